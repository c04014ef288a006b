"""The hub's failed-list mirror (``qdash_mp.hub.failed_mirror``) against a real redis-server,
the entries written by the real ``publish.lua``.

What is proved: after any mix of new failures, jobs that failed again, removals (through the
script, and behind its back as a publisher older than ``frmz`` removes), a filtered page and
its total through the mirror equal those of one scan of the index in Redis, for every
filter kind, with and without ``?host=``, with a snapshot; the mirror follows with one
incremental step (no full read) while the publishers are current, and reads in full when
the counts say a host removed without logging it or Redis lost its data.
"""

from __future__ import annotations

import random
from typing import Any

from qdash_mp.failed_filter import FailedFilter
from qdash_mp.hub.failed_scan import scan_failed
from qdash_mp.hub.format_failed import fall_member
from qdash_mp.hub.inspector import HOST, HubInspector
from qdash_mp.hub.keys import Keys

from .test_hub_view_failed import T0, Host

K = Keys()

FILTERS = [
    FailedFilter(queue="mail"),
    FailedFilter(queue="pdf", name="render"),
    FailedFilter(q="timeout"),
    FailedFilter(q="TIMEOUT", queue="mail"),
    FailedFilter(q="Straße"),  # case-folded: matches "STRASSE"
    FailedFilter(name="send", after=T0 + 50, before=T0 + 400),
    FailedFilter(queue="nope"),
]


def _failure(rnd: random.Random, id: str) -> tuple[str, str, float, str, str]:
    queue = rnd.choice(["mail", "pdf", "img"])
    name = rnd.choice(["send", "render"])
    error = rnd.choice(["SMTP timeout", "x", "disk full", "STRASSE closed", "Timeout: 30 s"])
    return id, queue, T0 + rnd.randrange(500), name, error


async def _same(ins: HubInspector, host: str | None) -> None:
    """Every filter's pages and totals through the mirror equal the scan's."""
    hw = int(await ins.redis.get(K.fseq) or 0) + 1
    token = HOST.set(host)
    try:
        for flt in FILTERS:
            for page in (1, 2):
                want = await ins.failed_query_by_scan(flt, page, snapshot=hw)
                got = await ins.failed_query(flt, page, snapshot=hw)
                assert got.total == want.total, (flt, host)
                assert [j.id for j in got.rows] == [j.id for j in want.rows], (flt, host)
            early = await ins.failed_query(flt, 1, snapshot=hw // 2)
            assert early.total == (await ins.failed_query_by_scan(flt, 1, snapshot=hw // 2)).total
            # a bulk action's ids (the mirror) are the scan's, for the whole snapshot
            for below in (hw, hw // 2):
                scanned = [
                    m.hub_id
                    async for batch in scan_failed(ins.redis, ins.keys, host, flt, below=below)
                    for m in batch
                ]
                assert sorted(await ins.failed_ids(flt, below)) == sorted(scanned), (flt, host)
    finally:
        HOST.reset(token)


async def test_the_mirror_pages_equal_a_scans_through_changes(r: Any) -> None:
    rnd = random.Random(5)
    hosts = [Host(r, "a"), Host(r, "b"), Host(r, "c")]
    listed: dict[str, set[str]] = {h.name: set() for h in hosts}
    ins = HubInspector(r, max_lag=0)
    for round_ in range(6):
        for h in hosts:
            adds = [_failure(rnd, f"{h.name}{round_}-{i}") for i in range(rnd.randrange(20, 60))]
            again = rnd.sample(sorted(listed[h.name]), min(5, len(listed[h.name])))
            adds += [_failure(rnd, id) for id in again]  # failed again: a new record
            gone = rnd.sample(sorted(listed[h.name]), min(8, len(listed[h.name])))
            gone = [g for g in gone if g not in again]
            await h.publish(adds, gone)
            listed[h.name] |= {a[0] for a in adds}
            listed[h.name] -= set(gone)
        for host in (None, "b"):
            await _same(ins, host)
    assert ins.mirror.full_reads == 1  # the first filtered page; incremental since
    assert ins.mirror.live == sum(map(len, listed.values()))


async def test_a_removal_behind_the_scripts_back_is_found_by_the_count(r: Any) -> None:
    a = Host(r, "a")
    await a.publish([(f"j{i}", "mail", T0 + i, "send", "boom") for i in range(30)])
    ins = HubInspector(r, max_lag=0)
    assert (await ins.failed_query(FailedFilter(queue="mail"), 1)).total == 30
    # a publisher that predates frmz removes j3: index, record and sequence, no log entry
    async with r.pipeline(transaction=True) as pipe:
        pipe.zrem(K.fi("a"), "j3").hdel(K.fj("a"), "j3").zrem(K.fall, fall_member("a", "j3"))
        pipe.zrem(K.fseqz, fall_member("a", "j3"))
        await pipe.execute()
    page = await ins.failed_query(FailedFilter(queue="mail"), 1)
    assert page.total == 29
    assert "j3@a" not in {j.id for j in page.rows}
    assert ins.mirror.full_reads == 2
    await _same(ins, None)


async def test_redis_losing_its_data_resets_the_mirror(r: Any) -> None:
    a = Host(r, "a")
    await a.publish([(f"j{i}", "mail", T0 + i, "send", "boom") for i in range(10)])
    ins = HubInspector(r, max_lag=0)
    assert (await ins.failed_query(FailedFilter(q="boom"), 1)).total == 10
    await r.flushdb()
    await a.publish([("k", "mail", T0, "send", "boom")])
    page = await ins.failed_query(FailedFilter(q="boom"), 1)
    assert [j.id for j in page.rows] == ["k@a"]
    assert page.total == 1


async def test_trimmed_removals_make_a_lagging_mirror_read_in_full(r: Any) -> None:
    a = Host(r, "a")
    await a.publish([(f"j{i}", "mail", T0 + i, "send", "boom") for i in range(10)])
    ins = HubInspector(r, max_lag=0)
    assert (await ins.failed_query(FailedFilter(queue="mail"), 1)).total == 10
    await a.publish(removes=["j1", "j2"])
    # what the script does after 100,000 removals: drops the oldest, remembers how far
    top = await r.zrange(K.frmz, -1, -1, withscores=True)
    await r.zremrangebyrank(K.frmz, 0, -1)
    await r.set(K.frmlo, int(top[0][1]))
    page = await ins.failed_query(FailedFilter(queue="mail"), 1)
    assert page.total == 8
    assert ins.mirror.full_reads == 2


async def test_the_script_trims_the_removal_log(r: Any) -> None:
    a = Host(r, "a")
    await a.publish([("j", "mail", T0, "send", "boom")])
    # 101,000 older removals already logged (sequences 1..101,000), then one more
    await r.set(K.fseq, 200_000)
    for k in range(0, 101_000, 10_100):
        await r.zadd(K.frmz, {f"a\x00old{i}": i + 1 for i in range(k, k + 10_100)})
    await a.publish(removes=["j"])
    assert await r.zcard(K.frmz) == 100_000  # the last 100,000 kept
    assert int(await r.get(K.frmlo)) == 1001  # the highest sequence dropped
    assert await r.zscore(K.frmz, fall_member("a", "j")) == 200_001
    await a.publish(removes=["never-listed"])  # not in the index: nothing logged
    assert await r.zcard(K.frmz) == 100_000
