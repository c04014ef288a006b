"""Cumulative hook counts and packed failed jobs -> BATCH frames (pure, no I/O, no thread).

The hooks only ever add to their cumulative counters (``qdash_mp.client.tally``); the
batcher remembers what it already put into batches (``sent``) and turns ``cumulative - sent``
into counter rows. Each counter is read in one C call, so a value is never torn while hooks
keep counting; a hook that runs meanwhile lands in the next batch. Used by the sender thread only.

With a ``LifeBatcher`` (``qdash_mp.client.lifecycle``) and a collector that welcomed version
2 (``ext_ok``), batches also carry BATCH v2's ``ext``: runtime/wait bucket and started
deltas (resent until ACKed, like the counters), and, in live batches only, the active
gauges and jobs (when changed and after each WELCOME) and tracking events. A delta above
``MAX_DELTA`` (which the wire refuses) goes out capped; the remainder follows in later batches.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from qdash_mp.client.lifecycle import LifeBatcher
from qdash_mp.client.tally import Counts, snapshot
from qdash_mp.wire import MAX_DELTA, encode_batch

__all__ = ["BATCH_BYTES", "HIST_QUEUES_PER_BATCH", "QUEUES_PER_BATCH", "Batcher", "Pending"]

BATCH_BYTES = 1024 * 1024
"""Soft size of one batch's failed jobs; a single bigger record still goes alone."""

QUEUES_PER_BATCH = 2000
"""Counter rows per batch, so a batch stays far below ``MAX_FRAME`` whatever the names."""

HIST_QUEUES_PER_BATCH = 200
"""Queues with bucket deltas per batch (each up to 2 x 418 pairs, ~7 KB at most)."""

Rows = list[tuple[str, list[int]]]


class Pending:
    """What ``deltas`` found to send, taken off batch by batch by ``next_batch``."""

    __slots__ = ("hist", "live", "rows", "started")

    def __init__(self, rows: Rows) -> None:
        self.rows = rows
        self.hist: list[tuple[str, dict[int, int], dict[int, int]]] = []
        self.started: list[tuple[str, int]] = []
        self.live = False  # gauges and events still to go (live batches only)

    def __bool__(self) -> bool:
        return bool(self.rows or self.hist or self.started)


class Batcher:
    """Batches from ``counts`` (pushed, processed, failed, retried) and ``failed_jobs``."""

    __slots__ = ("_counts", "_failed_jobs", "_max_failed", "_replay", "_sent", "ext_ok", "life")

    def __init__(
        self,
        counts: tuple[Counts, ...],
        failed_jobs: collections.deque[bytes],
        max_failed: int,
        life: LifeBatcher | None = None,
        replay: Callable[[], None] | None = None,
    ) -> None:
        self._counts = counts
        self._replay = replay
        self._sent: tuple[dict[str, int], ...] = tuple({} for _ in counts)
        self._failed_jobs = failed_jobs
        self._max_failed = max_failed
        self.life = life
        if life is not None:
            life.counts = counts
        self.ext_ok = True
        """Send ``ext`` (the collector welcomed version 2, or none was met yet)."""

    def _cumulative(self, kind: int) -> dict[str, int]:
        snap = snapshot(self._counts[kind])
        life = self.life
        if kind == 1 and life is not None and life.extra_processed:
            for q, n in life.extra_processed.items():
                snap[q] = snap.get(q, 0) + n
        return snap

    def replay(self) -> None:
        """Run the hooks a ``RunLog`` recorded (``qdash_mp.client.runlog``), if any, so that
        the counts read next include every hook recorded so far. ``has_news`` does it first;
        a caller of ``deltas`` does it before it counts the failed jobs it owes."""
        if self._replay is not None:
            self._replay()

    def has_news(self) -> bool:
        """Anything counted or failed that is not in a batch yet?"""
        self.replay()
        if self._failed_jobs:
            return True
        if self.life is not None and self.life.has_news(self.ext_ok):
            return True
        return any(self._cumulative(k) != s for k, s in enumerate(self._sent))

    def deltas(self, live: bool = True) -> Pending:
        """Everything to send now: counter rows ``(queue, [d_pushed, d_processed, d_failed,
        d_retried])`` where anything changed, and with ``ext`` its counters (and, ``live``,
        the gauges and events for the first batch). The caller replays first (``replay``)."""
        life = self.life
        if life is not None:
            life.drain()
            if not self.ext_ok:
                life.forget_ext()
        rows: dict[str, list[int]] = {}
        for kind, sent in enumerate(self._sent):
            snap = self._cumulative(kind)
            if snap == sent:
                continue
            for q, value in snap.items():
                delta = value - sent.get(q, 0)
                if delta:
                    row = rows.get(q)
                    if row is None:
                        row = rows[q] = [0, 0, 0, 0]
                    # The wire refuses more: the remainder goes in a later batch.
                    row[kind] = min(delta, MAX_DELTA)
        pending = Pending(list(rows.items()))
        if life is not None and self.ext_ok:
            pending.hist = life.hist_deltas()
            pending.started = life.started_deltas()
            pending.live = live
        return pending

    def next_batch(self, seq: int, pending: Pending, max_jobs: int) -> tuple[bytes, int] | None:
        """Batch ``seq`` from counter rows taken off ``pending`` and failed jobs taken off the
        deque: as many as fit in a batch, and at most ``max_jobs`` of them (``max_jobs < 1``:
        no such limit). ``(frame, failed jobs taken)``, or ``None`` if there is nothing to send.
        """
        jobs = self._failed_jobs
        rows = pending.rows
        chunk = rows[:QUEUES_PER_BATCH]
        del rows[: len(chunk)]
        hist = pending.hist[:HIST_QUEUES_PER_BATCH]
        del pending.hist[: len(hist)]
        started = pending.started[:QUEUES_PER_BATCH]
        del pending.started[: len(started)]
        ext: dict[str, Any] = {}
        life = self.life
        gauges = None
        if pending.live and life is not None:
            pending.live = False
            gauges = life.gauge_update()
            if gauges is not None:
                ext["active"], ext["jobs"] = gauges
            events = life.events()
            if events:
                ext["events"] = events
        if hist:
            ext["hist"] = {q: (r, w) for q, r, w in hist}
        if started:
            ext["started"] = dict(started)
        limit = self._max_failed if max_jobs < 1 else min(self._max_failed, max_jobs)
        packed: list[bytes] = []
        size = 0
        while jobs and len(packed) < limit:
            item = jobs[0]
            if packed and size + len(item) > BATCH_BYTES:
                break
            packed.append(jobs.popleft())
            size += len(item)
        if not chunk and not packed and not ext:
            return None
        frame = encode_batch(seq, {q: (d[0], d[1], d[2], d[3]) for q, d in chunk}, packed, **ext)
        if life is not None:
            for q, r, w in hist:
                life.hist_sent(q, r, w)
            life.started_sent(started)
            if gauges is not None:
                life.gauges_sent(*gauges)
        for q, deltas in chunk:
            for kind, delta in enumerate(deltas):
                if delta:
                    sent = self._sent[kind]
                    sent[q] = sent.get(q, 0) + delta
        return frame, len(packed)
