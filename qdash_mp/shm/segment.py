"""Shared-memory segments: open, create, lock, follow generations, retire.

One ``Segment`` is one mapped block (see ``layout`` for its bytes). A table is generation 0
(the segment named NAME, its entry point) plus, once it has grown, the newest generation it
points to. Segments are kept away from ``multiprocessing``'s resource tracker so they outlive
the process that made them (the counters must survive ``kill -9``). See ``docs/shm.md``.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import struct
import sys
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from types import ModuleType

from qdash_mp.errors import ShmError, ShmIncompatible, ShmLocked
from qdash_mp.fsio import try_flock
from qdash_mp.shm import layout as hdr
from qdash_mp.shm.layout import (
    CLIENT_ENTRY_SIZE,
    CLIENT_HEAD,
    HEADER_SIZE,
    MAGIC,
    Layout,
    segment_name,
)
from qdash_mp.shm.snapshot import Content

__all__ = [
    "LinkReader",
    "Segment",
    "attach",
    "close_block",
    "copy_table",
    "create",
    "decode_clients",
    "follow",
    "lock",
    "pid_alive",
    "retire",
    "unlink",
    "writer_link",
]


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


def unlink(name: str) -> bool:
    """Remove the segment ``name``; False if there was none."""
    try:
        _posixshmem().shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


class Segment:
    """One mapped block: the SharedMemory, its byte view and its int64 view."""

    __slots__ = ("buf", "generation", "layout", "name", "q", "shm")

    def __init__(self, name: str, shm: SharedMemory) -> None:
        self.name = name
        self.shm = shm
        buf = shm.buf
        assert buf is not None  # only None after close()
        self.buf: memoryview = buf
        self.q: memoryview = buf.cast("q")
        self.layout = Layout(1, 0, 0)
        self.generation = 0

    def header_ok(self, ring: int | None = None) -> str | None:
        """Why this block is unusable (None if usable); sets ``layout`` when usable."""
        if len(self.buf) < HEADER_SIZE:
            return f"{len(self.buf)} bytes is too small for a header"
        if bytes(self.buf[:8]) != MAGIC:
            return "bad magic (not a qdash_mp stats block, or not initialized)"
        q = self.q
        if q[hdr.VERSION] != hdr.LAYOUT_VERSION:
            return f"layout version {q[hdr.VERSION]}, this qdash_mp reads {hdr.LAYOUT_VERSION}"
        if ring is not None and q[hdr.RING] != ring:
            return f"a {q[hdr.RING] - 1} s throughput window, not {ring - 1} s"
        if (
            q[hdr.RING] < 2
            or not 0 <= q[hdr.COUNT] <= q[hdr.CAPACITY]
            or not 0 <= q[hdr.CLIENTS] <= q[hdr.CLIENT_CAP]
            or q[hdr.CAPACITY] < 1
            or q[hdr.CLIENT_CAP] < 1
            or q[hdr.NAME_MAX_SLOT] != hdr.NAME_MAX
        ):
            return "a corrupt header"
        layout = Layout(q[hdr.RING], q[hdr.CAPACITY], q[hdr.CLIENT_CAP])
        if len(self.buf) < layout.size:
            return f"{len(self.buf)} bytes, its header needs {layout.size}"
        self.layout = layout
        self.generation = q[hdr.GENERATION]
        return None

    def begin(self) -> int:
        """Open a write section; returns the even sequence it started from."""
        seq: int = self.q[hdr.SEQ]
        self.q[hdr.SEQ] = seq + 1
        return seq

    def end(self, seq: int) -> None:
        """Close the write section opened by ``begin`` (which returned ``seq``)."""
        self.q[hdr.SEQ] = seq + 2

    def close(self) -> None:
        # Release our views before SharedMemory.close(), or its mmap refuses to close.
        self.q.release()
        self.shm.close()

    def __del__(self) -> None:
        # A dropped, unclosed segment must not make SharedMemory.__del__ fail on our view.
        with contextlib.suppress(BufferError):
            self.q.release()


def attach(name: str) -> Segment:
    """Map an existing segment; ``FileNotFoundError`` if there is none."""
    try:
        shm = _open_shm(name)
    except ValueError as exc:  # an empty segment: its creator died before sizing it
        raise ShmIncompatible(f"shared-memory segment {name!r} is empty") from exc
    return Segment(name, shm)


def lock(name: str, pid: int = 0) -> int:
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


def create(
    name: str,
    layout: Layout,
    *,
    generation: int,
    started: int,
    incarnation: int,
    content: Content | None = None,
) -> tuple[Segment, int]:
    """Create, lock, reserve and initialize a block; returns it and the fd holding the lock.

    ``content`` (a restored snapshot) is written into the block before it is published. The
    magic is written last, so a block whose creator died half-way has none; the lock is taken
    before anything is written, so nobody mistakes a block being created for such a one.
    Fully reserved up front (``posix_fallocate``), so a full ``/dev/shm`` is a clear error
    here instead of a ``SIGBUS`` later.
    """
    shm = _open_shm(name, create=True, size=layout.size)
    seg = Segment(name, shm)
    fd = -1
    try:
        fd = lock(name)
        try:
            os.posix_fallocate(fd, 0, layout.size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise ShmError(
                    f"cannot reserve {layout.size} bytes of shared memory for {name!r} "
                    f"(is /dev/shm full?): {exc}"
                ) from exc
        q = seg.q
        q[hdr.VERSION] = hdr.LAYOUT_VERSION
        q[hdr.RING] = layout.ring
        q[hdr.CAPACITY] = layout.capacity
        q[hdr.STARTED] = started
        q[hdr.PID] = os.getpid()
        q[hdr.GENERATION] = generation
        q[hdr.STATUS] = hdr.LIVE
        q[hdr.NAME_MAX_SLOT] = hdr.NAME_MAX
        q[hdr.INCARNATION] = incarnation
        q[hdr.CLIENT_CAP] = layout.clients
        seg.layout = layout
        seg.generation = generation
        if content is not None:
            _fill(seg, content)
        seg.buf[:8] = MAGIC
    except BaseException:
        if fd >= 0:
            os.close(fd)
        seg.close()
        unlink(name)
        raise
    return seg, fd


def _fill(seg: Segment, content: Content) -> None:
    """Write a snapshot's queues and clients into a new, still unpublished block."""
    q, buf, lay = seg.q, seg.buf, seg.layout
    rs = lay.rec_slots
    record = struct.Struct(f"={rs}q")
    for i, (stored, values) in enumerate(content.queues):
        at = Layout.entry_at(i)
        q[at // 8] = len(stored)
        buf[at + 8 : at + 8 + len(stored)] = stored
        record.pack_into(buf, lay.rec_at + 8 * rs * i, *values)
    for j, (raw_id, seq, second) in enumerate(content.clients):
        at = 8 * lay.client_slot(j)
        CLIENT_HEAD.pack_into(buf, at, len(raw_id), seq, second)
        buf[at + 24 : at + 24 + len(raw_id)] = raw_id
    q[hdr.COUNT] = len(content.queues)
    q[hdr.CLIENTS] = len(content.clients)


def copy_table(old: Segment, new: Segment, count: int, known: int) -> None:
    """Copy the first ``count`` directory entries and records and ``known`` clients to ``new``.

    ``new`` is a fresh, bigger generation nobody reads yet (growth, see ``docs/shm.md``).
    """
    src, dst = old.layout, new.layout
    dir_end = Layout.entry_at(count)
    rec_bytes = count * dst.rec_slots * 8
    cli_bytes = known * CLIENT_ENTRY_SIZE
    new.buf[HEADER_SIZE:dir_end] = old.buf[HEADER_SIZE:dir_end]
    new.buf[dst.rec_at : dst.rec_at + rec_bytes] = old.buf[src.rec_at : src.rec_at + rec_bytes]
    new.buf[dst.cli_at : dst.cli_at + cli_bytes] = old.buf[src.cli_at : src.cli_at + cli_bytes]
    new.q[hdr.COUNT] = count
    new.q[hdr.CLIENTS] = known


LinkReader = Callable[[Segment], tuple[int, int]]


def writer_link(seg: Segment) -> tuple[int, int]:
    """``(status, next)`` of a block, read by its writer (no seqlock needed)."""
    return seg.q[hdr.STATUS], seg.q[hdr.NEXT]


def follow(name: str, base: Segment, link: LinkReader) -> Segment:
    """The block a table's readers and writer should use: generation 0 or the newest one.

    Follows ``next`` from ``base`` (whose header is checked) while blocks are superseded; a
    block may be unlinked under our feet by a growing writer, so when a generation is gone we
    try the one generation 0 now points to. ``link`` reads ``(status, next)`` of a block.
    """
    seg = base
    ring, incarnation = base.q[hdr.RING], base.q[hdr.INCARNATION]
    for _ in range(64):
        status, nxt = link(seg)
        if status != hdr.SUPERSEDED:
            return seg
        found = None
        for gen in dict.fromkeys((nxt, link(base)[1])):
            if gen <= seg.generation:
                continue
            try:
                cand = attach(segment_name(name, gen))
            except (FileNotFoundError, ShmIncompatible):
                continue
            if (
                cand.header_ok(ring) is None
                and cand.generation == gen
                and cand.q[hdr.INCARNATION] == incarnation
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


def retire(name: str, base: Segment) -> None:
    """Remove a table we will not reattach: mark its blocks closed (readers leave), unlink."""
    if _ours(base):
        newest = base.q[hdr.NEXT]
        for gen in range(1, min(newest, 64) + 1):
            try:
                seg = attach(segment_name(name, gen))
            except (FileNotFoundError, ShmIncompatible):
                continue
            if _ours(seg):
                close_block(seg)
            seg.close()
            unlink(seg.name)
        close_block(base)
    unlink(name)


def _ours(seg: Segment) -> bool:
    """A stats block of this or an older layout (their headers agree up to slot 13)."""
    return (
        len(seg.buf) >= HEADER_SIZE
        and bytes(seg.buf[:8]) == MAGIC
        and seg.q[hdr.VERSION] in (1, 2, hdr.LAYOUT_VERSION)
    )


def close_block(seg: Segment) -> None:
    """Mark a block closed in one write section (its readers then report the table gone)."""
    seq = seg.begin()
    seg.q[hdr.STATUS] = hdr.CLOSED
    seg.end(seq)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (``pid <= 0``: no)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def decode_clients(seg: Segment, name: str) -> list[tuple[str, int, int]]:
    """``(id, seq, second)`` of the client entries in use."""
    buf, lay = seg.buf, seg.layout
    out = []
    for j in range(seg.q[hdr.CLIENTS]):
        at = 8 * lay.client_slot(j)
        n, seq, second = CLIENT_HEAD.unpack_from(buf, at)
        if not 1 <= n <= CLIENT_ENTRY_SIZE - 24:
            raise ShmIncompatible(f"shared stats {name!r}: corrupt client entry {j} ({n} bytes)")
        try:
            out.append(
                (bytes(buf[at + 24 : at + 24 + n]).decode("utf-8", "surrogatepass"), seq, second)
            )
        except UnicodeDecodeError as exc:
            raise ShmIncompatible(f"shared stats {name!r}: corrupt client id: {exc}") from None
    return out
