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
from functools import partial
from itertools import repeat
from operator import itemgetter
from typing import Final, Literal

import msgpack

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
    RecordType,
    commit_record,
    decode_op,
    read_record,
)
from qdash_mp.records import MAX_DEPTH, MAX_ITEMS, first_bad_failed

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
_FAILED_T: Final = int(RecordType.FAILED)
_NOT_FAILED: Final = re.compile(rb"[^\x%02x]" % _FAILED_T)
_fast_unpackb: Final = partial(msgpack.unpackb, use_list=False)
"""A FAILED array that ``first_bad_failed`` accepts decodes alike with ``format._unpackb``
(ext types come out as objects that fail its checks); as a tuple, which the cyclic GC stops
tracking at its first look (lists of a whole batch would keep it busy)."""
_CHUNK: Final = 256
"""Records framed before they are decoded: enough for C-level passes to pay, few enough that
their payloads' memory is reused from chunk to chunk (a whole batch's would stay behind as
holes in the heap)."""
_FIELD0: Final = itemgetter(0)
_FIELD1: Final = itemgetter(1)
_FIELD5: Final = itemgetter(5)
_FIELD6: Final = itemgetter(6)
_FIELD8: Final = itemgetter(8)


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
        "_head_crcs",
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
        self._head_crcs: dict[int, int] = {}
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
        """The next committed batch, or ``None`` (see the class docstring).

        Two passes over each ``_CHUNK`` records of a batch: their framing (length,
        checksum), then their payloads, decoded together (``_decode``). The outcome is what a
        record-by-record reading gives: the first problem in file order is the one reported,
        with the records before it pending.
        """
        buf = self._buf
        end = self._end
        pos = self.pos
        unpack_from = HEADER.unpack_from
        crc32 = zlib.crc32
        hsize = HEADER.size
        head_crcs = self._head_crcs
        starts: list[int] = []  # offset of each record of the batch (after pending ones)
        types = bytearray()
        payloads: list[bytes | bytearray] = []
        while True:
            if pos >= end:
                self._decode(starts, types, payloads, pos)
                if self.problem is None:
                    self.pos = pos
                    if self.pending:
                        self.problem = Problem(pos, "records without a COMMIT at the end")
                return None
            if end - pos < hsize:
                self._decode(starts, types, payloads, pos)
                if self.problem is None:
                    self._fail(pos, "incomplete record header")
                return None
            crc, n, rtype = unpack_from(buf, pos)  # type: ignore[arg-type] # (a buffer)
            stop = pos + hsize + n
            if n > MAX_PAYLOAD or stop > end:
                self._decode(starts, types, payloads, pos)
                if self.problem is None:
                    self._fail(pos, f"record length {n} runs past the end of the data")
                return None
            payload = buf[pos + hsize : stop]
            # The CRC covers length and type too: that part's CRC, once per (length, type).
            key = n << 8 | rtype
            head = head_crcs.get(key)
            if head is None:
                head = head_crcs[key] = crc32(_LEN_TYPE.pack(n, rtype))
            if crc32(payload, head) != crc:
                self._decode(starts, types, payloads, pos)
                if self.problem is None:
                    self._fail(pos, "checksum mismatch")
                return None
            if rtype == _COMMIT_T:
                self._decode(starts, types, payloads, pos)
                if self.problem is not None:
                    return None
                ops = self.pending
                if n != _COMMIT.size:
                    self._fail(pos, "malformed COMMIT record")
                    return None
                start, count = _COMMIT.unpack(payload)
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
            starts.append(pos)
            types.append(rtype)
            payloads.append(payload)
            pos = stop
            if len(starts) >= _CHUNK:  # decode as we go: a few payloads alive at a time
                self._decode(starts, types, payloads, pos)
                if self.problem is not None:
                    return None
                starts = []
                types = bytearray()
                payloads = []

    def _decode(
        self, starts: list[int], types: bytearray, payloads: list[bytes | bytearray], end: int
    ) -> None:
        """Decode the framed records (offsets ``starts``, the last one ending at ``end``) onto
        ``pending``; at the first that does not decode, ``problem`` is set there and the
        records before it stay pending.

        A run of FAILED records (the usual batch) is decoded in C-level passes
        (``_decode_failed``: one ``unpackb`` each, one ``first_bad_failed`` for the run, the
        checks ``check_failed`` makes). Other records, and a run where any of that fails,
        go record by record through ``decode_op``, which says what is wrong.
        """
        k = len(starts)
        if not k:
            return
        sizes = [b - a for a, b in zip(starts, [*starts[1:], end], strict=True)]
        ops = self.pending
        metas = self.pending_metas
        i = 0
        while i < k:
            j = i + 1
            if types[i] == _FAILED_T:
                m = _NOT_FAILED.search(types, i)
                j = k if m is None else m.start()
                if j - i > 1 and self._decode_failed(payloads[i:j], sizes[i:j]):
                    i = j
                    continue
            for at, rtype, payload, size in zip(
                starts[i:j], types[i:j], payloads[i:j], sizes[i:j], strict=True
            ):
                op = decode_op(rtype, payload, size, metas)
                if type(op) is str:
                    self._fail(at, op)
                    return
                ops.append(op)  # type: ignore[arg-type]
            i = j

    def _decode_failed(self, payloads: list[bytes | bytearray], sizes: list[int]) -> bool:
        """Decode a run of FAILED records onto ``pending`` in C-level passes; False (and
        nothing pending added) if one of them does not decode or check."""
        try:
            objs = list(map(_fast_unpackb, payloads))
        except Exception:  # noqa: BLE001 - decode_op, record by record, says what it is
            return False
        if first_bad_failed(objs, MAX_ITEMS, MAX_DEPTH) >= 0:
            return False
        self.pending += zip(
            repeat(_FAILED_T, len(sizes)),
            map(_FIELD0, objs),
            sizes,
            map(_FIELD8, objs),
            strict=True,
        )
        self.pending_metas += zip(
            map(_FIELD5, objs), map(_FIELD1, objs), map(_FIELD6, objs), strict=True
        )
        return True

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
