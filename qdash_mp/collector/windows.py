"""Rolling runtime/wait windows (1 min, 5 min, 1 h) from the lifetime bucket counts.

Pure: the collector's tick passes each queue's lifetime bucket counts (from shared memory)
once a second; the difference to the previous tick is counted in that minute of a
``histogram.RollingHistogram``. ``prime`` takes the counts at start as the baseline, so after
a restart the windows start empty (the lifetime, in shared memory, does not); a queue first
seen later counts from zero. Counts that go back (a reset segment) re-baseline silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qdash_mp.histogram import RollingHistogram

__all__ = ["WINDOW_NAMES", "Windows"]

WINDOW_NAMES = ("1m", "5m", "1h")

Buckets = tuple[Sequence[int], Sequence[int]]


class _Pair:
    __slots__ = ("prev", "runtime", "wait")

    def __init__(self, prev: Buckets) -> None:
        self.prev = (list(prev[0]), list(prev[1]))
        self.runtime = RollingHistogram()
        self.wait = RollingHistogram()


def _delta(now: Sequence[int], prev: list[int]) -> dict[int, int] | None:
    """Sparse ``now - prev``; ``None`` if any count went back."""
    out: dict[int, int] = {}
    for i, (a, b) in enumerate(zip(now, prev, strict=True)):
        if a != b:
            if a < b:
                return None
            out[i] = a - b
    return out


class Windows:
    """Per-queue rolling windows of runtime and wait; see the module docstring."""

    def __init__(self) -> None:
        self._q: dict[str, _Pair] = {}

    def prime(self, buckets: Mapping[str, Buckets]) -> None:
        """The counts already there at start: not part of any window."""
        for queue, b in buckets.items():
            self._q[queue] = _Pair(b)

    def update(self, minute: int, buckets: Mapping[str, Buckets]) -> None:
        """Count what each queue's lifetime counts gained since the last call in ``minute``."""
        for queue, (rt, wt) in buckets.items():
            pair = self._q.get(queue)
            if pair is None:
                pair = self._q[queue] = _Pair(([0] * len(rt), [0] * len(wt)))
            for now, prev, hist in (
                (rt, pair.prev[0], pair.runtime),
                (wt, pair.prev[1], pair.wait),
            ):
                if list(now) == prev:
                    continue
                delta = _delta(now, prev)
                if delta:
                    hist.add(minute, delta)
                prev[:] = now

    def summaries(self, queue: str, minute: int) -> dict[str, dict[str, Any]]:
        """``{"1m": {"runtime": {...}, "wait": {...}}, "5m": ..., "1h": ...}`` (empty
        summaries for an unknown queue)."""
        pair = self._q.get(queue)
        if pair is None:
            pair = _Pair(((), ()))
        rt = pair.runtime.summaries(minute)
        wt = pair.wait.summaries(minute)
        return {w: {"runtime": rt[w].as_dict(), "wait": wt[w].as_dict()} for w in WINDOW_NAMES}
