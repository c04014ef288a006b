"""The runtime bucket counts of each closed history period of a host, for exact hub merges.

Pure bookkeeping plus one read of the host's ``History`` state (under the lifecycle's lock).
The history files keep per-period runtime *summaries* only, but the state of each queue file
(``history_format.State``) holds, right after a minute closed, ``base_counts`` -- the lifetime
runtime buckets that minute was closed at -- and ``hour_counts`` -- the current hour's bucket
counts, of which the hour's point is the summary. ``observe`` looks at that state often (each
publish, ~1/s, with or without Redis) and derives:

* **minute t** (``state.last``): ``base_counts`` now minus at the previous observation. A
  close only ever adds counts that are >= 0, so if every difference is >= 0 and they sum to
  the point's runtime count, the difference is exactly minute t's counts (when several
  minutes closed between two observations, the earlier ones were then empty). A new
  queue's file starts from zero counts, so its first minute is known even unobserved
  before. Otherwise
  (a reset segment, the first close after the history was opened before this publisher
  saw it, several non-empty minutes unobserved) minute t has no buckets.
* **hour h**: the last ``hour_counts`` observed while ``hour_t`` was h. ``buckets_for``
  accepts them for a point only if they sum to the point's runtime count: within an hour the
  counts only grow, so an equal sum means equal counts (the hour's final counts, or the
  partial hour's current ones).

Memory is bounded: minute maps wait until the publisher acknowledged their point
(``acknowledged``), at most ``max_minutes`` of them (the oldest go first: those minutes are
then published without buckets); three hours per queue.
"""

from __future__ import annotations

import array
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from qdash_mp.histogram import NBUCKETS

if TYPE_CHECKING:
    from qdash_mp.history import History

__all__ = ["PeriodBuckets"]

log = logging.getLogger("qdash_mp.hub.period_buckets")

HOURS_KEPT: Final = 3
_ZEROS: Final = array.array("Q", bytes(8 * NBUCKETS))


def _sparse_delta(now: array.array[int], before: array.array[int]) -> dict[int, int] | None:
    """Sparse ``now - before``; ``None`` if any count went back."""
    out: dict[int, int] = {}
    if now == before:
        return out
    for i, (a, b) in enumerate(zip(now, before, strict=True)):
        if a != b:
            if a < b:
                return None
            out[i] = a - b
    return out


class _Seen:
    __slots__ = ("base", "hour", "hour_t", "seq")

    def __init__(self) -> None:
        self.seq = -1
        self.base: array.array[int] | None = None
        self.hour_t = 0
        self.hour: array.array[int] | None = None


class PeriodBuckets:
    """Bucket counts of closed minutes and of hours per queue; see the module docstring."""

    def __init__(self, max_minutes: int = 10_000) -> None:
        self._seen: dict[str, _Seen] = {}
        self._minutes: dict[str, dict[int, dict[int, int]]] = {}
        self._n_minutes = 0
        self._max_minutes = max_minutes
        self._hours: dict[str, dict[int, dict[int, int]]] = {}

    def observe(self, history: History) -> None:
        """Look at every queue file's state (call with the lifecycle's lock held: ``History``
        is not thread-safe). Costs a comparison per queue unless a minute closed."""
        # History keeps no bucket counts per period in its files, only in this state (see
        # docs/hub.md, "Which periods carry buckets").
        for queue, s in history.queue_states():
            seen = self._seen.get(queue)
            if seen is None:
                seen = self._seen[queue] = _Seen()
            elif s.seq == seen.seq:
                continue
            last = s.last
            before = seen.base
            if before is None and s.seq == 1:
                before = _ZEROS  # a new queue's file: its first close started from zero
            if before is not None and last is not None and last.count:
                delta = _sparse_delta(s.base_counts, before)
                if delta is not None and sum(delta.values()) == last.count:
                    self._add_minute(queue, last.t, delta)
                else:
                    log.debug(
                        "hub: minute %d of %r without buckets (observed seq %d -> %d, "
                        "counted %s of %d)",
                        last.t,
                        queue,
                        seen.seq,
                        s.seq,
                        None if delta is None else sum(delta.values()),
                        last.count,
                    )
            seen.seq = s.seq
            seen.base = array.array("Q", s.base_counts)
            if s.hour_t:
                hours = self._hours.setdefault(queue, {})
                hours[s.hour_t] = {i: n for i, n in enumerate(s.hour_counts) if n}
                while len(hours) > HOURS_KEPT:
                    del hours[min(hours)]

    def _add_minute(self, queue: str, t: int, delta: dict[int, int]) -> None:
        minutes = self._minutes.setdefault(queue, {})
        if t not in minutes:
            self._n_minutes += 1
        minutes[t] = delta
        while self._n_minutes > self._max_minutes:
            # the oldest minute of the queue that holds the oldest one: close enough to
            # oldest-first without a global index, and bounded
            q = min(self._minutes, key=lambda k: min(self._minutes[k]) if self._minutes[k] else 0)
            m = self._minutes[q]
            if not m:
                del self._minutes[q]
                continue
            del m[min(m)]
            self._n_minutes -= 1

    def buckets_for(self, queue: str, res: str, point: Mapping[str, Any]) -> dict[int, int] | None:
        """The bucket counts of ``point`` (a ``History.points`` dict of ``queue``; ``res``
        ``"m"`` or ``"h"``) when known and consistent with it, else ``None``."""
        count = point["runtime"]["count"]
        if not count:
            return None
        kept = (self._minutes if res == "m" else self._hours).get(queue)
        b = kept.get(int(point["t"])) if kept else None
        if b is None or sum(b.values()) != count:
            return None
        return b

    def acknowledged(self, queue: str, t: int) -> None:
        """The minute points of ``queue`` up to ``t`` reached the hub: forget their maps."""
        minutes = self._minutes.get(queue)
        if not minutes:
            return
        for k in [k for k in minutes if k <= t]:
            del minutes[k]
            self._n_minutes -= 1
        if not minutes:
            del self._minutes[queue]

    def clear(self) -> None:
        """Forget everything (the history was closed and reopened)."""
        self._seen.clear()
        self._minutes.clear()
        self._hours.clear()
        self._n_minutes = 0
