"""Enqueue 20 resizes and 5 flaky jobs: ``python producer.py``."""

from tasks import flaky, resize

for i in range(20):
    resize.delay(f"img-{i}.png", 640)
for order in range(5):
    flaky.delay(order)
print("enqueued 25 jobs on queue 'celery'")
