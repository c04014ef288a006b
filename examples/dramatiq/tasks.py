"""Dramatiq actors reported to qdash_mp. Worker: ``dramatiq tasks --processes 2``."""

import os
import random
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries

from qdash_mp.integrations.dramatiq import QdashMiddleware

broker = RedisBroker(url=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
broker.add_middleware(QdashMiddleware(), before=Retries)  # the one line
dramatiq.set_broker(broker)


@dramatiq.actor
def resize(image: str, width: int) -> str:
    time.sleep(random.uniform(0.01, 0.1))
    return f"{image}@{width}"


@dramatiq.actor(max_retries=2, min_backoff=100, max_backoff=500)
def flaky(order: int) -> None:
    if int(time.time()) % 2 == 0:
        raise ConnectionError(f"payment gateway timed out for order {order}")
