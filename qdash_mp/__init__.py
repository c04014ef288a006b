"""qdash_mp: an operations dashboard for Python job queues, embedded or across processes.

``create_app`` is imported lazily, so worker processes that only use ``Client`` or ``Stats``
do not pay for importing aiohttp and jinja2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qdash_mp.client import Client
from qdash_mp.errors import NotFound, QdashError
from qdash_mp.failed import FailedJobs, MemoryFailedJobs
from qdash_mp.hooks import Hooks
from qdash_mp.inspector import Inspector, new_inspector
from qdash_mp.models import (
    PAGE_SIZE,
    ActiveJob,
    FailedJob,
    Job,
    JobView,
    LatencySummary,
    QueueStat,
    StatsView,
    ThroughputSample,
    TrackedJob,
    WorkerView,
)
from qdash_mp.sampler import Sampler
from qdash_mp.stats import Stats

if TYPE_CHECKING:
    from qdash_mp.web import create_app

__all__ = [
    # data
    "PAGE_SIZE",
    "ActiveJob",
    "FailedJob",
    "Job",
    "JobView",
    "LatencySummary",
    "QueueStat",
    "StatsView",
    "ThroughputSample",
    "TrackedJob",
    "WorkerView",
    # embedded parts
    "FailedJobs",
    "Inspector",
    "MemoryFailedJobs",
    "Sampler",
    "Stats",
    "new_inspector",
    # dashboard
    "create_app",
    # worker hooks to the collector, and the contract both sides implement
    "Client",
    "Hooks",
    # errors
    "NotFound",
    "QdashError",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from qdash_mp.web import create_app

        return create_app
    raise AttributeError(f"module 'qdash_mp' has no attribute {name!r}")
