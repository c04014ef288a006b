"""The hub's dashboard (``HubInspector`` + ``hub_app``) over a real redis-server, with host
data written through ``qdash_mp.hub.format`` exactly as publishers write it.

What is proved here: totals are exact sums and percentiles come from summed buckets (equal
to the summary of the union of values); per-host rows equal each host's own view; stale
hosts keep their counts; ``?host=`` narrows every route and an unknown host is a 404;
failed jobs page newest first across hosts with ``id@host`` ids; retry/forget go to the
owning host's command stream, are answered from ``res:{req}``, and a stale host's command is
answered 202 "queued" and stays visible; the stats view is reused while no seq changed.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from qdash_testing.http import csrf_token_in, get_json
from qdash_testing.netns import RedisServer

from qdash_mp.histogram import count_values, sparse, summary
from qdash_mp.hub.app import hub_app
from qdash_mp.hub.format import (
    HostInfo,
    QueueRecord,
    encode_host,
    encode_point,
    encode_queue,
    encode_workers,
)
from qdash_mp.hub.format_failed import Result, decode_command, encode_result, fall_member
from qdash_mp.hub.inspector import HubInspector
from qdash_mp.hub.keys import Keys
from qdash_mp.models import Job
from qdash_mp.records import FailedRecord, pack_failed

K = Keys()


@pytest.fixture(scope="module")
def view_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture
async def r(view_redis: RedisServer) -> AsyncIterator[Any]:
    client = aioredis.from_url(view_redis.url())
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


def _values(seed: int, n: int) -> list[float]:
    rnd = random.Random(seed)
    return [rnd.lognormvariate(-3, 1.5) for _ in range(n)]


def _record(seed: int, n: int, **kw: Any) -> QueueRecord:
    rt = [0] * 418
    count_values(rt, _values(seed, n))
    wt = [0] * 418
    count_values(wt, _values(seed + 1000, n))
    base = {"pushed": n + 5, "processed": n, "failed": 2, "retried": 1, "active": 1}
    base.update(kw)
    return QueueRecord(**base, throughput=float(n) / 10, runtime=sparse(rt), wait=sparse(wt))


async def publish(
    r: Any,
    host: str,
    seq: int,
    queues: dict[str, QueueRecord],
    *,
    last_seen: float | None = None,
) -> None:
    """What one publish leaves in Redis for ``host`` (queues, host info)."""
    info = HostInfo(seq, last_seen if last_seen is not None else time.time(), 1.0, "t", 7)
    pipe = r.pipeline(transaction=True)
    if queues:
        pipe.hset(K.q(host), mapping={q: encode_queue(rec) for q, rec in queues.items()})
    pipe.hset(K.hosts, host, encode_host(info))
    pipe.hset(K.seq, host, seq)
    await pipe.execute()


async def add_failed(r: Any, host: str, job_id: str, failed_at: float, queue: str = "q") -> None:
    rec = FailedRecord.from_job(
        Job(job_id, "Task", {"n": job_id}, 1), queue, f"boom {job_id}", "tb", failed_at
    )
    pipe = r.pipeline(transaction=True)
    pipe.hset(K.fj(host), job_id, pack_failed(rec))
    pipe.zadd(K.fi(host), {job_id: failed_at})
    pipe.zadd(K.fall, {fall_member(host, job_id): failed_at})
    await pipe.execute()


async def remove_failed(r: Any, host: str, job_id: str) -> None:
    pipe = r.pipeline(transaction=True)
    pipe.hdel(K.fj(host), job_id)
    pipe.zrem(K.fi(host), job_id)
    pipe.zrem(K.fall, fall_member(host, job_id))
    await pipe.execute()


async def client_for(aiohttp_client: Any, inspector: HubInspector) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(hub_app(inspector))
    return client


# -- stats ---------------------------------------------------------------------------------


async def test_totals_are_exact_sums_and_percentiles_come_from_summed_buckets(r: Any) -> None:
    a = {"mail": _record(1, 500), "pdf": _record(2, 50)}
    b = {"mail": _record(3, 2000, active=3)}
    await publish(r, "a", 4, a)
    await publish(r, "b", 9, b)
    view = await HubInspector(r, max_lag=0).stats()
    mail = view.queue("mail")
    assert mail is not None
    assert mail.pushed == 505 + 2005
    assert mail.processed == 2500
    assert mail.failed == 4
    assert mail.retried == 2
    assert mail.active == 4
    assert mail.pending == mail.pushed - mail.processed - mail.failed
    # the union of both hosts' values, bucketed once, has exactly these percentiles
    union = [0] * 418
    count_values(union, _values(1, 500) + _values(3, 2000))
    assert mail.runtime == summary(union)
    assert mail.runtime.count == 2500
    totals = view.totals
    assert totals.processed == 2550
    assert totals.pushed == 505 + 55 + 2005
    every = [0] * 418
    count_values(every, _values(1, 500) + _values(2, 50) + _values(3, 2000))
    assert totals.runtime == summary(every)
    assert totals.throughput == pytest.approx(255.0)


async def test_per_host_rows_equal_each_hosts_own_view(r: Any, aiohttp_client: Any) -> None:
    a = {"mail": _record(1, 30), "pdf": _record(2, 7)}
    b = {"mail": _record(3, 11)}
    await publish(r, "a", 1, a)
    await publish(r, "b", 1, b)
    client = await client_for(aiohttp_client, HubInspector(r, max_lag=0))
    doc = await (await client.get("/queues/api/stats")).json()
    assert set(doc["hosts"]) == {"a", "b"}
    for name, queues in (("a", a), ("b", b)):
        row = doc["hosts"][name]
        assert row["stale"] is False
        assert row["seq"] == 1
        assert row["queued"] == 0
        assert set(row["queues"]) == set(queues)
        one = await (await client.get("/queues/api/stats", params={"host": name})).json()
        # ?host=NAME is that host's own document, and the same as its row
        assert {q["queue"]: q for q in one["queues"]} == row["queues"]
        assert one["totals"] == row["totals"]
        assert list(one["hosts"]) == [name]
    summed = sum(doc["hosts"][h]["totals"]["processed"] for h in ("a", "b"))
    assert doc["totals"]["processed"] == summed == 48


async def test_stale_host_keeps_its_counts(r: Any) -> None:
    await publish(r, "a", 3, {"q": _record(1, 10)}, last_seen=time.time() - 60)
    await publish(r, "b", 3, {"q": _record(2, 20)})
    view = await HubInspector(r, max_lag=0).stats()
    assert view.hosts["a"]["stale"] is True
    assert view.hosts["b"]["stale"] is False
    assert view.totals.processed == 30  # the stale host's jobs did happen
    assert view.hosts["a"]["totals"]["throughput"] == 0.0
    q = view.queue("q")
    assert q is not None
    assert q.throughput == pytest.approx(2.0)


async def test_view_is_reused_until_a_seq_changes(r: Any) -> None:
    await publish(r, "a", 1, {"q": _record(1, 10)})
    ins = HubInspector(r, max_lag=0)
    first = await ins.stats()
    assert await ins.stats() is first
    await publish(r, "a", 2, {"q": _record(1, 11)})
    second = await ins.stats()
    assert second is not first
    assert second.totals.processed == 11
    # a new host shows up on the next read
    await publish(r, "b", 1, {"q": _record(2, 5)})
    assert (await ins.stats()).totals.processed == 16


async def test_a_load_in_flight_serves_the_last_view_for_max_lag(r: Any) -> None:
    await publish(r, "a", 1, {"q": _record(1, 10)})
    ins = HubInspector(r, max_lag=60)
    first = await ins.stats()
    await publish(r, "a", 2, {"q": _record(1, 11)})
    assert first.totals.processed == 10
    # not waited for: the load runs in the background, the records already read answer
    assert (await ins.stats()).totals.processed == 10
    for _ in range(500):  # bounded: the load is one pipelined read
        view = await ins.stats()
        if view.totals.processed == 11:
            break
        await asyncio.sleep(0.01)
    assert view.totals.processed == 11
    assert view.hosts["a"]["seq"] == 2
    slow = HubInspector(r, max_lag=0)
    await slow.stats()
    await publish(r, "a", 3, {"q": _record(1, 12)})
    assert (await slow.stats()).totals.processed == 12  # past max_lag: waits for the load


async def test_unknown_host_is_404_and_pages_take_the_filter(r: Any, aiohttp_client: Any) -> None:
    await publish(r, "a", 1, {"alpha": _record(1, 3)})
    await publish(r, "b", 1, {"beta": _record(2, 3)})
    client = await client_for(aiohttp_client, HubInspector(r, max_lag=0))
    resp = await client.get("/queues/api/stats", params={"host": "nope"})
    assert resp.status == 404
    assert "nope" in (await resp.json())["error"]
    page = await (await client.get("/queues/", params={"host": "a"})).text()
    assert "alpha" in page
    assert "beta" not in page
    page = await (await client.get("/queues/")).text()
    assert "alpha" in page
    assert "beta" in page
    assert (await client.get("/queues/q/alpha", params={"host": "a"})).status == 200
    assert (await client.get("/queues/q/alpha", params={"host": "b"})).status == 404
    assert (await client.get("/queues/api/openapi.json", params={"host": "a"})).status == 200
    hosts = await client.get("/queues/hosts")
    assert hosts.status == 200
    text = await hosts.text()
    assert "?host=a" in text
    assert "?host=b" in text


# -- history and workers -------------------------------------------------------------------


def _point(t: int, n: int, p50: float | None = None) -> dict[str, Any]:
    s = {"count": 0, "p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    if p50 is not None:
        s = {"count": n, "p50": p50, "p90": p50, "p95": p50, "p99": p50, "max": p50 * 2}
    return {"t": t, "pushed": n, "processed": n, "failed": 0, "runtime": s}


async def test_history_merges_points_per_minute(r: Any, aiohttp_client: Any) -> None:
    now = int(time.time()) // 60 * 60
    await publish(r, "a", 1, {"q": _record(1, 1)})
    await publish(r, "b", 1, {"q": _record(2, 1)})
    await r.hset(K.hm("a", "q"), mapping={now - 120: encode_point(_point(now - 120, 5, 0.5))})
    await r.hset(
        K.hm("b", "q"),
        mapping={
            now - 120: encode_point(_point(now - 120, 7, 0.25)),
            now - 60: encode_point(_point(now - 60, 2, 0.125)),
        },
    )
    client = await client_for(aiohttp_client, HubInspector(r, max_lag=0))
    doc = await (await client.get("/queues/api/history", params={"queue": "q"})).json()
    pts = doc["points"]
    assert [p["t"] for p in pts] == [now - 120, now - 60]
    assert pts[0]["processed"] == 12
    assert pts[0]["runtime"]["count"] == 12
    assert pts[0]["runtime"]["max"] == 1.0
    assert pts[0]["runtime"]["p50"] is None
    assert pts[1]["runtime"]["p50"] == 0.125  # one host: its summary as it is
    one = await (await client.get("/queues/api/history", params={"queue": "q", "host": "a"})).json()
    assert [p["processed"] for p in one["points"]] == [5]


async def test_workers_carry_the_publishing_host(r: Any, aiohttp_client: Any) -> None:
    await publish(r, "a", 1, {})
    row = {
        "id": "w1",
        "pid": 11,
        "host": "box",
        "name": "worker-1",
        "queues": ["q"],
        "connected_at": 1.0,
        "last_seen": 2.0,
        "active": [{"queue": "q", "id": "j", "name": "T", "started_at": 1.5}],
        "state": "connected",
        "can_requeue": True,
    }
    await r.set(K.w("a"), encode_workers([row]))
    client = await client_for(aiohttp_client, HubInspector(r, max_lag=0))
    doc = await (await client.get("/queues/api/workers")).json()
    assert doc["workers"] == [{**row, "host": "a"}]
    assert (await client.get("/queues/workers")).status == 200


# -- failed jobs and commands --------------------------------------------------------------


async def test_failed_pages_newest_first_across_hosts(r: Any, aiohttp_client: Any) -> None:
    await publish(r, "a", 1, {})
    await publish(r, "b", 1, {})
    t0 = 1_700_000_000.0
    for i in range(60):
        await add_failed(r, "a" if i % 3 else "b", f"j{i}", t0 + i)
    await add_failed(r, "b", "j5", t0 + 100)  # the same id on another host
    client = await client_for(aiohttp_client, HubInspector(r, max_lag=0))
    p1 = await (await client.get("/queues/api/failed")).json()
    assert p1["total"] == 61
    assert p1["pages"] == 2
    ids = [j["id"] for j in p1["jobs"]]
    assert ids[0] == "j5@b"
    assert ids[1] == "j59@a"
    assert len(ids) == 50
    p2 = await (await client.get("/queues/api/failed", params={"page": 2})).json()
    assert [j["id"] for j in p2["jobs"]][-1] == "j0@b"
    only_b = await (await client.get("/queues/api/failed", params={"host": "b"})).json()
    assert only_b["total"] == 21
    assert all(j["id"].endswith("@b") for j in only_b["jobs"])
    job = await (await client.get("/queues/api/failed/j5@b")).json()
    assert job["payload"] == {"n": "j5"}
    assert job["traceback"] == "tb"
    assert (await client.get("/queues/api/failed/j5")).status == 404  # ambiguous
    assert (await client.get("/queues/api/failed/j7")).status == 200  # only on a
    assert (await client.get("/queues/failed/j5@a")).status == 200
    assert (await client.get("/queues/failed")).status == 200


async def _answer(r: Any, host: str, *, ok: bool = True, remove: bool = True) -> Any:
    """Play the host's side of one command (what ``qdash_mp.hub.commands`` does), for the
    hub-only tests; the netns tests run the real collector."""
    for _ in range(200):
        entries = await r.xrange(K.cmd(host))
        if entries:
            break
        await asyncio.sleep(0.01)
    entry_id, fields = entries[0]
    cmd = decode_command(fields)
    if ok and remove:
        await remove_failed(r, host, cmd.id)
    result = Result(ok, False, None if ok else "broker down", cmd.op, cmd.id, time.time())
    await r.set(K.res(cmd.req), encode_result(result), ex=3600)
    await r.xdel(K.cmd(host), entry_id)
    return cmd


async def test_retry_goes_to_the_owning_host_and_waits_for_its_answer(
    r: Any, aiohttp_client: Any
) -> None:
    await publish(r, "a", 1, {})
    await publish(r, "b", 1, {})
    await add_failed(r, "a", "j1", 1.0)
    await add_failed(r, "b", "j1", 2.0)
    client = await client_for(aiohttp_client, HubInspector(r, max_lag=0))
    token = csrf_token_in(await (await client.get("/queues/failed")).text())
    host_side = asyncio.create_task(_answer(r, "b"))
    resp = await client.post(
        "/queues/failed/j1@b/retry",
        data={"csrf_token": token},
        headers={"Accept": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    cmd = await host_side
    assert (cmd.op, cmd.id) == ("retry", "j1")
    assert await r.xlen(K.cmd("a")) == 0  # nothing went to the other host
    assert await r.zscore(K.fi("a"), "j1") == 1.0
    # a refusal on the host is a 409 and the job stays
    await add_failed(r, "b", "j2", 3.0)
    host_side = asyncio.create_task(_answer(r, "b", ok=False))
    resp = await client.post(
        "/queues/failed/j2@b/retry",
        data={"csrf_token": token},
        headers={"Accept": "application/json"},
    )
    assert resp.status == 409
    assert "broker down" in (await resp.json())["error"]
    await host_side


async def test_offline_hosts_retry_is_queued_and_visible(r: Any, aiohttp_client: Any) -> None:
    await publish(r, "gone", 5, {"q": _record(1, 3)}, last_seen=time.time() - 3600)
    await add_failed(r, "gone", "j1", 1.0)
    client = await client_for(aiohttp_client, HubInspector(r, max_lag=0))
    token = csrf_token_in(await (await client.get("/queues/failed")).text())
    t = time.monotonic()
    resp = await client.post(
        "/queues/failed/j1@gone/retry",
        data={"csrf_token": token},
        headers={"Accept": "application/json"},
    )
    assert time.monotonic() - t < 2.0  # a stale host is not waited for
    assert resp.status == 202
    body = await resp.json()
    assert body["queued"] is True
    assert body["host"] == "gone"
    assert body["ok"] is True
    entries = await r.xrange(K.cmd("gone"))
    assert len(entries) == 1
    assert decode_command(entries[0][1]).id == "j1"
    doc = await (await client.get("/queues/api/stats")).json()
    assert doc["hosts"]["gone"]["queued"] == 1
    assert doc["hosts"]["gone"]["stale"] is True
    failed = await (await client.get("/queues/api/failed")).json()
    assert [j["id"] for j in failed["jobs"]] == ["j1@gone"]  # still listed until it ran
    # a browser gets a 303 back with the message
    resp = await client.post(
        "/queues/failed/j1@gone/forget", data={"csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303
    assert await r.xlen(K.cmd("gone")) == 2


async def test_flush_sends_a_forget_per_job_to_each_host(r: Any, aiohttp_client: Any) -> None:
    await publish(r, "a", 1, {})
    await publish(r, "b", 1, {})
    for i in range(3):
        await add_failed(r, "a", f"a{i}", float(i))
    await add_failed(r, "b", "b0", 9.0)
    ins = HubInspector(r, max_lag=0)
    assert await ins.flush_failed() == 4
    got = {decode_command(f).id for _, f in await r.xrange(K.cmd("a"))}
    assert got == {"a0", "a1", "a2"}
    assert [decode_command(f).op for _, f in await r.xrange(K.cmd("b"))] == ["forget"]


# -- qdash-mp hub --------------------------------------------------------------------------


def _hub_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qdash_mp", "hub", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_refuses_a_public_address_without_auth(view_redis: RedisServer) -> None:
    proc = _hub_cli("--redis", view_redis.url(), "--http", "0.0.0.0:0")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "--auth-token-file" in err
    proc = _hub_cli("--redis", "http://nope", "--http", "127.0.0.1:0")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "redis://" in err


def test_cli_serves_the_hub_and_stops_on_sigterm(view_redis: RedisServer) -> None:
    async def seed() -> None:
        client = aioredis.from_url(view_redis.url(db=3))
        await client.flushdb()
        await publish(client, "h1", 2, {"q": _record(1, 9)})
        await client.aclose()

    asyncio.run(seed())
    with _hub_cli("--redis", view_redis.url(db=3), "--http", "127.0.0.1:0") as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "qdash-mp hub: dashboard at URL"
            assert "dashboard at http://127.0.0.1:" in line
            url = line.rsplit(" ", 1)[1].strip()
            doc = get_json(url + "api/stats")
            assert doc["totals"]["processed"] == 9
            assert doc["hosts"]["h1"]["seq"] == 2
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


async def test_the_preencoded_body_is_the_document(r: Any, aiohttp_client: Any) -> None:
    """``/queues/api/stats`` is assembled from cached JSON parts: it must be exactly the
    view's ``to_dict()`` (all hosts, one host, a stale host)."""
    await publish(r, "a", 1, {"x": _record(1, 30), "y": _record(2, 3)})
    await publish(r, "b", 4, {"x": _record(3, 11)}, last_seen=time.time() - 60)
    ins = HubInspector(r, max_lag=0)
    client = await client_for(aiohttp_client, ins)
    for params in ({}, {"host": "a"}, {"host": "b"}):
        resp = await client.get("/queues/api/stats", params=params)
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        body = await resp.json()
        view = await ins.reader.view(params.get("host"))
        assert body == json.loads(json.dumps(view.to_dict()))
    assert body["hosts"]["b"]["stale"] is True
    assert body["totals"]["throughput"] == 0.0  # b's rate is not a rate any more


async def test_hub_responses_validate_against_the_openapi_document(
    r: Any, aiohttp_client: Any
) -> None:
    from jsonschema import Draft202012Validator

    from qdash_mp.web.openapi import OPENAPI

    def validate(path: str, method: str, status: int, body: Any) -> None:
        op = OPENAPI["paths"][path][method]
        assert str(status) in op["responses"], f"{method} {path} {status} undocumented"
        assert any(p["name"] == "host" for p in op.get("parameters", [])) or method == "post"
        schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
        Draft202012Validator({**OPENAPI, "$ref": "#/x", "x": schema}).validate(body)

    await publish(r, "a", 1, {"q": _record(1, 5)})
    await publish(r, "gone", 1, {"q": _record(2, 5)}, last_seen=time.time() - 3600)
    await add_failed(r, "gone", "j1", 1.0)
    client = await client_for(aiohttp_client, HubInspector(r, max_lag=0))
    for url, path in (
        ("/queues/api/stats", "/queues/api/stats"),
        ("/queues/api/stats?host=a", "/queues/api/stats"),
        ("/queues/api/failed?host=gone", "/queues/api/failed"),
        ("/queues/api/failed/j1@gone", "/queues/api/failed/{id}"),
        ("/queues/api/workers?host=a", "/queues/api/workers"),
    ):
        resp = await client.get(url)
        validate(path, "get", resp.status, await resp.json())
    token = csrf_token_in(await (await client.get("/queues/failed")).text())
    resp = await client.post(
        "/queues/failed/j1@gone/retry",
        data={"csrf_token": token},
        headers={"Accept": "application/json"},
    )
    validate("/queues/failed/{id}/retry", "post", resp.status, await resp.json())
    assert resp.status == 202


async def test_the_event_stream_carries_the_hosts(r: Any, aiohttp_client: Any) -> None:
    await publish(r, "a", 1, {"q": _record(1, 5)})
    client = await client_for(aiohttp_client, HubInspector(r, max_lag=0))
    resp = await client.get("/queues/api/events", params={"once": "1"})
    assert resp.status == 200
    text = await resp.text()
    assert "event: stats" in text
    data = next(line for line in text.splitlines() if line.startswith('data: {"queues"'))
    assert json.loads(data[len("data: ") :])["hosts"]["a"]["totals"]["processed"] == 5


async def test_read_only_hub_refuses_commands(r: Any, aiohttp_client: Any) -> None:
    from qdash_mp.access_settings import AccessSettings

    await publish(r, "a", 1, {})
    await add_failed(r, "a", "j1", 1.0)
    app = hub_app(HubInspector(r, max_lag=0), access=AccessSettings(read_only=True))
    client = await aiohttp_client(app)
    page = await (await client.get("/queues/failed")).text()
    assert "j1@a" in page
    resp = await client.post(
        "/queues/failed/j1@a/retry",
        data={"csrf_token": "refused before CSRF is looked at"},
        headers={"Accept": "application/json"},
    )
    assert resp.status == 403
    assert await r.xlen(K.cmd("a")) == 0  # nothing was sent to the host
