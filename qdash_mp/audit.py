"""The audit log of operator actions: who, from where, what, how many, with what result.

``FileAuditLog`` (the collector's: ``<data-dir>/audit.log``) appends one checksummed record
per action and fsyncs it before the action's answer is sent, so an answered action survives
``kill -9``; at open it cuts a torn tail (logged) and refuses corruption (``AuditCorrupt``).
The file is created by the first action, so a collector that fails to start leaves none.
Retention (max entries, max age) rewrites the file atomically (temp file, fsync, rename, fsync
of the directory) when it has grown a quarter past the limit, so the cost is amortised.
``MemoryAuditLog`` is the embedded app's. The byte layout is in ``qdash_mp.audit_format``.

Why a file of its own rather than records in the failed-job journal: the journal's hot path
(group commit of failed jobs) and its recovery stay untouched, and the two have different
retention. Both live in the data dir and share the crash-safety rules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qdash_mp.audit_format import HEADER, HEADER_SIZE, decode, encode_record
from qdash_mp.errors import AuditCorrupt, AuditError

__all__ = ["AUDIT_FILE", "AuditEntry", "AuditLog", "FileAuditLog", "MemoryAuditLog"]

log = logging.getLogger("qdash_mp.audit")

AUDIT_FILE = "audit.log"
DEFAULT_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One operator action. ``ids`` or ``filter`` say what it targeted."""

    t: float
    who: str
    remote: str
    action: str
    ids: tuple[str, ...] = ()
    filter: dict[str, Any] | None = None
    count: int = 0
    result: str = "ok"
    status: int = 200

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "who": self.who,
            "remote": self.remote,
            "action": self.action,
            "ids": list(self.ids),
            "filter": self.filter,
            "count": self.count,
            "result": self.result,
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditEntry:
        try:
            return cls(
                t=float(d["t"]),
                who=str(d["who"]),
                remote=str(d["remote"]),
                action=str(d["action"]),
                ids=tuple(str(i) for i in d.get("ids") or ()),
                filter=d.get("filter"),
                count=int(d.get("count", 0)),
                result=str(d.get("result", "")),
                status=int(d.get("status", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AuditCorrupt(f"audit record without a valid field: {exc}") from None


class AuditLog(Protocol):
    """Where the dashboard records actions (``append``) and reads them back (newest first)."""

    async def append(self, entry: AuditEntry) -> None: ...

    def page(self, offset: int, limit: int) -> list[AuditEntry]: ...

    def __len__(self) -> int: ...


@dataclass
class MemoryAuditLog:
    """In-process audit log (embedded dashboards): the newest ``max_entries`` actions."""

    max_entries: int = DEFAULT_MAX_ENTRIES
    _entries: deque[AuditEntry] = field(init=False)

    def __post_init__(self) -> None:
        self._entries = deque(maxlen=self.max_entries)

    async def append(self, entry: AuditEntry) -> None:
        self._entries.append(entry)

    def page(self, offset: int, limit: int) -> list[AuditEntry]:
        return _newest(list(self._entries), offset, limit)

    def __len__(self) -> int:
        return len(self._entries)


def _newest(entries: Sequence[AuditEntry], offset: int, limit: int) -> list[AuditEntry]:
    n = len(entries)
    hi = max(0, n - offset)
    return list(reversed(entries[max(0, hi - limit) : hi]))


class FileAuditLog:
    """The durable audit log in one append-only file (see the module docstring)."""

    def __init__(
        self, path: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES, max_age: float | None = None
    ) -> None:
        self.path = path
        self.max_entries = max(1, max_entries)
        self.max_age = max_age
        self._lock = threading.Lock()
        self._entries: list[AuditEntry] = []
        self._fd = -1
        self._closed = False
        if path.exists():
            self._open()

    # -- open / recover ----------------------------------------------------------------------

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            buf = os.pread(fd, size, 0) if size else b""
            decoded = decode(buf)
            if decoded.torn is not None:
                log.warning("audit log %s: cut a torn tail (%s)", self.path, decoded.torn)
                os.ftruncate(fd, decoded.end)
            if decoded.end < HEADER_SIZE:
                os.ftruncate(fd, 0)
                os.pwrite(fd, HEADER, 0)
            os.fsync(fd)
            self._sync_dir()
            self._entries = [AuditEntry.from_dict(d) for d in decoded.entries]
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._apply_retention(time.time(), force=True)

    def _sync_dir(self) -> None:
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def page(self, offset: int, limit: int) -> list[AuditEntry]:
        return _newest(self._entries, offset, limit)

    # -- writing -----------------------------------------------------------------------------

    async def append(self, entry: AuditEntry) -> None:
        """Write ``entry`` and fsync it (off the event loop)."""
        await asyncio.to_thread(self.append_sync, entry)

    def append_sync(self, entry: AuditEntry) -> None:
        record = encode_record(entry.to_dict())
        with self._lock:
            if self._closed:
                raise AuditError("the audit log is closed")
            if self._fd < 0:
                self._open()  # the first action creates the file
            end = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                os.pwrite(self._fd, record, end)
                os.fsync(self._fd)
            except OSError as exc:
                os.ftruncate(self._fd, end)  # no half record left for the next append to bury
                raise AuditError(f"cannot write the audit log {self.path}: {exc}") from exc
            self._entries.append(entry)
            self._apply_retention(entry.t, force=False)

    def _apply_retention(self, now: float, *, force: bool) -> None:
        keep = self._entries
        if self.max_age is not None:
            cutoff = now - self.max_age
            keep = [e for e in keep if e.t >= cutoff]
        slack = self.max_entries if force else self.max_entries + self.max_entries // 4
        if len(keep) == len(self._entries) and len(keep) <= slack:
            return
        keep = keep[-self.max_entries :]
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = HEADER + b"".join(encode_record(e.to_dict()) for e in keep)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._sync_dir()
        old, self._fd = self._fd, os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        os.close(old)
        log.info("audit log: kept %d of %d entries", len(keep), len(self._entries))
        self._entries = keep

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
