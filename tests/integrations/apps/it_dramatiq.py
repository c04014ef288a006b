"""The Dramatiq actors of the integrations tests (worker: ``dramatiq it_dramatiq -p 2``)."""

from __future__ import annotations

import os
import sys

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
from marks import MARKS, boom, mark

from qdash_mp.integrations.dramatiq import QdashMiddleware

QUEUE = os.environ["IT_QUEUE"]

broker = RedisBroker(url=os.environ["IT_REDIS_URL"])
broker.add_middleware(QdashMiddleware(), before=Retries)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, actor_name="it.add")
def add(x: int, y: int) -> int:
    mark(f"add-{x}")
    return x + y


@dramatiq.actor(queue_name=QUEUE, actor_name="it.fail", max_retries=0)
def fail(x: int, note: str = "") -> None:
    boom(x)


@dramatiq.actor(
    queue_name=QUEUE, actor_name="it.flaky", max_retries=3, min_backoff=10, max_backoff=20
)
def flaky(x: int) -> None:
    """Fails on its first run; Dramatiq's Retries runs it again."""
    mark(f"flaky-{x}")
    if len((MARKS / f"flaky-{x}").read_text().splitlines()) < 2:
        raise RuntimeError("first run fails")


@dramatiq.actor(
    queue_name=QUEUE, actor_name="it.doomed", max_retries=2, min_backoff=10, max_backoff=20
)
def doomed(x: int) -> None:
    """Always fails: retried twice by Dramatiq, then failed for good."""
    mark(f"doomed-{x}")
    raise RuntimeError(f"doomed {x}")


if __name__ == "__main__":  # producer: python it_dramatiq.py OK FAIL FLAKY DOOMED
    n_ok, n_fail, n_flaky, n_doomed = (int(a) for a in sys.argv[1:])
    for i in range(n_ok):
        add.send(i, 1)
    for i in range(n_fail):
        fail.send(i, note=f"n{i}")
    for i in range(n_flaky):
        flaky.send(i)
    for i in range(n_doomed):
        doomed.send(i)
    broker.close()
