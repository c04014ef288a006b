"""Realistic traffic for the browser tests and ``scripts/screenshots.py``: worker processes
that run simulated jobs through a real ``Client``, and past history written before a
collector starts (so the 24 h / 30 day charts have something to show).

``python -m qdash_testing.traffic --socket S --seed N [--jobs-per-s R] [--failure-rate F]``
runs one worker until SIGTERM (then its client closes, flushing): each job is pushed, started,
run for a log-normal time (``qdash_mp.simulate.Traffic``) and reported processed or failed.
A retry from the dashboard comes back through the worker's requeue callback and is pushed
again. ``DemoWorkers`` starts and stops a set of them.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from qdash_mp import Client, Job
from qdash_mp.histogram import NBUCKETS, count_values
from qdash_mp.history import History
from qdash_mp.simulate import DEMO_QUEUES, Traffic

__all__ = ["DemoWorkers", "seed_history"]

_TESTS = Path(__file__).resolve().parent.parent


class DemoWorkers:
    """``n`` worker processes on ``socket_path``; ``stop()`` (or the ``with`` exit) ends them."""

    def __init__(
        self, socket_path: str, n: int = 2, *, jobs_per_s: float = 20.0, failure_rate: float = 0.05
    ) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_TESTS), env.get("PYTHONPATH")]))
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qdash_testing.traffic",
                    "--socket",
                    socket_path,
                    "--seed",
                    str(i + 1),
                    "--jobs-per-s",
                    str(jobs_per_s),
                    "--failure-rate",
                    str(failure_rate),
                ],
                env=env,
            )
            for i in range(n)
        ]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def __enter__(self) -> DemoWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def seed_history(data_dir: Path, *, now: float | None = None, seed: int = 7) -> None:
    """Write 30 days of plausible per-queue history into ``data_dir`` (collector not running).

    The last 24 h get a point per minute; older days one minute per hour carrying that hour's
    jobs (the hour ring sums them). A daily wave plus noise, ~2 % failures.
    """
    rng = random.Random(seed)
    now = time.time() if now is None else now
    end = int(now // 60 * 60) - 60
    hist = History(data_dir / "history", lambda: now, durable=False)
    try:
        minutes = [end - 30 * 86400 + h * 3600 for h in range(29 * 24)]
        minutes += list(range(end - 86400 + 60, end + 1, 60))
        for t in minutes:
            per = 3600 if t < end - 86400 else 60
            for k, q in enumerate(DEMO_QUEUES):
                wave = 1.0 + 0.6 * math.sin((t / 86400.0 + k / 4) * 2 * math.pi)
                rate = (4 - k) * 0.8 * wave * rng.uniform(0.8, 1.2)  # jobs/s
                processed = int(rate * per)
                failed = int(processed * rng.uniform(0.0, 0.04))
                counts = [0] * NBUCKETS
                sample = min(processed, 200)
                mu = -4.5 + 0.4 * k + 0.3 * wave
                count_values(counts, (rng.lognormvariate(mu, 0.7) for _ in range(sample)))
                if sample and processed > sample:
                    counts = [c * processed // sample for c in counts]
                hist.record(q, t, processed + failed, processed, failed, counts)
    finally:
        hist.close()


def _main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs-per-s", type=float, default=20.0)
    ap.add_argument("--failure-rate", type=float, default=0.05)
    args = ap.parse_args()
    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    traffic = Traffic(seed=args.seed, failure_rate=args.failure_rate, prefix=f"w{args.seed}-")
    retries: queue.SimpleQueue[tuple[str, Job]] = queue.SimpleQueue()

    def requeue(job: Job) -> None:
        retries.put((str(job.payload["queue"]), job))

    gap = 1.0 / args.jobs_per_s if args.jobs_per_s > 0 else 0.05
    with Client(
        args.socket, requeue=requeue, name=f"demo-worker-{args.seed}", track_jobs=True
    ) as client:
        while running:
            outcome = traffic.next()
            q, job = outcome.queue, outcome.job
            try:
                q, job = retries.get_nowait()  # its push was counted when it first came
            except queue.Empty:
                job = Job(job.id, job.name, job.payload, job.attempts, time.time())
                client.on_pushed(q, job)
            client.on_started(q, job)
            time.sleep(max(outcome.runtime, gap))
            if outcome.error is not None:
                client.on_failed(q, job, outcome.error)
            else:
                client.on_processed(q, job)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
