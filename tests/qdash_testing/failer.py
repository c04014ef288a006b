"""A worker that keeps failing jobs and flushing, and says which ones were acknowledged.

Run as ``python -m qdash_testing.failer --socket S --group G``; it fails jobs ``f-0``, ``f-1``,
... in groups of G, calls ``flush()`` after each group, and prints ``acked N`` (jobs
``f-0`` .. ``f-(N-1)`` are acknowledged: durable in the collector's journal) whenever a
flush returned True. It stops when stdin closes or after ``--max-jobs``.
"""

from __future__ import annotations

import argparse
import sys
import threading

from qdash_mp import Client, Job


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--group", type=int, default=20)
    p.add_argument("--max-jobs", type=int, default=1_000_000)
    p.add_argument("--flush-timeout", type=float, default=0.5)
    args = p.parse_args()

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    client = Client(args.socket, flush_interval=0.01)
    n = 0
    while not stop.is_set() and n < args.max_jobs:
        for _ in range(args.group):
            job = Job(id=f"f-{n}", name="Flaky", payload={"n": n, "blob": "x" * 200}, attempts=1)
            client.on_failed("flaky", job, RuntimeError(f"failure {n}"))
            n += 1
        if client.flush(timeout=args.flush_timeout):
            print(f"acked {n}", flush=True)
    ok = client.flush(timeout=60)
    print(f"{'acked' if ok else 'final'} {n}", flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
