"""RQ jobs reported to qdash_mp (see README.md for the worker command)."""

import random
import time


def resize(image: str, width: int) -> str:
    time.sleep(random.uniform(0.01, 0.1))
    return f"{image}@{width}"


def flaky(order: int) -> None:
    if int(time.time()) % 2 == 0:
        raise ConnectionError(f"payment gateway timed out for order {order}")
