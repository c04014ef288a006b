"""The collector's ``Stats`` in shared memory: one writer, any number of lock-free readers.

One concept, two homes: the collector keeps the same per-queue *records* as ``Stats`` (see
``qdash_mp.stats``: ``apply_deltas`` writes them, ``read_record``/``build_view`` read them),
but in one POSIX shared-memory block, so the dashboard, ``qdash-mp stats`` or a ``/metrics``
exporter in any local process can read the counters without asking the daemon, and a
collector restarted after ``kill -9`` reattaches and counts on from where it stopped.

The block also holds the collector's dedup table: for each client, the seq of the last batch
applied. A batch's counters and its client's seq change in one write section and one redo-log
commit, so after any crash either both or neither are there, and a batch the client resends
because it was never acknowledged is counted exactly once.

``SharedStats`` is the writer (only the collector creates one); ``SharedStatsReader`` is a
reader. Both produce the same ``StatsView`` as ``Stats.snapshot()``.

Block layout
============

Every integer is a signed 64-bit slot in native byte order (little-endian on x86-64 and
arm64), 8-byte aligned. ``R`` is the ring size (``window + 1``), ``C`` the capacity in queues,
``K`` the capacity in clients, ``L = record_len(R) = 4 + 2R`` the record size in slots and
``W = max(L, 67)`` the redo-log payload size in slots (a client entry is 67 slots)::

    offset (bytes)          size      field
    ----------------------  --------  ---------------------------------------------------------
    header (16 slots, 128 bytes)
    0                       8         magic, the bytes b"QDASHSHM"
    8                       8         layout version, 2
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
    D + 8L i                8L        queue i's record, exactly the ``qdash_mp.stats`` layout
    clients (K entries of 536 bytes)
    E = D + 8L C
    E + 536 j               8         byte length n of client j's id (1 <= n <= 512)
    E + 536 j + 8           8         seq of the last batch of client j applied
    E + 536 j + 16          8         Unix second that batch was applied (its last update)
    E + 536 j + 24          512       the client id, UTF-8, n bytes used, the rest zero
    redo log (C + 1 entries of 8(W+1) bytes)
    G = E + 536 K
    G + 8(W+1) k            8         t >= 0: this entry is the new content of record t;
                                      t < 0: the new content of client entry j = -1 - t
    G + 8(W+1) k + 8        8W        record: its L slots; client: its 67 slots (536 bytes,
                                      laid out as above); the rest of the W slots unused
    total size: G + 8(W+1)(C + 1)

Layout version 1 (before the client table) is not read: a reader refuses it
(``ShmIncompatible``), a writer replaces it (logged: counters restart from 0).

Generation ``g`` lives in the segment ``NAME`` (g = 0) or ``NAME-g<g>``. Segments are created
owner-only (0600) and fully reserved up front (``posix_fallocate``), so a full ``/dev/shm``
is a clear error at creation instead of a ``SIGBUS`` later.

Queue names. A name is stored as its UTF-8 bytes (lone surrogates, which only a Python ``str``
can hold, are kept with the ``surrogatepass`` handler, so every ``str`` round-trips). A name
longer than 248 bytes is stored shortened: its longest prefix of whole characters that fits in
229 bytes, then ``"…"`` and the first 16 hex digits of the SHA-256 of the full name's bytes
(``stored_queue_name`` computes it). Shortened names stay unique (barring a 64-bit hash
collision); every snapshot, the writer's included, shows the stored form; a queue is
identified by its stored form, so a short name spelled exactly like another name's shortened
form shares its counters.

Clients. A client id is 1 to 128 characters (``CLIENT_ID_MAX``, the wire protocol's limit),
so its UTF-8 (``surrogatepass``) takes at most 512 bytes and is stored whole: lookups are exact
string matches, never a hash. Only the writer reads the entries; it mirrors them in a dict
(id to entry and seq), rebuilt on attach, so ``client_seq`` costs a dict lookup.

When a new client comes and all K entries are taken, it gets the entry of the least recently
updated client if that one's last batch is at least ``client_ttl`` seconds old (10 minutes by
default; logged at INFO); otherwise the table grows (see Growth) rather than forget a client
heard from recently. Forgetting a client is exact unless it later resends a batch that was
applied but not acknowledged: that batch would be counted twice. A client resends as soon as
it reconnects (its backoff is capped at a second by default), so that takes a client cut off
from a running collector for longer than ``client_ttl`` while more than K other clients sent
batches. ``DEFAULT_CLIENT_CAPACITY`` (4096) and the TTL are sized so that this does not happen;
a table that churns through more clients than that simply grows.

Concurrency
===========

Seqlock. The writer makes every change inside a *write section*: it bumps the sequence to odd,
writes, and bumps it back to even. ``apply_batch`` applies a whole client batch (new directory
entries, count, every record it touches, the client's seq) in one section. A reader reads the
sequence, copies the part of the block it needs (the records of the N queues, and the
directory entries it has not decoded yet; plain ``bytes`` copies, which may tear individual
values), reads the sequence again, and keeps the copy only if both readings are the same even
number; otherwise it retries: at once for 0.5 ms (a write section takes microseconds), then
sleeping from 50 µs to 1 ms between attempts, until ``timeout``; then it raises ``ShmBusy``
(saying so when the writer died in the middle of a section). Readers never write.

Memory ordering. Slots are written through ``memoryview.cast("q")`` item assignment, which
CPython performs as one aligned 8-byte store, in program order: the interpreter's opaque
calls between bytecodes keep the C compiler from reordering them. x86-64 (TSO) makes stores
visible in program order and does not reorder loads with older loads, which is all a seqlock
needs; so on x86-64 a copy that passed the sequence check saw no write section. Nothing here
issues memory barriers, so on weakly ordered CPUs (arm64) the check is best effort: the same
assumption as prometheus_client's multiprocess mmap files, which have no check at all.

Crash safety (``kill -9`` of the collector). Segments outlive their writer (they are kept away
from ``multiprocessing``'s resource tracker, which would unlink them when the process dies)
and the next ``create_or_attach`` reattaches. Records and client entries are changed through a
redo log inside the write section: each touched record is copied into the log and the deltas
are applied there; the client's entry is copied in (or built, for a new client) with its new
seq and second; then the entry count is stored (the commit point), the log entries are copied
over the records and the client entry (counting a new entry into M) and the count is reset to
0. A writer that dies before the commit point changed no record and no seq (the batch was not
acknowledged and will be resent); one that dies after it left a complete log, which the next
writer replays (replaying twice is harmless). So a batch's counters and seq are applied
together or not at all; the only trace of a batch cut short can be a new queue with all
counters at 0. Reattaching also ends a write section left open (odd sequence), so readers can
read again.

One writer. The writer holds an exclusive ``flock`` on the segment named NAME; a second
``create_or_attach`` of the same name fails with ``ShmLocked`` while the first is alive. The
lock goes away with the process, so a restart after ``kill -9`` is not blocked.

Growth. A block holds C queues (``DEFAULT_CAPACITY`` unless told) and K clients. When a batch
brings more queues, or a client, than fit, the writer creates generation ``g + 1`` with twice
the capacity that fell short (or more), copies the directory, records and client entries, then
in one write section each marks the old block superseded (``next = g + 1``) and points
generation 0's ``next`` at it, and unlinks the old block unless it is generation 0 (which stays
as the entry point). A reader that finds its block superseded reopens NAME and follows
``next``.

Clean restarts: the snapshot file
=================================

On a clean shutdown the collector removes the segment (``unlink``), so it first ``save``\\ s
the table to a file; ``create_or_attach(..., restore_from=path)`` loads that file when it has
to create a new table, and ignores it (logging that it is stale) when a segment survived,
which is then the newer state. The file is written to a temporary name, fsynced, renamed over
``path`` and the directory fsynced, so ``path`` is always a whole snapshot, old or new::

    offset  size  field
    0       8     magic, the bytes b"QDASHSNP"
    8       4     format version, 1 (big-endian unsigned)
    12      4     CRC-32 (``zlib.crc32``) of the body (big-endian unsigned)
    16      8     body length B (big-endian unsigned); the file is exactly 24 + B bytes
    24      B     body: one msgpack map
                    "window":   int, the throughput window in seconds (R - 1)
                    "started":  int, Unix second the table began counting
                    "saved_at": int, Unix second of the save
                    "queues":   array of [name: bin (UTF-8, surrogatepass, the stored form),
                                          record: array of L ints, the record as above]
                    "clients":  array of [id: bin (UTF-8, surrogatepass), seq: int,
                                          second: int], least recently updated first

A file that does not verify (magic, version, length, CRC, structure, value ranges) or that was
saved with another window is renamed to ``path + ".bad"`` with a warning, and the table starts
empty. The file is left in place after a restore: deleting it is the caller's call.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import importlib
import logging
import operator
import os
import re
import secrets
import struct
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Final, TypeVar

import msgpack

from qdash_mp.errors import CollectorError, ConfigError, QdashError
from qdash_mp.fsio import try_flock, write_atomically
from qdash_mp.models import QueueStat, StatsView
from qdash_mp.stats import (
    COUNTERS,
    DEFAULT_WINDOW,
    StatsBase,
    apply_deltas,
    build_view,
    read_record,
    record_len,
    ring_slots,
)
from qdash_mp.wire import MAX_CLIENT_ID

__all__ = [
    "CLIENT_ID_MAX",
    "DEFAULT_CAPACITY",
    "DEFAULT_CLIENT_CAPACITY",
    "DEFAULT_CLIENT_TTL",
    "LAYOUT_VERSION",
    "MAGIC",
    "NAME_MAX",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_VERSION",
    "SharedStats",
    "SharedStatsReader",
    "ShmBusy",
    "ShmError",
    "ShmIncompatible",
    "ShmLocked",
    "ShmMissing",
    "segment_name",
    "stored_queue_name",
]

log = logging.getLogger("qdash_mp.shm")

_T = TypeVar("_T")

MAGIC: Final = b"QDASHSHM"
LAYOUT_VERSION: Final = 2
HEADER_SIZE: Final = 128
DIR_ENTRY_SIZE: Final = 256
NAME_MAX: Final = DIR_ENTRY_SIZE - 8
"""Bytes of UTF-8 a queue name may take before it is stored shortened."""
DEFAULT_CAPACITY: Final = 1024
"""Queues the first block holds; it grows beyond. The default block (1024 queues, 4096 clients,
a 60 s window) takes 4.5 MB."""
CLIENT_ID_MAX: Final = MAX_CLIENT_ID
"""Characters in a client id (its UTF-8 takes at most four times as many bytes)."""
CLIENT_ENTRY_SIZE: Final = 24 + 4 * CLIENT_ID_MAX
DEFAULT_CLIENT_CAPACITY: Final = 4096
"""Clients the first block holds (2.2 MB); it grows beyond, or reuses idle clients' entries."""
DEFAULT_CLIENT_TTL: Final = 600.0
"""Seconds since its last batch before a client's entry may be given to a new client."""
SNAPSHOT_MAGIC: Final = b"QDASHSNP"
SNAPSHOT_VERSION: Final = 1

# Header slots (index into the int64 view of the block).
_VERSION, _RING, _CAPACITY, _COUNT, _SEQ, _STARTED, _PID = 1, 2, 3, 4, 5, 6, 7
_GENERATION, _STATUS, _NEXT, _NAME_MAX, _LOG_COUNT, _INCARNATION = 8, 9, 10, 11, 12, 13
_CLIENT_CAP, _CLIENTS = 14, 15

_LIVE, _SUPERSEDED, _CLOSED = 1, 2, 3

_N = len(COUNTERS)
_CS = CLIENT_ENTRY_SIZE // 8
"""Slots in a client entry: id length, seq, second, then the id bytes."""
_CLIENT_HEAD = struct.Struct("=3q")
_HASH_CHARS = 16
_ELLIPSIS = "…"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_SPIN_SECONDS = 0.0005
"""How long a reader retries at once (write sections take microseconds) before sleeping."""
_PAUSE_MIN, _PAUSE_MAX = 5e-5, 1e-3
_INT64 = range(-(2**63), 2**63)
_SNAPSHOT_HEAD = struct.Struct(">8sIIQ")

_fault_hook: Callable[[str], None] | None = None
"""Test seam, None in production (where it costs one global lookup per point).

When set, the writer calls it inside ``apply_batch``'s write section with ``"log"`` (the redo
log is written, not committed), ``"commit"`` (committed, nothing copied back yet) and
``"copy"`` (records copied back, the client entry not yet), so a test can kill the writer in
each window.
"""


class ShmError(QdashError):
    """The shared-memory stats block cannot be used."""


class ShmMissing(ShmError, CollectorError):
    """No stats segment of that name: the collector is not running (or shut down)."""


class ShmIncompatible(ShmError):
    """A segment of that name exists but is not a stats block this version can read."""


class ShmLocked(ShmError, CollectorError):
    """Another live writer (collector) owns the segment."""


class ShmBusy(ShmError):
    """No consistent snapshot could be read in time."""


class _BadSnapshot(ShmError):
    """A snapshot file that does not verify (handled inside ``create_or_attach``)."""


def segment_name(name: str, generation: int) -> str:
    """The segment holding ``generation`` of the table called ``name``."""
    return name if generation == 0 else f"{name}-g{generation}"


def stored_queue_name(queue: str) -> str:
    """The name ``queue`` is stored and shown under (itself unless over ``NAME_MAX`` bytes)."""
    return _stored(queue).decode("utf-8", "surrogatepass")


def _stored(queue: str) -> bytes:
    raw = queue.encode("utf-8", "surrogatepass")
    if len(raw) <= NAME_MAX:
        return raw
    suffix = (_ELLIPSIS + hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]).encode()
    end = NAME_MAX - len(suffix)
    while raw[end] & 0xC0 == 0x80:  # a continuation byte: the cut is inside a character
        end -= 1
    return raw[:end] + suffix


def _check_name(name: str) -> None:
    # The resource tracker's wire format and shm_open's name rules both want this.
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"shared-memory name must be 1-200 characters from [A-Za-z0-9_.-], not {name!r}"
        )


def _check_client_id(client_id: object) -> str:
    if not isinstance(client_id, str) or not 1 <= len(client_id) <= CLIENT_ID_MAX:
        raise ValueError(f"client id must be a str of 1..{CLIENT_ID_MAX} characters")
    return client_id


# --- segments -------------------------------------------------------------------------------


def _posixshmem() -> ModuleType:
    # The C module behind SharedMemory: its own fd (flock, fallocate) and an unlink that does
    # not involve the resource tracker. Imported lazily; it has no type stubs.
    return importlib.import_module("_posixshmem")


def _open_shm(name: str, *, create: bool = False, size: int = 0) -> SharedMemory:
    """Open (or create) a segment that the resource tracker will not unlink behind our back.

    Python < 3.13 registers every SharedMemory, created or attached, with the tracker, which
    unlinks it when this process exits or dies: wrong for the collector (the counters must
    survive ``kill -9``) and for readers (the segment is not theirs). So we unregister at once.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name, create=create, size=size, track=False)
    shm = SharedMemory(name, create=create, size=size)
    resource_tracker.unregister("/" + name, "shared_memory")
    return shm


def _unlink(name: str) -> bool:
    """Remove the segment ``name``; False if there was none."""
    try:
        _posixshmem().shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


class _Layout:
    """Offsets of one block (bytes for ``*_at``, int64 slots for ``*_slot``)."""

    __slots__ = (
        "capacity",
        "cli_at",
        "cli_slot",
        "clients",
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
        self.rec_at = HEADER_SIZE + capacity * DIR_ENTRY_SIZE
        self.rec_slot = self.rec_at // 8
        self.cli_at = self.rec_at + capacity * self.rec_slots * 8
        self.cli_slot = self.cli_at // 8
        log_at = self.cli_at + clients * CLIENT_ENTRY_SIZE
        self.log_slot = log_at // 8
        self.log_slots = max(self.rec_slots, _CS) + 1
        self.size = log_at + (capacity + 1) * self.log_slots * 8

    def client_slot(self, j: int) -> int:
        """Int64 slot of client entry ``j`` (its id length; seq, second and id follow)."""
        return self.cli_slot + j * _CS

    @staticmethod
    def entry_at(i: int) -> int:
        """Byte offset of directory entry ``i``."""
        return HEADER_SIZE + i * DIR_ENTRY_SIZE


class _Segment:
    """One mapped block: the SharedMemory, its byte view and its int64 view."""

    __slots__ = ("buf", "generation", "layout", "name", "q", "shm")

    def __init__(self, name: str, shm: SharedMemory) -> None:
        self.name = name
        self.shm = shm
        buf = shm.buf
        assert buf is not None  # only None after close()
        self.buf: memoryview = buf
        self.q: memoryview = buf.cast("q")
        self.layout = _Layout(1, 0, 0)
        self.generation = 0

    def header_ok(self, ring: int | None = None) -> str | None:
        """Why this block is unusable (None if usable); sets ``layout`` when usable."""
        if len(self.buf) < HEADER_SIZE:
            return f"{len(self.buf)} bytes is too small for a header"
        if bytes(self.buf[:8]) != MAGIC:
            return "bad magic (not a qdash_mp stats block, or not initialized)"
        q = self.q
        if q[_VERSION] != LAYOUT_VERSION:
            return f"layout version {q[_VERSION]}, this qdash_mp reads {LAYOUT_VERSION}"
        if ring is not None and q[_RING] != ring:
            return f"a {q[_RING] - 1} s throughput window, not {ring - 1} s"
        if (
            q[_RING] < 2
            or not 0 <= q[_COUNT] <= q[_CAPACITY]
            or not 0 <= q[_CLIENTS] <= q[_CLIENT_CAP]
            or q[_CAPACITY] < 1
            or q[_CLIENT_CAP] < 1
            or q[_NAME_MAX] != NAME_MAX
        ):
            return "a corrupt header"
        layout = _Layout(q[_RING], q[_CAPACITY], q[_CLIENT_CAP])
        if len(self.buf) < layout.size:
            return f"{len(self.buf)} bytes, its header needs {layout.size}"
        self.layout = layout
        self.generation = q[_GENERATION]
        return None

    def begin(self) -> int:
        """Open a write section; returns the even sequence it started from."""
        seq: int = self.q[_SEQ]
        self.q[_SEQ] = seq + 1
        return seq

    def end(self, seq: int) -> None:
        """Close the write section opened by ``begin`` (which returned ``seq``)."""
        self.q[_SEQ] = seq + 2

    def close(self) -> None:
        # Release our views before SharedMemory.close(), or its mmap refuses to close.
        self.q.release()
        self.shm.close()

    def __del__(self) -> None:
        # A dropped, unclosed segment must not make SharedMemory.__del__ fail on our view.
        with contextlib.suppress(BufferError):
            self.q.release()


def _attach(name: str) -> _Segment:
    """Map an existing segment; ``FileNotFoundError`` if there is none."""
    try:
        shm = _open_shm(name)
    except ValueError as exc:  # an empty segment: its creator died before sizing it
        raise ShmIncompatible(f"shared-memory segment {name!r} is empty") from exc
    return _Segment(name, shm)


def _lock(name: str, pid: int = 0) -> int:
    """An fd of segment ``name`` holding its exclusive writer lock; ``ShmLocked`` if taken."""
    fd: int = _posixshmem().shm_open("/" + name, os.O_RDWR, mode=0o600)
    if not try_flock(fd):
        os.close(fd)
        owner = f" (pid {pid})" if pid else ""
        raise ShmLocked(
            f"shared stats {name!r} are written by another collector{owner}; "
            "stop it first, or give this one another data dir or --shm name"
        ) from None
    return fd


def _create(
    name: str,
    layout: _Layout,
    *,
    generation: int,
    started: int,
    incarnation: int,
    content: _Content | None = None,
) -> tuple[_Segment, int]:
    """Create, lock, reserve and initialize a block; returns it and the fd holding the lock.

    ``content`` (a restored snapshot) is written into the block before it is published. The
    magic is written last, so a block whose creator died half-way has none; the lock is taken
    before anything is written, so nobody mistakes a block being created for such a one.
    """
    shm = _open_shm(name, create=True, size=layout.size)
    seg = _Segment(name, shm)
    fd = -1
    try:
        fd = _lock(name)
        try:
            os.posix_fallocate(fd, 0, layout.size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise ShmError(
                    f"cannot reserve {layout.size} bytes of shared memory for {name!r} "
                    f"(is /dev/shm full?): {exc}"
                ) from exc
        q = seg.q
        q[_VERSION] = LAYOUT_VERSION
        q[_RING] = layout.ring
        q[_CAPACITY] = layout.capacity
        q[_STARTED] = started
        q[_PID] = os.getpid()
        q[_GENERATION] = generation
        q[_STATUS] = _LIVE
        q[_NAME_MAX] = NAME_MAX
        q[_INCARNATION] = incarnation
        q[_CLIENT_CAP] = layout.clients
        seg.layout = layout
        seg.generation = generation
        if content is not None:
            _fill(seg, content)
        seg.buf[:8] = MAGIC
    except BaseException:
        if fd >= 0:
            os.close(fd)
        seg.close()
        _unlink(name)
        raise
    return seg, fd


def _fill(seg: _Segment, content: _Content) -> None:
    """Write a snapshot's queues and clients into a new, still unpublished block."""
    q, buf, lay = seg.q, seg.buf, seg.layout
    rs = lay.rec_slots
    record = struct.Struct(f"={rs}q")
    for i, (stored, values) in enumerate(content.queues):
        at = _Layout.entry_at(i)
        q[at // 8] = len(stored)
        buf[at + 8 : at + 8 + len(stored)] = stored
        record.pack_into(buf, lay.rec_at + 8 * rs * i, *values)
    for j, (raw_id, seq, second) in enumerate(content.clients):
        at = 8 * lay.client_slot(j)
        _CLIENT_HEAD.pack_into(buf, at, len(raw_id), seq, second)
        buf[at + 24 : at + 24 + len(raw_id)] = raw_id
    q[_COUNT] = len(content.queues)
    q[_CLIENTS] = len(content.clients)


LinkReader = Callable[[_Segment], tuple[int, int]]


def _writer_link(seg: _Segment) -> tuple[int, int]:
    return seg.q[_STATUS], seg.q[_NEXT]


def _follow(name: str, base: _Segment, link: LinkReader) -> _Segment:
    """The block a table's readers and writer should use: generation 0 or the newest one.

    Follows ``next`` from ``base`` (whose header is checked) while blocks are superseded; a
    block may be unlinked under our feet by a growing writer, so when a generation is gone we
    try the one generation 0 now points to. ``link`` reads ``(status, next)`` of a block.
    """
    seg = base
    ring, incarnation = base.q[_RING], base.q[_INCARNATION]
    for _ in range(64):
        status, nxt = link(seg)
        if status != _SUPERSEDED:
            return seg
        found = None
        for gen in dict.fromkeys((nxt, link(base)[1])):
            if gen <= seg.generation:
                continue
            try:
                cand = _attach(segment_name(name, gen))
            except (FileNotFoundError, ShmIncompatible):
                continue
            if (
                cand.header_ok(ring) is None
                and cand.generation == gen
                and cand.q[_INCARNATION] == incarnation
            ):
                found = cand
                break
            cand.close()
        if seg is not base:
            seg.close()
        if found is None:
            raise ShmIncompatible(
                f"shared stats {name!r} moved to generation {nxt}, which is missing or damaged"
            )
        seg = found
    raise ShmIncompatible(f"shared stats {name!r}: too many generations")  # pragma: no cover


def _retire(name: str, base: _Segment) -> None:
    """Remove a table we will not reattach: mark its blocks closed (readers leave), unlink."""
    if _ours(base):
        newest = base.q[_NEXT]
        for gen in range(1, min(newest, 64) + 1):
            try:
                seg = _attach(segment_name(name, gen))
            except (FileNotFoundError, ShmIncompatible):
                continue
            if _ours(seg):
                _close_block(seg)
            seg.close()
            _unlink(seg.name)
        _close_block(base)
    _unlink(name)


def _ours(seg: _Segment) -> bool:
    """A stats block of this or an older layout (their headers agree up to slot 13)."""
    return (
        len(seg.buf) >= HEADER_SIZE
        and bytes(seg.buf[:8]) == MAGIC
        and seg.q[_VERSION] in (1, LAYOUT_VERSION)
    )


def _close_block(seg: _Segment) -> None:
    seq = seg.begin()
    seg.q[_STATUS] = _CLOSED
    seg.end(seq)


def _recover(seg: _Segment) -> None:
    """End a write section a dead writer left open; redo its batch if it had committed it."""
    q, lay = seg.q, seg.layout
    pending, odd = q[_LOG_COUNT], q[_SEQ] & 1
    if not pending and not odd:
        return
    seq = q[_SEQ] - odd
    q[_SEQ] = seq + 1
    if 0 < pending <= lay.capacity + 1:
        _replay(seg, pending)
        what = f"redid its last batch ({pending} log entries)"
    elif pending:
        what = f"ignored a corrupt redo log ({pending} entries)"
    else:
        what = "its last batch had not been committed, nothing to redo"
    q[_LOG_COUNT] = 0
    q[_SEQ] = seq + 2
    log.warning("shared stats %r: the previous writer died mid-update; %s", seg.name, what)


def _replay(seg: _Segment, entries: int) -> None:
    """Copy ``entries`` committed redo-log entries over their records and client entries.

    Idempotent: replaying a log that was already (partly) copied back changes nothing more.
    """
    q, lay = seg.q, seg.layout
    rs, count = lay.rec_slots, q[_COUNT]
    for k in range(entries):
        e = lay.log_slot + k * lay.log_slots
        tag = q[e]
        if 0 <= tag < count:
            r = lay.rec_slot + tag * rs
            q[r : r + rs] = q[e + 1 : e + 1 + rs]
        elif tag < 0 and -1 - tag <= q[_CLIENTS] and -1 - tag < lay.clients:
            j = -1 - tag
            c = lay.client_slot(j)
            q[c : c + _CS] = q[e + 1 : e + 1 + _CS]
            if j == q[_CLIENTS]:  # a new client's entry
                q[_CLIENTS] = j + 1


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _decode_names(raw: bytes, count: int, name: str) -> list[str]:
    """Decode ``count`` directory entries from their bytes."""
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


def _decode_clients(seg: _Segment, name: str) -> list[tuple[str, int, int]]:
    """``(id, seq, second)`` of the client entries in use."""
    buf, lay = seg.buf, seg.layout
    out = []
    for j in range(seg.q[_CLIENTS]):
        at = 8 * lay.client_slot(j)
        n, seq, second = _CLIENT_HEAD.unpack_from(buf, at)
        if not 1 <= n <= CLIENT_ENTRY_SIZE - 24:
            raise ShmIncompatible(f"shared stats {name!r}: corrupt client entry {j} ({n} bytes)")
        try:
            out.append(
                (bytes(buf[at + 24 : at + 24 + n]).decode("utf-8", "surrogatepass"), seq, second)
            )
        except UnicodeDecodeError as exc:
            raise ShmIncompatible(f"shared stats {name!r}: corrupt client id: {exc}") from None
    return out


# --- the snapshot file (pure: bytes in, bytes out) ------------------------------------------


@dataclass(frozen=True)
class _Content:
    """A table's contents outside shared memory: what ``save`` writes and a restore loads."""

    window: int
    started: int
    saved_at: int
    queues: list[tuple[bytes, list[int]]]
    """(stored name as UTF-8, record), in directory order."""
    clients: list[tuple[bytes, int, int]]
    """(id as UTF-8, last seq, second of its last update), least recently updated first."""


def _encode_snapshot(content: _Content) -> bytes:
    """The snapshot file's bytes (see "Clean restarts" in the module docstring)."""
    body: bytes = msgpack.packb(
        {
            "window": content.window,
            "started": content.started,
            "saved_at": content.saved_at,
            "queues": [[name, record] for name, record in content.queues],
            "clients": [[raw_id, seq, second] for raw_id, seq, second in content.clients],
        },
        use_bin_type=True,
    )
    head = _SNAPSHOT_HEAD.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, zlib.crc32(body), len(body))
    return head + body


def _decode_snapshot(raw: bytes, window: int) -> _Content:
    """Verify and decode a snapshot file saved with a ``window`` s window; ``_BadSnapshot``."""
    if len(raw) < _SNAPSHOT_HEAD.size:
        raise _BadSnapshot(f"{len(raw)} bytes is too short for a header")
    magic, version, crc, length = _SNAPSHOT_HEAD.unpack_from(raw)
    body = raw[_SNAPSHOT_HEAD.size :]
    if magic != SNAPSHOT_MAGIC:
        raise _BadSnapshot("bad magic (not a qdash_mp stats snapshot)")
    if version != SNAPSHOT_VERSION:
        raise _BadSnapshot(f"format version {version}, this qdash_mp reads {SNAPSHOT_VERSION}")
    if length != len(body):
        raise _BadSnapshot(f"the header announces {length} body bytes, the file has {len(body)}")
    if zlib.crc32(body) != crc:
        raise _BadSnapshot("CRC mismatch (the file is damaged)")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _BadSnapshot(f"undecodable body: {exc or type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise _BadSnapshot("the body is not a map")
    saved_window = _int(obj, "window")
    if saved_window != window:
        raise _BadSnapshot(f"saved with a {saved_window} s throughput window, not {window} s")
    rs = record_len(window + 1)
    queues: list[tuple[bytes, list[int]]] = []
    names: set[bytes] = set()
    for row in _list(obj, "queues"):
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], bytes)):
            raise _BadSnapshot("a queue row is not [name, record]")
        name, record = row
        _utf8(name, "queue name")
        if len(name) > NAME_MAX or name in names:
            raise _BadSnapshot(f"queue name {name[:40]!r}... is too long or repeated")
        if not (isinstance(record, list) and len(record) == rs and all(map(_is_int64, record))):
            raise _BadSnapshot(f"the record of queue {name[:40]!r} is not {rs} int64s")
        names.add(name)
        queues.append((name, record))
    clients: list[tuple[bytes, int, int]] = []
    ids: set[bytes] = set()
    for row in _list(obj, "clients"):
        if not (
            isinstance(row, list)
            and len(row) == 3
            and isinstance(row[0], bytes)
            and _is_int64(row[1])
            and _is_int64(row[2])
            and row[1] >= 0
        ):
            raise _BadSnapshot("a client row is not [id, seq >= 0, second]")
        raw_id, seq, second = row
        if not 1 <= len(_utf8(raw_id, "client id")) <= CLIENT_ID_MAX or raw_id in ids:
            raise _BadSnapshot(f"client id {raw_id[:40]!r} is too long, empty or repeated")
        ids.add(raw_id)
        clients.append((raw_id, seq, second))
    return _Content(window, _int(obj, "started"), _int(obj, "saved_at"), queues, clients)


def _is_int64(value: object) -> bool:
    return type(value) is int and value in _INT64


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not _is_int64(value):
        raise _BadSnapshot(f"{key!r} is missing or not an int64")
    assert isinstance(value, int)
    return value


def _list(obj: dict[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise _BadSnapshot(f"{key!r} is missing or not an array")
    return value


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise _BadSnapshot(f"a {what} is not UTF-8: {exc}") from None


def _load_snapshot(path: Path, window: int) -> _Content | None:
    """The snapshot at ``path`` if there is one and it verifies; a bad one is set aside."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read stats snapshot %s (%s): counters start from 0", path, exc)
        return None
    try:
        return _decode_snapshot(raw, window)
    except _BadSnapshot as exc:
        bad = path.with_name(path.name + ".bad")
        try:
            os.replace(path, bad)
        except OSError as err:
            aside = f"could not move it aside: {err}"
        else:
            aside = f"moved it to {bad}"
        log.warning(
            "stats snapshot %s is unusable (%s); %s; counters start from 0", path, exc, aside
        )
        return None


class _Rows:
    """Decode records into rows, reusing the previous snapshot's row of an unchanged record.

    A row is a function of the record's bytes, ``now`` and ``started``, so it is reused while
    all three are the same; and, for a record whose ring holds no count that can enter a
    window ending at or after ``now`` ("quiet": its throughput is 0 from then on), for any
    later ``now``. Every row still comes from ``read_record``; most queues of a big table are
    quiet or unchanged between two snapshots, and skipping their decoding is what keeps a
    snapshot of a thousand queues around a millisecond.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        # Per queue index: (record bytes, row, now, started, quiet).
        self._cache: list[tuple[bytes, QueueStat, int, int, bool]] = []

    def clear(self) -> None:
        self._cache = []

    def rows(
        self, records: bytes, layout: _Layout, names: Sequence[str], now: int, started: int
    ) -> list[QueueStat]:
        """The rows of ``records`` (the first ``len(names)`` records of a block, as bytes)."""
        ring, rs = layout.ring, layout.rec_slots
        size = rs * 8
        q = memoryview(records).cast("q")
        cache = self._cache
        del cache[len(names) :]
        out: list[QueueStat] = []
        for i, queue in enumerate(names):
            rec = records[i * size : (i + 1) * size]
            if i < len(cache):
                old_rec, row, at, since, quiet = cache[i]
                if (
                    old_rec == rec
                    and row.queue == queue
                    and ((now == at and started == since) or (quiet and now >= at))
                ):
                    out.append(row)
                    continue
            off = i * rs
            row = read_record(q, off, ring, queue, now, started)
            quiet = row.throughput == 0.0 and _quiet(q, off, ring, now)
            entry = (rec, row, now, started, quiet)
            if i < len(cache):
                cache[i] = entry
            else:
                cache.append(entry)
            out.append(row)
        return out


def _quiet(q: memoryview, off: int, ring: int, now: int) -> bool:
    """No bucket of the record at ``off`` counts for a window ending at ``now`` or later."""
    lo = now - ring + 1
    secs = q[off + _N : off + _N + ring]
    if max(secs) < lo:
        return True
    cnts = q[off + _N + ring : off + _N + 2 * ring]
    return all(sec < lo for sec, cnt in zip(secs, cnts, strict=True) if cnt)


# --- the writer -----------------------------------------------------------------------------


class SharedStats(StatsBase):
    """The collector's per-queue counters and client seqs in shared memory; the one writer.

    Build it with ``create_or_attach``. Thread-safe (one short lock per call, like ``Stats``),
    and a ``StatsBase``: the ``on_*`` hooks, ``add`` and ``snapshot`` behave as ``Stats``'s,
    except that names over ``NAME_MAX`` bytes show in their stored form.
    """

    def __init__(
        self,
        name: str,
        base: _Segment,
        seg: _Segment,
        lock_fd: int,
        clock: Callable[[], float],
        client_ttl: float,
        restored: bool = False,
    ) -> None:
        """Internal: use ``create_or_attach``."""
        self._name = name
        self._base = base
        self._seg: _Segment | None = seg
        # Closing the fd releases the writer lock: at close(), or when the object is dropped.
        self._release_lock = weakref.finalize(self, os.close, lock_fd)
        self._clock = clock
        self._client_ttl = client_ttl
        self._restored = restored
        self._ring = seg.layout.ring
        self._lock = threading.Lock()
        count = seg.q[_COUNT]
        self._names = _decode_names(
            bytes(seg.buf[HEADER_SIZE : _Layout.entry_at(count)]), count, name
        )
        self._index = {queue: i for i, queue in enumerate(self._names)}
        self._rows = _Rows()
        # The client entries, mirrored: id and seq per entry, id -> entry, and the entries
        # from least to most recently updated, with the second of their last update.
        entries = _decode_clients(seg, name)
        self._client_ids = [client_id for client_id, _, _ in entries]
        self._client_seqs = [seq for _, seq, _ in entries]
        self._clients = {client_id: j for j, client_id in enumerate(self._client_ids)}
        self._lru: collections.OrderedDict[int, int] = collections.OrderedDict(
            sorted(((j, second) for j, (_, _, second) in enumerate(entries)), key=_by_second)
        )

    @classmethod
    def create_or_attach(
        cls,
        name: str,
        *,
        window: float = DEFAULT_WINDOW,
        capacity: int = DEFAULT_CAPACITY,
        client_capacity: int = DEFAULT_CLIENT_CAPACITY,
        client_ttl: float = DEFAULT_CLIENT_TTL,
        clock: Callable[[], float] = time.time,
        restore_from: Path | None = None,
    ) -> SharedStats:
        """Reattach to the table ``name`` if it exists, else create it.

        Reattaching (same magic, layout version and window; after a crash or a restart)
        keeps every counter, the throughput ring, the started second and the clients' seqs,
        and repairs an update the previous writer left half done. A table with another window
        or layout is replaced (logged: its counters restart from 0). ``ShmLocked`` if another
        live writer owns it; ``ShmIncompatible`` if ``name`` is taken by something that is not
        a table. ``capacity`` and ``client_capacity`` are the first block's; the table grows
        as needed. ``client_ttl``: see "Clients" in the module docstring.

        ``restore_from``: a file written by ``save``. When a new table is created, it starts
        from that file if the file verifies (``restored`` is then True); a file that does not
        is renamed to ``<name>.bad`` (logged) and the table starts empty. When a table is
        reattached, the file is ignored: the table in memory is newer.
        """
        _check_name(name)
        if capacity < 1 or client_capacity < 1:
            raise ConfigError(
                f"capacity and client_capacity must be at least 1, not {capacity} "
                f"and {client_capacity}"
            )
        ring = ring_slots(window)
        content: _Content | None = None
        loaded = restore_from is None
        for _ in range(4):
            try:
                base = _attach(name)
            except FileNotFoundError:
                if not loaded:
                    assert restore_from is not None
                    content = _load_snapshot(Path(restore_from), ring - 1)
                    loaded = True
                queues, clients = capacity, client_capacity
                if content is not None:
                    queues = _at_least(capacity, len(content.queues))
                    clients = _at_least(client_capacity, len(content.clients))
                layout = _Layout(ring, queues, clients)
                incarnation = secrets.randbits(63)
                started = int(clock()) if content is None else content.started
                try:
                    seg, fd = _create(
                        name,
                        layout,
                        generation=0,
                        started=started,
                        incarnation=incarnation,
                        content=content,
                    )
                except FileExistsError:
                    continue
                log.info(
                    "created shared stats %r (%d queues, %d clients, %d bytes)",
                    name,
                    queues,
                    clients,
                    layout.size,
                )
                if content is not None:
                    log.info(
                        "restored shared stats %r from %s (saved at %d): %d queues, %d clients",
                        name,
                        restore_from,
                        content.saved_at,
                        len(content.queues),
                        len(content.clients),
                    )
                return cls(name, seg, seg, fd, clock, client_ttl, content is not None)
            except ShmIncompatible:
                # Empty: its creator died before sizing it (or is about to: then it is locked).
                os.close(_lock(name))
                _unlink(name)
                continue
            stats = cls._attach_table(name, base, ring, clock, client_ttl)
            if stats is not None:
                if restore_from is not None and Path(restore_from).exists():
                    log.info(
                        "not restoring from %s: the shared stats %r survived in memory and "
                        "are newer than that snapshot, which is stale",
                        restore_from,
                        name,
                    )
                return stats
        raise ShmError(f"could not create or attach shared stats {name!r}: it keeps changing")

    @classmethod
    def _attach_table(
        cls,
        name: str,
        base: _Segment,
        ring: int,
        clock: Callable[[], float],
        client_ttl: float,
    ) -> SharedStats | None:
        """Reattach to ``base``'s table, or retire it and return None (caller creates anew)."""
        try:
            fd = _lock(name, base.q[_PID] if len(base.buf) >= HEADER_SIZE else 0)
        except BaseException:
            base.close()
            raise
        why = base.header_ok(ring)
        if why is None and base.q[_STATUS] == _CLOSED:
            why = "it was shut down"
        seg = base
        if why is None:
            try:
                seg = _follow(name, base, _writer_link)
            except ShmIncompatible as exc:
                why = str(exc)
        if why is None:
            try:
                _recover(seg)
                gen = seg.generation
                for stale in (*range(1, gen), gen + 1):
                    if _unlink(segment_name(name, stale)):
                        log.info(
                            "removed stale shared-memory segment %r", segment_name(name, stale)
                        )
                seg.q[_PID] = base.q[_PID] = os.getpid()
                stats = cls(name, base, seg, fd, clock, client_ttl)
            except BaseException:
                if seg is not base:
                    seg.close()
                base.close()
                os.close(fd)
                raise
            log.info(
                "reattached to shared stats %r: generation %d, %d queues, %d clients",
                name,
                gen,
                len(stats._names),
                len(stats._client_ids),
            )
            return stats
        if bytes(base.buf[:8]) not in (MAGIC, bytes(8)):
            base.close()
            os.close(fd)
            raise ShmIncompatible(
                f"shared-memory segment {name!r} exists and is not a qdash_mp stats table "
                f"({why}); choose another name, or remove it if it is a leftover"
            )
        log.warning("replacing shared stats %r (%s): counters restart from 0", name, why)
        try:
            _retire(name, base)
        finally:
            base.close()
            os.close(fd)
        return None

    # -- properties --

    @property
    def name(self) -> str:
        """The table's name (its generation-0 segment; what readers open)."""
        return self._name

    @property
    def window(self) -> int:
        """The throughput window, in seconds."""
        return self._ring - 1

    @property
    def generation(self) -> int:
        """The generation of the block in use (0 until the table first grows)."""
        return self._live().generation

    @property
    def capacity(self) -> int:
        """Queues the block in use can hold before the table grows."""
        return self._live().layout.capacity

    @property
    def client_capacity(self) -> int:
        """Clients the block in use can hold before the table grows or reuses entries."""
        return self._live().layout.clients

    @property
    def restored(self) -> bool:
        """True if this table was created from the ``restore_from`` snapshot."""
        return self._restored

    # -- writing --

    def add(
        self, queue: str, pushed: int = 0, processed: int = 0, failed: int = 0, retried: int = 0
    ) -> None:
        """Add several counts to ``queue`` at once."""
        self._apply(((queue, (pushed, processed, failed, retried)),), None)

    def apply_batch(
        self,
        counters: Mapping[str, Sequence[int]],
        client: tuple[str, int] | None = None,
    ) -> None:
        """Add a client batch, ``{queue: [pushed, processed, failed, retried]}``, atomically.

        Readers see all of it or none of it, and so does a writer reattaching after a crash.
        ``client=(client_id, seq)`` also records ``seq`` as that client's last applied batch
        (``client_seq``) in the same commit as the counters; ``seq`` must be above the
        client's current one (``ValueError`` otherwise, and nothing is applied): deciding
        whether a batch is new is the caller's job, this only makes the outcome crash-proof.
        """
        self._apply(counters.items(), client)

    def client_seq(self, client_id: str) -> int:
        """The seq of ``client_id``'s last batch applied with ``apply_batch``; 0 if none."""
        with self._lock:
            self._live()
            j = self._clients.get(client_id)
            return 0 if j is None else self._client_seqs[j]

    def client_seqs(self) -> dict[str, int]:
        """Every client the table remembers, with the seq of its last batch applied."""
        with self._lock:
            self._live()
            return dict(zip(self._client_ids, self._client_seqs, strict=True))

    def _apply(
        self, items: Iterable[tuple[str, Sequence[int]]], client: tuple[str, int] | None
    ) -> None:
        with self._lock:
            seg = self._live()
            now = int(self._clock())
            # 1. Plan: record index of each queue, new directory entries, the client's entry.
            index = self._index
            count = len(self._names)
            plan: list[tuple[int, Sequence[int]]] = []
            fresh: dict[str, int] = {}
            new: list[tuple[str, bytes]] = []
            for queue, deltas in items:
                if len(deltas) != _N:
                    raise ValueError(
                        f"counters of {queue!r} must be {_N} ints {COUNTERS}, not {deltas!r}"
                    )
                idx = index.get(queue)
                if idx is None:
                    idx = fresh.get(queue)
                    if idx is None:
                        stored = _stored(queue)
                        key = stored.decode("utf-8", "surrogatepass")
                        idx = index.get(key, fresh.get(key))
                        if idx is None:
                            idx = fresh[key] = count + len(new)
                            new.append((key, stored))
                        fresh[queue] = idx
                plan.append((idx, deltas))
            slot, claim, client_id, client_seq = -1, b"", "", 0
            if client is not None:
                client_id, client_seq = client[0], operator.index(client[1])
                slot, claim = self._plan_client(client_id, client_seq, seg.layout.clients, now)
            # 2. Grow first if the block is too small (the plan's indexes stay valid).
            if count + len(new) > seg.layout.capacity or slot >= seg.layout.clients:
                seg = self._grow(count + len(new), max(len(self._client_ids), slot + 1))
            # 3. One write section: new directory entries, then the redo-logged records and
            # client entry, committed by one store.
            q, buf, lay, ring = seg.q, seg.buf, seg.layout, self._ring
            rs, rec0, log0, ls = lay.rec_slots, lay.rec_slot, lay.log_slot, lay.log_slots
            hook = _fault_hook
            seq = seg.begin()
            try:
                if new:
                    for k, (_key, stored) in enumerate(new):
                        at = _Layout.entry_at(count + k)
                        q[at // 8] = len(stored)
                        buf[at + 8 : at + 8 + len(stored)] = stored
                    q[_COUNT] = count + len(new)
                    self._names.extend(key for key, _ in new)
                if fresh:
                    index.update(fresh)
                logged: dict[int, int] = {}
                for idx, deltas in plan:
                    if not any(deltas):
                        continue
                    e = logged.get(idx)
                    if e is None:
                        e = logged[idx] = log0 + len(logged) * ls + 1
                        r = rec0 + idx * rs
                        q[e - 1] = idx
                        q[e : e + rs] = q[r : r + rs]
                    apply_deltas(q, e, ring, deltas, now)
                entries = len(logged)
                d = 0
                if slot >= 0:
                    d = log0 + entries * ls + 1
                    q[d - 1] = -1 - slot
                    if claim:  # a new client, in a free entry or a forgotten client's
                        at = 8 * d
                        _CLIENT_HEAD.pack_into(buf, at, len(claim), client_seq, now)
                        buf[at + 24 : at + CLIENT_ENTRY_SIZE] = claim.ljust(
                            CLIENT_ENTRY_SIZE - 24, b"\0"
                        )
                    else:
                        c = lay.client_slot(slot)
                        q[d : d + _CS] = q[c : c + _CS]
                        q[d + 1] = client_seq
                        q[d + 2] = now
                    entries += 1
                if hook is not None:
                    hook("log")
                if entries:
                    q[_LOG_COUNT] = entries  # the commit point
                    if hook is not None:
                        hook("commit")
                    for idx, e in logged.items():
                        r = rec0 + idx * rs
                        q[r : r + rs] = q[e : e + rs]
                    if hook is not None:
                        hook("copy")
                    if slot >= 0:
                        c = lay.client_slot(slot)
                        q[c : c + _CS] = q[d : d + _CS]
                        if slot == q[_CLIENTS]:
                            q[_CLIENTS] = slot + 1
                    q[_LOG_COUNT] = 0
            finally:
                if q[_LOG_COUNT]:  # pragma: no cover - only if copying back itself failed
                    _replay(seg, q[_LOG_COUNT])
                    q[_LOG_COUNT] = 0
                seg.end(seq)
            if slot >= 0:
                self._remember(slot, client_id, client_seq, now, bool(claim))

    def _plan_client(self, client_id: str, seq: int, capacity: int, now: int) -> tuple[int, bytes]:
        """The entry ``client_id``'s new ``seq`` goes to, and its id bytes if it is new there.

        A known client keeps its entry. A new one gets the next free entry; when there is none,
        the least recently updated client's if that one is idle for ``client_ttl`` seconds,
        else entry ``K`` (the caller grows the table).
        """
        j = self._clients.get(client_id)
        if j is not None:
            last = self._client_seqs[j]
            if seq <= last:
                raise ValueError(
                    f"client {client_id!r}: batch {seq} is not after {last}, its last applied"
                )
            return j, b""
        _check_client_id(client_id)
        if seq < 1:
            raise ValueError(f"client {client_id!r}: batch seq must be >= 1, not {seq}")
        stored = client_id.encode("utf-8", "surrogatepass")
        known = len(self._client_ids)
        if known < capacity:
            return known, stored
        oldest, second = next(iter(self._lru.items()))
        if second <= now - self._client_ttl:
            return oldest, stored
        return known, stored

    def _remember(self, j: int, client_id: str, seq: int, now: int, claimed: bool) -> None:
        """Mirror a committed client entry update in process memory."""
        if claimed:
            if j < len(self._client_ids):
                old = self._client_ids[j]
                log.info(
                    "shared stats %r: forgot client %r (last batch %d, %d s ago) to make room "
                    "for %r",
                    self._name,
                    old,
                    self._client_seqs[j],
                    now - self._lru[j],
                    client_id,
                )
                del self._clients[old]
                self._client_ids[j] = client_id
            else:
                self._client_ids.append(client_id)
                self._client_seqs.append(0)
            self._clients[client_id] = j
        self._client_seqs[j] = seq
        self._lru[j] = now
        self._lru.move_to_end(j)

    def _grow(self, queues: int, clients: int) -> _Segment:
        """Move the table to a new generation that holds ``queues`` queues and ``clients``."""
        old = self._live()
        capacity = _at_least(old.layout.capacity, queues)
        client_capacity = _at_least(old.layout.clients, clients)
        gen = old.generation + 1
        gen_name = segment_name(self._name, gen)
        if _unlink(gen_name):
            log.warning("removed stale shared-memory segment %r (an interrupted growth)", gen_name)
        layout = _Layout(self._ring, capacity, client_capacity)
        new, fd = _create(
            gen_name,
            layout,
            generation=gen,
            started=old.q[_STARTED],
            incarnation=old.q[_INCARNATION],
        )
        os.close(fd)
        count, known = len(self._names), len(self._client_ids)
        dir_end = _Layout.entry_at(count)
        rec_bytes = count * layout.rec_slots * 8
        cli_bytes = known * CLIENT_ENTRY_SIZE
        src = old.layout
        new.buf[HEADER_SIZE:dir_end] = old.buf[HEADER_SIZE:dir_end]
        new.buf[layout.rec_at : layout.rec_at + rec_bytes] = old.buf[
            src.rec_at : src.rec_at + rec_bytes
        ]
        new.buf[layout.cli_at : layout.cli_at + cli_bytes] = old.buf[
            src.cli_at : src.cli_at + cli_bytes
        ]
        new.q[_COUNT] = count
        new.q[_CLIENTS] = known
        for seg in (old, self._base) if old is not self._base else (old,):
            seq = seg.begin()
            seg.q[_NEXT] = gen
            seg.q[_STATUS] = _SUPERSEDED
            seg.end(seq)
        if old is not self._base:
            old.close()
            _unlink(old.name)
        self._seg = new
        log.info(
            "shared stats %r grew to %d queues and %d clients (generation %d)",
            self._name,
            capacity,
            client_capacity,
            gen,
        )
        return new

    # -- reading --

    def snapshot(self) -> StatsView:
        """A consistent view of every queue, sorted by name, with totals."""
        with self._lock:
            seg = self._live()
            lay = seg.layout
            records = bytes(seg.buf[lay.rec_at : lay.rec_at + len(self._names) * lay.rec_slots * 8])
            now = int(self._clock())
            rows = self._rows.rows(records, lay, self._names, now, seg.q[_STARTED])
        return build_view(rows)

    # -- lifecycle --

    def save(self, path: Path) -> None:
        """Write the whole table (counters, rings, started, client seqs) to ``path``, atomically.

        For a clean shutdown: once the last batch is applied (anything applied after the save
        is lost with the ``unlink`` that follows), then ``unlink``.
        ``create_or_attach(restore_from=path)`` loads it. The format is in the module
        docstring. ``ShmError`` if the file cannot be written.
        """
        path = Path(path)
        with self._lock:
            seg = self._live()
            q, lay = seg.q, seg.layout
            rs = lay.rec_slots
            content = _Content(
                window=self._ring - 1,
                started=q[_STARTED],
                saved_at=int(self._clock()),
                queues=[
                    (
                        queue.encode("utf-8", "surrogatepass"),
                        q[lay.rec_slot + i * rs : lay.rec_slot + (i + 1) * rs].tolist(),
                    )
                    for i, queue in enumerate(self._names)
                ],
                clients=[
                    (self._client_ids[j].encode("utf-8", "surrogatepass"), self._client_seqs[j], t)
                    for j, t in self._lru.items()
                ],
            )
        try:
            write_atomically(path, _encode_snapshot(content))
        except OSError as exc:
            raise ShmError(f"cannot save shared stats {self._name!r} to {path}: {exc}") from exc
        log.info(
            "saved shared stats %r to %s: %d queues, %d clients",
            self._name,
            path,
            len(content.queues),
            len(content.clients),
        )

    def close(self) -> None:
        """Detach, leaving the table for the next writer (or readers). Idempotent."""
        with self._lock:
            seg, self._seg = self._seg, None
            if seg is None:
                return
            for block in {id(seg): seg, id(self._base): self._base}.values():
                if block.q[_PID] == os.getpid():
                    block.q[_PID] = 0
                block.close()
            self._release_lock()

    def unlink(self) -> None:
        """Remove the table (clean shutdown): readers are told it is gone. Also closes."""
        with self._lock:
            seg = self._seg
            if seg is None:
                raise ShmError(f"shared stats {self._name!r} are closed")
            for block in {id(seg): seg, id(self._base): self._base}.values():
                _close_block(block)
                _unlink(block.name)
        self.close()

    def _live(self) -> _Segment:
        if self._seg is None:
            raise ShmError(f"shared stats {self._name!r} are closed")
        return self._seg

    def __enter__(self) -> SharedStats:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._seg is None else f"generation {self._seg.generation}"
        return (
            f"<SharedStats {self._name!r} {state}, {len(self._names)} queues, "
            f"{len(self._client_ids)} clients>"
        )


def _by_second(entry: tuple[int, int]) -> tuple[int, int]:
    j, second = entry
    return second, j


def _at_least(capacity: int, need: int) -> int:
    """``capacity`` doubled until it holds ``need``."""
    while capacity < need:
        capacity *= 2
    return capacity


# --- readers --------------------------------------------------------------------------------


class SharedStatsReader:
    """Read a collector's ``SharedStats`` from any local process, without asking the daemon.

    Opening checks the table (``ShmMissing`` when there is none: the collector is not
    running; ``ShmIncompatible`` for a bad magic or layout version). ``snapshot()`` is
    consistent (seqlock; ``ShmBusy`` after ``timeout`` seconds of failed attempts), sees new
    queues, follows the table when it grows and reopens it when a new collector replaced it.
    ``clock`` (Unix seconds) is the reader's own, for the throughput window. A reader keeps
    decoded names and rows between snapshots: use one per thread.
    """

    def __init__(
        self, name: str, *, clock: Callable[[], float] = time.time, timeout: float = 1.0
    ) -> None:
        _check_name(name)
        self._name = name
        self._clock = clock
        self._timeout = timeout
        self._seg: _Segment | None = None
        self._names: list[str] = []
        self._rows = _Rows()
        self._open()

    @property
    def name(self) -> str:
        """The table's name."""
        return self._name

    @property
    def writer_pid(self) -> int:
        """Pid of the attached writer, 0 if none is (the collector closed the table)."""
        pid: int = self._open_seg().q[_PID]
        return pid

    def snapshot(self) -> StatsView:
        """A consistent view of every queue, sorted by name, with totals."""
        for _ in range(16):
            seg = self._open_seg()
            status, count, started, known, new_names, records = self._read(seg, self._copy)
            if status != _LIVE:  # superseded by a bigger block, or shut down
                self._open()
                continue
            if known < len(self._names):
                del self._names[known:]
            self._names.extend(_decode_names(new_names, count - known, self._name))
            now = int(self._clock())
            return build_view(self._rows.rows(records, seg.layout, self._names, now, started))
        raise ShmBusy(f"shared stats {self._name!r} keep moving; try again")  # pragma: no cover

    def _copy(self, seg: _Segment) -> tuple[int, int, int, int, bytes, bytes]:
        q, lay = seg.q, seg.layout
        status, count, started = q[_STATUS], min(max(q[_COUNT], 0), lay.capacity), q[_STARTED]
        known = len(self._names) if len(self._names) <= count else 0
        names = bytes(seg.buf[_Layout.entry_at(known) : _Layout.entry_at(count)])
        records = bytes(seg.buf[lay.rec_at : lay.rec_at + count * lay.rec_slots * 8])
        return status, count, started, known, names, records

    def _read(self, seg: _Segment, copy: Callable[[_Segment], _T]) -> _T:
        """``copy(seg)`` taken outside any write section (the seqlock read side)."""
        q = seg.q
        seq = q[_SEQ]
        if not seq & 1:
            data = copy(seg)
            if q[_SEQ] == seq:
                return data
        start = time.monotonic()
        spin_until, deadline = start + _SPIN_SECONDS, start + self._timeout
        pause = _PAUSE_MIN
        while True:
            seq = q[_SEQ]
            if not seq & 1:
                data = copy(seg)
                if q[_SEQ] == seq:
                    return data
            now = time.monotonic()
            if now < spin_until:
                continue
            if now >= deadline:
                raise self._busy(seg)
            time.sleep(pause)
            pause = min(pause * 2, _PAUSE_MAX)

    def _busy(self, seg: _Segment) -> ShmBusy:
        pid = seg.q[_PID]
        if seg.q[_SEQ] & 1 and not _pid_alive(pid):
            return ShmBusy(
                f"shared stats {self._name!r}: the collector (pid {pid}) died in the middle of "
                "an update; start it again (`qdash-mp collector`), it repairs the table"
            )
        return ShmBusy(
            f"shared stats {self._name!r}: no consistent snapshot within {self._timeout} s "
            "(the collector is updating them nonstop)"
        )

    def _open_seg(self) -> _Segment:
        return self._seg if self._seg is not None else self._open()

    def _open(self) -> _Segment:
        """(Re)open the table by name and follow it to its newest block."""
        self._drop()
        try:
            base = _attach(self._name)
        except FileNotFoundError:
            raise ShmMissing(
                f"no shared stats {self._name!r}: is the collector running? "
                "start it with `qdash-mp collector`"
            ) from None
        why = base.header_ok()
        if why is not None:
            base.close()
            raise ShmIncompatible(f"shared-memory segment {self._name!r}: {why}")
        try:
            seg = _follow(self._name, base, self._link)
            status = self._link(seg)[0]
        except BaseException:
            base.close()
            raise
        if seg is not base:
            base.close()
        if status == _CLOSED:
            seg.close()
            raise ShmMissing(
                f"shared stats {self._name!r} were closed: the collector shut down; "
                "start it with `qdash-mp collector`"
            )
        self._seg = seg
        return seg

    def _link(self, seg: _Segment) -> tuple[int, int]:
        return self._read(seg, _writer_link)

    def _drop(self) -> None:
        seg, self._seg = self._seg, None
        self._names = []
        self._rows.clear()
        if seg is not None:
            seg.close()

    def close(self) -> None:
        """Unmap the table. Idempotent."""
        self._drop()

    def __enter__(self) -> SharedStatsReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
