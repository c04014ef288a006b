"""The hub's failed list with filters, snapshots and bulk actions (``FailedQueries`` over
Redis), against a real redis-server, with the failed entries written by the real
``publish.lua`` (so the arrival sequence is the one hosts write).

What is proved: ``queue``/``name``/``q``/``after``/``before`` narrow the list across hosts and
with ``?host=``, ``X-Total-Count`` counts every match; a snapshot bounds the list and the
bulk actions (failures that arrived later, and a job that failed again, are not acted on;
a reconciliation re-sending the same bytes does not make an entry new); ``since`` counts the
new ones; bulk retry/forget queue one command per job to its owning host without waiting for
each answer; the flush with a snapshot forgets what the page counted only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from qdash_testing.http import csrf_token_in

from qdash_mp.failed_filter import FailedFilter
from qdash_mp.hub.app import hub_app
from qdash_mp.hub.format import HostInfo, encode_host
from qdash_mp.hub.format_failed import decode_command, fall_member
from qdash_mp.hub.inspector import HubInspector
from qdash_mp.hub.keys import Keys
from qdash_mp.hub.publisher import SCRIPT, Publish, build_args
from qdash_mp.models import Job
from qdash_mp.records import FailedRecord, pack_failed

K = Keys()
T0 = 1_700_000_000.0


class Host:
    """Publishes failed entries for one host through the real script."""

    def __init__(self, r: Any, name: str, requeue: tuple[str, ...] = ("*",)) -> None:
        self.r = r
        self.name = name
        self.seq = 0
        self.requeue = requeue
        self.script = r.register_script(SCRIPT)

    async def publish(
        self,
        adds: Sequence[tuple[str, str, float, str, str]] = (),
        removes: Sequence[str] = (),
    ) -> None:
        """``adds``: (id, queue, failed_at, name, error)."""
        self.seq += 1
        info = HostInfo(self.seq, time.time(), 1.0, "t", 7, self.requeue)
        p = Publish(self.seq, encode_host(info))
        for id, queue, at, name, error in adds:
            rec = FailedRecord.from_job(Job(id, name, {"n": id}, 1), queue, error, "tb", at)
            p.adds.append((id, repr(at), pack_failed(rec)))
        p.removes = list(removes)
        reply = await self.script(args=build_args("qdash:", self.name, p, time.time(), 0))
        assert reply[0] == 1


async def client_for(aiohttp_client: Any, r: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(hub_app(HubInspector(r, max_lag=0)))
    return client


async def two_hosts(r: Any) -> tuple[Host, Host]:
    a, b = Host(r, "a"), Host(r, "b", requeue=("mail",))
    await a.publish(
        [
            (f"a{i}", "mail" if i % 2 else "pdf", T0 + i, "send" if i < 6 else "render", f"E{i}")
            for i in range(10)
        ]
    )
    await b.publish(
        [
            (f"b{i}", "mail", T0 + 100 + i, "send", "SMTP timeout" if i < 3 else "x")
            for i in range(5)
        ]
    )
    return a, b


async def api(client: TestClient[Any, Any], **params: str) -> tuple[dict[str, Any], Any]:
    resp = await client.get("/queues/api/failed", params=params)
    assert resp.status == 200, await resp.text()
    return await resp.json(), resp.headers


async def test_filters_narrow_the_list_across_hosts(r: Any, aiohttp_client: Any) -> None:
    await two_hosts(r)
    client = await client_for(aiohttp_client, r)
    doc, headers = await api(client)
    assert doc["total"] == 15
    assert headers["X-Total-Count"] == "15"
    assert [j["id"] for j in doc["jobs"]][:2] == ["b4@b", "b3@b"]  # newest first
    doc, headers = await api(client, queue="mail")
    assert doc["total"] == 10  # a1 a3 ... a9 and b0..b4
    assert all(j["queue"] == "mail" for j in doc["jobs"])
    doc, _ = await api(client, queue="mail", name="send", q="smtp")
    assert [j["id"] for j in doc["jobs"]] == ["b2@b", "b1@b", "b0@b"]
    doc, _ = await api(client, after=str(T0 + 3), before=str(T0 + 7))
    assert [j["id"] for j in doc["jobs"]] == ["a6@a", "a5@a", "a4@a", "a3@a"]
    doc, headers = await api(client, host="a", queue="mail")
    assert headers["X-Total-Count"] == "5"
    assert {j["id"] for j in doc["jobs"]} == {f"a{i}@a" for i in (1, 3, 5, 7, 9)}
    doc, _ = await api(client, name="render", page="2")
    assert doc["total"] == 4
    assert doc["jobs"] == []
    assert (await client.get("/queues/api/failed", params={"after": "nonsense"})).status == 400
    page = await client.get("/queues/failed", params={"queue": "pdf"})
    assert page.status == 200
    assert "a8@a" in await page.text()


async def test_pages_of_a_filter_follow_failed_at(r: Any, aiohttp_client: Any) -> None:
    a = Host(r, "a")
    b = Host(r, "b")
    await a.publish([(f"a{i}", "q", T0 + 2 * i, "t", "e") for i in range(40)])
    await b.publish([(f"b{i}", "q", T0 + 2 * i + 1, "t", "e") for i in range(40)])
    client = await client_for(aiohttp_client, r)
    p1, _ = await api(client)
    p2, _ = await api(client, page="2")
    ids = [j["id"] for j in p1["jobs"] + p2["jobs"]]
    want = [f"{'b' if k % 2 else 'a'}{k // 2}@{'b' if k % 2 else 'a'}" for k in range(79, -1, -1)]
    assert ids == want
    # the same pages through a scan (a text filter every job matches)
    s1, _ = await api(client, q="E")
    s2, _ = await api(client, q="E", page="2")
    assert [j["id"] for j in s1["jobs"] + s2["jobs"]] == want
    assert s1["total"] == 80
    ranged, _ = await api(client, after=str(T0 + 10), before=str(T0 + 20))
    assert [j["id"] for j in ranged["jobs"]] == want[-20:-10]


async def test_a_snapshot_bounds_the_list_and_the_bulk_forget(r: Any, aiohttp_client: Any) -> None:
    a, b = await two_hosts(r)
    client = await client_for(aiohttp_client, r)
    token = csrf_token_in(await (await client.get("/queues/failed")).text())
    doc, headers = await api(client, queue="mail")
    snap = headers["X-Qdash-Snapshot"]
    assert doc["total"] == 10
    # after the operator looked: a new failure, a job that failed again (new bytes), and a
    # reconciliation re-sending an unchanged record
    await b.publish([("b9", "mail", T0 + 500, "send", "later")])
    await b.publish([("b0", "mail", T0 + 600, "send", "again")])
    await a.publish([("a1", "mail", T0 + 1, "send", "E1")])  # the same bytes as before
    doc, headers = await api(client, queue="mail", snapshot=snap)
    assert doc["total"] == 9  # b0 failed again: not what the page counted
    assert "b9@b" not in {j["id"] for j in doc["jobs"]}
    new, _ = await api(client, queue="mail", since=snap)
    assert {j["id"] for j in new["jobs"]} == {"b9@b", "b0@b"}
    new, headers = await api(client, since=snap)
    assert [j["id"] for j in new["jobs"]] == ["b0@b", "b9@b"]
    assert headers["X-Total-Count"] == "2"
    seen, _ = await api(client, snapshot=snap)  # no text filter: the page without a scan
    assert seen["total"] == 14  # 16 listed now, minus b9 (later) and b0 (failed again)
    assert {"b0@b", "b9@b"}.isdisjoint(j["id"] for j in seen["jobs"])
    t = time.monotonic()
    resp = await client.post(
        "/queues/failed/forget",
        data={"csrf_token": token, "queue": "mail", "snapshot": snap},
        headers={"Accept": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    assert time.monotonic() - t < 2.0  # queued, not waited for
    body = await resp.json()
    assert body["done"] == 9
    sent_a = {decode_command(f).id for _, f in await r.xrange(K.cmd("a"))}
    sent_b = {decode_command(f).id for _, f in await r.xrange(K.cmd("b"))}
    assert sent_a == {"a1", "a3", "a5", "a7", "a9"}
    assert sent_b == {"b1", "b2", "b3", "b4"}  # not b9 (later), not b0 (failed again)
    assert {decode_command(f).op for _, f in await r.xrange(K.cmd("b"))} == {"forget"}


async def test_bulk_retry_queues_a_command_per_job_without_waiting(
    r: Any, aiohttp_client: Any
) -> None:
    await two_hosts(r)
    client = await client_for(aiohttp_client, r)
    token = csrf_token_in(await (await client.get("/queues/failed")).text())
    ids = ["a1@a", "a3@a", "b2@b", "nope@a"]
    t = time.monotonic()
    resp = await client.post(
        "/queues/failed/retry",
        data=[("csrf_token", token)] + [("ids", i) for i in ids],
        headers={"Accept": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    assert time.monotonic() - t < 2.0  # the hosts never answer here: nothing waited 3 s each
    body = await resp.json()
    assert (body["done"], body["skipped"]) == (3, 1)
    cmds_a = [decode_command(f) for _, f in await r.xrange(K.cmd("a"))]
    assert [(c.op, c.id) for c in cmds_a] == [("retry", "a1"), ("retry", "a3")]
    assert [decode_command(f).id for _, f in await r.xrange(K.cmd("b"))] == ["b2"]
    # a single retry still waits for the host's answer (then reports it queued)
    ins = HubInspector(r, max_lag=0, command_wait=0.2)
    from qdash_mp.errors import RetryQueued

    with pytest.raises(RetryQueued):
        await ins.retry("a5@a")


async def test_flush_with_a_snapshot_forgets_what_the_page_counted(
    r: Any, aiohttp_client: Any
) -> None:
    a, _ = await two_hosts(r)
    client = await client_for(aiohttp_client, r)
    page = await (await client.get("/queues/failed", params={"host": "a"})).text()
    token = csrf_token_in(page)
    _, headers = await api(client, host="a")
    snap = headers["X-Qdash-Snapshot"]
    await a.publish([("late", "mail", T0 + 900, "send", "x")])
    resp = await client.post(
        "/queues/failed/flush?host=a",
        data={"csrf_token": token, "snapshot": snap},
        headers={"Accept": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["flushed"] == 10
    sent = {decode_command(f).id for _, f in await r.xrange(K.cmd("a"))}
    assert sent == {f"a{i}" for i in range(10)}
    assert await r.xlen(K.cmd("b")) == 0


async def test_arrival_sequence_epoch_and_can_retry(r: Any) -> None:
    a, b = await two_hosts(r)
    ins = HubInspector(r, max_lag=0)
    await ins.stats()
    epoch = await ins.refresh_epoch()
    assert epoch
    assert ins.failed_epoch == epoch
    seq = await ins.failed_seq("a3@a")
    assert seq is not None
    assert seq > 0
    await a.publish([("a3", "pdf", T0 + 3, "send", "E3")])  # failed again (another record)
    assert (await ins.failed_seq("a3@a") or 0) > seq
    assert await ins.failed_seq("nope") is None
    await a.publish(removes=["a3"])
    assert await r.zscore(K.fseqz, fall_member("a", "a3")) is None
    assert ins.can_retry("pdf")  # host a: every queue
    page = await ins.failed_query(FailedFilter(queue="mail"), 1)
    assert page.total == 9
    assert page.epoch == epoch
    assert await ins.failed_history("a1@a") == []
    await r.flushdb()  # Redis lost everything: old snapshots are from another run
    assert await ins.refresh_epoch() != epoch
    await b.publish([("b0", "mail", T0, "send", "x")])
    assert sorted(await ins.failed_ids(FailedFilter(), 10**9)) == ["b0@b"]


async def test_the_nav_links_the_hosts_page_and_carries_the_host(
    r: Any, aiohttp_client: Any
) -> None:
    await two_hosts(r)
    client = await client_for(aiohttp_client, r)
    html = await (await client.get("/queues/failed", params={"host": "a"})).text()
    assert 'href="/queues/hosts"' in html
    for link in ("/queues/?host=a", "/queues/workers?host=a", "/queues/failed?host=a"):
        assert f'href="{link}"' in html, link
    assert "/queues/api/stats?host=a" in html
    html = await (await client.get("/queues/")).text()
    assert 'href="/queues/hosts"' in html
    assert "?host=" not in html
    page = await client.get("/queues/hosts")
    assert page.status == 200
    assert 'aria-current="page">Hosts' in await page.text()
