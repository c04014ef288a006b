"""Opening a journal: verify every record, cut a torn tail, repair or refuse damage, salvage.

``Recovery._recover`` (run by ``Journal.open``) lists the segments, drops temp files and
segments a finished compaction replaced, then reads every segment with a
``scan.BatchReader`` into the index. What a bad region means:

    where                       what it looks like                   what recovery does
    last segment, no valid      a short file, zero-filled blocks     cut (torn tail: the
      COMMIT after it                                                  batch was never acked)
    last COMMIT of the file     within REPAIR_MAX_BITS of the        rewrite it (side copy
      (batch written whole)       COMMIT the batch implies             of the damaged bytes)
    anywhere else               damage before a valid COMMIT,        JournalCorrupt (file,
                                  or a last COMMIT beyond repair       offset, --salvage)

With ``salvage=True`` every record that verifies is kept, the skipped ranges are reported,
the damaged segments are copied to ``.corrupt-`` side files and the journal is compacted.
Why a torn tail can only be an unacknowledged write, and what a flipped bit looks like
instead, is in ``docs/journal.md``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdash_mp.errors import JournalCorrupt
from qdash_mp.journal.format import (
    Problem,
    SegmentHeader,
    commit_record,
    header_size,
    read_header,
)
from qdash_mp.journal.scan import BatchReader, classify_last_commit, find_commit
from qdash_mp.journal.segments import SEG_NAME, JournalBase, Segment

__all__ = ["Cut", "Recovery", "RecoveryReport", "Repaired", "Skipped"]

logger = logging.getLogger("qdash_mp.journal")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic GC off while recovery reads the segments (and back as it was after).

    Reading a record makes a few short-lived tuples (its decoded array, its op, its metas),
    none part of a cycle: refcounting frees them all, while the collector's generational
    passes over them cost a tenth of a 1M-job open. Garbage cycles other threads make
    meanwhile just wait the few seconds for the next collection.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass(frozen=True, slots=True)
class Cut:
    """Bytes cut off a segment on recovery, saved in ``side_file``."""

    file: Path
    offset: int
    length: int
    side_file: Path
    reason: str


@dataclass(frozen=True, slots=True)
class Skipped:
    """Damaged bytes salvage skipped (their copy is in the segment's ``.corrupt-`` file)."""

    file: Path
    offset: int
    length: int
    reason: str


@dataclass(frozen=True, slots=True)
class Repaired:
    """A damaged last COMMIT rewritten; the damaged bytes are saved in ``side_file``."""

    file: Path
    offset: int
    side_file: Path
    reason: str


@dataclass(slots=True)
class RecoveryReport:
    """What ``Journal.open`` found and did."""

    records: int = 0
    """Data records read (FAILED, REMOVED, FLUSHED, CLIENT_SEQ)."""
    segments: int = 0
    bytes_cut: int = 0
    cuts: list[Cut] = field(default_factory=list)
    side_files: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    repaired: list[Repaired] = field(default_factory=list)
    removed_files: list[Path] = field(default_factory=list)
    """Temp files and segments replaced by a finished compaction, deleted."""
    pruned: int = 0
    seconds: float = 0.0


class Recovery(JournalBase):
    """The recovery part of ``Journal`` (see the module docstring)."""

    def _recover(self, salvage: bool) -> None:
        started = time.perf_counter()
        report = self.recovery
        io = self._io
        found: list[tuple[int, int, Path]] = []
        for name in sorted(os.listdir(self.directory)):
            path = self.directory / name
            if name.endswith(".seg.tmp"):
                path.unlink()
                report.removed_files.append(path)
                logger.info("removed unfinished temp file %s", path)
                continue
            m = SEG_NAME.match(name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), path))
        found.sort()
        next_num = found[-1][0] + 1 if found else 1

        # A compacted segment replaces every segment ordered before it.
        compacted = [(num, gen) for num, gen, _ in found if gen > 0]
        if compacted:
            top = max(compacted)
            for num, gen, path in found:
                if (num, gen) < top:
                    path.unlink()
                    report.removed_files.append(path)
                    logger.info("removed %s: replaced by compacted segment %s", path, top)
            found = [f for f in found if (f[0], f[1]) >= top]
            io.fsync_dir(self.directory)

        segments: list[tuple[Segment, SegmentHeader | Problem]] = []
        for num, gen, path in found:
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            seg = Segment(num, gen, path, fd, size)
            self._segments[num] = seg
            head = os.pread(fd, min(size, 4096), 0)
            header = read_header(head, len(head))
            if isinstance(header, SegmentHeader) and (header.num, header.gen) != (num, gen):
                header = Problem(0, f"header says segment {header.num}.{header.gen}")
            segments.append((seg, header))

        # A last segment whose header is damaged with nothing committed after it is a torn
        # creation: cut it whole.
        if segments and isinstance(segments[-1][1], Problem):
            seg, problem = segments[-1]
            assert isinstance(problem, Problem)
            with self._map(seg) as buf:
                torn = find_commit(buf, 0, seg.end) < 0
                if torn:
                    self._cut(seg, buf, 0, problem.reason)
            if torn:
                segments.pop()

        report.segments = len(segments)
        damaged: list[Segment] = []
        with _gc_paused():
            self._scan_all(segments, salvage, damaged)
        self._total_bytes = sum(s.end for s in self._segments.values())

        if segments:
            self._active = segments[-1][0]
        else:
            self._active = self._create_segment(SegmentHeader(next_num, 0, created_at=self._now()))
            self._segments[self._active.num] = self._active
            self._total_bytes = self._active.end
        self._p_len = None
        report.seconds = time.perf_counter() - started

        if damaged:
            for seg in damaged:
                side = self._side_path(seg.path, "corrupt")
                with self._map(seg) as buf:
                    self._write_side(side, buf[0 : seg.end])
                report.side_files.append(side)
                logger.error("salvage: copied damaged segment %s to %s", seg.path, side)
            self.compact()
        pruned_before = self.pruned_total
        if self.enforce_retention():
            self.commit()
        report.pruned = self.pruned_total - pruned_before
        report.seconds = time.perf_counter() - started
        logger.info(
            "journal %s recovered in %.3fs: %d records in %d segments, %d failed jobs, "
            "%d bytes cut, %d ranges skipped",
            self.directory,
            report.seconds,
            report.records,
            report.segments,
            len(self._index.pos),
            report.bytes_cut,
            len(report.skipped),
        )

    def _scan_all(
        self,
        segments: list[tuple[Segment, SegmentHeader | Problem]],
        salvage: bool,
        damaged: list[Segment],
    ) -> None:
        """Read every segment into the index, in order; damaged ones salvage skipped bytes in
        are added to ``damaged``."""
        for i, (seg, header) in enumerate(segments):
            nxt = segments[i + 1][1] if i + 1 < len(segments) else None
            self._check_order(seg, header, segments[i - 1][0] if i else None, salvage)
            limit = seg.end
            if isinstance(nxt, SegmentHeader) and (nxt.prev_num, nxt.prev_gen) == (
                seg.num,
                seg.gen,
            ):
                limit = nxt.prev_end
                if seg.end < limit:
                    self._corrupt(
                        salvage,
                        f"{seg.path} is {seg.end} bytes but {limit} of it were durable",
                    )
                    limit = seg.end
            last = nxt is None
            if self._scan(seg, header, limit, last, salvage):
                damaged.append(seg)
            self._index.maybe_rebuild()  # keep replayed tombstones from piling up
            if limit < seg.end:
                with self._map(seg) as buf:
                    self._cut(seg, buf, limit, "bytes of a commit that failed before it")

    def _check_order(
        self,
        seg: Segment,
        header: SegmentHeader | Problem,
        prev: Segment | None,
        salvage: bool,
    ) -> None:
        """Segments must follow each other without a gap (nobody deleted one)."""
        if not isinstance(header, SegmentHeader) or header.compacted:
            return
        if prev is None:
            if header.prev_num != -1:
                self._corrupt(
                    salvage,
                    f"{seg.path} follows segment {header.prev_num}, which is missing",
                )
        elif header.prev_num != prev.num:
            self._corrupt(
                salvage,
                f"{seg.path} follows segment {header.prev_num}, not {prev.path.name}: "
                "a segment is missing",
            )

    def _corrupt(self, salvage: bool, message: str) -> None:
        if not salvage:
            raise JournalCorrupt(
                f"{message}; the journal will not open over damaged data. Run "
                "`qdash-mp collector --salvage` to keep every record that still verifies."
            )
        logger.error("salvage: %s", message)

    def _scan(
        self,
        seg: Segment,
        header: SegmentHeader | Problem,
        limit: int,
        last: bool,
        salvage: bool,
    ) -> bool:
        """Read one segment into the index; True if salvage skipped damaged bytes in it."""
        skipped = False
        with self._map(seg) as buf:
            if isinstance(header, Problem):
                reader = BatchReader(buf, 0, limit)
                reader.problem = header
            else:
                reader = BatchReader(buf, header_size(buf), limit)
            try:
                while True:
                    if reader.problem is None:
                        batch = reader.read_batch()
                        if batch is not None:
                            self._apply(
                                seg.num, batch[0], batch[1], replay=True, metas=reader.metas
                            )
                            continue
                        if reader.problem is None:
                            break
                    problem = reader.problem
                    verdict = None
                    if last and limit == seg.end:
                        verdict = classify_last_commit(
                            buf, problem.offset, limit, reader.pending_start, len(reader.pending)
                        )
                        if verdict == "repair":
                            self._repair_commit(seg, buf, problem.offset, reader)
                            break
                        if verdict == "torn" or (
                            verdict is None and find_commit(buf, problem.offset, limit) < 0
                        ):
                            self._cut(seg, buf, reader.committed, problem.reason)
                            break
                    if salvage and not last and problem.reason.startswith("records without"):
                        start, ops = reader.take_pending()
                        self._apply(seg.num, start, ops, replay=True, metas=reader.metas)
                        break
                    where = f"{seg.path} at offset {problem.offset}: {problem.reason}"
                    if not salvage:
                        self._corrupt(
                            salvage,
                            f"damaged COMMIT in {where}, closing a batch written whole"
                            if verdict == "damaged"
                            else f"damaged record in {where}, followed by committed records",
                        )
                    start, ops = reader.take_pending()
                    self._apply(seg.num, start, ops, replay=True, metas=reader.metas)
                    offset, length = reader.resync()
                    skipped = True
                    self.recovery.skipped.append(Skipped(seg.path, offset, length, problem.reason))
                    logger.error(
                        "salvage: skipped %d damaged bytes in %s at offset %d (%s)",
                        length,
                        seg.path,
                        offset,
                        problem.reason,
                    )
            finally:
                self.recovery.records += reader.records
                del reader
        return skipped

    def _cut(self, seg: Segment, buf: Any, offset: int, reason: str) -> None:
        """Save bytes ``offset..end`` of ``seg`` to a side file, then cut them off.

        A cut at offset 0 (a segment whose very header is torn) removes the file.
        """
        length = seg.end - offset
        side: Path | None = None
        if length > 0:
            side = self._side_path(seg.path, "cut")
            self._write_side(side, buf[offset : seg.end])
        if offset == 0:
            os.close(seg.fd)
            seg.path.unlink()
            self._io.fsync_dir(self.directory)
            del self._segments[seg.num]
        elif length > 0:
            self._io.truncate(seg.fd, offset)
            self._io.fdatasync(seg.fd)
        seg.end = offset
        if side is None:
            logger.warning("journal: removed empty segment %s (%s)", seg.path, reason)
            return
        report = self.recovery
        report.cuts.append(Cut(seg.path, offset, length, side, reason))
        report.side_files.append(side)
        report.bytes_cut += length
        logger.warning(
            "journal: cut %d bytes from %s at offset %d (%s); saved to %s",
            length,
            seg.path,
            offset,
            reason,
            side,
        )

    def _repair_commit(self, seg: Segment, buf: Any, pos: int, reader: BatchReader) -> None:
        """Rewrite the damaged COMMIT at ``pos`` closing the batch ``reader`` holds.

        The batch was written to its last byte and every record of it verifies: only the
        marker is damaged, so it is rewritten as the batch implies it, after its damaged
        bytes are saved to a side file.
        """
        start, ops = reader.take_pending()
        side = self._side_path(seg.path, "corrupt")
        self._write_side(side, buf[pos : seg.end])
        self._io.pwrite_all(seg.fd, commit_record(start, len(ops)), pos)
        self._io.fdatasync(seg.fd)
        self._apply(seg.num, start, ops, replay=True, metas=reader.metas)
        reason = f"damaged COMMIT closing {len(ops)} record(s) written whole"
        report = self.recovery
        report.repaired.append(Repaired(seg.path, pos, side, reason))
        report.side_files.append(side)
        logger.warning(
            "journal: repaired the COMMIT in %s at offset %d (%s); damaged bytes saved to %s",
            seg.path,
            pos,
            reason,
            side,
        )
