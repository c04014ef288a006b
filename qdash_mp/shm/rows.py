"""Decode a block's records into rows, skipping records that did not change (writer and reader).

Every row comes from ``qdash_mp.stats.read_record``; this only decides when a previous row can
be reused, which is what keeps a snapshot of a thousand queues around a millisecond.
"""

from __future__ import annotations

from collections.abc import Sequence

from qdash_mp.models import QueueStat
from qdash_mp.shm.layout import Layout
from qdash_mp.stats import read_record, record_quiet

__all__ = ["Rows"]


class Rows:
    """Decode records into rows, reusing the previous snapshot's row of an unchanged record.

    A row is a function of the record's bytes, ``now`` and ``started``, so it is reused while
    all three are the same; and, for a record whose ring holds no count that can enter a
    window ending at or after ``now`` ("quiet": its throughput is 0 from then on), for any
    later ``now``. Most queues of a big table are quiet or unchanged between two snapshots.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        # Per queue index: (record bytes, row, now, started, quiet).
        self._cache: list[tuple[bytes, QueueStat, int, int, bool]] = []

    def clear(self) -> None:
        self._cache = []

    def rows(
        self, records: bytes, layout: Layout, names: Sequence[str], now: int, started: int
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
            quiet = row.throughput == 0.0 and record_quiet(q, off, ring, now)
            entry = (rec, row, now, started, quiet)
            if i < len(cache):
                cache[i] = entry
            else:
                cache.append(entry)
            out.append(row)
        return out
