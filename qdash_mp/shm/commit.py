"""Committing a planned batch to a block: the redo log, then one write section.

The writer (``SharedStats``, holding its lock) calls ``commit`` with a ``Plan`` whose record
indexes fit the block. The order is what makes a batch crash-safe (``docs/shm.md``):

1. outside the write section, copy each record the batch changes into a redo-log entry and
   apply the deltas there (readers never read the log: a long copy cannot starve them);
2. inside it, add the new directory entries, store ``LOG_COUNT`` (the commit point), copy
   every entry back to its record, and clear ``LOG_COUNT``.

A writer killed before the commit point leaves the batch unapplied; after it, the next writer
replays the log (``redo.replay``). Nothing here raises on a value: the plan was validated.
"""

from __future__ import annotations

from collections.abc import Callable

from qdash_mp.shm import layout as hdr
from qdash_mp.shm.layout import CLIENT_ENTRY_SIZE, CLIENT_HEAD, CLIENT_SLOTS, Layout
from qdash_mp.shm.plan import Plan
from qdash_mp.shm.redo import replay
from qdash_mp.shm.segment import Segment
from qdash_mp.stats import apply_deltas, apply_hist, apply_started

__all__ = ["ClientUpdate", "commit"]

_fault_hook: Callable[[str], None] | None = None
"""Test seam, None in production (where it costs one global lookup per batch).

When set, ``commit`` calls it inside the write section with ``"log"`` (the redo log is
written, not committed), ``"commit"`` (committed, nothing copied back yet) and ``"copy"``
(records copied back, the client entry not yet), so a test can kill the writer in each window.
"""

ClientUpdate = tuple[int, bytes, int]
"""``(slot, claim, seq)``: the client entry to write (slot -1: none). ``claim`` is the encoded
id of a client taking a free or forgotten entry, empty for one updating its own."""


def commit(
    seg: Segment,
    plan: Plan,
    ring: int,
    now: int,
    client: ClientUpdate,
    names: list[str],
    index: dict[str, int],
) -> None:
    """Apply ``plan`` (and the client entry) to ``seg``; extend ``names`` and ``index``."""
    q, buf, lay = seg.q, seg.buf, seg.layout
    rs, rec0, log0, ls = lay.rec_slots, lay.rec_slot, lay.log_slot, lay.log_slots
    hs = lay.head_slots
    full = plan.full
    count = len(names)
    # 1. The redo log. A log entry: [target, slots to copy back, payload]. A record whose
    # histograms do not change logs (and copies back) only its head.
    logged: dict[int, int] = {}

    def entry(idx: int) -> int:
        """Record ``idx``'s log entry, made (a copy of the record) on first use."""
        e = logged.get(idx)
        if e is None:
            size = rs if idx in full else hs
            e = logged[idx] = log0 + len(logged) * ls + 2
            r = rec0 + idx * rs
            q[e - 2] = idx
            q[e - 1] = size
            q[e : e + size] = q[r : r + size]
        return e

    for idx, deltas in plan.counters:
        if any(deltas):  # saturates: cannot raise on a value
            apply_deltas(q, entry(idx), ring, deltas, now)
    for idx, n, runtime, wait in plan.lifecycle:
        e = entry(idx)
        if n:
            apply_started(q, e, n)
        apply_hist(q, e, ring, runtime, wait)  # validated by the plan; saturates
    entries = len(logged)
    slot, claim, client_seq = client
    d = 0
    if slot >= 0:
        d = log0 + entries * ls + 2
        q[d - 2] = -1 - slot
        q[d - 1] = CLIENT_SLOTS
        if claim:  # a new client, in a free entry or a forgotten client's
            at = 8 * d
            CLIENT_HEAD.pack_into(buf, at, len(claim), client_seq, now)
            buf[at + 24 : at + CLIENT_ENTRY_SIZE] = claim.ljust(CLIENT_ENTRY_SIZE - 24, b"\0")
        else:
            c = lay.client_slot(slot)
            q[d : d + CLIENT_SLOTS] = q[c : c + CLIENT_SLOTS]
            q[d + 1] = client_seq
            q[d + 2] = now
        entries += 1
    # 2. The write section (readers retry while it is open).
    hook = _fault_hook
    seq = seg.begin()
    try:
        if plan.new:
            for k, (_key, stored) in enumerate(plan.new):
                at = Layout.entry_at(count + k)
                q[at // 8] = len(stored)
                buf[at + 8 : at + 8 + len(stored)] = stored
            q[hdr.COUNT] = count + len(plan.new)
            names.extend(key for key, _ in plan.new)
        if plan.fresh:
            index.update(plan.fresh)
        if hook is not None:
            hook("log")
        if entries:
            q[hdr.LOG_COUNT] = entries  # the commit point
            if hook is not None:
                hook("commit")
            if full:
                for idx, e in logged.items():
                    r = rec0 + idx * rs
                    n = q[e - 1]
                    q[r : r + n] = q[e : e + n]
            else:  # counters only: every entry is a head
                for idx, e in logged.items():
                    r = rec0 + idx * rs
                    q[r : r + hs] = q[e : e + hs]
            if hook is not None:
                hook("copy")
            if slot >= 0:
                c = lay.client_slot(slot)
                q[c : c + CLIENT_SLOTS] = q[d : d + CLIENT_SLOTS]
                if slot == q[hdr.CLIENTS]:
                    q[hdr.CLIENTS] = slot + 1
            q[hdr.LOG_COUNT] = 0
    finally:
        if q[hdr.LOG_COUNT]:  # pragma: no cover - only if copying back itself failed
            replay(seg, q[hdr.LOG_COUNT])
            q[hdr.LOG_COUNT] = 0
        seg.end(seq)
