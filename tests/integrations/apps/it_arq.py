"""The arq functions of the integrations tests (worker: ``arq it_arq.WorkerSettings``)."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Retry, func
from marks import MARKS, boom, mark

from qdash_mp.integrations.arq import create_pool, instrument

QUEUE = os.environ["IT_QUEUE"]
REDIS = RedisSettings.from_dsn(os.environ["IT_REDIS_URL"])


async def add(ctx: dict[str, Any], x: int, y: int) -> int:
    mark(f"add-{x}")
    return x + y


async def fail(ctx: dict[str, Any], x: int, note: str = "") -> None:
    boom(x)


async def flaky(ctx: dict[str, Any], x: int) -> None:
    """Asks arq to retry on its first run."""
    mark(f"flaky-{x}")
    if len((MARKS / f"flaky-{x}").read_text().splitlines()) < 2:
        raise Retry(defer=0.01)


async def doomed(ctx: dict[str, Any], x: int) -> None:
    """Asks for a retry every time: arq gives up after max_tries=2."""
    mark(f"doomed-{x}")
    raise Retry(defer=0.01)


started: list[str] = []


async def on_startup(ctx: dict[str, Any]) -> None:
    started.append("user hook ran")


@instrument
class WorkerSettings:
    functions = [add, fail, flaky, func(doomed, max_tries=2)]  # noqa: RUF012
    queue_name = QUEUE
    redis_settings = REDIS
    on_startup = on_startup
    poll_delay = 0.05


async def produce(n_ok: int, n_fail: int, n_flaky: int, n_doomed: int) -> None:
    pool = await create_pool(REDIS, default_queue_name=QUEUE)
    for i in range(n_ok):
        await pool.enqueue_job("add", i, 1)
    for i in range(n_fail):
        await pool.enqueue_job("fail", i, note=f"n{i}")
    for i in range(n_flaky):
        await pool.enqueue_job("flaky", i)
    for i in range(n_doomed):
        await pool.enqueue_job("doomed", i)
    await pool.aclose()


if __name__ == "__main__":  # producer: python it_arq.py OK FAIL FLAKY DOOMED
    asyncio.run(produce(*(int(a) for a in sys.argv[1:])))
