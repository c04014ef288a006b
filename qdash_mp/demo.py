"""``qdash-mp demo``: a live dashboard with simulated traffic, in one command.

``run_embedded`` runs everything in one process (``Stats`` + ``MemoryFailedJobs`` +
``create_app``); ``run_multiprocess`` starts the collector daemon and worker processes that
report through ``Client`` hooks, which is how qdash_mp is meant to be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiohttp import web

from qdash_mp.failed import MemoryFailedJobs
from qdash_mp.inspector import new_inspector
from qdash_mp.models import Job
from qdash_mp.simulate import Traffic
from qdash_mp.stats import Stats
from qdash_mp.web import create_app

__all__ = ["run_embedded"]

log = logging.getLogger("qdash_mp.demo")


async def _embedded_worker(
    traffic: Traffic,
    stats: Stats,
    failed: MemoryFailedJobs,
    retries: asyncio.Queue[tuple[str, Job]],
) -> None:
    """Run simulated jobs one after another: ~2% fail, and now and then one is retried."""
    while True:
        outcome = traffic.next()
        queue, job = outcome.queue, outcome.job
        if not retries.empty():
            queue, job = retries.get_nowait()
        else:
            stats.on_pushed(queue)
        await asyncio.sleep(outcome.runtime)
        if outcome.error is not None:
            stats.on_failed(queue)
            failed.record(job, queue, outcome.error)
        else:
            stats.on_processed(queue, runtime=outcome.runtime)
        if failed.len() and traffic.should_retry(0.02):
            # the simulated operator presses "Retry" on the newest failure
            with contextlib.suppress(LookupError):
                failed.retry(failed.page(0, 1)[0].id)


async def run_embedded(
    host: str = "127.0.0.1",
    port: int = 8700,
    *,
    workers: int = 4,
    duration: float | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the dashboard over simulated traffic until cancelled (or for ``duration`` s).

    ``ready(url)`` is called once the HTTP server listens.
    """
    stats = Stats()
    retries: asyncio.Queue[tuple[str, Job]] = asyncio.Queue()

    def requeue(job: Job) -> None:
        queue = str(job.payload["queue"])
        retries.put_nowait((queue, job))
        stats.on_pushed(queue)

    failed = MemoryFailedJobs(requeue).with_stats(stats)
    app = create_app(new_inspector(stats, failed))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    url = f"http://{host}:{bound[1]}/queues/"
    if ready is not None:
        ready(url)
    tasks = [
        asyncio.create_task(_embedded_worker(Traffic(seed=i, prefix=f"w{i}-"), stats, failed, retries))
        for i in range(workers)
    ]
    try:
        if duration is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(duration)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
