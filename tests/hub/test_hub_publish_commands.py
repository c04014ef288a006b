"""Hub commands (``XADD qdash:cmd:{host}``) executed by the owning host, exactly once.

Real redis-server, real collector processes with a ``--requeue`` target that records every
requeue, real client processes. The test plays the hub: it XADDs the command and reads the
result key.
"""

from __future__ import annotations

import shutil
import time
import urllib.error
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qdash_testing.collector import CollectorProc, short_dir, wait_for
from qdash_testing.http import get_json
from qdash_testing.redis_server import RedisServer, hub_host, run_worker

from qdash_mp.hub.format_failed import Command, Result, decode_result, encode_command

pytestmark = pytest.mark.slow

WAIT = 60.0


def make_collector(d: Path, server: RedisServer, *, requeue: bool = True) -> CollectorProc:
    args: tuple[str, ...] = ("--hub", server.url, "--host-name", "h1")
    if requeue:
        args += ("--requeue", "qdash_testing.redis_server:requeue_then_pause")
    return CollectorProc(
        d,
        args=args,
        env={
            "QDASH_TEST_REQUEUE_FILE": str(d / "requeued"),
            "QDASH_TEST_REDIS_PORT": str(server.port),
        },
    )


@pytest.fixture
def host_dir() -> Iterator[Path]:
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def send(r: Any, op: str, id: str) -> str:
    """XADD a command like the hub does; returns its req."""
    req = uuid.uuid4().hex
    r.xadd("qdash:cmd:h1", encode_command(Command(op, id, req, "test", time.time())))
    return req


def result(r: Any, req: str) -> Result:
    data = wait_for(lambda: r.get(f"qdash:res:{req}"), WAIT, f"the result of {req}", 0.05)
    assert 0 < r.ttl(f"qdash:res:{req}") <= 3600
    return decode_result(data)


def requeued(d: Path) -> list[str]:
    path = d / "requeued"
    return path.read_text().split() if path.exists() else []


def in_journal(proc: CollectorProc, id: str) -> bool:
    try:
        get_json(f"{proc.http}/queues/api/failed/{id}")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
        return False
    return True


def test_retry_and_forget_from_the_hub_run_once_on_the_host(
    redis_server: RedisServer, host_dir: Path
) -> None:
    proc = make_collector(host_dir, redis_server)
    try:
        proc.start()
        run_worker(proc.socket, "mail", "j", pushed=5, processed=0, failed=5)
        r = redis_server.client()
        wait_for(lambda: len(hub_host(r, "h1")["fi"]) == 5, WAIT, "the failed jobs in the hub")
        req = send(r, "retry", "j-1")
        res = result(r, req)
        assert (res.ok, res.already, res.error, res.op, res.id) == (
            True,
            False,
            None,
            "retry",
            "j-1",
        )
        assert requeued(host_dir) == ["j-1"]
        # the result and the index change are one script call: gone from the hub already
        hub = hub_host(r, "h1")
        assert "j-1" not in hub["fi"]
        assert "j-1" not in hub["fj"]
        assert "h1\x00j-1" not in hub["fall"]
        assert not in_journal(proc, "j-1")
        assert r.xlen("qdash:cmd:h1") == 0
        stats = get_json(proc.http + "/queues/api/stats")["queues"][0]
        assert (stats["retried"], stats["pushed"]) == (1, 6)
        # again: the id is gone, nothing is requeued twice
        res = result(r, send(r, "retry", "j-1"))
        assert (res.ok, res.already) == (True, True)
        res = result(r, send(r, "forget", "j-2"))
        assert (res.ok, res.already) == (True, False)
        wait_for(lambda: "j-2" not in hub_host(r, "h1")["fi"], WAIT, "j-2 gone from the hub")
        assert not in_journal(proc, "j-2")
        # an offline host's commands wait in its stream, then run when it is back
        proc.stop()
        req = send(r, "retry", "j-3")
        assert r.xlen("qdash:cmd:h1") == 1
        proc.start()
        assert result(r, req).ok
        assert requeued(host_dir) == ["j-1", "j-3"]
        wait_for(lambda: set(hub_host(r, "h1")["fi"]) == {"j-0", "j-4"}, WAIT, "the hub index")
    finally:
        proc.cleanup()


def test_retry_without_a_requeue_route_keeps_the_job(
    redis_server: RedisServer, host_dir: Path
) -> None:
    proc = make_collector(host_dir, redis_server, requeue=False)
    try:
        proc.start()
        run_worker(proc.socket, "mail", "j", pushed=1, processed=0, failed=1)
        r = redis_server.client()
        wait_for(lambda: "j-0" in hub_host(r, "h1")["fi"], WAIT, "j-0 in the hub")
        res = result(r, send(r, "retry", "j-0"))
        assert not res.ok
        assert res.error is not None
        assert "no connected worker accepts retries" in res.error
        assert in_journal(proc, "j-0")
        assert "j-0" in hub_host(r, "h1")["fi"]
        assert r.xlen("qdash:cmd:h1") == 0
        # a broken entry is answered (when it names a req) and deleted, not retried forever
        r.xadd("qdash:cmd:h1", {"op": "drop", "id": "j-0", "req": "r-bad", "by": "", "at": "1"})
        res = result(r, "r-bad")
        assert not res.ok
        assert res.error is not None
        assert "unreadable command" in res.error
        wait_for(lambda: r.xlen("qdash:cmd:h1") == 0, WAIT, "the broken entry deleted")
        assert in_journal(proc, "j-0")
    finally:
        proc.cleanup()


def test_killed_between_requeue_and_ack_the_retry_is_not_repeated(
    redis_server: RedisServer, host_dir: Path
) -> None:
    proc = make_collector(host_dir, redis_server)
    r = redis_server.client()
    try:
        proc.start()
        run_worker(proc.socket, "mail", "pause", pushed=2, processed=0, failed=2)
        wait_for(lambda: len(hub_host(r, "h1")["fi"]) == 2, WAIT, "the failed jobs in the hub")
        req = send(r, "retry", "pause-0")
        # The requeue target pauses Redis writes right after requeueing: the publish that
        # would acknowledge the retry hangs. Once the drop is durable, kill -9.
        wait_for(lambda: requeued(host_dir) == ["pause-0"], WAIT, "the requeue")
        wait_for(lambda: not in_journal(proc, "pause-0"), WAIT, "the journal drop")
        wait_for(
            lambda: any(c["cmd"] == "evalsha" and "b" in c["flags"] for c in r.client_list()),
            WAIT,
            "the acknowledging publish to hang",
        )
        assert r.get(f"qdash:res:{req}") is None
        proc.kill()
        r.execute_command("CLIENT", "UNPAUSE")
        proc.start()
        res = result(r, req)
        assert res.ok
        assert requeued(host_dir) == ["pause-0"]  # exactly once
        wait_for(
            lambda: set(hub_host(r, "h1")["fi"]) == {"pause-1"}, WAIT, "pause-0 gone from the hub"
        )
        assert r.xlen("qdash:cmd:h1") == 0
        assert get_json(proc.http + "/queues/api/stats")["queues"][0]["retried"] == 1
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        proc.cleanup()
