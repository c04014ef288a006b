"""The hub publisher inside an in-process collector with a hand-moved clock: history points
(minute and hour) reach the hub exactly as the host has them and old ones are trimmed; an
overflowing change list (Redis away) falls back to a full reconciliation that is exact.

Real redis-server, real ``Collector`` (in this event loop, so its clock can be moved) and a
real ``Client`` talking to it over its socket.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from qdash_testing.collector import short_dir
from qdash_testing.redis_server import RedisServer

from qdash_mp import Client, Job, histogram
from qdash_mp.collector import Collector
from qdash_mp.hub.format import decode_point
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
    c.hub._max_changes = 3  # test-only: a tiny change list
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
        assert c.hub._overflow  # more changes than the list holds: it gave up on them
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
