"""sse: what 1,000 live dashboards cost the collector, SSE fan-out vs polling (100 with --quick).

One real collector (``--http``) whose stats change all the time: a ``Client`` in the
orchestrator pushes to 10 queues, 200 hook calls a second, so every update carries news.

sse_fanout   one viewer process opens N connections to ``GET /queues/api/events`` (the
             collector computes the events once a second and writes the same bytes to all);
             every viewer must receive at least one ``stats`` event per two seconds.
polling      one process runs N pollers, each ``GET /queues/api/stats`` once a second
             (staggered over the second), as Sidekiq, Flower and Horizon pages do.

Both in the same run, alternating, each ``repeats`` times; the metric is the collector's CPU
(its threads' ``/proc/<pid>/task/*/schedstat``, as ``bench_ingest``) over the measured
window, as a percentage of one core (``collector_core_pct``); the polling row carries the
paired ratio polling / sse. The viewers' own CPU is not counted (another process).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import threading
import time
from typing import Any

from _common import (
    BenchError,
    Config,
    Row,
    cpu_seconds,
    cpu_seconds_fine,
    paired_ratios,
    progress,
    say,
    short_dir,
    start_collector,
    wait_go,
    worker_main,
    workers,
)

BENCH = "sse"


def sizes(cfg: Config) -> tuple[int, float, int]:
    """(viewers, measured seconds, repeats)."""
    return (100, 4.0, 1) if cfg.quick else (1000, 15.0, 3)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run(cfg: Config) -> list[Row]:
    from qdash_mp import Client

    viewers, seconds, repeats = sizes(cfg)
    _raise_nofile()  # the collector inherits it: 1,000 sockets
    samples: dict[str, list[float]] = {"sse_fanout": [], "polling": []}
    events: list[float] = []
    with contextlib.ExitStack() as stack:
        collector, _ = start_collector(stack, short_dir(stack, cfg, "qds"))
        assert collector.proc is not None
        pid = collector.proc.pid
        base = collector.http.rstrip("/")
        client = Client(collector.socket)
        stack.callback(client.close)
        stop = threading.Event()

        def feed() -> None:
            i = 0
            while not stop.wait(0.005):
                client.on_pushed(f"q{i % 10}")
                i += 1

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        stack.callback(feeder.join)
        stack.callback(stop.set)
        for rep in range(repeats):
            for mode in ("sse_fanout", "polling"):
                progress(f"sse: {mode}, {viewers} viewers, repeat {rep + 1}/{repeats}")
                params = {"base": base, "n": viewers, "seconds": seconds, "mode": mode}
                with workers("bench_sse.py", "view", [params]) as (w,):
                    fine0, ticks0 = cpu_seconds_fine(pid), cpu_seconds(pid)
                    t0 = time.monotonic()
                    w.go()
                    result = w.read(timeout=seconds + 120)["result"]
                    took = time.monotonic() - t0
                    fine1, ticks1 = cpu_seconds_fine(pid), cpu_seconds(pid)
                cpu = fine1 - fine0 if fine0 is not None and fine1 is not None else ticks1 - ticks0
                samples[mode].append(100.0 * cpu / took)
                if mode == "sse_fanout":
                    if result["min_events"] < seconds / 2:
                        raise BenchError(f"sse: a viewer got only {result['min_events']} events")
                    events.append(result["events"] / took)
                elif result["errors"]:
                    raise BenchError(f"sse: {result['errors']} polls failed")
    note = f"collector CPU, % of one core, {viewers} viewers at 1 update/s"
    return [
        Row(
            BENCH,
            "sse_fanout",
            "collector_core_pct",
            "%",
            samples=samples["sse_fanout"],
            producers=viewers,
            note=note,
            extra={"events_per_s": [round(x, 1) for x in events]},
        ),
        Row(
            BENCH,
            "polling",
            "collector_core_pct",
            "%",
            samples=samples["polling"],
            producers=viewers,
            reference="sse_fanout",
            ratios=paired_ratios(samples["polling"], samples["sse_fanout"]),
            note=note + " (GET /queues/api/stats each second)",
        ),
    ]


# --- worker side ------------------------------------------------------------------------------


async def _view(p: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    n, seconds, base = int(p["n"]), float(p["seconds"]), str(p["base"])
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        counts = [0] * n
        errors = 0
        if p["mode"] == "sse_fanout":
            responses = [await session.get(base + "/queues/api/events") for _ in range(n)]
            for r in responses:
                if r.status != 200:
                    raise BenchError(f"events answered {r.status}")
            say(ready=n)
            await asyncio.get_running_loop().run_in_executor(None, wait_go)

            async def read(i: int, resp: aiohttp.ClientResponse) -> None:
                async for line in resp.content:
                    if line.startswith(b"event: stats"):
                        counts[i] += 1

            end = time.monotonic() + seconds
            tasks = [asyncio.create_task(read(i, r)) for i, r in enumerate(responses)]
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for r in responses:
                r.close()
        else:
            say(ready=n)
            await asyncio.get_running_loop().run_in_executor(None, wait_go)
            start = time.monotonic()

            async def poll(i: int) -> None:
                nonlocal errors
                k = 0
                while True:
                    at = start + k + i / n  # staggered: n requests spread over each second
                    if at >= start + seconds:
                        return
                    await asyncio.sleep(max(0.0, at - time.monotonic()))
                    async with session.get(base + "/queues/api/stats") as r:
                        await r.read()
                        errors += r.status != 200
                    counts[i] += 1
                    k += 1

            await asyncio.gather(*(poll(i) for i in range(n)))
    return {"events": sum(counts), "min_events": min(counts), "errors": errors}


def _view_role(p: dict[str, Any]) -> None:
    _raise_nofile()
    say(result=asyncio.run(_view(p)))


if __name__ == "__main__":
    worker_main({"view": _view_role})
