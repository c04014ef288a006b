"""A worker process for tests: makes hook calls through a real ``Client`` and flushes.

Run as ``python -m qdash_testing.worker --socket S --pushed N --processed N --failed N``; it
prints one JSON line ``{"flushed": bool, "client_id": ...}`` when done. With ``--requeue-file``
it registers a requeue callback that appends retried job ids to that file and stays up
until stdin closes. With ``--spool-dir`` the client spools what it cannot deliver;
``--no-flush`` skips the flush and closes at once (a collector that is down gets the rest
spooled), printing ``{"flushed": false, "closed": bool, "client_id": ..., "spool_pending": n}``
and exiting 0. ``--fsize-limit N`` makes every file write past N bytes fail (RLIMIT_FSIZE),
and ``--until-spool-fails`` waits, before announcing, until the client saw its spool file
fail that way.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time
from pathlib import Path

from qdash_mp import Client, Job


def _share(total: int, round_: int, rounds: int) -> int:
    """The calls of ``round_`` when ``total`` calls are spread over ``rounds`` rounds."""
    return total // rounds + (1 if round_ < total % rounds else 0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--queue", default="q")
    p.add_argument("--pushed", type=int, default=0)
    p.add_argument("--processed", type=int, default=0)
    p.add_argument("--failed", type=int, default=0)
    p.add_argument("--id-prefix", default="job")
    p.add_argument("--flush-timeout", type=float, default=120.0)
    p.add_argument("--requeue-file", default=None)
    p.add_argument("--chunks", type=int, default=1, help="split the calls into this many rounds")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between rounds")
    p.add_argument("--announce", action="store_true", help='print "calls done" before flushing')
    p.add_argument("--spool-dir", default=None)
    p.add_argument("--max-pending-failed", type=int, default=100_000)
    p.add_argument("--max-batch-failed", type=int, default=1000)
    p.add_argument("--no-flush", action="store_true", help="close without flushing first")
    p.add_argument("--fsize-limit", type=int, default=0, help="RLIMIT_FSIZE, bytes")
    p.add_argument("--until-spool-fails", action="store_true")
    args = p.parse_args()

    if args.fsize_limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, args.fsize_limit))

    requeue = None
    if args.requeue_file:
        out = Path(args.requeue_file)

        def requeue(job: Job) -> None:
            with out.open("a") as f:
                f.write(job.id + "\n")

    client = Client(
        args.socket,
        requeue=requeue,
        spool_dir=args.spool_dir,
        max_pending_failed=args.max_pending_failed,
        max_batch_failed=args.max_batch_failed,
    )
    on_pushed, on_processed = client.on_pushed, client.on_processed
    q = args.queue
    n = max(1, args.chunks)
    failed = 0
    for round_ in range(n):
        for _ in range(_share(args.pushed, round_, n)):
            on_pushed(q)
        for _ in range(_share(args.processed, round_, n)):
            on_processed(q)
        for _ in range(_share(args.failed, round_, n)):
            job = Job(
                id=f"{args.id_prefix}-{failed}", name="Task", payload={"i": failed}, attempts=1
            )
            client.on_failed(q, job, RuntimeError(f"boom {failed}"))
            failed += 1
        if args.pause and round_ < n - 1:
            time.sleep(args.pause)
    if args.until_spool_fails:
        deadline = time.monotonic() + 60
        while not (client._spool is not None and client._spool.broken):  # test-only peek
            if time.monotonic() > deadline:
                print(json.dumps({"error": "the spool never failed"}), flush=True)
                return 3
            time.sleep(0.01)
    if args.announce:
        print("calls done", flush=True)
    if args.no_flush:
        closed = client.close()
        report = {
            "flushed": False,
            "closed": closed,
            "client_id": client.client_id,
            "spool_pending": client.spool_pending(),
        }
        print(json.dumps(report), flush=True)
        return 0
    flushed = client.flush(timeout=args.flush_timeout)
    print(json.dumps({"flushed": flushed, "client_id": client.client_id}), flush=True)
    if args.requeue_file:
        sys.stdin.read()  # serve requeue requests until the test closes our stdin
    client.close()
    return 0 if flushed else 1


if __name__ == "__main__":
    sys.exit(main())
