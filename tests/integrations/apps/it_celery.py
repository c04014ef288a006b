"""The Celery app of the integrations tests (worker: ``celery -A it_celery worker``)."""

from __future__ import annotations

import os
import signal
import sys
import time

from celery import Celery
from marks import boom, mark

from qdash_mp.integrations.celery import install

app = Celery("it_celery", broker=os.environ["IT_REDIS_URL"])
app.conf.update(
    task_default_queue=os.environ["IT_QUEUE"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
install(app)


@app.task(name="it.add")
def add(x: int, y: int) -> int:
    mark(f"add-{x}")
    return x + y


@app.task(name="it.fail")
def fail(x: int, note: str = "") -> None:
    boom(x)


@app.task(name="it.flaky", bind=True, max_retries=2, default_retry_delay=0)
def flaky(self, x: int) -> None:  # type: ignore[no-untyped-def]
    mark(f"flaky-{x}")
    if self.request.retries < 1:
        raise self.retry(countdown=0)


@app.task(name="it.die")
def die(x: int) -> None:
    mark(f"die-{x}")
    os.kill(os.getpid(), signal.SIGKILL)  # the pool child dies: the parent reports the loss


@app.task(name="it.hang", time_limit=1)
def hang(x: int) -> None:
    mark(f"hang-{x}")
    time.sleep(60)  # past the hard time limit: the parent kills the pool child and reports it


if __name__ == "__main__":  # producer: python it_celery.py OK FAIL [FLAKY [DIE [HANG]]]
    n_ok, n_fail, *rest = (int(a) for a in sys.argv[1:])
    for i in range(n_ok):
        add.delay(i, 1)
    for i in range(n_fail):
        fail.apply_async((i,), {"note": f"n{i}"})
    for i in range(rest[0] if rest else 0):
        flaky.delay(i)
    for i in range(rest[1] if len(rest) > 1 else 0):
        die.delay(i)
    for i in range(rest[2] if len(rest) > 2 else 0):
        hang.delay(i)
