"""Staging: encode records into the pending buffer, and retention (max_jobs, max_age).

Two entry points stage failures: ``stage_failed_packed`` for FAILED arrays as they come off
the wire (the collector's bulk path: the bytes are stored as they are, only the framing
is added) and ``stage_failed`` for one ``FailedJob``. ``stage_removed``, ``stage_flush`` and
``stage_client_seq`` stage the other records. Nothing staged is visible until
``Journal.commit`` made it durable.

Removals are checked against the *pending state* (committed, then everything staged:
``pending.py``) and retention counts it. How retention stays exact where it matters and
free where it does not is in ``docs/journal.md``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import repeat
from operator import itemgetter
from typing import Final, Literal

import msgpack

from qdash_mp.errors import JournalError, NotFound, ProtocolError
from qdash_mp.journal.format import (
    HEADER,
    MAX_PAYLOAD,
    Op,
    Problem,
    RecordType,
    append_record,
    encode_client_seq,
    encode_removed,
    encode_removed_many,
    failed_metas,
    flushed_payload,
    frame_records,
    read_record,
    record_header,
)
from qdash_mp.journal.index import LOC_MASK, LOC_SHIFT
from qdash_mp.journal.pending import GONE, PendingState
from qdash_mp.models import FailedJob
from qdash_mp.records import FailedMeta, FailedRecord, PackedFailed, pack_failed_record

__all__ = ["Staging"]

_AGE_CHECK_EVERY: Final = 1.0
"""Seconds between age-retention checks made by ``stage_failed_packed``."""
_BULK: Final = 16
"""``stage_failed_packed`` frames this many records or more in column passes."""
_FAILED: Final = int(RecordType.FAILED)
_REMOVED: Final = int(RecordType.REMOVED)
_FLUSHED: Final = int(RecordType.FLUSHED)
_CLIENT_SEQ: Final = int(RecordType.CLIENT_SEQ)
_HISTORY: Final = int(RecordType.HISTORY)


def _timestamp(value: datetime | float) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return float(value)


class Staging(PendingState):
    """The staging and retention part of ``Journal`` (see the module docstring)."""

    batch_prunes: bool = True
    """Stage a batch's count prunes ahead of it as one run when that gives the same state
    (``_stage_counted``); False stages record by record: the twin the tests compare it with.
    """

    def stage_failed(self, failed: FailedJob, payload_raw: bytes | None = None) -> None:
        """Stage the record of ``failed`` (it supersedes a live record of the same id).

        ``payload_raw`` is the msgpack encoding of the job payload exactly as received;
        without it the payload is packed here. The record is checked as the wire checks a
        FAILED array (``records.check_failed``): ``JournalError`` saying what breaks the
        rules, and nothing staged. Naive datetimes are taken as UTC.
        """
        job = failed.job
        if payload_raw is None:
            try:
                payload_raw = msgpack.packb(job.payload, use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as exc:
                raise JournalError(
                    f"the payload of failed job {failed.id!r} is not msgpack-able: {exc}"
                ) from None
        try:
            if type(payload_raw) is not bytes:
                payload_raw = bytes(memoryview(payload_raw))
            enqueued_at = job.enqueued_at
            if enqueued_at is not None and type(enqueued_at) is not float:
                enqueued_at = float(enqueued_at)
            record = pack_failed_record(
                FailedRecord(
                    job_id=failed.id,
                    name=job.name,
                    payload_raw=payload_raw,
                    attempts=job.attempts,
                    enqueued_at=enqueued_at,
                    queue=failed.queue,
                    error=failed.error,
                    traceback=failed.traceback,
                    failed_at=_timestamp(failed.failed_at),
                )
            )
        except (TypeError, ValueError, OverflowError, ProtocolError) as exc:
            raise JournalError(f"cannot record failed job {failed.id!r}: {exc}") from None
        self.stage_failed_packed((record,), ((failed.queue, job.name, failed.error),))

    def stage_failed_packed(
        self, records: Iterable[PackedFailed], metas: Iterable[FailedMeta] | None = None
    ) -> None:
        """Stage FAILED records that are already packed and checked: the collector's path.

        Each record is ``(data, id, failed_at)``: ``data`` the msgpack bytes of a FAILED
        array that passed ``records.check_failed`` -- what a decoded ``Batch`` carries
        (each a ``records.PackedFailed``) -- and ``id``, ``failed_at`` its fields 0 and 8. The
        bytes are stored as they are; only the record framing (length, type, one CRC) is
        added. A failure in ``data`` would only show at recovery, as a damaged record: pass
        nothing unchecked. All or nothing: a record over ``MAX_PAYLOAD`` bytes raises
        ``JournalError`` and none is staged.

        ``metas``: ``(queue, name, error)`` of each record, its fields 5, 1, 6, as the decoder
        that checked it read them (``Batch.metas``); the filter columns need them. Without
        them they are decoded from ``data`` here (what the wire decode already did once).
        """
        records = list(records)
        meta_list = None if metas is None else list(metas)
        if meta_list is not None and len(meta_list) != len(records):
            raise ValueError(f"{len(meta_list)} metas for {len(records)} records")
        if len(records) < _BULK:  # a few: the column passes below cost more than they save
            chunk = bytearray()
            ops: list[Op] = []
            ids = []
            for data, id, failed_at in records:
                try:
                    head = record_header(_FAILED, data)
                except ValueError as exc:
                    raise JournalError(f"cannot record failed job {id!r}: {exc}") from None
                chunk += head
                chunk += data
                ops.append((_FAILED, id, len(head) + len(data), failed_at))
                ids.append(id)
        else:
            datas = list(map(itemgetter(0), records))
            ids = list(map(itemgetter(1), records))
            failed_ats = list(map(itemgetter(2), records))
            try:
                chunk = frame_records(_FAILED, datas)
            except ValueError as exc:
                big = next(r for r in records if len(r[0]) > MAX_PAYLOAD)
                raise JournalError(f"cannot record failed job {big[1]!r}: {exc}") from None
            sizes = [HEADER.size + n for n in map(len, datas)]
            ops = list(zip(repeat(_FAILED), ids, sizes, failed_ats, strict=False))
        if not ops:
            return
        if meta_list is None:  # (after the framing: the sizes are checked)
            meta_list = failed_metas(map(itemgetter(0), records))
        with self._lock:
            self._check_open()
            touched = self._p_ids
            queue = self._p_queue
            committed = 0 if self._p_flushed else len(self._index.pos)
            if committed + len(queue) + len(ops) <= self._max_jobs:
                # Even if every id were new, max_jobs could not be reached (the usual case):
                # no need to count, nor to look the ids up in the (big) committed index.
                self._p_len = None
                self._buf += chunk
                self._ops += ops
                touched.update(zip(ids, ops, strict=False))  # (same length) a later one supersedes
                queue += ops
            else:
                self._stage_counted(chunk, ops, ids)
            self._metas += meta_list  # in the order of the FAILED ops, which staging keeps
            now = self._clock()
            if now >= self._next_age_check:
                self._next_age_check = now + _AGE_CHECK_EVERY
                self._prune_age(now)

    def _stage_counted(self, chunk: bytearray, ops: list[Op], ids: list[str]) -> None:
        """Stage framed FAILED records near ``max_jobs`` (lock held), pruning as needed.

        The usual case at the cap -- none of the ids the batch makes prune is one of the
        batch's own -- stages those prunes first and then the batch as one run (so that
        ``_apply`` takes it in C passes); anything else goes record by record
        (``_stage_pruning``). Both leave the same pending and committed state: the k-th
        prune is the k-th oldest job live before the batch either way, since a batch's
        records are newer than every one of them.
        """
        touched = self._p_ids
        p_len = self._pending_len()
        batch = set(ids)
        live = touched.keys() & batch  # ids the batch supersedes: they add no live job
        n_live = sum(1 for id in live if touched[id] is not GONE)
        if not self._p_flushed:
            n_live += len(self._index.pos.keys() & (batch - live))
        grown = p_len + len(batch) - n_live
        need = grown - self._max_jobs
        if need > 0 and self.batch_prunes:
            doomed = self._p_oldest_ids(need)
            if len(doomed) < need or not batch.isdisjoint(doomed):
                self._stage_pruning(chunk, ops)  # a batch id would be pruned, or re-failed
                return
            self._stage_pruned(doomed)
            grown = self._max_jobs
        elif need > 0:
            self._stage_pruning(chunk, ops)
            return
        self._buf += chunk
        self._ops += ops
        touched.update(zip(ids, ops, strict=True))  # a later one of an id supersedes
        self._p_queue += ops
        self._p_len = grown

    def _stage_pruned(self, ids: list[str]) -> None:
        """``_stage_removed(id, "pruned", "pruned:count")`` for each of ``ids`` (all live in
        the pending state, distinct), in C passes (lock held).
        """
        payloads = encode_removed_many(ids, "pruned")
        try:
            self._buf += frame_records(_REMOVED, payloads)
        except ValueError as exc:  # pragma: no cover - an id is at most MAX_ID characters
            raise JournalError(str(exc)) from None
        sizes = [HEADER.size + n for n in map(len, payloads)]
        self._ops += zip(repeat(_REMOVED), ids, sizes, repeat("pruned:count"), strict=False)
        self._p_ids.update(zip(ids, repeat(GONE), strict=False))
        if self._p_len is not None:
            self._p_len -= len(ids)

    def _stage_pruning(self, chunk: bytearray, ops: list[Op]) -> None:
        """Stage framed FAILED records one by one, each count prune right behind the
        failure that caused it (lock held): a later record of the same id in the same
        batch must come after the prune of its earlier one.
        """
        buf = self._buf
        touched = self._p_ids
        queue = self._p_queue
        pos = self._index.pos
        p_len = self._pending_len()
        off = 0
        with memoryview(chunk) as view:
            for op in ops:
                size = op[2]
                buf += view[off : off + size]
                off += size
                self._ops.append(op)
                id = op[1]
                prev = touched.get(id)
                if prev is None:
                    if self._p_flushed or id not in pos:
                        p_len += 1
                elif prev is GONE:
                    p_len += 1
                touched[id] = op
                queue.append(op)
                if p_len > self._max_jobs:
                    self._p_len = p_len
                    self._prune_count()
                    p_len = self._pending_len()
        self._p_len = p_len

    def stage_removed(
        self,
        id: str,
        reason: Literal["retried", "forgotten"],
        *,
        if_failed_at: float | None = None,
        keep_history: bool = False,
    ) -> bool:
        """Stage dropping the record of ``id``; returns whether it did.

        ``NotFound`` if it is not there in the pending state (committed plus staged), so a
        job whose failure is staged can be removed, and a job cannot be removed twice. With
        ``if_failed_at`` the record is dropped only if it is still the failure of that time:
        a retry must not drop a newer failure of the same job that arrived meanwhile
        (returns False then, staging nothing). ``keep_history`` (a retry): the removed
        failure is also staged as a HISTORY record, the job page's retry history, when it is
        the committed record (a failure still staged has none).
        """
        if reason not in ("retried", "forgotten"):
            raise ValueError(f"reason must be 'retried' or 'forgotten', not {reason!r}")
        with self._lock:
            self._check_open()
            if not self._p_live(id):
                raise NotFound(id)
            if if_failed_at is not None and self._p_failed_at(id) != if_failed_at:
                return False
            if keep_history and id not in self._p_ids:
                self._stage_history(id)
            self._stage_removed(id, reason, reason)
            return True

    def _stage_history(self, id: str) -> None:
        """Stage the committed FAILED record of ``id`` again as a HISTORY record (lock held):
        the same payload bytes, only the type (and so the CRC) differ."""
        p = self._index.pos[id]
        loc, size = self._index.loc[p], self._index.size[p]
        seg = self._segments[loc >> LOC_SHIFT]
        try:
            data = os.pread(seg.fd, size, loc & LOC_MASK)
        except OSError as exc:
            raise JournalError(f"cannot read {seg.path}: {exc}") from exc
        rec = read_record(data, 0, len(data))
        if isinstance(rec, Problem) or rec[0] != _FAILED:
            return  # _read would say what is wrong when the record is next read
        hsize = self._append(_HISTORY, rec[2])
        self._ops.append((_HISTORY, id, hsize, None))

    def _p_failed_at(self, id: str) -> float:
        """``failed_at`` of the live record of ``id`` in the pending state (lock held)."""
        op = self._p_ids.get(id)
        if op is not None:
            failed_at: float = op[3]
            return failed_at
        return self._read(self._index.pos[id]).failed_at

    def stage_flush(self) -> None:
        """Stage dropping every failed job."""
        with self._lock:
            self._check_open()
            size = self._append(_FLUSHED, flushed_payload())
            self._ops.append((_FLUSHED, "", size, None))
            self._p_ids.clear()
            self._p_queue.clear()
            self._p_flushed = True
            self._p_len = 0
            self._index.front = len(self._index.alive)

    def stage_client_seq(self, client_id: str, seq: int) -> None:
        """Stage ``seq`` as the highest batch of ``client_id`` applied (dedup state)."""
        if type(client_id) is not str or not client_id:
            raise ValueError("client_id must be a non-empty str")
        if type(seq) is not int or seq < 0:
            raise ValueError(f"seq must be a non-negative int, not {seq!r}")
        at = float(self._clock())
        try:
            payload = encode_client_seq(client_id, seq, at)
        except (ValueError, OverflowError) as exc:
            raise JournalError(f"cannot record the seq of client {client_id!r}: {exc}") from None
        with self._lock:
            self._check_open()
            size = self._append(_CLIENT_SEQ, payload)
            self._ops.append((_CLIENT_SEQ, client_id, size, (seq, at)))

    def enforce_retention(self) -> int:
        """Stage prunes for the count and age limits now; returns how many were staged.

        ``stage_failed`` does this by itself (the age limit at most once a second); call
        it (then ``commit``) now and then so that jobs also expire while no new failures
        arrive.
        """
        with self._lock:
            self._check_open()
            before = len(self._ops)
            self._prune_count()
            now = self._clock()
            self._next_age_check = now + _AGE_CHECK_EVERY
            self._prune_age(now)
            return len(self._ops) - before

    @property
    def staged(self) -> int:
        """Records staged and not yet committed."""
        return len(self._ops)

    def _append(self, rtype: int, payload: bytes) -> int:
        try:
            return append_record(self._buf, rtype, payload)
        except ValueError as exc:
            raise JournalError(str(exc)) from None

    def _stage_removed(self, id: str, reason: str, detail: str) -> None:
        size = self._append(_REMOVED, encode_removed(id, reason))
        self._ops.append((_REMOVED, id, size, detail))
        self._p_ids[id] = GONE
        if self._p_len is not None:
            self._p_len -= 1

    def _prune_count(self) -> None:
        while self._pending_len() > self._max_jobs:
            oldest = self._p_oldest()
            if oldest is None:  # pragma: no cover - p_len > 0 implies a live job
                return
            self._stage_removed(oldest[0], "pruned", "pruned:count")

    def _prune_age(self, now: float) -> None:
        cutoff = now - self._max_age
        while True:
            oldest = self._p_oldest()
            if oldest is None:
                return
            key, slot, op = oldest
            failed_at = op[3] if slot < 0 else self._read(slot).failed_at
            if failed_at >= cutoff:
                return
            self._stage_removed(key, "pruned", "pruned:age")
