"""qdash_mp: an operations dashboard for Python job queues, embedded or across processes.

Every public name is imported on first use (``_WHERE``): worker processes that only use
``Client`` or ``Stats`` do not pay for aiohttp and jinja2, nor an RQ worker for the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from qdash_mp.web import create_app

_WHERE = {
    **dict.fromkeys(
        [
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
        ],
        "qdash_mp.models",
    ),
    "FailedJobs": "qdash_mp.failed",
    "MemoryFailedJobs": "qdash_mp.failed",
    "Inspector": "qdash_mp.inspector",
    "new_inspector": "qdash_mp.inspector",
    "Sampler": "qdash_mp.sampler",
    "Stats": "qdash_mp.stats",
    "create_app": "qdash_mp.web",
    "Client": "qdash_mp.client",
    "Hooks": "qdash_mp.hooks",
    "NotFound": "qdash_mp.errors",
    "QdashError": "qdash_mp.errors",
}
"""Where each public name lives. They are imported on first use: a process that imports
one module of the package (an RQ worker importing its adapter, which forks a horse per job
and pays for every page it holds in each fork) loads only what that module needs."""

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
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'qdash_mp' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
