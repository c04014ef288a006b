"""The hub publisher inside an in-process collector with a hand-moved clock: history points
(minute and hour) reach the hub exactly as the host has them and old ones are trimmed; an
overflowing change list (Redis away) falls back to a full reconciliation that is exact.

Real redis-server, real ``Collector`` (in this event loop, so its clock can be moved) and a
real ``Client`` talking to it over its socket.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from qdash_testing.collector import short_dir
from qdash_testing.redis_server import RedisServer

from qdash_mp import Client, Job, histogram
from qdash_mp.collector import Collector
from qdash_mp.hub.format import decode_point, encode_point
from qdash_mp.settings import CollectorSettings

WAIT = 60.0
T0 = 1_800_000_000 - 1_800_000_000 % 3600 + 20  # 20 s into an hour


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def until(predicate: Callable[[], Any], what: str) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def hub_collector(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[Collector, Clock]]:
    d = short_dir()
    clock = Clock(T0)
    settings = CollectorSettings(
        data_dir=d,
        http_enabled=False,
        tick_interval=0.02,
        clock=clock,
        hub_url=redis_server.url,
        hub_host="h1",
        hub_interval=0.05,
    )
    c = Collector(settings)
    await c.start()
    try:
        yield c, clock
    finally:
        await c.stop()
        shutil.rmtree(d, ignore_errors=True)


async def hub_points(r: Any, key: str) -> dict[int, dict[str, Any]]:
    raw = await asyncio.to_thread(r.hgetall, key)
    return {int(t): decode_point(v) for t, v in raw.items()}


def without_buckets(points: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {t: {k: v for k, v in p.items() if k != "buckets"} for t, p in points.items()}


async def test_history_points_reach_the_hub_exactly(
    redis_server: RedisServer, hub_collector: tuple[Collector, Clock]
) -> None:
    c, clock = hub_collector
    r = redis_server.client()
    stale = T0 - 2 * 86400
    await asyncio.to_thread(r.hset, "qdash:hm:h1:mail", str(stale), b"old")
    client = Client(str(c.settings.socket), flush_interval=0.02)
    try:
        for minute in range(3):
            for i in range(5 + minute):
                client.on_pushed("mail")
                client.on_processed("mail", Job(id=f"{minute}-{i}", name="t"), runtime=0.01 * i)
            assert await asyncio.to_thread(client.flush, 30)
            want = sum(5 + m for m in range(minute + 1))
            await until(lambda w=want: c.stats.snapshot().totals.pushed == w, "the counts")
            history = c.lifecycle.history
            assert history is not None
            await until(lambda h=history: "mail" in h.queues(), "the history to see mail")
            await asyncio.sleep(0.1)  # a few ticks inside the minute
            clock.t = (clock.t // 60 + 1) * 60 + 20  # the next minute: this one closes
            await until(
                lambda m=minute: (
                    len(c.lifecycle.history.points("mail", "minute")) == m + 1
                    if c.lifecycle.history
                    else False
                ),
                "the minute closed",
            )
            clock.t += 15  # 35 s into the minute: the publisher's second look

        async def same() -> bool:
            host_m = await c.inspector.history("mail", "minute")
            host_h = await c.inspector.history("mail", "hour")
            hub_m = await hub_points(r, "qdash:hm:h1:mail")
            hub_h = await hub_points(r, "qdash:hh:h1:mail")
            return without_buckets(hub_m) == {p["t"]: p for p in host_m} and without_buckets(
                hub_h
            ) == {p["t"]: p for p in host_h}

        await until(same, "the hub's history to equal the host's")
        minutes = await hub_points(r, "qdash:hm:h1:mail")
        assert [p["pushed"] for _, p in sorted(minutes.items())] == [5, 6, 7]
        # each minute's runtime buckets: what its jobs' runtimes bucket to, exactly
        for minute, (_, p) in enumerate(sorted(minutes.items())):
            want_b = histogram.bucket_counts([0.01 * i for i in range(5 + minute)])
            assert p["buckets"] == want_b, minute
        (hour,) = (await hub_points(r, "qdash:hh:h1:mail")).values()
        want_h = histogram.bucket_counts([0.01 * i for m in range(3) for i in range(5 + m)])
        assert hour["buckets"] == want_h
        assert stale not in minutes  # trimmed: older than 24 h
        assert await asyncio.to_thread(r.smembers, "qdash:hq:h1") == {b"mail"}
    finally:
        await asyncio.to_thread(client.close)


async def test_change_list_overflow_falls_back_to_reconciliation(
    redis_server: RedisServer, hub_collector: tuple[Collector, Clock]
) -> None:
    c, _ = hub_collector
    assert c.hub is not None
    c.hub.failed.max_changes = 3  # a tiny change list
    r = redis_server.client()
    client = Client(str(c.settings.socket), flush_interval=0.02)
    try:
        for i in range(2):
            client.on_failed("mail", Job(id=f"a-{i}", name="t"), "boom")
        assert await asyncio.to_thread(client.flush, 30)
        await until(lambda: r.zcard("qdash:fi:h1") == 2, "the first failed jobs in the hub")
        redis_server.stop()
        await until(lambda: c.hub is not None and c.hub.up is False, "the hub seen as down")
        for i in range(10):
            client.on_failed("mail", Job(id=f"b-{i}", name="t"), "boom")
        assert await asyncio.to_thread(client.flush, 30)
        await c.forget("a-0")
        assert c.hub.failed.overflowed  # more changes than the list holds: it gave up on them
        redis_server.start()
        r = redis_server.client()
        want = {"a-1", *(f"b-{i}" for i in range(10))}
        await until(
            lambda: {m.decode() for m in r.zrange("qdash:fi:h1", 0, -1)} == want,
            "the reconciled index",
        )
        assert {m.decode() for m in r.hkeys("qdash:fj:h1")} == want
        assert r.zcard("qdash:fall") == len(want)
    finally:
        await asyncio.to_thread(client.close)


@pytest.fixture
async def two_hosts(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[list[Collector], Clock]]:
    clock = Clock(T0)
    dirs, collectors = [], []
    try:
        for host in ("h1", "h2"):
            d = short_dir()
            dirs.append(d)
            settings = CollectorSettings(
                data_dir=d,
                http_enabled=False,
                tick_interval=0.02,
                clock=clock,
                hub_url=redis_server.url,
                hub_host=host,
                hub_interval=0.05,
            )
            c = Collector(settings)
            await c.start()
            collectors.append(c)
        yield collectors, clock
    finally:
        for c in collectors:
            await c.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def nearest_rank(ordered: list[float], pct: int) -> float:
    return ordered[max(1, math.ceil(pct * len(ordered) / 100)) - 1]


async def test_two_hosts_minute_percentiles_merge_exactly_from_buckets(
    redis_server: RedisServer, two_hosts: tuple[list[Collector], Clock]
) -> None:
    """Two publishers with lognormal runtimes in the same minute: the hub's minute and hour
    points have the percentiles of the union's buckets, exactly, and so within 2.19 % of the
    exact percentiles of the raw values. A host point without buckets (e.g. written by an
    older publisher) makes the period fall back to exact counts and null percentiles."""
    import redis.asyncio as aioredis

    from qdash_mp.hub.inspector import HubInspector

    collectors, clock = two_hosts
    rng = random.Random(13)
    values = [
        [rng.lognormvariate(-3.0, 1.0) for _ in range(700)],
        [rng.lognormvariate(-1.5, 0.6) for _ in range(300)],
    ]
    clients = [Client(str(c.settings.socket), flush_interval=0.02) for c in collectors]
    r = redis_server.client()
    hub_redis = aioredis.from_url(redis_server.url)
    try:
        for client, vals in zip(clients, values, strict=True):
            for i, v in enumerate(vals):
                client.on_processed("q", Job(id=str(i), name="t"), runtime=v)
            assert await asyncio.to_thread(client.flush, 30)
        for c, n in zip(collectors, map(len, values), strict=True):
            await until(lambda c=c, n=n: c.stats.snapshot().totals.processed == n, "the counts")
            await until(
                lambda c=c: c.lifecycle.history is not None and "q" in c.lifecycle.history.queues(),
                "the history to see q",
            )
        await asyncio.sleep(0.1)  # a few ticks inside the minute
        minute = int(clock.t // 60 * 60)
        clock.t = minute + 60 + 20  # the next minute: this one closes on both hosts
        for c in collectors:
            await until(
                lambda c=c: (
                    c.lifecycle.history is not None
                    and len(c.lifecycle.history.points("q", "minute")) == 1
                ),
                "the minute closed",
            )
        clock.t += 15  # the publishers' second look

        async def published() -> bool:
            for host in ("h1", "h2"):
                m = await hub_points(r, f"qdash:hm:{host}:q")
                h = await hub_points(r, f"qdash:hh:{host}:q")
                if "buckets" not in m.get(minute, {}) or "buckets" not in h.get(T0 - 20, {}):
                    return False
            return True

        await until(published, "both hosts' minute and hour points with buckets")
        union = sorted(values[0] + values[1])
        want = histogram.summary(histogram.bucket_counts(union)).to_dict()
        ins = HubInspector(hub_redis, max_lag=0, clock=clock)
        for resolution, t in (("minute", minute), ("hour", T0 - 20)):
            (point,) = await ins.history("q", resolution)  # type: ignore[arg-type]
            assert point["t"] == t
            assert point["processed"] == len(union)
            assert point["runtime"] == want, resolution
            for pct in (50, 90, 95, 99):
                exact = nearest_rank(union, pct)
                got = point["runtime"][f"p{pct}"]
                assert abs(got - exact) <= histogram.MAX_RELATIVE_ERROR * exact, (pct, got, exact)
            assert abs(point["runtime"]["max"] - union[-1]) <= (
                histogram.MAX_RELATIVE_ERROR * union[-1]
            )
        # one host point without buckets: exact counts, no percentile guessed
        raw = await asyncio.to_thread(r.hget, "qdash:hm:h2:q", str(minute))
        plain = {k: v for k, v in decode_point(raw).items() if k != "buckets"}
        await asyncio.to_thread(r.hset, "qdash:hm:h2:q", str(minute), encode_point(plain))
        (point,) = await ins.history("q", "minute")
        assert point["runtime"]["count"] == len(union)
        assert [point["runtime"][k] for k in ("p50", "p90", "p95", "p99")] == [None] * 4
        h1 = decode_point(await asyncio.to_thread(r.hget, "qdash:hm:h1:q", str(minute)))
        assert point["runtime"]["max"] == max(h1["runtime"]["max"], plain["runtime"]["max"])
    finally:
        await hub_redis.aclose()
        for client in clients:
            await asyncio.to_thread(client.close)


async def test_a_minute_across_a_collector_restart_keeps_exact_buckets(
    redis_server: RedisServer,
) -> None:
    """The history attributes what happened before a restart (and while down) to the first
    minute closed after it; that minute's published buckets are exactly those counts."""
    d = short_dir()
    clock = Clock(T0)
    settings = CollectorSettings(
        data_dir=d,
        http_enabled=False,
        tick_interval=0.02,
        clock=clock,
        hub_url=redis_server.url,
        hub_host="h1",
        hub_interval=0.05,
    )
    r = redis_server.client()
    first, before, after = [0.003, 0.004, 0.2], [0.01, 0.02], [0.05, 1.5, 3.0]

    async def run(c: Collector, vals: list[float], tag: str, total: int) -> None:
        client = Client(str(c.settings.socket), flush_interval=0.02)
        try:
            for i, v in enumerate(vals):
                client.on_processed("q", Job(id=f"{tag}-{i}", name="t"), runtime=v)
            assert await asyncio.to_thread(client.flush, 30)
        finally:
            await asyncio.to_thread(client.close)
        await until(lambda: c.stats.snapshot().totals.processed == total, "the counts")
        await until(
            lambda: c.lifecycle.history is not None and "q" in c.lifecycle.history.queues(),
            "the history to see q",
        )
        await asyncio.sleep(0.1)  # a few ticks inside the minute

    async def close_minute(c: Collector, n: int) -> int:
        minute = int(clock.t // 60 * 60)
        clock.t = minute + 60 + 20
        await until(
            lambda: (
                c.lifecycle.history is not None
                and len(c.lifecycle.history.points("q", "minute")) == n
            ),
            "the minute closed",
        )
        clock.t += 15
        await until(
            lambda: r.hget("qdash:hm:h1:q", str(minute)) is not None, "the minute in the hub"
        )
        return minute

    try:
        # Bounded as a whole: a stop that hung here once (CI, 300 s) fails in 120 s with
        # the await it hung in, in the traceback.
        async with asyncio.timeout(120):
            c = Collector(settings)
            await c.start()
            try:
                await run(c, first, "a", 3)
                m0 = await close_minute(c, 1)
                await run(c, before, "b", 5)  # the next minute, then a restart in it
            finally:
                await c.stop()
            c = Collector(settings)
            await c.start()
            try:
                await run(c, after, "c", 8)
                m1 = await close_minute(c, 2)
            finally:
                await c.stop()
        p0, p1 = (decode_point(r.hget("qdash:hm:h1:q", str(m))) for m in (m0, m1))
        assert p0["buckets"] == histogram.bucket_counts(first)
        assert p1["processed"] == 5
        assert p1["buckets"] == histogram.bucket_counts(before + after)
    finally:
        shutil.rmtree(d, ignore_errors=True)
