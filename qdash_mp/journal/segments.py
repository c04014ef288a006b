"""The segment files of a journal directory, and the state the journal's parts share.

``JournalBase`` holds what recovery, staging, compaction and the store all use: the open
segments, the index, the ``FileIO`` every write and sync goes through (``qdash_mp.fsio``,
the one fault-injection seam), and the primitives over them -- create and rotate a
segment, map one, save bytes to a side file, apply written records to the index, read a
record back. ``qdash_mp.journal.store.Journal`` puts the parts together.

Files (``directory``, the collector passes ``<data-dir>/journal``)::

    lock                        flock()ed while a Journal has the directory open
    NNNNNNNNNN.GGGG.seg         segments: number N, generation G (G > 0: compacted)
    *.seg.tmp                   a segment being created or compacted; deleted on open
    *.seg.cut-<UTC stamp>       bytes cut off a segment on recovery (torn tail), kept
    *.seg.corrupt-<UTC stamp>   copy of damaged bytes (a segment salvage skipped bytes in,
                                or a last COMMIT recovery repaired)
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from qdash_mp.errors import JournalCorrupt, JournalError
from qdash_mp.fsio import FileIO
from qdash_mp.journal.columns import Meta
from qdash_mp.journal.format import (
    FailedFields,
    Op,
    Problem,
    RecordType,
    SegmentHeader,
    decode_failed,
    read_record,
    segment_record,
)
from qdash_mp.journal.index import LOC_MASK, LOC_SHIFT, Index

if TYPE_CHECKING:
    from qdash_mp.journal.recovery import RecoveryReport

__all__ = [
    "HISTORY_IDS",
    "HISTORY_PER_ID",
    "SEG_NAME",
    "JournalBase",
    "Segment",
    "seg_name",
    "stamp",
]

logger = logging.getLogger("qdash_mp.journal")

SEG_NAME: Final = re.compile(r"^(\d{10,})\.(\d{4,})\.seg$")

_FAILED: Final = int(RecordType.FAILED)
_REMOVED: Final = int(RecordType.REMOVED)
_FLUSHED: Final = int(RecordType.FLUSHED)
_CLIENT_SEQ: Final = int(RecordType.CLIENT_SEQ)
_HISTORY: Final = int(RecordType.HISTORY)
HISTORY_PER_ID: Final = 10
"""Retried failures kept per job id (HISTORY records; the oldest go first)."""
HISTORY_IDS: Final = 10_000
"""Job ids with a retry history kept (the id whose history was added to longest ago goes)."""
_NOT_FAILED: Final = re.compile(rb"[^\x%02x]" % _FAILED)
_REMOVED_BYTE: Final = bytes((_REMOVED,))
_NOT_REMOVED: Final = re.compile(rb"[^\x%02x]" % _REMOVED)
"""Finds the next record that is not a FAILED in a string of record type bytes."""


@dataclass(slots=True)
class Segment:
    """An open segment file."""

    num: int
    gen: int
    path: Path
    fd: int
    end: int
    """Durable length: bytes covered by the last successful sync."""


def seg_name(num: int, gen: int) -> str:
    """The file name of segment ``num``, generation ``gen``."""
    return f"{num:010d}.{gen:04d}.seg"


def stamp() -> str:
    """A UTC time stamp for side-file names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


class JournalBase:
    """State and file primitives shared by the journal's parts (see the module docstring)."""

    recovery: RecoveryReport
    client_seqs: dict[str, int]
    """Highest committed batch seq per client id (read single keys; it changes on commit)."""
    pruned_total: int
    """Failed jobs this Journal pruned by retention (count and age), since open."""

    def __init__(
        self,
        directory: Path,
        *,
        max_jobs: int,
        max_age: float,
        clock: Callable[[], float],
        segment_bytes: int,
        compact_min_bytes: int,
        io: FileIO,
    ) -> None:
        """Use ``Journal.open``: this only sets up empty state, without touching files."""
        self.directory = directory
        self.client_seqs = {}
        self.pruned_total = 0
        self._max_jobs = max_jobs
        self._max_age = max_age
        self._clock = clock
        self._segment_bytes = segment_bytes
        self._compact_min = compact_min_bytes
        self._io = io
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self._closed = False
        self._lock_fd = -1
        self._segments: dict[int, Segment] = {}
        self._active: Segment | None = None
        self._must_rotate = False
        self._total_bytes = 0
        self._client_seen: dict[str, float] = {}
        self._index = Index()  # committed state
        # job id -> [loc, size] of its HISTORY records (retried failures), oldest first
        self._history: OrderedDict[str, list[list[int]]] = OrderedDict()
        # staged records, and the pending state: committed, then everything staged
        self._buf = bytearray()
        self._ops: list[Op] = []
        self._metas: list[Meta] = []  # (queue, name, error) of each staged FAILED op, in order
        self._p_ids: dict[str, Op] = {}  # id -> its live staged FAILED op, or GONE
        self._p_queue: deque[Op] = deque()  # staged FAILED ops, oldest first
        self._p_flushed = False
        self._p_len: int | None = 0  # live jobs in the pending state; None: not counted
        self._next_age_check = -math.inf

    # What the other parts provide (``Journal`` combines them).

    def commit(self) -> None:
        """Provided by ``store.Journal``."""
        raise NotImplementedError

    def compact(self, *, _crash_after: str | None = None) -> None:
        """Provided by ``compaction.Compaction``."""
        raise NotImplementedError

    def enforce_retention(self) -> int:
        """Provided by ``staging.Staging``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ files

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError("the journal is closed")

    def _now(self) -> float:
        return float(self._clock())

    def _create_segment(self, header: SegmentHeader) -> Segment:
        """A new segment file holding only its header, made durable under its final name."""
        path = self.directory / seg_name(header.num, header.gen)
        tmp = path.with_name(path.name + ".tmp")
        data = segment_record(header)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._io.pwrite_all(fd, data, 0)
            self._io.fdatasync(fd)
            os.rename(tmp, path)
            self._io.fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return Segment(header.num, header.gen, path, fd, len(data))

    def _rotate(self, why: str) -> None:
        """Start the next segment; its header records how much of this one is durable."""
        old = self._active
        assert old is not None
        header = SegmentHeader(old.num + 1, 0, old.num, old.gen, old.end, self._now())
        new = self._create_segment(header)
        with self._lock:
            self._segments[new.num] = new
            self._active = new
        self._must_rotate = False
        self._total_bytes += new.end
        logger.info("journal: started segment %s (%s)", new.path.name, why)

    @contextlib.contextmanager
    def _map(self, seg: Segment) -> Iterator[Any]:
        """The segment's first ``seg.end`` bytes as a read-only buffer."""
        if seg.end == 0:
            yield b""
            return
        mm = mmap.mmap(seg.fd, seg.end, prot=mmap.PROT_READ)
        try:
            yield mm
        finally:
            mm.close()

    def _side_path(self, path: Path, kind: str) -> Path:
        base = f"{path.name}.{kind}-{stamp()}"
        side = path.with_name(base)
        n = 1
        while side.exists():
            side = path.with_name(f"{base}.{n}")
            n += 1
        return side

    def _write_side(self, side: Path, data: bytes | bytearray) -> None:
        fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self._io.pwrite_all(fd, data, 0)
            self._io.fdatasync(fd)
        finally:
            os.close(fd)
        self._io.fsync_dir(self.directory)

    # ------------------------------------------------------------------ the index

    def _apply(
        self,
        num: int,
        start: int,
        ops: Iterable[Op],
        *,
        replay: bool,
        metas: list[Meta],
    ) -> int:
        """Apply written records to the index; returns how many were retention prunes.

        ``metas``: each FAILED record's (queue, name, error), in order, for the filter
        columns (staging took them from the wire decode, recovery from its one decode).
        """
        mi = 0  # the next FAILED record's entry in metas
        ops = ops if isinstance(ops, list) else list(ops)
        # Runs of FAILED records (a batch's failed jobs) go in a few C-level passes; the
        # other records, one by one.
        kinds = bytes(map(itemgetter(0), ops))
        not_failed = _NOT_FAILED.search
        not_removed = _NOT_REMOVED.search
        index = self._index
        base = num << LOC_SHIFT
        off = start
        pruned = 0
        i = 0
        n = len(ops)
        while i < n:
            rtype, key, size, extra = ops[i]
            if rtype == _FAILED:
                m = not_failed(kinds, i)
                j = n if m is None else m.start()
                if j == i + 1:  # one alone: the run set-up would cost more than the record
                    index.append_one(base + off, key, size, extra, metas[mi])
                    mi += 1
                    off += size
                else:
                    run = ops[i:j]
                    off = index.append_failed(base, off, run, metas[mi : mi + len(run)])
                    mi += len(run)
                i = j
                continue
            if rtype == _REMOVED and kinds[i + 1 : i + 2] == _REMOVED_BYTE:
                # A run of removals (a batch's retention prunes): one loop, no dispatch.
                m = not_removed(kinds, i)
                j = n if m is None else m.start()
                run = ops[i:j]
                index.remove_many(list(map(itemgetter(1), run)))
                off += sum(map(itemgetter(2), run))
                if not replay:
                    pruned += sum(map(str.startswith, map(itemgetter(3), run), repeat("pruned")))
                i = j
                continue
            if rtype == _REMOVED:
                index.remove(key)
                if not replay and extra.startswith("pruned"):
                    pruned += 1
            elif rtype == _FLUSHED:
                index.kill_all()
            elif rtype == _HISTORY:
                self._history_add(key, base + off, size)
            elif rtype == _CLIENT_SEQ:
                seq, at = extra
                if seq > self.client_seqs.get(key, -1):
                    self.client_seqs[key] = seq
                if at > self._client_seen.get(key, -math.inf):
                    self._client_seen[key] = at
            off += size
            i += 1
        self.pruned_total += pruned
        return pruned

    def _history_add(self, id: str, loc: int, size: int) -> None:
        """Keep the HISTORY record at ``loc`` as the newest retried failure of ``id``."""
        kept = self._history.pop(id, [])
        kept.append([loc, size])
        del kept[:-HISTORY_PER_ID]
        self._history[id] = kept
        while len(self._history) > HISTORY_IDS:
            self._history.popitem(last=False)

    def _read(self, p: int) -> FailedFields:
        """The FAILED record in slot ``p``, read from disk and verified again."""
        return self._read_at(self._index.loc[p], self._index.size[p], _FAILED, self._index.ids[p])

    def _read_at(self, loc: int, size: int, rtype: int, id: str) -> FailedFields:
        """The FAILED (or HISTORY) record of job ``id`` at ``loc``, read and verified."""
        seg = self._segments[loc >> LOC_SHIFT]
        off = loc & LOC_MASK
        try:
            data = os.pread(seg.fd, size, off)
        except OSError as exc:
            raise JournalError(f"cannot read {seg.path} at offset {off}: {exc}") from exc
        rec = read_record(data, 0, len(data))
        why = ""
        if isinstance(rec, Problem):
            why = rec.reason
        elif rec[0] != rtype or rec[1] != size:
            why = "not the record the index expects"
        else:
            try:
                fields = decode_failed(rec[2])
            except ValueError as exc:
                why = str(exc)
            else:
                if fields.id == id:
                    return fields
                why = "record of another job"
        raise JournalCorrupt(
            f"{seg.path} at offset {off}: a stored record no longer verifies ({why}); "
            "restart with `qdash-mp collector --salvage` to keep every record that does"
        )
