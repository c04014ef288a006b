"""The Huey tasks of the integrations tests (worker: ``huey_consumer it_huey.huey``)."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlparse

from huey import RedisHuey
from marks import MARKS, boom, mark

from qdash_mp.integrations.huey import install

_url = urlparse(os.environ["IT_REDIS_URL"])
huey = RedisHuey(os.environ["IT_QUEUE"], host=_url.hostname, port=_url.port, results=False)
install(huey)


@huey.task()
def add(x: int, y: int) -> int:
    mark(f"add-{x}")
    return x + y


@huey.task()
def fail(x: int, note: str = "") -> None:
    boom(x)


@huey.task(retries=2)
def flaky(x: int) -> None:
    """Fails on its first run; Huey retries it."""
    mark(f"flaky-{x}")
    if len((MARKS / f"flaky-{x}").read_text().splitlines()) < 2:
        raise RuntimeError("first run fails")


@huey.task(retries=1)
def doomed(x: int) -> None:
    """Always fails: retried once by Huey, then failed for good."""
    mark(f"doomed-{x}")
    raise RuntimeError(f"doomed {x}")


def produce(n_ok: int, n_fail: int, n_flaky: int, n_doomed: int) -> None:
    for i in range(n_ok):
        add(i, 1)
    for i in range(n_fail):
        fail(i, note=f"n{i}")
    for i in range(n_flaky):
        flaky(i)
    for i in range(n_doomed):
        doomed(i)


if __name__ == "__main__":  # producer: python it_huey.py OK FAIL FLAKY DOOMED
    import it_huey  # Huey names tasks by module: enqueue them as ``it_huey.*``, not __main__

    it_huey.produce(*(int(a) for a in sys.argv[1:]))
