"""The workers page, the queue page and the overview's lifecycle columns (issue 10)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
from qdash_testing.collector import reap, run_module

from qdash_mp import Job, MemoryFailedJobs, Stats, create_app, new_inspector
from qdash_mp.collector import Collector

TIMEOUT = 10.0


async def embedded(aiohttp_client: Any) -> Any:
    stats = Stats(track_jobs=True)
    failed = MemoryFailedJobs(requeue=lambda job: None).with_stats(stats)
    stats.on_pushed("mail/eu", Job(id="p1", name="send", payload={}))
    stats.on_pushed("mail/eu", Job(id="r1", name="send", payload={}))
    stats.on_started("mail/eu", Job(id="r1", name="send", payload={}))
    stats.on_processed("mail/eu", Job(id="r1", name="send", payload={}), runtime=0.0123)
    failed.record(Job(id="f1", name="send", payload={}), "mail/eu", "boom")
    return await aiohttp_client(create_app(new_inspector(stats, failed)))


async def test_overview_rows_link_to_the_queue_page(aiohttp_client: Any) -> None:
    client = await embedded(aiohttp_client)
    html = await (await client.get("/queues/")).text()
    assert '<td class="queue">mail/eu</td>' in html
    assert '<a href="/queues/q/mail%2Feu" aria-label="Open queue mail/eu"' in html
    for head in ("Active</span></th>", "p50</abbr></th>", "p99</abbr></th>"):
        assert head in html
    assert "12.3 ms" in html  # the one runtime is every percentile
    assert 'href="/queues/workers"' in html


async def test_queue_page(aiohttp_client: Any) -> None:
    client = await embedded(aiohttp_client)
    resp = await client.get("/queues/q/mail%2Feu")
    assert resp.status == 200
    html = await resp.text()
    assert '<h1>Queue <span class="queue">mail/eu</span></h1>' in html
    assert '<dt>Pushed</dt><dd data-k="pushed">2</dd>' in html
    assert "p50 12.3 ms" in html
    assert ">p1</td>" in html  # pending (tracked)
    assert ">r1</td>" in html  # recently finished
    assert (await client.get("/queues/q/nope")).status == 404


async def test_queue_page_lists_only_its_own_newest_failures(aiohttp_client: Any) -> None:
    stats = Stats()
    failed = MemoryFailedJobs(requeue=lambda job: None).with_stats(stats)
    stats.on_pushed("mail")
    stats.on_pushed("sms")
    for i in range(12):
        failed.record(Job(id=f"a{i}", name="send", payload={}), "mail", f"boom {i}")
    failed.record(Job(id="other", name="send", payload={}), "sms", "elsewhere")
    client = await aiohttp_client(create_app(new_inspector(stats, failed)))
    html = await (await client.get("/queues/q/mail")).text()
    assert "Newest failed jobs of this queue" in html
    assert '<a href="/queues/failed/a11">a11</a>' in html  # the newest first
    assert "a1</a>" not in html  # 10 shown of 12: a0 and a1 are on the filtered list only
    assert "other" not in html
    assert "elsewhere" not in html
    html = await (await client.get("/queues/q/sms")).text()
    assert '<a href="/queues/failed/other">other</a>' in html
    assert "a11" not in html


async def test_workers_page_embedded_says_it_does_not_know(aiohttp_client: Any) -> None:
    client = await embedded(aiohttp_client)
    html = await (await client.get("/queues/workers")).text()
    assert "does not know its workers" in html


async def page(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_workers_page_shows_who_works_on_what_and_greys_the_gone(
    live_collector: Collector,
) -> None:
    sock = str(live_collector.settings.socket)
    proc = run_module(
        "qdash_testing.lifecycle", mode="worker", socket=sock, name="w-one", queue="mail"
    )
    url = f"{live_collector.http_url}/queues/workers"
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "started"
        html = await page(url)
        assert "<td>w-one</td>" in html
        assert f"<td>{socket.gethostname()}</td>" in html
        assert f'<td class="num">{proc.pid}</td>' in html
        assert '· work <span class="id">w-one-1</span>' in html
        assert 'class="gone"' not in html
        proc.stdin.write("finish\n")
        proc.stdin.flush()
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "done"
        proc.stdin.close()
        assert await asyncio.to_thread(proc.wait, TIMEOUT) == 0
        for _ in range(int(TIMEOUT / 0.02)):
            html = await page(url)
            if 'class="gone"' in html:
                break
            await asyncio.sleep(0.02)
        assert '<tr class="gone">' in html
        assert "idle" in html
    finally:
        reap(proc)
