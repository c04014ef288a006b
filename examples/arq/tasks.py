"""arq functions reported to qdash_mp. Worker: ``arq tasks.WorkerSettings``."""

import asyncio
import os
import random
import time
from typing import Any

from arq.connections import RedisSettings

from qdash_mp.integrations.arq import instrument

REDIS = RedisSettings.from_dsn(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))


async def resize(ctx: dict[str, Any], image: str, width: int) -> str:
    await asyncio.sleep(random.uniform(0.01, 0.1))
    return f"{image}@{width}"


async def flaky(ctx: dict[str, Any], order: int) -> None:
    if int(time.time()) % 2 == 0:
        raise ConnectionError(f"payment gateway timed out for order {order}")


@instrument  # the one line
class WorkerSettings:
    functions = (resize, flaky)
    redis_settings = REDIS
