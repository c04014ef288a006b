"""The hub publisher (``collector --hub``) against a real redis-server and real processes.

* The hub holds exactly the host's own numbers (every counter, the runtime/wait counts as
  buckets, the failed ids with their FAILED records and payloads) and its workers.
* A replayed publish (the same or a lower seq, e.g. after a lost reply) changes nothing.
* Redis stopped mid-run and started again (with its data, and empty): the collector counts
  on locally and then catches up exactly; failed jobs added meanwhile appear, removed ones
  disappear.
* The collector ``kill -9``'d while its publish hangs in a paused Redis, then restarted:
  totals exact, no acknowledged failed job missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from qdash_testing.collector import CollectorProc, short_dir, wait_for
from qdash_testing.http import DashboardSession, get_json
from qdash_testing.redis_server import RedisServer, host_view, hub_host, mismatch, run_worker

from qdash_mp.hub.format import HostInfo, QueueRecord, encode_host, encode_queue
from qdash_mp.hub.publisher import SCRIPT, Publish, build_args

pytestmark = pytest.mark.slow

SETTLE = 60.0
"""Upper bound of a wait for the hub to equal the host (a loaded 2-core machine)."""


@pytest.fixture
def hub_collector(redis_server: RedisServer) -> Iterator[CollectorProc]:
    """A collector process publishing to ``redis_server`` as host ``h1`` (not started)."""
    d = short_dir()
    proc = CollectorProc(d, args=("--hub", redis_server.url, "--host-name", "h1"))
    yield proc
    proc.cleanup()
    shutil.rmtree(d, ignore_errors=True)


def settle(r: object, proc: CollectorProc, host: str = "h1") -> None:
    """Wait until the hub's copy of ``host`` equals its dashboard, to the unit."""
    last = [""]

    def same() -> bool:
        last[0] = mismatch(r, host, proc.http)
        return not last[0]

    try:
        wait_for(same, SETTLE, "the hub to equal the host", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last[0]}\n{proc.logs()[-3000:]}") from None


def test_hub_holds_exactly_the_hosts_numbers(
    redis_server: RedisServer, hub_collector: CollectorProc
) -> None:
    proc = hub_collector.start()
    run_worker(proc.socket, "mail", "m", pushed=700, processed=600, failed=40)
    run_worker(proc.socket, "sms", "s", pushed=50, processed=45, failed=3)
    r = redis_server.client()
    settle(r, proc)
    hub = hub_host(r, "h1")
    assert hub["queues"]["mail"].pushed == 700
    assert hub["queues"]["mail"].processed == 600
    assert hub["queues"]["mail"].failed == 40
    assert sum(hub["queues"]["mail"].runtime.values()) == 640  # processed + failed runtimes
    assert sum(hub["queues"]["mail"].wait.values()) == 600
    assert len(hub["fi"]) == 43
    rec = hub["fj"]["m-7"]
    assert (rec.queue, rec.error, rec.attempts) == ("mail", "RuntimeError: boom 7", 1)
    assert msgpack.unpackb(rec.payload_raw) == {"i": 7, "by": "m"}  # the payload, copied
    assert hub["fi"]["m-7"] == rec.failed_at
    assert hub["info"] is not None
    assert hub["info"].seq == hub["seq"]
    # the host's own detail page shows the same record
    own = get_json(proc.http + "/queues/api/failed/m-7")
    assert own["payload"] == {"i": 7, "by": "m"}
    assert own["traceback"] == rec.traceback
    # workers: the two clients came and went
    wait_for(
        lambda: (
            hub_host(r, "h1")["workers"] == get_json(proc.http + "/queues/api/workers")["workers"]
        ),
        SETTLE,
        "the hub's workers to be the host's",
    )
    assert len(hub["workers"]) == 2
    # the heartbeat goes on without traffic: seq and last_seen move
    seq = hub["seq"]
    wait_for(lambda: hub_host(r, "h1")["seq"] > seq, 10, "a heartbeat publish")


def test_a_replayed_publish_changes_nothing(
    redis_server: RedisServer, hub_collector: CollectorProc
) -> None:
    proc = hub_collector.start()
    run_worker(proc.socket, "mail", "m", pushed=20, processed=10, failed=2)
    r = redis_server.client()
    settle(r, proc)
    proc.stop()  # nothing publishes any more: what is in Redis stays put
    before = {k: r.dump(k) for k in r.keys("qdash:*")}
    applied = int(r.hget("qdash:seq", "h1"))
    script = r.register_script(SCRIPT)
    for seq in (applied, applied - 1, 1):
        old = Publish(
            seq=seq,
            host=encode_host(HostInfo(seq, 1.0, 1.0, "0", 1, ())),
            workers=b"\x90",
            queues=[("mail", encode_queue(QueueRecord(pushed=10**6)))],
            adds=[("m-0", "1.0", b"\x90")],
            removes=["m-1"],
        )
        flag, prev, commands = script(args=build_args("qdash:", "h1", old, 1.0, 10))
        assert (flag, int(prev), commands) == (0, applied, [])
    assert {k: r.dump(k) for k in r.keys("qdash:*")} == before


@pytest.mark.parametrize("persistent", [True, False], ids=["redis-keeps-data", "redis-empty"])
def test_redis_outage_then_exact_catch_up(persistent: bool) -> None:
    server = RedisServer(persistent=persistent).start()
    d = short_dir()
    requeued = d / "requeued"
    proc = CollectorProc(
        d,
        args=(
            "--hub",
            server.url,
            "--host-name",
            "h1",
            "--requeue",
            "qdash_testing.requeue:append",
        ),
        env={"QDASH_TEST_REQUEUE_FILE": str(requeued)},
    )
    try:
        proc.start()
        run_worker(proc.socket, "mail", "a", pushed=300, processed=250, failed=20)
        r = server.client()
        settle(r, proc)
        server.stop()
        # Redis away: the collector goes on counting, retrying and forgetting locally.
        run_worker(proc.socket, "mail", "b", pushed=200, processed=150, failed=15)
        run_worker(proc.socket, "other", "c", pushed=5, processed=5, failed=1)
        session = DashboardSession(proc.http)
        for id in ("a-0", "a-1", "b-0"):
            status, _ = session.post(f"/queues/failed/{id}/retry")
            assert status == 200
        for id in ("a-2", "b-1"):
            status, _ = session.post(f"/queues/failed/{id}/forget")
            assert status == 200
        stats = get_json(proc.http + "/queues/api/stats")
        assert stats["totals"]["pushed"] == 508  # 505 pushed + 3 retried
        server.start()
        r = server.client()
        settle(r, proc)
        hub = hub_host(r, "h1")
        assert {"b-2", "c-0", "a-3"} <= set(hub["fi"])
        assert not {"a-0", "a-1", "a-2", "b-0", "b-1"} & set(hub["fi"])
        assert hub["queues"]["mail"].retried == 3
        assert "reachable again" in proc.logs()
        # logged once, not every second
        assert proc.logs().count("unreachable") == 1
    finally:
        proc.cleanup()
        server.cleanup()
        shutil.rmtree(d, ignore_errors=True)


def paused_evalsha(r: object) -> bool:
    """Whether a client is held by CLIENT PAUSE with an EVALSHA (the publish in flight)."""
    clients = r.client_list()  # type: ignore[attr-defined]
    return any(c["cmd"] == "evalsha" and "b" in c["flags"] for c in clients)


def test_collector_killed_mid_publish_then_restarted(
    redis_server: RedisServer, hub_collector: CollectorProc
) -> None:
    proc = hub_collector.start()
    run_worker(proc.socket, "mail", "a", pushed=100, processed=80, failed=10)
    r = redis_server.client()
    settle(r, proc)
    run_worker(proc.socket, "mail", "b", pushed=100, processed=90, failed=10)
    acked = set(host_view(proc.http)["failed"])  # acknowledged: durable in the journal
    assert len(acked) == 20
    # Writes paused: the next publish is sent and hangs in Redis; then kill -9 the collector.
    r.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
    try:
        wait_for(lambda: paused_evalsha(r), 20, "a publish to hang in the paused Redis")
        proc.kill()
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
    proc.start()
    run_worker(proc.socket, "mail", "c", pushed=10, processed=10, failed=1)
    settle(r, proc)
    hub = hub_host(r, "h1")
    assert hub["queues"]["mail"].pushed == 210
    assert acked | {"c-0"} == set(hub["fi"])


def test_start_refuses_a_bad_hub_url_or_host_name(tmp_path: Path) -> None:
    import subprocess
    import sys

    for args in (["--hub", "http://x"], ["--hub", "redis://x", "--host-name", "a:b"]):
        out = subprocess.run(
            [sys.executable, "-m", "qdash_mp", "collector", "--data-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 2, out
        assert "--hub" in out.stderr or "--host-name" in out.stderr


def test_an_applied_seq_above_ours_is_overtaken_and_everything_republished(
    redis_server: RedisServer, hub_collector: CollectorProc
) -> None:
    """Another writer under the same host name (or a clock gone back) left a higher seq:
    the publisher moves above it and publishes everything again, so the hub is exact."""
    proc = hub_collector.start()
    run_worker(proc.socket, "mail", "m", pushed=30, processed=20, failed=3)
    r = redis_server.client()
    settle(r, proc)
    high = int(r.hget("qdash:seq", "h1")) + 10**9
    r.hset("qdash:seq", "h1", high)
    r.delete("qdash:q:h1", "qdash:fi:h1", "qdash:fj:h1", "qdash:fall")  # its "other" state
    settle(r, proc)
    assert int(r.hget("qdash:seq", "h1")) > high
    assert "publishing everything again above it" in proc.logs()
