"""The on-disk format of per-queue history files: byte layout, encoders, decoders.

Pure functions over bytes; ``qdash_mp.history`` owns the files and the durability rules.

One file per queue, ``q-<first 32 hex digits of sha256(queue name as UTF-8)>.qh``, of a fixed
size (``FILE_SIZE`` = 153,024 bytes), so the history of a queue never grows. All integers are
little-endian; every block carries a zlib CRC-32 of its other bytes::

    offset   size    block
    0        64      header
    64       1024    queue name, UTF-8, zero padded (covered by the header's CRC)
    1088     6848    state copy A    \\ double-buffered: written alternately, the valid copy
    7936     6848    state copy B    /  with the higher seq wins, a torn one is ignored
    14784    92160   minute ring: 1440 slots x 64 bytes (24 hours)
    106944   46080   hour ring:    720 slots x 64 bytes (30 days)

Header::

    0   8   magic      b"QDHIST\\x00\\x01"
    8   4   version    uint32, FORMAT_VERSION (1)
    12  4   nbuckets   uint32, histogram.NBUCKETS (418): the bucket scheme of the state
    16  4   minutes    uint32, slots in the minute ring (1440)
    20  4   hours      uint32, slots in the hour ring (720)
    24  4   name_len   uint32, bytes of the queue name (1 .. 1024)
    28  8   created    float64, UNIX seconds
    36  24  reserved   zero
    60  4   crc        CRC-32 of bytes 0..59 and of the 1024-byte name area

Slot (one point of a ring; the slot of time ``t`` is ``(t // period) % slots``)::

    0   8   t          int64, start of the minute / hour, UNIX seconds; an all-zero slot is empty
    8   8   pushed     uint64  \\
    16  8   processed  uint64   | jobs in that minute / hour
    24  8   failed     uint64  /
    32  8   count      uint64, runtimes measured
    40  20  p50 p90 p95 p99 max   float32 seconds each (0 when count is 0)
    60  4   crc        CRC-32 of bytes 0..59

For example the minute starting 2025-12-02 00:00 UTC with 120 pushed, 118 processed, 2 failed
and 118 runtimes (p50 0.05 s, p90 0.2 s, p95 0.4 s, p99 1.5 s, max 2 s)::

    00 2c 2e 69 00 00 00 00  78 00 00 00 00 00 00 00   t = 1764633600   pushed = 120
    76 00 00 00 00 00 00 00  02 00 00 00 00 00 00 00   processed = 118  failed = 2
    76 00 00 00 00 00 00 00  cd cc 4c 3d cd cc 4c 3e   count = 118      p50      p90
    cd cc cc 3e 00 00 c0 3f  00 00 00 40 14 b2 77 2c   p95      p99      max      crc

State (what a restart needs to continue exactly; 6848 bytes)::

    0     8     seq        uint64, +1 per write; 0 = never written
    8     8     hour_t     int64, start of the hour being accumulated (0 = none yet)
    16    24    hour       uint64 x 3: pushed, processed, failed so far in that hour
    40    24    base       uint64 x 3: cumulative totals already counted into history
    64    64    last       the slot of the last minute recorded (rewritten on open: a torn
                           or lost ring write of that minute is redone from here)
    128   3344  hour runtime bucket counts, uint64 x NBUCKETS
    3472  3344  base runtime bucket counts (cumulative, like ``base``), uint64 x NBUCKETS
    6816  28    zero
    6844  4     crc        CRC-32 of bytes 0..6843
"""

from __future__ import annotations

import array
import hashlib
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from qdash_mp.errors import HistoryCorrupt
from qdash_mp.histogram import NBUCKETS, Counts, summary

__all__ = [
    "FILE_SIZE",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "HOUR",
    "HOUR_RING",
    "HOUR_SLOTS",
    "MAGIC",
    "MINUTE",
    "MINUTE_RING",
    "MINUTE_SLOTS",
    "NAME_AREA",
    "SLOT_SIZE",
    "STATE_A",
    "STATE_B",
    "STATE_SIZE",
    "Point",
    "State",
    "file_name",
    "make_point",
    "pack_header",
    "pack_slot",
    "pack_state",
    "point_dict",
    "unpack_header",
    "unpack_slot",
    "unpack_state",
]

MAGIC: Final = b"QDHIST\x00\x01"
FORMAT_VERSION: Final = 1
MINUTE: Final = 60
HOUR: Final = 3600
MINUTE_SLOTS: Final = 24 * 60
HOUR_SLOTS: Final = 30 * 24
NAME_AREA: Final = 1024
_HEAD: Final = struct.Struct("<8sIIIIId24x")
_CRC: Final = struct.Struct("<I")
HEADER_SIZE: Final = 64 + NAME_AREA
_SLOT: Final = struct.Struct("<qQQQQfffff")
SLOT_SIZE: Final = 64
_STATE_HEAD: Final = struct.Struct("<Qq3Q3Q")
STATE_SIZE: Final = 6848
_STATE_CRC_AT: Final = STATE_SIZE - 4
STATE_A: Final = HEADER_SIZE
STATE_B: Final = STATE_A + STATE_SIZE
MINUTE_RING: Final = STATE_B + STATE_SIZE
HOUR_RING: Final = MINUTE_RING + MINUTE_SLOTS * SLOT_SIZE
FILE_SIZE: Final = HOUR_RING + HOUR_SLOTS * SLOT_SIZE

assert _SLOT.size == SLOT_SIZE - 4
assert _STATE_HEAD.size == 64
assert 128 + 2 * 8 * NBUCKETS <= _STATE_CRC_AT
assert FILE_SIZE == 153_024


def file_name(queue: str) -> str:
    """The file holding ``queue``'s history (fixed length, any queue name)."""
    return "q-" + hashlib.sha256(queue.encode()).hexdigest()[:32] + ".qh"


def pack_header(queue: str, created: float) -> bytes:
    """Header and name area (``HEADER_SIZE`` bytes)."""
    name = queue.encode()
    if not 0 < len(name) <= NAME_AREA:
        raise ValueError(f"queue name of {len(name)} bytes; 1..{NAME_AREA} fit")
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, NBUCKETS, MINUTE_SLOTS, HOUR_SLOTS, len(name), created)
    area = name.ljust(NAME_AREA, b"\0")
    return head + _CRC.pack(zlib.crc32(area, zlib.crc32(head))) + area


def unpack_header(buf: bytes, where: str) -> tuple[str, float]:
    """``(queue, created)`` of a header; ``HistoryCorrupt`` naming ``where`` if it is bad."""
    if len(buf) < HEADER_SIZE:
        raise HistoryCorrupt(f"{where}: {len(buf)} bytes, shorter than a header")
    head, area = buf[:60], buf[64:HEADER_SIZE]
    (crc,) = _CRC.unpack_from(buf, 60)
    if zlib.crc32(area, zlib.crc32(head)) != crc:
        raise HistoryCorrupt(f"{where}: header checksum mismatch")
    magic, version, nbuckets, minutes, hours, name_len, created = _HEAD.unpack(head)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise HistoryCorrupt(f"{where}: not a version {FORMAT_VERSION} history file")
    if (nbuckets, minutes, hours) != (NBUCKETS, MINUTE_SLOTS, HOUR_SLOTS):
        raise HistoryCorrupt(f"{where}: layout {nbuckets}/{minutes}/{hours} is not ours")
    if not 0 < name_len <= NAME_AREA:
        raise HistoryCorrupt(f"{where}: name length {name_len}")
    try:
        return area[:name_len].decode(), created
    except UnicodeDecodeError:
        raise HistoryCorrupt(f"{where}: queue name is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class Point:
    """One minute or hour of a queue (percentiles 0.0 when ``count`` is 0)."""

    t: int
    pushed: int
    processed: int
    failed: int
    count: int = 0
    p50: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0


def make_point(t: int, jobs: Sequence[int], counts: Counts) -> Point:
    """The point of ``t`` from ``jobs`` (pushed, processed, failed) and runtime bucket counts
    (dense or sparse)."""
    pushed, processed, failed = jobs
    s = summary(counts)
    if not s.count:
        return Point(t, pushed, processed, failed)
    pcts = [x or 0.0 for x in (s.p50, s.p90, s.p95, s.p99, s.max)]
    return Point(t, pushed, processed, failed, s.count, *pcts)


def _f32(x: float) -> float:
    # float32 keeps ~7 digits: show 6 significant ones, not 0.05000000074505806
    return float(f"{x:.6g}")


def point_dict(p: Point) -> dict[str, Any]:
    """DESIGN.md's history point: ``{"t", "pushed", "processed", "failed", "runtime"}``."""
    if p.count:
        runtime: dict[str, Any] = {
            "count": p.count,
            "p50": _f32(p.p50),
            "p90": _f32(p.p90),
            "p95": _f32(p.p95),
            "p99": _f32(p.p99),
            "max": _f32(p.max),
        }
    else:
        runtime = dict.fromkeys(("p50", "p90", "p95", "p99", "max"))
        runtime = {"count": 0, **runtime}
    return {
        "t": p.t,
        "pushed": p.pushed,
        "processed": p.processed,
        "failed": p.failed,
        "runtime": runtime,
    }


def pack_slot(p: Point) -> bytes:
    """The 64 bytes of a ring slot."""
    body = _SLOT.pack(
        p.t, p.pushed, p.processed, p.failed, p.count, p.p50, p.p90, p.p95, p.p99, p.max
    )
    return body + _CRC.pack(zlib.crc32(body))


_EMPTY_SLOT: Final = bytes(SLOT_SIZE)


def unpack_slot(buf: bytes | memoryview, where: str) -> Point | None:
    """The point in a slot, None if empty; ``HistoryCorrupt`` if its checksum is wrong."""
    if buf == _EMPTY_SLOT:
        return None
    (crc,) = _CRC.unpack_from(buf, 60)
    if zlib.crc32(buf[:60]) != crc:
        raise HistoryCorrupt(f"{where}: slot checksum mismatch")
    return Point(*_SLOT.unpack_from(buf))


def _counts() -> array.array[int]:
    return array.array("Q", bytes(8 * NBUCKETS))


@dataclass(slots=True)
class State:
    """Everything besides the rings that a restart needs (see the module docstring)."""

    seq: int = 0
    hour_t: int = 0
    hour: list[int] = field(default_factory=lambda: [0, 0, 0])
    base: list[int] = field(default_factory=lambda: [0, 0, 0])
    last: Point | None = None
    hour_counts: array.array[int] = field(default_factory=_counts)
    base_counts: array.array[int] = field(default_factory=_counts)


def _le(a: array.array[int]) -> bytes:
    if sys.byteorder == "little":
        return a.tobytes()
    b = array.array("Q", a)  # pragma: no cover - big-endian hosts
    b.byteswap()  # pragma: no cover
    return b.tobytes()  # pragma: no cover


def pack_state(s: State) -> bytes:
    """The ``STATE_SIZE`` bytes of a state copy."""
    head = _STATE_HEAD.pack(s.seq, s.hour_t, *s.hour, *s.base)
    last = pack_slot(s.last) if s.last is not None else _EMPTY_SLOT
    body = head + last + _le(s.hour_counts) + _le(s.base_counts)
    body = body.ljust(_STATE_CRC_AT, b"\0")
    return body + _CRC.pack(zlib.crc32(body))


def unpack_state(buf: bytes, where: str) -> State | None:
    """The state in a copy; None if it was never written or its checksum is wrong."""
    if len(buf) != STATE_SIZE or buf == bytes(STATE_SIZE):
        return None
    (crc,) = _CRC.unpack_from(buf, _STATE_CRC_AT)
    if zlib.crc32(buf[:_STATE_CRC_AT]) != crc:
        return None
    seq, hour_t, *rest = _STATE_HEAD.unpack_from(buf)
    last = unpack_slot(buf[64:128], f"{where}: last minute")
    counts = []
    for at in (128, 128 + 8 * NBUCKETS):
        a = array.array("Q")
        a.frombytes(buf[at : at + 8 * NBUCKETS])
        if sys.byteorder != "little":  # pragma: no cover
            a.byteswap()
        counts.append(a)
    return State(seq, hour_t, rest[:3], rest[3:], last, counts[0], counts[1])
