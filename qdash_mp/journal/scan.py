"""Reading a segment's records in sequence: the committed batches, resync, and the tail.

Pure functions and classes over a ``Buffer`` (``bytes`` or a read-only ``mmap``): recovery
(``qdash_mp.journal.recovery``) maps each segment and walks it with a ``BatchReader``; what
a bad final region of the last segment means -- a torn tail to cut, a damaged COMMIT to
repair, or damage to refuse -- is decided by ``classify_last_commit``. The record layout
itself is in ``qdash_mp.journal.format``; why a torn tail looks the way it does is in
``docs/journal.md``.

A torn write (power lost between ``pwrite`` and the end of ``fdatasync``) leaves the last
batch as a *prefix* of what was written, in which whole file-system blocks of ``BLOCK``
bytes may read as zeros; a flipped bit leaves everything in place but one bit. So, for the
21 bytes where the COMMIT of a batch of ``count`` records from ``start`` should end the
file (``want``; here 2 records from offset 61)::

    want  c6 d3 24 1c 0c 00 00 00 02 3d 00 00 00 00 00 00 00 02 00 00 00
    flip  c6 d3 24 1c 0c 00 00 00 02 3d 00 00 00 00 00 00 00 03 00 00 00  -> repair
    zero  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  -> torn
    block c6 d3 24 1c|00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  -> torn
    short 53 4a 7b 2a 18 00 00 00 03 99 a1 6a a1 74 c4 01 01 01 c0 a1 71  -> None
    other 4a 74 38 15 0c 00 00 00 02 00 00 00 00 00 00 00 00 63 00 00 00  -> damaged

``block``: zeros from a ``BLOCK`` boundary (``|``) on. ``short``: the first 21 bytes of a
FAILED record of 33, the file ends inside it (a short write: the ordinary rule cuts it).
``other``: a whole record that verifies as no COMMIT of this batch (here, of 99 records
from offset 0).

Up to ``REPAIR_MAX_BITS`` bits away from ``want`` is repaired first, even where it could
also read as zeros from a block boundary: either way every record of the batch is on disk
whole, as after a crash between write and fsync, which recovery has always kept.
"""

from __future__ import annotations

import re
import zlib
from typing import Final, Literal

from qdash_mp.journal.format import (
    _COMMIT,
    _COMMIT_T,
    _LEN_TYPE,
    COMMIT_SIZE,
    HEADER,
    MAX_PAYLOAD,
    Buffer,
    Op,
    Problem,
    commit_record,
    decode_op,
    read_record,
)

__all__ = [
    "BLOCK",
    "REPAIR_MAX_BITS",
    "BatchReader",
    "classify_last_commit",
    "find_commit",
    "find_record",
]

BLOCK: Final = 4096
"""Bytes a file system writes back at a time: what a torn write may leave zero-filled."""
REPAIR_MAX_BITS: Final = 8
"""A last COMMIT that differs from the expected one in at most this many bits is repaired."""

_COMMIT_PATTERN: Final = _LEN_TYPE.pack(_COMMIT.size, _COMMIT_T)
_TYPE_BYTE: Final = re.compile(rb"[\x02-\x06]")


def _valid_commit(buf: Buffer, pos: int, end: int) -> bool:
    rec = read_record(buf, pos, end)
    return not isinstance(rec, Problem) and rec[0] == _COMMIT_T


def find_commit(buf: Buffer, start: int, end: int) -> int:
    """Offset of the first valid COMMIT record at or after ``start``, or -1.

    A valid COMMIT after damaged bytes proves that acknowledged data follows them, which is
    what tells corruption from a torn tail.
    """
    at = start + 4
    while True:
        hit = buf.find(_COMMIT_PATTERN, at, end)
        if hit < 0:
            return -1
        pos = hit - 4
        if pos >= start and _valid_commit(buf, pos, end):
            return pos
        at = hit + 1


def find_record(buf: Buffer, start: int, end: int) -> int:
    """Offset of the first record at or after ``start`` that verifies and decodes, or -1.

    Used by salvage to resynchronise after damaged bytes: every candidate type byte is
    tried, so this is slow on large damaged regions, which salvage accepts.
    """
    pattern = _TYPE_BYTE
    at = start + 8
    while at < end:
        m = pattern.search(buf, at, end)  # type: ignore[call-overload]
        if m is None:
            return -1
        hit: int = m.start()
        pos = hit - 8
        at = hit + 1
        rec = read_record(buf, pos, end)
        if isinstance(rec, Problem):
            continue
        rtype, size, payload = rec
        if rtype == _COMMIT_T or not isinstance(decode_op(rtype, payload, size), str):
            return pos
    return -1


class BatchReader:
    """Reads the committed batches of one segment, in order.

    ``read_batch()`` returns ``(start, ops)`` for each batch whose COMMIT verifies, where the
    ops are contiguous records starting at ``start``. It returns ``None`` when no further
    committed batch can be read; ``problem`` then says why (``None``: clean end at a batch
    boundary), ``committed`` is the end of the last good COMMIT, and ``pending`` holds the
    records read since then (``pending_start`` is where they begin).

    After a problem, ``resync()`` (salvage) skips to the next record that verifies; the
    following COMMIT is then accepted without checking its batch bounds.
    """

    __slots__ = (
        "_buf",
        "_end",
        "_lenient",
        "committed",
        "metas",
        "pending",
        "pending_metas",
        "pending_start",
        "pos",
        "problem",
        "records",
    )

    def __init__(self, buf: Buffer, start: int, end: int) -> None:
        self._buf = buf
        self._end = end
        self._lenient = False
        self.pos = start
        self.committed = start
        self.pending_start = start
        self.pending: list[Op] = []
        self.pending_metas: list[tuple[str, str, str]] = []
        self.metas: list[tuple[str, str, str]] = []
        """(queue, name, error) of each FAILED record of the batch just returned / taken."""
        self.problem: Problem | None = None
        self.records = 0

    def read_batch(self) -> tuple[int, list[Op]] | None:
        """The next committed batch, or ``None`` (see the class docstring)."""
        buf = self._buf
        end = self._end
        pos = self.pos
        ops = self.pending
        unpack = HEADER.unpack
        crc32 = zlib.crc32
        hsize = HEADER.size
        while True:
            if pos >= end:
                self.pos = pos
                if ops:
                    self.problem = Problem(pos, "records without a COMMIT at the end")
                else:
                    self.problem = None
                return None
            if end - pos < hsize:
                self._fail(pos, "incomplete record header")
                return None
            crc, n, rtype = unpack(buf[pos : pos + hsize])
            stop = pos + hsize + n
            if n > MAX_PAYLOAD or stop > end:
                self._fail(pos, f"record length {n} runs past the end of the data")
                return None
            body = buf[pos + 4 : stop]
            if crc32(body) != crc:
                self._fail(pos, "checksum mismatch")
                return None
            size = hsize + n
            if rtype == _COMMIT_T:
                if n != _COMMIT.size:
                    self._fail(pos, "malformed COMMIT record")
                    return None
                start, count = _COMMIT.unpack(body[5:])
                if not self._lenient and (start != self.pending_start or count != len(ops)):
                    self._fail(pos, "COMMIT does not match the batch before it")
                    return None
                batch = (self.pending_start, ops)
                self.records += len(ops)
                pos = stop
                self.pos = self.committed = self.pending_start = pos
                self.pending = []
                self.metas = self.pending_metas
                self.pending_metas = []
                self._lenient = False
                return batch
            op = decode_op(rtype, memoryview(body)[5:], size, self.pending_metas)
            if type(op) is str:
                self._fail(pos, op)
                return None
            ops.append(op)  # type: ignore[arg-type]
            pos = stop

    def _fail(self, pos: int, reason: str) -> None:
        self.pos = pos
        self.problem = Problem(pos, reason)

    def take_pending(self) -> tuple[int, list[Op]]:
        """The records read since the last COMMIT (salvage keeps them); clears them."""
        run = (self.pending_start, self.pending)
        self.records += len(self.pending)
        self.pending = []
        self.metas = self.pending_metas
        self.pending_metas = []
        return run

    def resync(self) -> tuple[int, int]:
        """Skip to the next verifying record after the problem; ``(offset, bytes skipped)``.

        Call ``take_pending()`` first. If nothing verifies before the end, skips to the end.
        """
        assert self.problem is not None
        bad = self.problem.offset
        nxt = find_record(self._buf, bad + 1, self._end)
        if nxt < 0:
            nxt = self._end
        self.pos = self.pending_start = self.committed = nxt
        self.problem = None
        self._lenient = True
        return bad, nxt - bad


def classify_last_commit(
    buf: Buffer, pos: int, end: int, start: int, count: int
) -> Literal["torn", "repair", "damaged"] | None:
    """What the bytes at ``pos`` that fail to verify are, when they end the last segment.

    ``start`` and ``count`` describe the batch read so far (records that verified, from
    ``start`` to ``pos``). ``None`` unless exactly one COMMIT fits in ``pos .. end`` after
    at least one record: then the ordinary rule applies (no valid COMMIT after = torn
    tail). Otherwise the batch was written to its last byte, and the COMMIT is either
    ``"repair"`` (within ``REPAIR_MAX_BITS`` of the expected COMMIT: a flipped bit),
    ``"torn"`` (zeros from ``pos`` or from a ``BLOCK`` boundary on, the rest as expected),
    ``None`` (a record the file ends inside, e.g. a FAILED record cut 21 bytes in), or
    ``"damaged"`` (a whole record that is no COMMIT of this batch).
    """
    if count == 0 or end - pos != COMMIT_SIZE:
        return None
    want = commit_record(start, count)
    got = bytes(buf[pos:end])
    bits = sum((a ^ b).bit_count() for a, b in zip(got, want, strict=True))
    if bits <= REPAIR_MAX_BITS:
        return "repair"
    first_block = -(-pos // BLOCK) * BLOCK
    for z in (pos, *range(first_block, end, BLOCK)):
        k = z - pos
        if got[:k] == want[:k] and not any(got[k:]):
            return "torn"
    _crc, n, _t = HEADER.unpack(got[: HEADER.size])
    if pos + HEADER.size + n > end:
        return None  # a record the file ends inside: a short write, the ordinary rule
    return "damaged"
