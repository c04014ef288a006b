"""qdash_mp: an operations dashboard for Python job queues, embedded or across processes."""

from qdash_mp.client import Client
from qdash_mp.errors import NotFound, QdashError
from qdash_mp.failed import FailedJobs, MemoryFailedJobs
from qdash_mp.inspector import Inspector, new_inspector
from qdash_mp.models import (
    PAGE_SIZE,
    FailedJob,
    Job,
    JobView,
    QueueStat,
    StatsView,
    ThroughputSample,
)
from qdash_mp.sampler import Sampler
from qdash_mp.stats import Stats
from qdash_mp.web import create_app

__all__ = [
    # errors
    "NotFound",
    "QdashError",
    # data
    "PAGE_SIZE",
    "FailedJob",
    "Job",
    "JobView",
    "QueueStat",
    "StatsView",
    "ThroughputSample",
    # embedded parts
    "FailedJobs",
    "Inspector",
    "MemoryFailedJobs",
    "Sampler",
    "Stats",
    "new_inspector",
    "create_app",
    "Client",
]

__version__ = "0.1.0"
