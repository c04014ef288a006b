"""taskiq tasks reported to qdash_mp. Worker: ``taskiq worker tasks:broker --workers 2``."""

import asyncio
import os
import random
import time

from taskiq import SimpleRetryMiddleware
from taskiq_redis import ListQueueBroker

from qdash_mp.integrations.taskiq import QdashMiddleware

broker = ListQueueBroker(os.environ.get("REDIS_URL", "redis://localhost:6379/0")).with_middlewares(
    SimpleRetryMiddleware(default_retry_count=2)
)
broker.add_middlewares(QdashMiddleware())  # the one line


@broker.task
async def resize(image: str, width: int) -> str:
    await asyncio.sleep(random.uniform(0.01, 0.1))
    return f"{image}@{width}"


@broker.task(retry_on_error=True)
async def flaky(order: int) -> None:
    if int(time.time()) % 2 == 0:
        raise ConnectionError(f"payment gateway timed out for order {order}")
