"""The collector's ``Stats`` in shared memory: one writer, any number of lock-free readers.

One concept, two homes: the collector keeps the same per-queue *records* as ``Stats`` (see
``qdash_mp.stats``: ``apply_deltas`` writes them, ``read_record``/``build_view`` read them),
but in one POSIX shared-memory block, so the dashboard, ``qdash-mp stats`` or a ``/metrics``
exporter in any local process can read the counters without asking the daemon, and a
collector restarted after ``kill -9`` reattaches and counts on from where it stopped.

``SharedStats`` is the writer (only the collector creates one); ``SharedStatsReader`` is a
reader. Both produce the same ``StatsView`` as ``Stats.snapshot()``. The block also keeps,
for each collector client, the seq of the last batch applied, changed together with that
batch's counters, so a batch resent after a crash is recognised and not counted twice.

Block layout
============

Every integer is a signed 64-bit slot in native byte order (little-endian on x86-64 and
arm64), 8-byte aligned; ``R`` is the ring size (``window + 1``), ``C`` the capacity (queues
this block can hold), ``K`` the client capacity and ``L = record_len(R) = 4 + 2R`` the record
size in slots::

    offset (bytes)          size      field
    ----------------------  --------  ---------------------------------------------------------
    header (16 slots, 128 bytes)
    0                       8         magic, the bytes b"QDASHSHM"
    8                       8         layout version, 1
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
    clients (K entries of 256 bytes)
    E = D + 8L C
    E + 256 j               8         byte length n of client j's id (0 <= n <= 232)
    E + 256 j + 8           8         seq of the last batch of client j applied
    E + 256 j + 16          8         Unix second that batch was applied
    E + 256 j + 24          232       the client id, UTF-8, n bytes used, the rest zero
    redo log (C + 1 entries of 8(L+1) bytes)
    G = E + 256 K
    G + 8(L+1) k            8         i >= 0: record index the entry belongs to;
                                      i < 0: client entry -1 - i
    G + 8(L+1) k + 8        8L        record: the new content of record i;
                                      client: its new seq and second (2 slots, rest unused)
    total size: G + 8(L+1)(C + 1)

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
form shares its counters. Client ids (at most 232 bytes before they are shortened the same
way) are only read by the writer.

Clients. The entry of a client is found by its id; the table holds K clients and, when full,
a new client takes the entry of the one whose last batch is oldest, if that is older than
``client_ttl`` (a day by default), or else the table grows. Forgetting a client is harmless
unless it still has a batch that was applied but never acknowledged, which would need it to
stay away for longer than ``client_ttl`` while the table fills up.

Concurrency
===========

Seqlock. The writer makes every change inside a *write section*: it bumps the sequence to odd,
writes, and bumps it back to even. ``apply_batch`` applies a whole client batch (new directory
entries, count, every record it touches) in one section. A reader reads the sequence, copies
the part of the block it needs (the records of the N queues, and the directory entries it has
not decoded yet; plain ``bytes`` copies, which may tear individual values), reads the
sequence again, and keeps the copy only if both readings are the same even number; otherwise
it retries: at once for 0.5 ms (a write section takes microseconds), then sleeping from
50 µs to 1 ms between attempts, until ``timeout``; then it raises ``ShmBusy`` (saying so when
the writer died in the middle of a section). Readers never write.

Memory ordering. Slots are written through ``memoryview.cast("q")`` item assignment, which
CPython performs as one aligned 8-byte store, in program order: the interpreter's opaque
calls between bytecodes keep the C compiler from reordering them. x86-64 (TSO) makes stores
visible in program order and does not reorder loads with older loads, which is all a seqlock
needs; so on x86-64 a copy that passed the sequence check saw no write section. Nothing here
issues memory barriers, so on weakly ordered CPUs (arm64) the check is best effort: the same
assumption as prometheus_client's multiprocess mmap files, which have no check at all.

Crash safety (``kill -9`` of the collector). Segments outlive their writer (they are kept away
from ``multiprocessing``'s resource tracker, which would unlink them when the process dies)
and the next ``create_or_attach`` reattaches. Records are changed through a redo log inside
the write section: each touched record is copied into the log, the deltas are applied there,
the client's new seq is added as one more entry, the entry count is stored (the commit
point), the log entries are copied over the records (and the client entry) and the count reset
to 0. A writer that dies before the commit point changed no record and no seq (the batch was
not acknowledged and will be resent); one that dies after it left a complete log, which the
next writer replays. So a batch and its seq are applied entirely or not at all; the only trace
of a batch cut short can be a new queue with all counters at 0, or a new client at seq 0.
Reattaching also ends a write section left open (odd sequence), so readers can read again.

One writer. The writer holds an exclusive ``flock`` on the segment named NAME; a second
``create_or_attach`` of the same name fails with ``ShmLocked`` while the first is alive. The
lock goes away with the process, so a restart after ``kill -9`` is not blocked.

Growth. A block holds C queues (``DEFAULT_CAPACITY`` unless told) and K clients. When a batch
brings more queues (or a client) than fit, the writer creates generation ``g + 1`` with at
least twice the capacity that was short, copies the directory, records and clients, then in
one write section each marks the old block superseded (``next = g + 1``) and points
generation 0's ``next`` at it, and unlinks the old block unless it is generation 0 (which
stays as the entry point). A reader that finds its
block superseded reopens NAME and follows ``next``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import logging
import operator
import os
import re
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from types import ModuleType, TracebackType
from typing import Final, TypeVar

from qdash_mp.errors import CollectorError, ConfigError, QdashError
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

__all__ = [
    "CLIENT_ID_MAX",
    "DEFAULT_CAPACITY",
    "DEFAULT_CLIENT_CAPACITY",
    "DEFAULT_CLIENT_TTL",
    "LAYOUT_VERSION",
    "MAGIC",
    "NAME_MAX",
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
LAYOUT_VERSION: Final = 1
HEADER_SIZE: Final = 128
DIR_ENTRY_SIZE: Final = 256
NAME_MAX: Final = DIR_ENTRY_SIZE - 8
"""Bytes of UTF-8 a queue name may take before it is stored shortened."""
DEFAULT_CAPACITY: Final = 1024
"""Queues the first block holds (about 2.6 MB with the default window); it grows beyond."""
CLIENT_ENTRY_SIZE: Final = 256
CLIENT_ID_MAX: Final = CLIENT_ENTRY_SIZE - 24
"""Bytes of UTF-8 a client id may take before it is stored shortened."""
DEFAULT_CLIENT_CAPACITY: Final = 1024
"""Clients the first block holds; it grows beyond (or reuses the entries of old clients)."""
DEFAULT_CLIENT_TTL: Final = 86400.0
"""Seconds since its last batch before a client's entry may be given to a new client."""

# Header slots (index into the int64 view of the block).
_VERSION, _RING, _CAPACITY, _COUNT, _SEQ, _STARTED, _PID = 1, 2, 3, 4, 5, 6, 7
_GENERATION, _STATUS, _NEXT, _NAME_MAX, _LOG_COUNT, _INCARNATION = 8, 9, 10, 11, 12, 13
_CLIENT_CAP, _CLIENTS = 14, 15

_LIVE, _SUPERSEDED, _CLOSED = 1, 2, 3

_N = len(COUNTERS)
_HASH_CHARS = 16
_ELLIPSIS = "…"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_SPIN_SECONDS = 0.0005
"""How long a reader retries at once (write sections take microseconds) before sleeping."""
_PAUSE_MIN, _PAUSE_MAX = 5e-5, 1e-3


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


def segment_name(name: str, generation: int) -> str:
    """The segment holding ``generation`` of the table called ``name``."""
    return name if generation == 0 else f"{name}-g{generation}"


def stored_queue_name(queue: str) -> str:
    """The name ``queue`` is stored and shown under (itself unless over ``NAME_MAX`` bytes)."""
    return _stored(queue, NAME_MAX).decode("utf-8", "surrogatepass")


def _stored(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, shortened to ``limit`` bytes as the module docstring describes."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return raw
    suffix = (_ELLIPSIS + hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]).encode()
    end = limit - len(suffix)
    while raw[end] & 0xC0 == 0x80:  # a continuation byte: the cut is inside a character
        end -= 1
    return raw[:end] + suffix


def _check_name(name: str) -> None:
    # The resource tracker's wire format and shm_open's name rules both want this.
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"shared-memory name must be 1-200 characters from [A-Za-z0-9_.-], not {name!r}"
        )


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
        self.log_slots = self.rec_slots + 1
        self.size = log_at + (capacity + 1) * self.log_slots * 8

    def client_slot(self, j: int) -> int:
        """Int64 slot of client entry ``j`` (its id length; seq and second follow)."""
        return self.cli_slot + j * (CLIENT_ENTRY_SIZE // 8)

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
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        owner = f" (pid {pid})" if pid else ""
        raise ShmLocked(
            f"shared stats {name!r} are written by another collector{owner}; "
            "stop it first, or give this one another data dir or --shm name"
        ) from None
    return fd


def _create(
    name: str, layout: _Layout, *, generation: int, started: int, incarnation: int
) -> tuple[_Segment, int]:
    """Create, lock, reserve and initialize a block; returns it and the fd holding the lock.

    The magic is written last, so a block whose creator died half-way has none; the lock is
    taken before anything is written, so nobody mistakes a block being created for such a one.
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
        seg.buf[:8] = MAGIC
    except BaseException:
        if fd >= 0:
            os.close(fd)
        seg.close()
        _unlink(name)
        raise
    seg.layout = layout
    seg.generation = generation
    return seg, fd


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
    q = base.q
    if bytes(base.buf[:8]) == MAGIC and q[_VERSION] == LAYOUT_VERSION:
        newest = q[_NEXT]
        for gen in range(1, min(newest, 64) + 1):
            try:
                seg = _attach(segment_name(name, gen))
            except (FileNotFoundError, ShmIncompatible):
                continue
            if seg.header_ok() is None:
                _close_block(seg)
            seg.close()
            _unlink(seg.name)
        _close_block(base)
    _unlink(name)


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
    """Copy ``entries`` committed redo-log entries to their records and client entries."""
    q, lay = seg.q, seg.layout
    rs, count, clients = lay.rec_slots, q[_COUNT], q[_CLIENTS]
    for k in range(entries):
        e = lay.log_slot + k * lay.log_slots
        idx = q[e]
        if 0 <= idx < count:
            r = lay.rec_slot + idx * rs
            q[r : r + rs] = q[e + 1 : e + 1 + rs]
        elif 0 <= -1 - idx < clients:
            c = lay.client_slot(-1 - idx)
            q[c + 1 : c + 3] = q[e + 1 : e + 3]


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
    """The collector's per-queue counters in shared memory; the one and only writer.

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
    ) -> None:
        """Internal: use ``create_or_attach``."""
        self._name = name
        self._base = base
        self._seg: _Segment | None = seg
        # Closing the fd releases the writer lock: at close(), or when the object is dropped.
        self._release_lock = weakref.finalize(self, os.close, lock_fd)
        self._clock = clock
        self._client_ttl = client_ttl
        self._ring = seg.layout.ring
        self._lock = threading.Lock()
        q, lay = seg.q, seg.layout
        count = q[_COUNT]
        self._names = _decode_names(
            bytes(seg.buf[HEADER_SIZE : _Layout.entry_at(count)]), count, name
        )
        self._index = {queue: i for i, queue in enumerate(self._names)}
        self._rows = _Rows()
        # Clients: stored id per entry, the second of its last batch, and id -> entry.
        self._client_ids: list[str] = []
        self._client_seen: list[int] = []
        for j in range(q[_CLIENTS]):
            c = lay.client_slot(j)
            n = q[c]
            if not 0 <= n <= CLIENT_ID_MAX:
                raise ShmIncompatible(f"shared stats {name!r}: corrupt client entry {j}")
            raw = bytes(seg.buf[8 * c + 24 : 8 * c + 24 + n])
            self._client_ids.append(raw.decode("utf-8", "surrogatepass"))
            self._client_seen.append(q[c + 2])
        self._clients = {client: j for j, client in enumerate(self._client_ids)}

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
    ) -> SharedStats:
        """Reattach to the table ``name`` if it exists, else create it.

        Reattaching (same magic, layout version and window; after a crash or a restart)
        keeps every counter, the throughput ring, the started second and the clients' seqs,
        and repairs an update the previous writer left half done. A table with another window
        or layout is replaced (logged: its counters restart from 0). ``ShmLocked`` if another
        live writer owns it; ``ShmIncompatible`` if ``name`` is taken by something that is not
        a table. ``capacity`` and ``client_capacity`` are the first block's; the table grows
        as needed. ``client_ttl``: see "Clients" in the module docstring.
        """
        _check_name(name)
        if capacity < 1 or client_capacity < 1:
            raise ConfigError(
                f"capacity and client_capacity must be at least 1, not {capacity} "
                f"and {client_capacity}"
            )
        ring = ring_slots(window)
        for _ in range(4):
            try:
                base = _attach(name)
            except FileNotFoundError:
                layout = _Layout(ring, capacity, client_capacity)
                incarnation = secrets.randbits(63)
                try:
                    seg, fd = _create(
                        name, layout, generation=0, started=int(clock()), incarnation=incarnation
                    )
                except FileExistsError:
                    continue
                log.info(
                    "created shared stats %r (%d queues, %d clients, %d bytes)",
                    name,
                    capacity,
                    client_capacity,
                    layout.size,
                )
                return cls(name, seg, seg, fd, clock, client_ttl)
            except ShmIncompatible:
                # Empty: its creator died before sizing it (or is about to: then it is locked).
                os.close(_lock(name))
                _unlink(name)
                continue
            stats = cls._attach_table(name, base, ring, clock, client_ttl)
            if stats is not None:
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

    # -- writing --

    def add(
        self, queue: str, pushed: int = 0, processed: int = 0, failed: int = 0, retried: int = 0
    ) -> None:
        """Add several counts to ``queue`` at once."""
        self._apply(((queue, (pushed, processed, failed, retried)),), None)

    def apply_batch(
        self,
        counters: Mapping[str, Sequence[int]],
        *,
        client: tuple[str, int] | None = None,
    ) -> None:
        """Add a client batch, ``{queue: [pushed, processed, failed, retried]}``, atomically.

        Readers see all of it or none of it, and so does a writer reattaching after a crash.
        ``client=(client_id, seq)`` also records ``seq`` as that client's last applied batch
        (``client_seq``), in the same commit as the counters.
        """
        self._apply(counters.items(), client)

    def client_seq(self, client_id: str) -> int:
        """The seq of ``client_id``'s last batch applied with ``apply_batch``; 0 if none."""
        with self._lock:
            seg = self._live()
            slot = self._client_slot(client_id)
            if slot < 0:
                return 0
            seq: int = seg.q[seg.layout.client_slot(slot) + 1]
            return seq

    def _client_slot(self, client_id: str) -> int:
        slot = self._clients.get(client_id)
        if slot is None:
            key = _stored(client_id, CLIENT_ID_MAX).decode("utf-8", "surrogatepass")
            slot = self._clients.get(key, -1)
        return slot

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
                        stored = _stored(queue, NAME_MAX)
                        key = stored.decode("utf-8", "surrogatepass")
                        idx = index.get(key, fresh.get(key))
                        if idx is None:
                            idx = fresh[key] = count + len(new)
                            new.append((key, stored))
                        fresh[queue] = idx
                plan.append((idx, deltas))
            slot, claim, client_id, client_seq = -1, None, "", 0
            clients = len(self._client_ids)
            if client is not None:
                client_id, client_seq = client[0], operator.index(client[1])
                if client_seq < 0:
                    raise ValueError(f"client seq must be >= 0, not {client_seq}")
                slot = self._client_slot(client_id)
                if slot < 0:
                    claim = _stored(client_id, CLIENT_ID_MAX)
                    slot = self._free_client_slot(seg.layout.clients, now)
            # 2. Grow first if the block is too small (the plan's indexes stay valid).
            need_clients = clients + 1 if slot == clients else clients
            if count + len(new) > seg.layout.capacity or need_clients > seg.layout.clients:
                seg = self._grow(count + len(new), need_clients)
            # 3. One write section: new entries, then the redo-logged records and client seq.
            q, buf, lay, ring = seg.q, seg.buf, seg.layout, self._ring
            rs, rec0, log0, ls = lay.rec_slots, lay.rec_slot, lay.log_slot, lay.log_slots
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
                if claim is not None:
                    self._claim_client(seg, slot, claim, client_id)
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
                if slot >= 0:
                    e = log0 + entries * ls + 1
                    q[e - 1] = -1 - slot
                    q[e] = client_seq
                    q[e + 1] = now
                    entries += 1
                if entries:
                    q[_LOG_COUNT] = entries  # the commit point
                    for idx, e in logged.items():
                        r = rec0 + idx * rs
                        q[r : r + rs] = q[e : e + rs]
                    if slot >= 0:
                        c = lay.client_slot(slot)
                        q[c + 1] = client_seq
                        q[c + 2] = now
                        self._client_seen[slot] = now
                    q[_LOG_COUNT] = 0
            finally:
                if q[_LOG_COUNT]:  # pragma: no cover - only if copying back itself failed
                    _replay(seg, q[_LOG_COUNT])
                    q[_LOG_COUNT] = 0
                seg.end(seq)

    def _free_client_slot(self, capacity: int, now: int) -> int:
        """The entry a new client gets: the next free one, or the stalest old enough."""
        clients = len(self._client_ids)
        if clients < capacity:
            return clients
        oldest = min(range(clients), key=self._client_seen.__getitem__)
        if self._client_seen[oldest] < now - self._client_ttl:
            return oldest
        return clients  # the table must grow

    def _claim_client(self, seg: _Segment, slot: int, stored: bytes, client_id: str) -> None:
        """Give entry ``slot`` (free, or a forgotten client's) to a new client, at seq 0."""
        c = seg.layout.client_slot(slot)
        q = seg.q
        q[c + 1] = q[c + 2] = 0
        q[c] = len(stored)
        seg.buf[8 * c + 24 : 8 * c + CLIENT_ENTRY_SIZE] = stored.ljust(CLIENT_ID_MAX, b"\0")
        key = stored.decode("utf-8", "surrogatepass")
        if slot == len(self._client_ids):
            q[_CLIENTS] = slot + 1
            self._client_ids.append(key)
            self._client_seen.append(0)
        else:
            log.info(
                "client %r takes the entry of %r, silent since %d",
                key,
                self._client_ids[slot],
                self._client_seen[slot],
            )
            self._clients = {k: j for k, j in self._clients.items() if j != slot}
            self._client_ids[slot] = key
            self._client_seen[slot] = 0
        self._clients[key] = self._clients[client_id] = slot

    def _grow(self, queues: int, clients: int) -> _Segment:
        """Move the table to a new generation that holds ``queues`` queues and ``clients``."""
        old = self._live()
        capacity, client_capacity = old.layout.capacity, old.layout.clients
        while capacity < queues:
            capacity *= 2
        while client_capacity < clients:
            client_capacity *= 2
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
        return f"<SharedStats {self._name!r} {state}, {len(self._names)} queues>"


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
