"""The exception hierarchy: one root, ``QdashError``, and a few branches.

Callers who want to catch "anything qdash_mp raised on purpose" catch ``QdashError``;
the branches exist where a caller or the HTTP layer acts differently (404 vs 409).
"""

from __future__ import annotations

__all__ = [
    "CollectorError",
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
    "AuditCorrupt",
    "AuditError",
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


class AuditError(QdashError):
    """The audit log could not be read or written."""


class AuditCorrupt(AuditError):
    """The audit log holds corruption that is not a torn tail."""
