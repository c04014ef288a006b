"""Simulated job traffic for ``qdash-mp demo``: queues, runtimes, failures, retries.

Pure of I/O: ``Traffic`` decides what happens next from a seeded ``random.Random``; the demo
feeds those decisions into real hooks (embedded ``Stats`` or a ``Client``).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from qdash_mp.models import Job

__all__ = ["DEMO_QUEUES", "Outcome", "Traffic"]

DEMO_QUEUES: dict[str, tuple[str, ...]] = {
    "emails": ("SendWelcomeEmail", "SendPasswordReset", "SendDigest"),
    "reports": ("BuildMonthlyReport", "ExportCsv"),
    "webhooks": ("DeliverWebhook",),
    "billing": ("ChargeCard", "IssueRefund"),
}

_ERRORS = (
    "smtp: connection refused",
    "TimeoutError: upstream did not answer in 30s",
    "KeyError: 'customer_id'",
    "HTTP 502 from https://hooks.example.test/ingest",
    "card_declined: insufficient funds",
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one simulated job."""

    queue: str
    job: Job
    runtime: float
    error: str | None


class Traffic:
    """An endless stream of simulated jobs; ``failure_rate`` of them fail."""

    def __init__(
        self, seed: int | None = None, failure_rate: float = 0.02, prefix: str = ""
    ) -> None:
        self._rng = random.Random(seed)
        self._failure_rate = failure_rate
        self._ids = itertools.count(1)
        self._prefix = prefix

    def next(self) -> Outcome:
        """The next job: its queue, a runtime in seconds, and an error or ``None``."""
        rng = self._rng
        queue = rng.choice(tuple(DEMO_QUEUES))
        job = Job(
            id=f"{self._prefix}{next(self._ids):08d}",
            name=rng.choice(DEMO_QUEUES[queue]),
            payload={"user_id": rng.randrange(1, 100_000), "queue": queue},
            attempts=rng.randint(1, 3),
        )
        runtime = rng.lognormvariate(-4.5, 0.8)
        error = rng.choice(_ERRORS) if rng.random() < self._failure_rate else None
        return Outcome(queue=queue, job=job, runtime=runtime, error=error)

    def should_retry(self, chance: float = 0.2) -> bool:
        """Whether the simulated operator retries a failed job now."""
        return self._rng.random() < chance
