"""Compaction: rewrite the live set of the older segments into one, crash-safe at each step.

When dead bytes (removed, superseded, flushed, pruned records, markers) exceed live bytes
and ``compact_min_bytes``, ``maybe_compact`` runs the five ``COMPACTION_STEPS``:

    step      what it does                                     a crash right after it
    prepare   start a new active segment, snapshot the live    old state (temp file, if
              slots of every older one                           any, deleted on open)
    write     copy those records (verified again) into         old state
              <last>.<gen+1>.seg.tmp, fsync it
    rename    rename it into place, fsync the directory        new state: the replaced
                                                                 segments are deleted on open
    install   point the index at it                            new state
    delete    delete the replaced segments, fsync the dir      new state

A compacted segment (``gen > 0``) replaces every segment ordered before it, so recovery
sees either the old state or the new one, never a mix. Commits carry on into the new
active segment while the copy runs; the index keeps its slot numbers (``Index.frozen``)
until ``install``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from qdash_mp.errors import JournalCorrupt, JournalError
from qdash_mp.journal.format import (
    Problem,
    RecordType,
    SegmentHeader,
    append_record,
    commit_record,
    encode_client_seq,
    read_record,
    segment_record,
)
from qdash_mp.journal.index import LOC_MASK, LOC_SHIFT
from qdash_mp.journal.segments import JournalBase, Segment, seg_name

__all__ = ["COMPACTION_STEPS", "Compaction", "SimulatedCrash"]

logger = logging.getLogger("qdash_mp.journal")

COMPACTION_STEPS: Final = ("prepare", "write", "rename", "install", "delete")
_COMPACT_BATCH: Final = 4096
_COMPACT_CHUNK: Final = 4 * 1024 * 1024
_FAILED: Final = int(RecordType.FAILED)
_CLIENT_SEQ: Final = int(RecordType.CLIENT_SEQ)
_HISTORY: Final = int(RecordType.HISTORY)


@dataclass(slots=True)
class _Plan:
    """A compaction in progress (see ``Compaction.compact``)."""

    num: int
    gen: int
    replaced: list[Segment]
    slots: array[int]
    locs: array[int]
    sizes: array[int]
    clients: list[tuple[str, int, float]]
    history: list[list[int]]
    """The [loc, size] entries of the kept HISTORY records (updated in place on install)."""
    tmp: Path
    path: Path
    fd: int = -1
    end: int = 0
    new_locs: array[int] = field(default_factory=lambda: array("q"))
    history_locs: array[int] = field(default_factory=lambda: array("q"))


class SimulatedCrash(BaseException):
    """Raised by ``compact(_crash_after=step)``: stop as a crash would, touching nothing."""


class Compaction(JournalBase):
    """The compaction part of ``Journal`` (see the module docstring)."""

    def maybe_compact(self) -> bool:
        """Compact if dead bytes exceed live bytes and ``compact_min_bytes``; True if it did.

        Blocking (it copies the live set): call it from a worker thread now and then.
        """
        dead = self._total_bytes - self._index.live_bytes
        if dead <= self._index.live_bytes or dead < self._compact_min:
            return False
        if self._compact_lock.locked():  # one is running already
            return False
        self.compact()
        return True

    def compact(self, *, _crash_after: str | None = None) -> None:
        """Rewrite the live set into one segment and delete the segments it replaces.

        Commits continue into the new active segment meanwhile. ``JournalError`` if it
        failed (the journal stays as it was). ``_crash_after`` (tests) stops right after
        the named step of ``COMPACTION_STEPS`` as if the process died there.
        """
        with self._compact_lock:
            plan = self._compact_prepare()
            self._crash_point("prepare", _crash_after)
            try:
                self._compact_write(plan)
                self._crash_point("write", _crash_after)
                self._compact_rename(plan)
                self._crash_point("rename", _crash_after)
            except OSError as exc:
                self._compact_abort(plan)
                raise JournalError(f"journal compaction failed: {exc}") from exc
            except SimulatedCrash:
                raise
            except BaseException:
                self._compact_abort(plan)
                raise
            self._compact_install(plan)
            self._crash_point("install", _crash_after)
            self._compact_delete(plan)
            self._crash_point("delete", _crash_after)

    @staticmethod
    def _crash_point(step: str, crash_after: str | None) -> None:
        if crash_after == step:
            raise SimulatedCrash(step)

    def _compact_prepare(self) -> _Plan:
        """Start a new active segment and snapshot the live set of all older ones."""
        with self._commit_lock:
            self._check_open()
            old = self._active
            assert old is not None
            try:
                self._rotate("compaction")
            except OSError as exc:
                raise JournalError(f"journal compaction failed: {exc}") from exc
            with self._lock:
                slots = self._index.live_slots()
                loc = self._index.loc
                size = self._index.size
                locs = array("q", [loc[p] for p in slots])
                sizes = array("I", [size[p] for p in slots])
                horizon = self._now() - self._max_age
                clients = [
                    (c, s, self._client_seen.get(c, 0.0))
                    for c, s in self.client_seqs.items()
                    if self._client_seen.get(c, 0.0) >= horizon
                ]
                replaced = [s for s in self._segments.values() if s.num <= old.num]
                history = [e for entries in self._history.values() for e in entries]
                self._index.frozen = True
        gen = old.gen + 1
        path = self.directory / seg_name(old.num, gen)
        return _Plan(
            num=old.num,
            gen=gen,
            replaced=replaced,
            slots=slots,
            locs=locs,
            sizes=sizes,
            clients=clients,
            history=history,
            tmp=path.with_name(path.name + ".tmp"),
            path=path,
        )

    def _compact_write(self, plan: _Plan) -> None:
        """Copy the snapshot's records (verified again) into the temp file; fsync it."""
        segs = {s.num: s for s in plan.replaced}
        with contextlib.suppress(FileNotFoundError):
            plan.tmp.unlink()
        fd = os.open(plan.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        plan.fd = fd
        out = bytearray(segment_record(SegmentHeader(plan.num, plan.gen, created_at=self._now())))
        written = 0
        batch_start = len(out)
        count = 0
        base = plan.num << LOC_SHIFT
        new_locs = plan.new_locs
        chunk = b""
        chunk_num = -1
        chunk_off = 0

        def close_batch() -> None:
            nonlocal written, batch_start, count, out
            out += commit_record(batch_start, count)
            self._io.pwrite_all(fd, out, written)
            written += len(out)
            out = bytearray()
            batch_start = written
            count = 0

        def copy(loc: int, size: int, rtype: int, into: array[int]) -> None:
            nonlocal chunk, chunk_num, chunk_off, count
            num = loc >> LOC_SHIFT
            off = loc & LOC_MASK
            rel = off - chunk_off
            if num != chunk_num or rel < 0 or rel + size > len(chunk):
                seg = segs[num]
                chunk = os.pread(seg.fd, max(size, min(_COMPACT_CHUNK, seg.end - off)), off)
                chunk_num, chunk_off, rel = num, off, 0
            rec = read_record(chunk, rel, rel + size)
            if isinstance(rec, Problem) or rec[0] != rtype or rec[1] != size:
                raise JournalCorrupt(
                    f"{segs[num].path} at offset {off}: a stored record no longer verifies; "
                    "restart with `qdash-mp collector --salvage`"
                )
            into.append(base + written + len(out))
            out.extend(chunk[rel : rel + size])
            count += 1
            if count >= _COMPACT_BATCH or len(out) >= _COMPACT_CHUNK:
                close_batch()

        for loc, size in zip(plan.locs, plan.sizes, strict=True):
            copy(loc, size, _FAILED, new_locs)
        for loc, size in plan.history:
            copy(loc, size, _HISTORY, plan.history_locs)
        for client_id, seq, at in plan.clients:
            append_record(out, _CLIENT_SEQ, encode_client_seq(client_id, seq, at))
            count += 1
        if count:
            close_batch()
        elif out:
            self._io.pwrite_all(fd, out, written)
            written += len(out)
        self._io.fdatasync(fd)
        plan.end = written

    def _compact_rename(self, plan: _Plan) -> None:
        """Put the compacted segment in place: from here recovery sees the new state."""
        os.rename(plan.tmp, plan.path)
        self._io.fsync_dir(self.directory)

    def _compact_install(self, plan: _Plan) -> None:
        """Point the index at the compacted segment and stop reading the replaced ones."""
        with self._lock:
            self._index.relocate(plan.slots, plan.new_locs)
            for entry, new in zip(plan.history, plan.history_locs, strict=True):
                entry[0] = new  # an entry dropped from the history meanwhile: no matter
            for seg in plan.replaced:
                if self._segments.get(seg.num) is seg:
                    del self._segments[seg.num]
                os.close(seg.fd)
                self._total_bytes -= seg.end
            self._segments[plan.num] = Segment(plan.num, plan.gen, plan.path, plan.fd, plan.end)
            self._total_bytes += plan.end
            self._index.frozen = False
            self._index.maybe_rebuild()
        logger.info(
            "journal compacted: %d live records in %s replace %d segment(s)",
            len(plan.slots),
            plan.path.name,
            len(plan.replaced),
        )

    def _compact_delete(self, plan: _Plan) -> None:
        """Delete the replaced segments (recovery would, if this does not finish)."""
        try:
            for seg in plan.replaced:
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
            self._io.fsync_dir(self.directory)
        except OSError as exc:
            logger.warning("could not delete replaced journal segments: %s", exc)

    def _compact_abort(self, plan: _Plan) -> None:
        if plan.fd >= 0:
            os.close(plan.fd)
        with contextlib.suppress(OSError):
            plan.tmp.unlink()
        with self._lock:
            self._index.frozen = False
            self._index.maybe_rebuild()
