"""The collector's ``Stats`` in shared memory: one writer, any number of lock-free readers.

One concept, two homes: the collector keeps the same per-queue *records* as ``Stats`` (see
``qdash_mp.stats``), but in one POSIX shared-memory block, so the dashboard, ``qdash-mp
stats`` or a ``/metrics`` exporter in any local process can read the counters without asking
the daemon, and a collector restarted after ``kill -9`` reattaches and counts on. The block
also holds the collector's dedup table (each client's last applied batch seq), changed in the
same commit as the batch's counters.

Modules, one job each:

- ``layout``: the block's bytes (the byte table) and name rules; pure.
- ``segment``: map, create, lock, follow and retire segments (generations).
- ``redo``: recovery: finish or drop the update a killed writer left behind.
- ``snapshot``: the checksummed snapshot file (its byte table), encode/decode/load/save.
- ``table``: find, repair, replace or create a writer's table (``create_or_attach``).
- ``rows``: records to rows with reuse of unchanged ones.
- ``writer``: ``SharedStats``; ``reader``: ``SharedStatsReader``.

The narrative (seqlock, memory ordering, redo log, growth, clean restarts, which state wins)
is in ``docs/shm.md``.
"""

from qdash_mp.errors import ShmBusy, ShmError, ShmIncompatible, ShmLocked, ShmMissing, SnapshotError
from qdash_mp.shm.layout import (
    CLIENT_ID_MAX,
    DEFAULT_CAPACITY,
    DEFAULT_CLIENT_CAPACITY,
    DEFAULT_CLIENT_TTL,
    LAYOUT_VERSION,
    MAGIC,
    NAME_MAX,
    segment_name,
    stored_queue_name,
)
from qdash_mp.shm.reader import SharedStatsReader
from qdash_mp.shm.snapshot import SNAPSHOT_MAGIC, SNAPSHOT_VERSION
from qdash_mp.shm.writer import SharedStats

__all__ = [
    "CLIENT_ID_MAX",
    "DEFAULT_CAPACITY",
    "DEFAULT_CLIENT_CAPACITY",
    "DEFAULT_CLIENT_TTL",
    "LAYOUT_VERSION",
    "MAGIC",
    "NAME_MAX",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_VERSION",
    "SharedStats",
    "SharedStatsReader",
    "ShmBusy",
    "ShmError",
    "ShmIncompatible",
    "ShmLocked",
    "ShmMissing",
    "SnapshotError",
    "segment_name",
    "stored_queue_name",
]
