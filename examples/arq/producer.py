"""Enqueue 20 resizes and 5 flaky jobs: ``python producer.py``."""

import asyncio

from tasks import REDIS

from qdash_mp.integrations.arq import create_pool  # an ArqRedis that counts pushes


async def main() -> None:
    pool = await create_pool(REDIS)
    for i in range(20):
        await pool.enqueue_job("resize", f"img-{i}.png", 640)
    for order in range(5):
        await pool.enqueue_job("flaky", order)
    await pool.aclose()
    print("enqueued 25 jobs on queue 'arq:queue'")


asyncio.run(main())
