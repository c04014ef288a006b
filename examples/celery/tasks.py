"""Celery tasks reported to qdash_mp. Worker: ``celery -A tasks worker -P prefork -c 2``."""

import os
import random
import time

from celery import Celery

from qdash_mp.integrations.celery import install

app = Celery("example", broker=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
install(app)  # the one line: producers count pushes, workers the rest (prefork-safe)


@app.task
def resize(image: str, width: int) -> str:
    time.sleep(random.uniform(0.01, 0.1))
    return f"{image}@{width}"


@app.task
def flaky(order: int) -> None:
    if int(time.time()) % 2 == 0:
        raise ConnectionError(f"payment gateway timed out for order {order}")
