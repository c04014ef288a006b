"""Lifecycle test processes (owned by the collector-lifecycle tests).

``python -m qdash_testing.lifecycle --mode worker --socket S --name N --queue Q`` runs a
``Client(name=N, track_jobs=True)``: pushes and starts job ``N-1``, flushes, prints
``started``; on a stdin line ``finish`` processes it, flushes, prints ``done``; on EOF closes.

``python -m qdash_testing.lifecycle --mode runtimes --socket S --seed K --count N --queue Q``
reports ``N`` jobs with runtimes drawn from a fixed lognormal (``runtimes(seed, n)``) and waits from
``waits(seed, n)``, flushes, prints ``{"flushed": bool}``.

``python -m qdash_testing.lifecycle --mode collector --data-dir D`` serves a collector whose clock
reads the float in ``D/clock`` (tests move time by writing it), ticking every 0.05 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

from qdash_mp import Client, Job


def runtimes(seed: int, n: int) -> list[float]:
    """``n`` runtimes in seconds, lognormal around 50 ms, the same for the same seed."""
    rng = random.Random(seed)
    return [rng.lognormvariate(-3.0, 1.2) for _ in range(n)]


def waits(seed: int, n: int) -> list[float]:
    """``n`` wait times (0.1 .. 30 s log-uniform), the same for the same seed."""
    rng = random.Random(seed + 1_000_003)
    return [10 ** rng.uniform(-1, 1.5) for _ in range(n)]


class FileClock:
    """Unix seconds read from a file (written by the test)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> float:
        return float(self.path.read_text())


def _worker(a: argparse.Namespace) -> int:
    with Client(a.socket, name=a.name, track_jobs=True) as client:
        job = Job(id=f"{a.name}-1", name="work")
        client.on_pushed(a.queue, job)
        client.on_started(a.queue, job)
        client.flush(30)
        print("started", flush=True)
        for line in sys.stdin:
            if line.strip() == "finish":
                client.on_processed(a.queue, job)
                client.flush(30)
                print("done", flush=True)
    return 0


def _runtimes(a: argparse.Namespace) -> int:
    import time

    rts = runtimes(a.seed, a.count)
    ws = waits(a.seed, a.count)
    with Client(a.socket) as client:
        for i, (rt, w) in enumerate(zip(rts, ws, strict=True)):
            # the client measures the wait at on_started as now - enqueued_at: w, to within
            # the microseconds between these two lines
            job = Job(id=f"{a.seed}-{i}", name="t", enqueued_at=time.time() - w)
            client.on_started(a.queue, job)
            client.on_processed(a.queue, job, runtime=rt)
            if a.pause and i % 200 == 199:
                time.sleep(a.pause)
        ok = client.flush(120)
    print(json.dumps({"flushed": ok}), flush=True)
    return 0


def _collector(a: argparse.Namespace) -> int:
    from qdash_mp.collector import serve
    from qdash_mp.settings import CollectorSettings

    d = Path(a.data_dir)
    settings = CollectorSettings(
        data_dir=d, http_port=0, tick_interval=0.05, clock=FileClock(d / "clock")
    )
    asyncio.run(serve(settings))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", required=True, choices=["worker", "runtimes", "collector"])
    p.add_argument("--socket")
    p.add_argument("--name", default="w")
    p.add_argument("--queue", default="q")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--data-dir")
    a = p.parse_args()
    return {"worker": _worker, "runtimes": _runtimes, "collector": _collector}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())
