"""``SharedStats``: the one writer of a table (the collector's counters and client seqs).

Every change is one seqlock write section; records and client entries change through the
redo log (written here, inline, on the hot path; replayed by ``redo``). See ``docs/shm.md``.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from qdash_mp.errors import ConfigError, ShmError
from qdash_mp.histogram import NBUCKETS
from qdash_mp.history import QueueTotals
from qdash_mp.models import QueueStat, StatsView
from qdash_mp.shm import layout as hdr
from qdash_mp.shm import snapshot
from qdash_mp.shm.clients import ClientTable
from qdash_mp.shm.commit import commit
from qdash_mp.shm.layout import (
    DEFAULT_CAPACITY,
    DEFAULT_CLIENT_CAPACITY,
    DEFAULT_CLIENT_TTL,
    HEADER_SIZE,
    Layout,
    check_name,
    decode_names,
    segment_name,
    stored_queue_name,
)
from qdash_mp.shm.plan import Hist, plan_batch
from qdash_mp.shm.rows import Rows
from qdash_mp.shm.segment import Segment, close_block, copy_table, create, decode_clients, unlink
from qdash_mp.shm.table import Opened, at_least, open_table
from qdash_mp.stats import (
    ACTIVE_SLOT,
    DEFAULT_WINDOW,
    INT64_MAX,
    StatsBase,
    build_view,
    hist_at,
    merged_hists,
    ring_slots,
)

__all__ = ["SharedStats"]

log = logging.getLogger("qdash_mp.shm")


class SharedStats(StatsBase):
    """The collector's per-queue counters and client seqs in shared memory; the one writer.

    Build it with ``create_or_attach``. Thread-safe (one short lock per call, like ``Stats``),
    and a ``StatsBase``: the ``on_*`` hooks, ``add`` and ``snapshot`` behave as ``Stats``'s,
    except that names over ``NAME_MAX`` bytes show in their stored form. Counts saturate at
    ``INT64_MAX`` like ``Stats``'s (see ``qdash_mp.stats.apply_deltas``).
    """

    def __init__(
        self, name: str, opened: Opened, clock: Callable[[], float], client_ttl: float
    ) -> None:
        """Internal: use ``create_or_attach``."""
        seg = opened.seg
        self._name = name
        self._base = opened.base
        self._seg: Segment | None = seg
        self._clock = clock
        self._restored = opened.restored
        self._ring = seg.layout.ring
        self._lock = threading.Lock()
        count = seg.q[hdr.COUNT]
        self._names = decode_names(
            bytes(seg.buf[HEADER_SIZE : Layout.entry_at(count)]), count, name
        )
        self._index = {queue: i for i, queue in enumerate(self._names)}
        self._rows = Rows()
        self._clients = ClientTable(decode_clients(seg, name), client_ttl, name)
        # Closing the fd releases the writer lock: at close(), or when the object is dropped.
        # Registered last: if anything above raised, the caller still owns the fd.
        self._release_lock = weakref.finalize(self, os.close, opened.fd)

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

        Reattaching (same magic, layout version and window; after a crash, a failed save or
        a restart) keeps every counter, the throughput ring, the started second and the
        clients' seqs, and repairs an update the previous writer left half done. A table with
        another window or layout is replaced (logged: its counters restart from 0).
        ``ShmLocked`` if another live writer owns it; ``ShmIncompatible`` if ``name`` is taken
        by something that is not a table. ``capacity`` and ``client_capacity`` are the first
        block's; the table grows as needed. ``client_ttl``: see ``docs/shm.md``.

        ``restore_from``: a file written by ``save``. When a new table is created, it starts
        from that file if the file verifies (``restored`` is then True); a file that does not
        is renamed to ``<name>.bad`` (logged) and the table starts empty. When a table is
        reattached, the file is ignored and left alone: a surviving segment is always at least
        as new as any snapshot (it is only left behind when a clean stop did not complete).
        """
        check_name(name)
        if capacity < 1 or client_capacity < 1:
            raise ConfigError(
                f"capacity and client_capacity must be at least 1, not {capacity} "
                f"and {client_capacity}"
            )
        opened = open_table(
            name,
            ring=ring_slots(window),
            capacity=capacity,
            client_capacity=client_capacity,
            clock=clock,
            restore_from=restore_from,
        )
        try:
            stats = cls(name, opened, clock, client_ttl)
        except BaseException:
            opened.abandon()
            raise
        if opened.reattached or opened.restored:
            stats._zero_active()
        if opened.reattached:
            log.info(
                "reattached to shared stats %r: generation %d, %d queues, %d clients",
                name,
                opened.seg.generation,
                len(stats._names),
                len(stats._clients),
            )
        return stats

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
        """Add several counts to ``queue`` at once (saturating at ``INT64_MAX``)."""
        self._apply(((queue, (pushed, processed, failed, retried)),), None, None, None)

    def _record(
        self,
        queue: str,
        deltas: Sequence[int],
        started: int,
        runtime_bucket: int | None,
        wait_bucket: int | None,
    ) -> None:
        hist = None
        if runtime_bucket is not None or wait_bucket is not None:
            hist = {
                queue: (
                    None if runtime_bucket is None else {runtime_bucket: 1},
                    None if wait_bucket is None else {wait_bucket: 1},
                )
            }
        self._apply(((queue, deltas),), None, {queue: started} if started else None, hist)

    def apply_batch(
        self,
        counters: Mapping[str, Sequence[int]],
        client: tuple[str, int] | None = None,
        *,
        started: Mapping[str, int] | None = None,
        hist: Hist | None = None,
    ) -> None:
        """Add a client batch, ``{queue: [pushed, processed, failed, retried]}``, atomically.

        Readers see all of it or none of it, and so does a writer reattaching after a crash.
        No int delta makes it raise: a count that would leave the int64 range saturates (see
        ``qdash_mp.stats.apply_deltas``), so a batch can never wedge its queue. Shape and
        type errors (not 4 counters, a non-int) raise before anything is committed.
        ``client=(client_id, seq)`` also records ``seq`` as that client's last applied batch
        (``client_seq``) in the same commit as the counters; ``seq`` must be above the
        client's current one and at most ``INT64_MAX`` (``ValueError`` otherwise, and nothing
        is applied): deciding whether a batch is new is the caller's job, this only makes the
        outcome crash-proof.

        ``started``: ``{queue: n}`` jobs started; ``hist``: ``{queue: (runtime, wait)}`` sparse
        bucket deltas (``{bucket: n}``, bucket ``0 .. NBUCKETS - 1``; either may be None or
        empty). Both go into the same commit; only the buckets named are touched, and a batch
        without them costs what a counters-only batch always did.
        """
        self._apply(counters.items(), client, started, hist)

    def set_active(self, gauges: Mapping[str, int]) -> None:
        """Set every queue's ``active`` gauge: ``gauges[queue]``, 0 for a queue not named.

        The collector calls it with the sum of its connected clients' gauges whenever they
        change, so readers (``qdash-mp stats``, the dashboard) see jobs running now. One write
        section, not redo-logged: a gauge is set, not added, and a restarted writer zeroes
        them all anyway (``create_or_attach``). Queues not in the table are ignored.
        """
        with self._lock:
            seg = self._live()
            q, lay = seg.q, seg.layout
            values = [0] * len(self._names)
            for queue, n in gauges.items():
                idx = self._index.get(queue)
                if idx is not None:
                    values[idx] = min(max(operator.index(n), 0), INT64_MAX)
            at, rs = lay.rec_slot + ACTIVE_SLOT, lay.rec_slots
            seq = seg.begin()
            try:
                for i, n in enumerate(values):
                    q[at + i * rs] = n
            finally:
                seg.end(seq)

    def _zero_active(self) -> None:
        """A (re)attached table knows no running job: zero every ``active`` gauge."""
        self.set_active({})

    def client_seq(self, client_id: str) -> int:
        """The seq of ``client_id``'s last batch applied with ``apply_batch``; 0 if none."""
        with self._lock:
            self._live()
            return self._clients.seq(client_id)

    def client_seqs(self) -> dict[str, int]:
        """Every client the table remembers, with the seq of its last batch applied."""
        with self._lock:
            self._live()
            return dict(zip(self._clients.ids, self._clients.seqs, strict=True))

    def _apply(
        self,
        items: Iterable[tuple[str, Sequence[int]]],
        client: tuple[str, int] | None,
        started: Mapping[str, int] | None,
        hist: Hist | None,
    ) -> None:
        with self._lock:
            seg = self._live()
            now = int(self._clock())
            # 1. Plan (pure; raises on a bad batch): records, new names, the client's entry.
            count = len(self._names)
            plan = plan_batch(items, started, hist, self._index, count)
            slot, claim, client_id, client_seq = -1, b"", "", 0
            if client is not None:
                client_id, client_seq = client[0], operator.index(client[1])
                slot, claim = self._clients.plan(client_id, client_seq, seg.layout.clients, now)
            # 2. Grow first if the block is too small (the plan's indexes stay valid).
            if count + len(plan.new) > seg.layout.capacity or slot >= seg.layout.clients:
                seg = self._grow(count + len(plan.new), max(len(self._clients), slot + 1))
            # 3. The redo log, then one write section (``commit``).
            commit(seg, plan, self._ring, now, (slot, claim, client_seq), self._names, self._index)
            if slot >= 0:
                self._clients.remember(slot, client_id, client_seq, now, bool(claim))

    def _grow(self, queues: int, clients: int) -> Segment:
        """Move the table to a new generation that holds ``queues`` queues and ``clients``."""
        old = self._live()
        capacity = at_least(old.layout.capacity, queues)
        client_capacity = at_least(old.layout.clients, clients)
        gen = old.generation + 1
        gen_name = segment_name(self._name, gen)
        if unlink(gen_name):
            log.warning("removed stale shared-memory segment %r (an interrupted growth)", gen_name)
        new, fd = create(
            gen_name,
            Layout(self._ring, capacity, client_capacity),
            generation=gen,
            started=old.q[hdr.STARTED],
            incarnation=old.q[hdr.INCARNATION],
        )
        os.close(fd)
        copy_table(old, new, len(self._names), len(self._clients))
        for seg in (old, self._base) if old is not self._base else (old,):
            seq = seg.begin()
            seg.q[hdr.NEXT] = gen
            seg.q[hdr.STATUS] = hdr.SUPERSEDED
            seg.end(seq)
        if old is not self._base:
            old.close()
            unlink(old.name)
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
            rows = self._rows.rows(records, lay, self._names, now, seg.q[hdr.STARTED])
            merged = self._merged(seg, rows)
        return build_view(rows, merged)

    def _merged(self, seg: Segment, rows: Sequence[QueueStat]) -> tuple[list[int], list[int]]:
        lay = seg.layout
        return merged_hists(
            seg.q,
            (
                lay.rec_slot + i * lay.rec_slots
                for i, row in enumerate(rows)
                if row.runtime.count or row.wait.count
            ),
            lay.ring,
        )

    def buckets(self, queue: str) -> tuple[list[int], list[int]]:
        """The lifetime runtime and wait histograms of ``queue`` (dense, ``NBUCKETS`` each;
        zeros for a queue never seen). Names over ``NAME_MAX`` bytes: either form."""
        with self._lock:
            seg = self._live()
            idx = self._index.get(queue)
            if idx is None:
                idx = self._index.get(stored_queue_name(queue))
            if idx is None:
                return [0] * NBUCKETS, [0] * NBUCKETS
            lay = seg.layout
            r = hist_at(lay.rec_slot + idx * lay.rec_slots, lay.ring, 0)
            return seg.q[r : r + NBUCKETS].tolist(), seg.q[r + NBUCKETS : r + 2 * NBUCKETS].tolist()

    def totals(self) -> dict[str, QueueTotals]:
        """Every queue's cumulative pushed, processed, failed and runtime histogram (dense),
        for the collector's history tick: read straight from the records, no view built."""
        with self._lock:
            seg = self._live()
            q, lay = seg.q, seg.layout
            rs, ring = lay.rec_slots, lay.ring
            out = {}
            for i, queue in enumerate(self._names):
                off = lay.rec_slot + i * rs
                r = hist_at(off, ring, 0)
                out[queue] = QueueTotals(
                    q[off], q[off + 1], q[off + 2], q[r : r + NBUCKETS].tolist()
                )
            return out

    # -- lifecycle --

    def save(self, path: Path) -> None:
        """Write the whole table (counters, rings, started, client seqs) to ``path``, atomically.

        For a clean shutdown: once the last batch is applied, ``save``, then ``unlink``.
        ``create_or_attach(restore_from=path)`` loads it; the format is in ``snapshot``.

        ``SnapshotError`` (a ``ShmError``) if the file cannot be written (a full disk, a
        missing directory...): the segment and any previous file at ``path`` are untouched.
        Then do not ``unlink``: ``close`` keeps the segment, and the next ``create_or_attach``
        reattaches it with every count (it wins over the older file).
        """
        path = Path(path)
        with self._lock:
            seg = self._live()
            q, lay = seg.q, seg.layout
            rs = lay.rec_slots
            content = snapshot.Content(
                window=self._ring - 1,
                started=q[hdr.STARTED],
                saved_at=int(self._clock()),
                queues=[
                    (
                        queue.encode("utf-8", "surrogatepass"),
                        q[lay.rec_slot + i * rs : lay.rec_slot + (i + 1) * rs].tolist(),
                    )
                    for i, queue in enumerate(self._names)
                ],
                clients=[
                    (client_id.encode("utf-8", "surrogatepass"), seq, second)
                    for client_id, seq, second in self._clients.by_age()
                ],
            )
        snapshot.save(path, content, self._name)
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
                if block.q[hdr.PID] == os.getpid():
                    block.q[hdr.PID] = 0
                block.close()
            self._release_lock()

    def unlink(self) -> None:
        """Remove the table (clean shutdown): readers are told it is gone. Also closes."""
        with self._lock:
            seg = self._seg
            if seg is None:
                raise ShmError(f"shared stats {self._name!r} are closed")
            for block in {id(seg): seg, id(self._base): self._base}.values():
                close_block(block)
                unlink(block.name)
        self.close()

    def _live(self) -> Segment:
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
            f"{len(self._clients)} clients>"
        )
