"""The RQ tasks of the integrations tests (worker: ``rq worker --worker-class ...``)."""

from __future__ import annotations

import os
import sys
import time

from marks import MARKS, boom, mark
from redis import Redis
from rq import Retry

from qdash_mp.integrations.rq import Queue


def add(x: int, y: int) -> int:
    mark(f"add-{x}")
    return x + y


def fail(x: int, note: str = "") -> None:
    boom(x)


def flaky(x: int) -> None:
    """Fails on its first run; RQ's Retry runs it again."""
    mark(f"flaky-{x}")
    if len((MARKS / f"flaky-{x}").read_text().splitlines()) < 2:
        raise RuntimeError("first run fails")


def again(x: int) -> Retry | int:
    """Returns a ``Retry`` on its first run (RQ puts it back), then its result."""
    mark(f"again-{x}")
    if len((MARKS / f"again-{x}").read_text().splitlines()) < 2:
        return Retry(max=2)
    return x


def spawn(x: int) -> None:
    """Enqueues a job from inside the work horse (which then leaves through os._exit)."""
    queue = Queue(os.environ["IT_QUEUE"], connection=Redis.from_url(os.environ["IT_REDIS_URL"]))
    queue.enqueue("it_rq.add", 100 + x, 1)


def hang(x: int) -> None:
    """Writes its pid and waits to be killed (the test SIGKILLs the work horse)."""
    mark(f"hang-{x}")
    (MARKS / f"hang-{x}.pid").write_text(str(os.getpid()))
    time.sleep(60)


if __name__ == "__main__":  # producer: python it_rq.py OK FAIL FLAKY HANG [SPAWN [AGAIN]]
    n_ok, n_fail, n_flaky, n_hang, *more = (int(a) for a in sys.argv[1:])
    q = Queue(os.environ["IT_QUEUE"], connection=Redis.from_url(os.environ["IT_REDIS_URL"]))
    for i in range(n_ok):
        q.enqueue("it_rq.add", i, 1)
    for i in range(n_fail):
        q.enqueue("it_rq.fail", i, note=f"n{i}")
    for i in range(n_flaky):
        q.enqueue("it_rq.flaky", i, retry=Retry(max=2))
    for i in range(n_hang):
        q.enqueue("it_rq.hang", i, job_timeout=120)
    for i in range(more[0] if more else 0):
        q.enqueue("it_rq.spawn", i)
    for i in range(more[1] if len(more) > 1 else 0):
        q.enqueue("it_rq.again", i)
