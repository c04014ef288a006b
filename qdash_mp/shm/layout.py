"""The shared-memory stats block, byte by byte: offsets, header, directory, clients, redo log.

Pure: no I/O. Every other module of ``qdash_mp.shm`` finds a field through the names here;
``tests/test_shm_layout.py`` checks this table against the constants and decodes a live block
with its own code written from the table. The narrative (seqlock, redo log, generations,
snapshots) is in ``docs/shm.md``.

Every integer is a signed 64-bit slot in native byte order (little-endian on x86-64 and
arm64), 8-byte aligned. ``R`` is the ring size (``window + 1``), ``C`` the capacity in queues,
``K`` the capacity in clients, ``B`` = ``histogram.NBUCKETS`` = 418 buckets per histogram,
``L = record_len(R) = 6 + 2R + 2B`` the record size in slots (``H = 6 + 2R`` of them its
head: counters, started, active, ring) and ``W = max(L, 67)`` the redo-log payload size in slots (a
client entry is 67 slots)::

    offset (bytes)          size      field
    ----------------------  --------  ---------------------------------------------------------
    header (16 slots, 128 bytes)
    0                       8         magic, the bytes b"QDASHSHM"
    8                       8         layout version, 3
    16                      8         R, throughput ring slots (window + 1 seconds)
    24                      8         C, capacity in queues
    32                      8         queue count N (N <= C); entries 0..N-1 are in use
    40                      8         seqlock sequence: odd while the writer is mid-update
    48                      8         started: Unix second the table began counting
    56                      8         pid of the writer attached now (0 after a clean close)
    64                      8         generation of this block (0 for the segment named NAME)
    72                      8         status: 1 live, 2 superseded (see next), 3 closed
    80                      8         next: generation that superseded this block, 0 if none;
                                      in generation 0 always the newest generation
    88                      8         NAME_MAX, name bytes per directory entry (248)
    96                      8         redo-log entries committed and not yet copied back (0)
    104                     8         incarnation: random id of this table, same in every
                                      generation; a new table (not a reattach) gets a new one
    112                     8         K, capacity in clients
    120                     8         client count M (M <= K); entries 0..M-1 are in use
    directory (C entries of 256 bytes)
    128 + 256 i             8         byte length n of queue i's name (0 <= n <= 248)
    128 + 256 i + 8         248       the name, UTF-8, n bytes used, the rest zero
    records (C records of 8L bytes)
    D = 128 + 256 C
    D + 8L i                8L        queue i's record, exactly the ``qdash_mp.stats_record`` layout
    clients (K entries of 536 bytes)
    E = D + 8L C
    E + 536 j               8         byte length n of client j's id (1 <= n <= 512)
    E + 536 j + 8           8         seq of the last batch of client j applied
    E + 536 j + 16          8         Unix second that batch was applied (its last update)
    E + 536 j + 24          512       the client id, UTF-8, n bytes used, the rest zero
    redo log (C + 1 entries of 8(W+2) bytes)
    G = E + 536 K
    G + 8(W+2) k            8         t >= 0: this entry is the new content of record t;
                                      t < 0: the new content of client entry j = -1 - t
    G + 8(W+2) k + 8        8         n, the slots of the payload that count: a record's
                                      L (all of it) or H (its head: its histograms did not
                                      change); a client's 67
    G + 8(W+2) k + 16       8W        the first n slots of the record or client entry
                                      (536 bytes laid out as above); the rest unused
    total size: G + 8(W+2)(C + 1)

Layouts 1 (before the client table) and 2 (before ``started`` and the histograms) are not
read: a reader refuses them, a writer replaces them (a clean stop's snapshot file carries the
counters over an upgrade: ``snapshot`` converts format 1). Generation ``g`` lives in the
segment ``NAME`` (g = 0) or ``NAME-g<g>``.

A queue name is its UTF-8 bytes (``surrogatepass``); one over 248 bytes is stored shortened:
its longest prefix of whole characters that fits in 229 bytes, then ``"…"`` (3 bytes) and the
first 16 hex digits of the SHA-256 of the full name's bytes. A client id (1 to 128 characters,
the wire protocol's limit) takes at most 512 bytes and is stored whole.
"""

from __future__ import annotations

import hashlib
import re
import struct
import sys
from typing import Final

from qdash_mp.errors import ConfigError, ShmIncompatible
from qdash_mp.stats import head_len, record_len
from qdash_mp.wire import MAX_CLIENT_ID

__all__ = [
    "CLIENT_ENTRY_SIZE",
    "CLIENT_ID_MAX",
    "DEFAULT_CAPACITY",
    "DEFAULT_CLIENT_CAPACITY",
    "DEFAULT_CLIENT_TTL",
    "DIR_ENTRY_SIZE",
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "NAME_MAX",
    "Layout",
    "check_client_id",
    "check_name",
    "decode_names",
    "segment_name",
    "stored_name",
    "stored_queue_name",
]

MAGIC: Final = b"QDASHSHM"
LAYOUT_VERSION: Final = 3
HEADER_SIZE: Final = 128
DIR_ENTRY_SIZE: Final = 256
NAME_MAX: Final = DIR_ENTRY_SIZE - 8
"""Bytes of UTF-8 a queue name may take before it is stored shortened."""
DEFAULT_CAPACITY: Final = 1024
"""Queues the first block holds; it grows beyond. The default block (1024 queues, 4096 clients,
a 60 s window) takes 18.3 MB (15.7 KB per queue: record, directory entry, redo-log entry)."""
CLIENT_ID_MAX: Final = MAX_CLIENT_ID
"""Characters in a client id (its UTF-8 takes at most four times as many bytes)."""
CLIENT_ENTRY_SIZE: Final = 24 + 4 * CLIENT_ID_MAX
DEFAULT_CLIENT_CAPACITY: Final = 4096
"""Clients the first block holds (2.2 MB); it grows beyond, or reuses idle clients' entries."""
DEFAULT_CLIENT_TTL: Final = 600.0
"""Seconds since its last batch before a client's entry may be given to a new client."""

# Header slots (index into the int64 view of the block), in table order.
VERSION, RING, CAPACITY, COUNT, SEQ, STARTED, PID = 1, 2, 3, 4, 5, 6, 7
GENERATION, STATUS, NEXT, NAME_MAX_SLOT, LOG_COUNT, INCARNATION = 8, 9, 10, 11, 12, 13
CLIENT_CAP, CLIENTS = 14, 15

# Values of the status slot.
LIVE, SUPERSEDED, CLOSED = 1, 2, 3

CLIENT_SLOTS: Final = CLIENT_ENTRY_SIZE // 8
"""Slots in a client entry: id length, seq, second, then the id bytes."""
CLIENT_HEAD: Final = struct.Struct("=3q")
"""A client entry's first three slots: id length, seq, second."""

_HASH_CHARS = 16
_ELLIPSIS = "…"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class Layout:
    """Offsets of one block (bytes for ``*_at``, int64 slots for ``*_slot``)."""

    __slots__ = (
        "capacity",
        "cli_at",
        "cli_slot",
        "clients",
        "head_slots",
        "log_slot",
        "log_slots",
        "rec_at",
        "rec_slot",
        "rec_slots",
        "ring",
        "size",
    )

    def __init__(self, ring: int, capacity: int, clients: int) -> None:
        self.ring = ring
        self.capacity = capacity
        self.clients = clients
        self.rec_slots = record_len(ring)
        self.head_slots = head_len(ring)
        self.rec_at = HEADER_SIZE + capacity * DIR_ENTRY_SIZE  # D
        self.rec_slot = self.rec_at // 8
        self.cli_at = self.rec_at + capacity * self.rec_slots * 8  # E
        self.cli_slot = self.cli_at // 8
        log_at = self.cli_at + clients * CLIENT_ENTRY_SIZE  # G
        self.log_slot = log_at // 8
        self.log_slots = max(self.rec_slots, CLIENT_SLOTS) + 2  # W + 2
        self.size = log_at + (capacity + 1) * self.log_slots * 8

    def client_slot(self, j: int) -> int:
        """Int64 slot of client entry ``j`` (its id length; seq, second and id follow)."""
        return self.cli_slot + j * CLIENT_SLOTS

    @staticmethod
    def entry_at(i: int) -> int:
        """Byte offset of directory entry ``i``."""
        return HEADER_SIZE + i * DIR_ENTRY_SIZE


def segment_name(name: str, generation: int) -> str:
    """The segment holding ``generation`` of the table called ``name``."""
    return name if generation == 0 else f"{name}-g{generation}"


def stored_queue_name(queue: str) -> str:
    """The name ``queue`` is stored and shown under (itself unless over ``NAME_MAX`` bytes)."""
    return stored_name(queue).decode("utf-8", "surrogatepass")


def stored_name(queue: str) -> bytes:
    """The directory bytes of ``queue``: its UTF-8, or its shortened form over ``NAME_MAX``."""
    raw = queue.encode("utf-8", "surrogatepass")
    if len(raw) <= NAME_MAX:
        return raw
    suffix = (_ELLIPSIS + hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]).encode()
    end = NAME_MAX - len(suffix)
    while raw[end] & 0xC0 == 0x80:  # a continuation byte: the cut is inside a character
        end -= 1
    return raw[:end] + suffix


def check_name(name: str) -> None:
    """``ConfigError`` unless ``name`` can name a segment."""
    # The resource tracker's wire format and shm_open's name rules both want this.
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"shared-memory name must be 1-200 characters from [A-Za-z0-9_.-], not {name!r}"
        )


def check_client_id(client_id: object) -> str:
    """``client_id`` if it is a storable client id, else ``ValueError``."""
    if not isinstance(client_id, str) or not 1 <= len(client_id) <= CLIENT_ID_MAX:
        raise ValueError(f"client id must be a str of 1..{CLIENT_ID_MAX} characters")
    return client_id


def decode_names(raw: bytes, count: int, name: str) -> list[str]:
    """Decode ``count`` directory entries from their bytes; ``ShmIncompatible`` if corrupt."""
    names = []
    for k in range(count):
        at = k * DIR_ENTRY_SIZE
        n = int.from_bytes(raw[at : at + 8], sys.byteorder, signed=True)
        if not 0 <= n <= NAME_MAX:
            raise ShmIncompatible(f"shared stats {name!r}: corrupt directory entry ({n} bytes)")
        try:
            names.append(raw[at + 8 : at + 8 + n].decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError as exc:
            raise ShmIncompatible(f"shared stats {name!r}: corrupt queue name: {exc}") from None
    return names
