"""hub: Redis commands a collector sends to the hub, at ~10k and at ~1M jobs/s (issue 13).

One private redis-server; for each rate a fresh collector (``--hub``) and one producer
process making ``on_processed`` hook calls on 10 queues at the rate (paced in 10 ms steps),
plus one ``on_failed`` per 1,000 jobs (so the failed index changes every second). Over the
measured window the bench reads Redis ``INFO commandstats`` before and after:

redis_commands_per_s   top-level commands the collector sent (its round trips: EVALSHA,
                       SCRIPT LOAD, the ZRANGE of a reconciliation, connection set-up),
                       per second. Goal: the same at both rates and <= 2.
inner_commands_per_s   commands the publish script ran inside Redis (HSET, ZADD, ...), per
                       second: the work the hub's Redis does for this host.

The 1M row's ``extra`` holds the achieved job rate (a loaded machine may not reach it; the
point is that the command rate does not follow the job rate). ``--quick``: 4 s windows.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any

from _common import (
    Config,
    Row,
    progress,
    say,
    short_dir,
    sleep_until_ns,
    start_collector,
    start_redis,
    wait_go,
    worker_main,
    workers,
)

import qdash_mp.hub

BENCH = "hub"
RATES = (10_000, 1_000_000)
INNER = {
    m.lower()
    for m in re.findall(
        r"redis\.call\('([A-Z]+)'",
        (Path(qdash_mp.hub.__file__).parent / "publish.lua").read_text(),
    )
}
"""Commands only ``publish.lua`` runs (inside EVALSHA): never a round trip of their own."""
OWN = {"info"}
"""The bench's own reads."""


def _calls(r: Any) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): s["calls"] for name, s in r.info("commandstats").items()}


def run(cfg: Config) -> list[Row]:
    import redis

    seconds = 4.0 if cfg.quick else 20.0
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        server = start_redis(stack, cfg)
        r = redis.Redis(host="127.0.0.1", port=server.port)
        stack.callback(r.close)
        for rate in RATES:
            with contextlib.ExitStack() as inner:
                d = short_dir(inner, cfg, "qdh")
                url = f"redis://127.0.0.1:{server.port}/0"
                collector, _ = start_collector(inner, d, "--hub", url, "--host-name", f"r{rate}")
                progress(f"hub: {rate:,} jobs/s for {seconds:g} s")
                params = {"socket": collector.socket, "rate": rate, "seconds": seconds + 2}
                with workers("bench_hub.py", "produce", [params]) as (w,):
                    w.go()
                    time.sleep(1.0)  # the collector is publishing under load
                    before = _calls(r)
                    t0 = time.monotonic()
                    time.sleep(seconds)
                    after = _calls(r)
                    took = time.monotonic() - t0
                    done = w.read()
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            inner_n = sum(n for k, n in delta.items() if k in INNER)
            top = sum(n for k, n in delta.items() if k not in INNER and k not in OWN)
            extra = {
                "target_jobs_per_s": rate,
                "achieved_jobs_per_s": round(done["jobs"] / done["seconds"]),
                "evalsha": delta.get("evalsha", 0),
                "commands": {k: n for k, n in sorted(delta.items()) if n},
            }
            label = f"{rate // 1000}k" if rate < 1_000_000 else f"{rate // 1_000_000}M"
            rows.append(
                Row(
                    BENCH,
                    f"qdash_mp_{label}",
                    "redis_commands_per_s",
                    "cmd/s",
                    [top / took],
                    extra=extra,
                )
            )
            rows.append(
                Row(BENCH, f"qdash_mp_{label}", "inner_commands_per_s", "cmd/s", [inner_n / took])
            )
            progress(
                f"hub: {rate:,}/s target, {extra['achieved_jobs_per_s']:,}/s achieved: "
                f"{top / took:.2f} commands/s, {inner_n / took:.1f} inside the script"
            )
    return rows


# ---------------------------------------------------------------------- worker


def _produce(params: dict[str, Any]) -> None:
    from qdash_mp import Client, Job

    client = Client(params["socket"], flush_interval=0.1)
    queues = [f"q{i}" for i in range(10)]
    per_step = max(1, params["rate"] // 100)
    say(ready=True)
    wait_go()
    on_processed = client.on_processed
    jobs = failed = 0
    t0 = time.monotonic_ns()
    end = t0 + int(params["seconds"] * 1e9)
    step = t0
    while step < end:
        for q in queues:
            for _ in range(per_step // len(queues)):
                on_processed(q)
        jobs += per_step // len(queues) * len(queues)
        while failed < jobs // 1000:
            client.on_failed("q0", Job(id=f"f-{failed}", name="t"), "boom")
            failed += 1
        step += 10_000_000
        sleep_until_ns(step)
    took = (time.monotonic_ns() - t0) / 1e9
    client.flush(timeout=60)
    client.close()
    say(jobs=jobs + failed, seconds=took)


if __name__ == "__main__":
    worker_main({"produce": _produce})
