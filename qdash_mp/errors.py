"""The exception hierarchy: one root, ``QdashError``, and a few branches.

Callers who want to catch "anything qdash_mp raised on purpose" catch ``QdashError``;
the branches exist where a caller or the HTTP layer acts differently (404 vs 409).
"""

from __future__ import annotations

__all__ = [
    "CollectorError",
    "CollectorNotRunning",
    "ConfigError",
    "JournalCorrupt",
    "JournalError",
    "NotFound",
    "ProtocolError",
    "QdashError",
    "RetryConflict",
    "RetryError",
    "RetryUnavailable",
    "HistoryCorrupt",
    "HistoryError",
    "ShmBusy",
    "ShmError",
    "ShmIncompatible",
    "ShmLocked",
    "ShmMissing",
    "SnapshotError",
    "SnapshotNotSaved",
    "AuditCorrupt",
    "AuditError",
    "HubError",
    "HubCorrupt",
    "RetryQueued",
]


class QdashError(Exception):
    """Root of every error qdash_mp raises on purpose."""


class NotFound(QdashError, LookupError):
    """``retry``/``forget``/lookup of an id that is not (or no longer) stored."""


class RetryError(QdashError):
    """A retry could not be carried out; the failed-job record stays where it was."""


class RetryUnavailable(RetryError):
    """Nobody can re-enqueue this job (no ``requeue`` callback for its queue)."""


class RetryConflict(RetryError):
    """Another retry of the same job is already in flight."""


class ProtocolError(QdashError):
    """A frame on the collector socket broke the wire protocol."""


class JournalError(QdashError):
    """The failed-job journal could not be read or written."""


class JournalCorrupt(JournalError):
    """The journal holds corruption that is not a torn tail; see ``--salvage``."""


class CollectorError(QdashError):
    """The collector daemon cannot start or cannot be reached."""


class ConfigError(QdashError, ValueError):
    """A setting or command-line value is invalid."""


class HistoryError(QdashError):
    """The per-queue history files could not be read or written."""


class HistoryCorrupt(HistoryError):
    """A history file holds corruption that is not a torn write (bad header, size, state)."""


class ShmError(QdashError):
    """The shared-memory stats block cannot be used."""


class ShmMissing(ShmError, CollectorError):
    """No stats segment of that name: the collector is not running (or shut down)."""


class ShmIncompatible(ShmError):
    """A segment of that name exists but is not a stats block this version can read."""


class ShmLocked(ShmError, CollectorError):
    """Another live writer (collector) owns the segment."""


class ShmBusy(ShmError):
    """No consistent snapshot could be read in time."""


class SnapshotError(ShmError):
    """The stats snapshot file could not be written; the shared-memory segment is untouched.

    Raised by ``SharedStats.save``. The counters are still in the segment: a caller that is
    shutting down must keep it (``close``, not ``unlink``) so the next start reattaches.
    """


class SnapshotNotSaved(CollectorError):
    """A stopping collector could not save its counters; it kept the shared-memory segment."""


class CollectorNotRunning(CollectorError):
    """No collector is running for that data dir (``qdash-mp stats`` exits 1)."""


class AuditError(QdashError):
    """The audit log could not be read or written."""


class AuditCorrupt(AuditError):
    """The audit log holds corruption that is not a torn tail."""


class HubError(QdashError):
    """The Redis hub (issue "Scale-out") could not be read or written."""


class HubCorrupt(HubError):
    """A blob read from the hub's Redis keys is not what ``qdash_mp.hub.format`` writes."""


class RetryQueued(RetryError):
    """A hub command (retry/forget) was queued for a host that has not executed it yet
    (offline, or slower than the wait): it runs once when the host reads its stream.
    ``host`` names that host. The dashboard answers 202, not an error."""

    def __init__(self, message: str, host: str = "") -> None:
        super().__init__(message)
        self.host = host
