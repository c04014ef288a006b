"""Huey tasks reported to qdash_mp. Worker: ``huey_consumer tasks.huey -w 2``."""

import os
import random
import time
from urllib.parse import urlparse

from huey import RedisHuey

from qdash_mp.integrations.huey import install

_url = urlparse(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
huey = RedisHuey("example", host=_url.hostname, port=_url.port)
install(huey)  # the one line


@huey.task()
def resize(image: str, width: int) -> str:
    time.sleep(random.uniform(0.01, 0.1))
    return f"{image}@{width}"


@huey.task(retries=2, retry_delay=1)
def flaky(order: int) -> None:
    if int(time.time()) % 2 == 0:
        raise ConnectionError(f"payment gateway timed out for order {order}")
