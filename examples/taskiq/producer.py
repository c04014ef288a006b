"""Enqueue 20 resizes and 5 flaky jobs: ``python producer.py``."""

import asyncio

from tasks import broker, flaky, resize


async def main() -> None:
    await broker.startup()
    for i in range(20):
        await resize.kiq(f"img-{i}.png", 640)
    for order in range(5):
        await flaky.kiq(order)
    await broker.shutdown()
    print("enqueued 25 jobs on queue 'taskiq'")


asyncio.run(main())
