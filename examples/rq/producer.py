"""Enqueue 20 resizes and 5 flaky jobs: ``python producer.py``."""

import os

from redis import Redis

from qdash_mp.integrations.rq import Queue  # counts pushes

queue = Queue(
    "default", connection=Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
)
for i in range(20):
    queue.enqueue("tasks.resize", f"img-{i}.png", 640)
for order in range(5):
    queue.enqueue("tasks.flaky", order)
print("enqueued 25 jobs on queue 'default'")
