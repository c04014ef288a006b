"""Cumulative hook counts and packed failed jobs -> BATCH frames (pure, no I/O, no thread).

The hooks only ever add to their cumulative dicts; the batcher remembers what it already put
into batches (``sent``) and turns ``cumulative - sent`` into counter rows. A queue's dict is
copied in one C call, so the view is consistent while hooks keep counting; a hook that runs
meanwhile lands in the next batch. Used by the sender thread only.
"""

from __future__ import annotations

import collections

from qdash_mp.wire import MAX_INT, encode_batch

__all__ = ["BATCH_BYTES", "QUEUES_PER_BATCH", "Batcher"]

BATCH_BYTES = 1024 * 1024
"""Soft size of one batch's failed jobs; a single bigger record still goes alone."""

QUEUES_PER_BATCH = 2000
"""Counter rows per batch, so a batch stays far below ``MAX_FRAME`` whatever the names."""

Rows = list[tuple[str, list[int]]]


class Batcher:
    """Batches from ``counts`` (pushed, processed, failed, retried) and ``failed_jobs``."""

    __slots__ = ("_counts", "_failed_jobs", "_max_failed", "_sent")

    def __init__(
        self,
        counts: tuple[dict[str, int], ...],
        failed_jobs: collections.deque[bytes],
        max_failed: int,
    ) -> None:
        self._counts = counts
        self._sent: tuple[dict[str, int], ...] = tuple({} for _ in counts)
        self._failed_jobs = failed_jobs
        self._max_failed = max_failed

    def has_news(self) -> bool:
        """Anything counted or failed that is not in a batch yet?"""
        if self._failed_jobs:
            return True
        return any(c != s for c, s in zip(self._counts, self._sent, strict=True))

    def deltas(self) -> Rows:
        """``(queue, [d_pushed, d_processed, d_failed, d_retried])`` where anything changed."""
        rows: dict[str, list[int]] = {}
        for kind, (counts, sent) in enumerate(zip(self._counts, self._sent, strict=True)):
            snap = counts.copy()  # one C call: a consistent view while hooks keep counting
            if snap == sent:
                continue
            for q, value in snap.items():
                delta = value - sent.get(q, 0)
                if delta:
                    row = rows.get(q)
                    if row is None:
                        row = rows[q] = [0, 0, 0, 0]
                    row[kind] = min(delta, MAX_INT)
        return list(rows.items())

    def next_batch(self, seq: int, pending: Rows, max_jobs: int) -> tuple[bytes, int] | None:
        """Batch ``seq`` from counter rows taken off ``pending`` and failed jobs taken off the
        deque: as many as fit in a batch, and at most ``max_jobs`` of them (``max_jobs < 1``:
        no such limit). ``(frame, failed jobs taken)``, or ``None`` if there is nothing to send.
        """
        jobs = self._failed_jobs
        chunk = pending[:QUEUES_PER_BATCH]
        del pending[: len(chunk)]
        limit = self._max_failed if max_jobs < 1 else min(self._max_failed, max_jobs)
        packed: list[bytes] = []
        size = 0
        while jobs and len(packed) < limit:
            item = jobs[0]
            if packed and size + len(item) > BATCH_BYTES:
                break
            packed.append(jobs.popleft())
            size += len(item)
        if not chunk and not packed:
            return None
        frame = encode_batch(seq, {q: (d[0], d[1], d[2], d[3]) for q, d in chunk}, packed)
        for q, deltas in chunk:
            for kind, delta in enumerate(deltas):
                if delta:
                    sent = self._sent[kind]
                    sent[q] = sent.get(q, 0) + delta
        return frame, len(packed)
