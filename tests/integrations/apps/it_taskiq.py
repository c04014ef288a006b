"""The taskiq tasks of the integrations tests (worker: ``taskiq worker it_taskiq:broker``)."""

from __future__ import annotations

import asyncio
import os
import sys

from marks import MARKS, boom, mark
from taskiq import SimpleRetryMiddleware
from taskiq_redis import ListQueueBroker

from qdash_mp.integrations.taskiq import QdashMiddleware

broker = ListQueueBroker(
    os.environ["IT_REDIS_URL"], queue_name=os.environ["IT_QUEUE"]
).with_middlewares(SimpleRetryMiddleware(default_retry_count=3))
broker.add_middlewares(QdashMiddleware())


@broker.task(task_name="it.add")
async def add(x: int, y: int) -> int:
    await asyncio.sleep(0.004)  # taskiq's execution_time would say 0.0 (rounded to 10 ms)
    mark(f"add-{x}")
    return x + y


@broker.task(task_name="it.fail")
async def fail(x: int, note: str = "") -> None:
    boom(x)


@broker.task(task_name="it.flaky", retry_on_error=True, max_retries=3)
async def flaky(x: int) -> None:
    """Fails on its first run; SimpleRetryMiddleware sends it again."""
    mark(f"flaky-{x}")
    if len((MARKS / f"flaky-{x}").read_text().splitlines()) < 2:
        raise RuntimeError("first run fails")


@broker.task(task_name="it.doomed", retry_on_error=True, max_retries=2)
async def doomed(x: int) -> None:
    """Always fails: retried once, then failed for good (max_retries=2 runs)."""
    mark(f"doomed-{x}")
    raise RuntimeError(f"doomed {x}")


async def produce(n_ok: int, n_fail: int, n_flaky: int, n_doomed: int) -> None:
    await broker.startup()
    for i in range(n_ok):
        await add.kiq(i, 1)
    for i in range(n_fail):
        await fail.kiq(i, note=f"n{i}")
    for i in range(n_flaky):
        await flaky.kiq(i)
    for i in range(n_doomed):
        await doomed.kiq(i)
    await broker.shutdown()


if __name__ == "__main__":  # producer: python it_taskiq.py OK FAIL FLAKY DOOMED
    asyncio.run(produce(*(int(a) for a in sys.argv[1:])))
