"""``qdash-mp demo``: a live dashboard with simulated traffic, in one command.

``run_embedded`` runs everything in one process (``Stats`` + ``MemoryFailedJobs`` +
``create_app``); ``run_multiprocess`` starts the collector daemon and worker processes that
report through ``Client`` hooks, which is how qdash_mp is meant to be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue as queues
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from aiohttp import web

from qdash_mp.client import Client
from qdash_mp.collector import Collector
from qdash_mp.errors import QdashError
from qdash_mp.failed import MemoryFailedJobs
from qdash_mp.inspector import new_inspector
from qdash_mp.models import Job
from qdash_mp.settings import CollectorSettings
from qdash_mp.simulate import Traffic
from qdash_mp.stats import Stats
from qdash_mp.web import create_app

__all__ = ["run_embedded", "run_multiprocess"]

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
        retries.put_nowait((queue, job))  # the retry counted the push

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
        asyncio.create_task(
            _embedded_worker(Traffic(seed=i, prefix=f"w{i}-"), stats, failed, retries)
        )
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


# -- multiprocess: the collector here, workers in their own processes ---------------------------


def _worker_main(socket_path: str, seed: int) -> None:
    """A simulated worker process: runs jobs and reports them through ``Client`` hooks.

    Ctrl-C reaches the whole process group; workers ignore SIGINT and leave when the demo
    sends SIGTERM, closing (and so flushing) their client.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    traffic = Traffic(seed=seed, prefix=f"w{seed}-")
    retries: queues.SimpleQueue[tuple[str, Job]] = queues.SimpleQueue()

    def requeue(job: Job) -> None:
        retries.put((str(job.payload["queue"]), job))

    with Client(socket_path, requeue=requeue) as client:
        while running:
            outcome = traffic.next()
            queue, job = outcome.queue, outcome.job
            try:
                queue, job = retries.get_nowait()  # the collector counted its push
            except queues.Empty:
                client.on_pushed(queue, job)
            time.sleep(outcome.runtime)
            if outcome.error is not None:
                client.on_failed(queue, job, outcome.error)
            else:
                client.on_processed(queue, job, runtime=outcome.runtime)


async def _operator(collector: Collector, every: float = 3.0) -> None:
    """Now and then press "Retry" on the newest failed job, as an operator would."""
    while True:
        await asyncio.sleep(every)
        newest = collector.journal.page(0, 1)
        if not newest:
            continue
        try:
            await collector.retry(newest[0].id)
        except (QdashError, LookupError) as exc:
            log.info("demo retry of %s not done: %s", newest[0].id, exc)


async def run_multiprocess(
    host: str = "127.0.0.1",
    port: int = 8700,
    *,
    workers: int = 4,
    duration: float | None = None,
    data_dir: Path | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run a collector and ``workers`` simulated worker processes until a signal.

    Without ``data_dir`` the collector works in a temporary directory removed afterwards,
    so the demo never touches a real ``./qdash-data``.
    """
    tmp = None if data_dir is not None else Path(tempfile.mkdtemp(prefix="qdash-demo-"))
    settings = CollectorSettings(data_dir=data_dir or tmp or Path(), http_host=host, http_port=port)
    collector = Collector(settings)
    await collector.start()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(str(settings.socket), i), name=f"qdash-demo-{i}")
        for i in range(workers)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    operator = asyncio.create_task(_operator(collector))
    try:
        for proc in procs:
            proc.start()
        if ready is not None:
            ready(f"{collector.http_url}/queues/")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        operator.cancel()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the worker closes its client, which flushes
        await asyncio.to_thread(_join_all, procs)
        await collector.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _join_all(procs: Sequence[BaseProcess], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("demo worker %s did not stop; killing it", proc.name)
            proc.kill()
            proc.join()
