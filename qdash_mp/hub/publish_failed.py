"""The publisher's failed-job index: which ids changed, reconciliation, what each publish adds.

``FailedChanges`` is the failed-index half of ``qdash_mp.hub.publisher.Publisher`` (the
module docstring there tells the whole story). It follows the journal through
``Journal.on_applied`` (a set of changed ids with a generation each, written in the
committing thread, hence the lock): at publish time each changed id is read back from the
journal -- there: an add with its FAILED record; gone: a removal. After a start, an
overflowing change list (``max_changes``), a journal flush, or when Redis lost this host's
state, a full reconciliation (``reconcile_now``) compares the journal with ``fi:{host}`` (ids
and failed_at scores, read in chunks) and queues every difference; everything drains in
batches of ``batch`` ids per publish. An id leaves the change list only when the publish that
carried it was applied and it did not change again meanwhile (``acknowledge``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from qdash_mp.collector.retry import read_for_retry
from qdash_mp.errors import NotFound, QdashError
from qdash_mp.journal.format import Op, RecordType
from qdash_mp.records import pack_failed_fields

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from qdash_mp.journal import Journal

__all__ = ["FailedChanges"]

log = logging.getLogger("qdash_mp.hub.publisher")

_FAILED: Final = int(RecordType.FAILED)
_REMOVED: Final = int(RecordType.REMOVED)
_FLUSHED: Final = int(RecordType.FLUSHED)
_ZRANGE_CHUNK: Final = 10_000
_READ_CHUNK: Final = 2_000


def _read_failed(
    journal: Journal, ids: Iterable[str]
) -> tuple[list[tuple[str, str, bytes]], list[str]]:
    """Adds (id, failed_at score, FAILED record) for the ids in the journal, removes for
    the others (in a worker thread: this reads records from disk)."""
    adds: list[tuple[str, str, bytes]] = []
    removes: list[str] = []
    for id in ids:
        try:
            failed, raw, failed_at = read_for_retry(journal, id)
        except NotFound:
            removes.append(id)
            continue
        except QdashError as exc:
            log.error("hub: failed job %r unreadable in the journal, not published: %s", id, exc)
            continue
        job = failed.job
        rec = pack_failed_fields(
            id,
            job.name,
            raw,
            job.attempts,
            job.enqueued_at,
            failed.queue,
            failed.error,
            failed.traceback,
            failed_at,
        )
        adds.append((id, repr(failed_at), rec))
    return adds, removes


def _differing(journal: Journal, ids: list[str], scores: dict[str, float]) -> list[str]:
    """The ids whose journal failed_at is not their hub score (in a worker thread)."""
    out = []
    for id in ids:
        try:
            at: float | None = journal.failed_at(id)
        except NotFound:
            at = None
        if at is None or scores.get(id) != at:
            out.append(id)
    return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FailedChanges:
    """The change list, the reconciliation backlog and what a publish takes of them."""

    def __init__(self, batch: int, max_changes: int) -> None:
        self.batch = batch
        self.max_changes = max_changes
        """Changed ids listed at most; beyond, the list is dropped for a reconciliation."""
        # The change list: written by the journal's committing thread, hence the lock.
        self._lock = threading.Lock()
        self._dirty: dict[str, int] = {}
        self._gen = 0
        self._overflow = False
        self.reconcile = True
        """A full reconciliation is due before the next publish."""
        self._backlog: dict[str, None] = {}

    def on_applied(self, ops: list[Op]) -> None:
        """``Journal.on_applied``: remember which failed ids changed (bounded)."""
        with self._lock:
            if self._overflow:
                return
            for op in ops:
                rtype = op[0]
                if rtype in (_FAILED, _REMOVED):
                    self._gen += 1
                    self._dirty[op[1]] = self._gen
                elif rtype == _FLUSHED:
                    self._overflow = True
                    self._dirty.clear()
                    return
            if len(self._dirty) > self.max_changes:
                self._overflow = True
                self._dirty.clear()

    @property
    def overflowed(self) -> bool:
        """The change list gave up (overflow or flush): a reconciliation comes next."""
        with self._lock:
            return self._overflow

    def reconcile_due(self) -> bool:
        """Whether a reconciliation is due (the change list overflowed, or ``reconcile``)."""
        with self._lock:
            if self._overflow:
                self.reconcile = True
        return self.reconcile

    async def reconcile_now(self, r: Redis, key: str, journal: Journal) -> None:
        """Compare the journal with the hub's ``fi:{host}`` (``key``); queue every
        difference."""
        with self._lock:
            self._overflow = False
            self._dirty.clear()  # re-derived below; changes from now on are listed again
        ids = await asyncio.to_thread(journal.ids)
        scores: dict[str, float] = {}
        start = 0
        while True:
            chunk = await r.zrange(key, start, start + _ZRANGE_CHUNK - 1, withscores=True)
            for member, score in chunk:
                scores[_text(member)] = float(score)
            if len(chunk) < _ZRANGE_CHUNK:
                break
            start += _ZRANGE_CHUNK
        in_journal = set(ids)
        backlog = dict.fromkeys(i for i in scores if i not in in_journal)
        removes = len(backlog)
        for k in range(0, len(ids), _READ_CHUNK):
            part = ids[k : k + _READ_CHUNK]
            differing = await asyncio.to_thread(_differing, journal, part, scores)
            backlog.update(dict.fromkeys(differing))
        self._backlog = backlog
        log.info(
            "hub: failed-job index reconciled: %d in the journal, %d in the hub; "
            "%d to add or refresh, %d to remove",
            len(ids),
            len(scores),
            len(backlog) - removes,
            removes,
        )

    async def take(
        self, journal: Journal, first: list[str]
    ) -> tuple[list[tuple[str, str, bytes]], list[str], dict[str, int | None]]:
        """Adds, removes and the ids taken (-> their change generation, ``None``: not in the
        change list) for one publish: ``first`` (ids whose commands finished), then changed
        ids, then the backlog, ``batch`` at most."""
        taken: dict[str, int | None] = {}
        with self._lock:
            for id in first:
                taken[id] = self._dirty.get(id)
            for id, gen in self._dirty.items():
                if len(taken) >= self.batch:
                    break
                taken.setdefault(id, gen)
        for id in self._backlog:
            if len(taken) >= self.batch:
                break
            taken.setdefault(id, None)
        adds: list[tuple[str, str, bytes]] = []
        removes: list[str] = []
        if taken:
            adds, removes = await asyncio.to_thread(_read_failed, journal, list(taken))
        return adds, removes, taken

    def acknowledge(self, taken: dict[str, int | None]) -> None:
        """The publish that carried ``taken`` was applied: those ids are done unless they
        changed again meanwhile."""
        with self._lock:
            for id, gen in taken.items():
                if gen is not None and self._dirty.get(id) == gen:
                    del self._dirty[id]
        for id in taken:
            self._backlog.pop(id, None)
