"""Latency histograms: the bucket scheme for runtimes and wait times, summaries, rolling windows.

Pure logic, no I/O. A histogram is a list (or a sparse mapping) of plain int counts, one per
bucket, so it merges *exactly* by summing: across processes, across batches, across minutes.
That is what lets bucket counts travel like today's counters (cumulative, resent, deduplicated
by the batch sequence number) and survive a collector ``kill -9`` unchanged.

Bucket scheme (log-spaced, 16 buckets per power of two)
-------------------------------------------------------

Bucket ``k`` of the tracked range holds ``[2**(k/16), 2**((k+1)/16))``: every bucket is
``2**(1/16)`` = 1.0443 times wider than the one before, so the relative error is the same
everywhere. The index costs one float power and one ``frexp``: ``x**16`` lies in
``[2**k, 2**(k+1))``, whose binary exponent ``frexp`` returns as ``k + 1``. The tracked range is
2**-14 s (61.04 us) .. 2**12 s (4096 s), 26 octaves, which covers the target 100 us .. 1 hour::

    index   range (seconds)                          meaning
    0       x < 2**-14  (also 0, negatives, NaN)      underflow
    1       [2**(-224/16), 2**(-223/16))              first tracked bucket (61.04 us ..)
    i       [2**((i-225)/16), 2**((i-224)/16))        16 buckets per octave
    416     [2**(191/16), 2**12)                      last tracked bucket (.. 4096 s)
    417     x >= 2**12  (also +inf)                   overflow

    bucket_of(x) = frexp(x ** 16)[1] + 224            for 2**-14 <= x < 2**12

(``x**16`` stays far inside the float range there: 2**-224 .. 2**192.) Octave edges are
exact; the 15 edges inside an octave are irrational, so a value within one ulp of such an
edge may fall on either side depending on the platform's ``pow`` -- which moves nothing
that matters: counts stay exact sums, and the error bound below holds to 1e-15.

Why not HDR's log-linear sub-buckets (``frexp(x)`` and ``int(m * 32)``, exact dyadic edges)?
Measured in the same loop, the extra ``int()`` call made it ~1.7x slower per value, and its
worst bucket (17/16 wide) gives 3.08 % error against 2.19 % here.

Relative error. A value is reported as its bucket's geometric midpoint ``sqrt(lo * hi)``,
off by at most ``2**(1/32) - 1 = 2.190 %`` from any value in the bucket, in either direction
(``MAX_RELATIVE_ERROR``); ``tests/test_histogram.py`` measures it over a dense sweep of the
whole range. Underflow is reported as 2**-14 s and overflow as 2**12 s (bounds, not
estimates); outside the tracked range no error bound holds.

Percentiles use the nearest-rank definition: ``p``-th percentile of ``n`` values = the value
of rank ``ceil(p * n)`` in sorted order (computed in integers, no float rounding). The bucket
holding that rank is exactly the bucket of the exact percentile, so a reported percentile is
within ``MAX_RELATIVE_ERROR`` of the exact one.

Cost. ``bucket_of`` is a float power, one C call (``frexp``) and an add; ``count_values``
buckets a batch of raw runtimes (the client's sender thread, off the hook): a few values in
one loop, many by sorting them and bisecting against ``thresholds()``, the exact float edges
of ``bucket_of`` (same buckets, no power per value). The
measured costs and the proposed hot path are in ``docs/lifecycle.md``.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, MutableSequence, Sequence
from math import frexp
from typing import Final

from qdash_mp.models import EMPTY_SUMMARY, LatencySummary

__all__ = [
    "EMPTY",
    "WINDOWS",
    "HIGHEST",
    "LOWEST",
    "MAX_RELATIVE_ERROR",
    "NBUCKETS",
    "OVERFLOW",
    "PERCENTILES",
    "SUB_BUCKETS",
    "UNDERFLOW",
    "LatencySummary",
    "RollingHistogram",
    "add_into",
    "bucket_bounds",
    "bucket_counts",
    "bucket_of",
    "count_values",
    "cumulative_at_octaves",
    "dense",
    "merge",
    "percentile",
    "representative",
    "sparse",
    "summary",
    "thresholds",
]

SUB_BUCKETS: Final = 16
"""Linear sub-buckets per power of two."""
_LOW_EXP: Final = -14
_HIGH_EXP: Final = 12
LOWEST: Final = 2.0**_LOW_EXP
"""Smallest tracked value, 61.03515625 us; below it is the underflow bucket."""
HIGHEST: Final = 2.0**_HIGH_EXP
"""First untracked value, 4096 s; from it on is the overflow bucket."""
UNDERFLOW: Final = 0
OVERFLOW: Final = (_HIGH_EXP - _LOW_EXP) * SUB_BUCKETS + 1
"""Index of the overflow bucket (417)."""
NBUCKETS: Final = OVERFLOW + 1
"""Buckets in a histogram, underflow and overflow included (418)."""
MAX_RELATIVE_ERROR: Final = 2.0 ** (1 / (2 * SUB_BUCKETS)) - 1.0
"""Largest relative error of a reported value inside the tracked range (0.02190)."""

# frexp(x**16) of x in [2**(k/16), 2**((k+1)/16)) has exponent k + 1; the first tracked
# bucket has k = -224 and index 1.
_OFFSET: Final = -_LOW_EXP * SUB_BUCKETS  # 224

PERCENTILES: Final = ((50, "p50"), (90, "p90"), (95, "p95"), (99, "p99"))
"""Reported percentiles as (percent, field name); integer percents keep ranks exact."""


def bucket_of(seconds: float) -> int:
    """Index of the bucket holding ``seconds`` (never raises, for any float)."""
    if LOWEST <= seconds < HIGHEST:
        return frexp(seconds**16)[1] + _OFFSET
    # NaN fails both comparisons and lands in underflow with 0 and the negatives.
    return OVERFLOW if seconds >= HIGHEST else UNDERFLOW


def bucket_bounds(index: int) -> tuple[float, float]:
    """Exact ``[lo, hi)`` of bucket ``index``; underflow is ``[-inf, LOWEST)``, overflow
    ``[HIGHEST, inf)``."""
    if index == UNDERFLOW:
        return (-math.inf, LOWEST)
    if index == OVERFLOW:
        return (HIGHEST, math.inf)
    if not 0 < index < OVERFLOW:
        raise IndexError(f"bucket index {index} out of range 0..{OVERFLOW}")
    k = index - 1 - _OFFSET
    return (_edge(k), _edge(k + 1))


def _edge(k: int) -> float:
    """``2**(k/16)``, exact when ``k`` is a multiple of 16 (an octave edge)."""
    octave, sub = divmod(k, SUB_BUCKETS)
    return math.ldexp(2.0 ** (sub / SUB_BUCKETS), octave)


def representative(index: int) -> float:
    """The value reported for bucket ``index``: its geometric midpoint (bounds at the ends)."""
    if index == UNDERFLOW:
        return LOWEST
    if index == OVERFLOW:
        return HIGHEST
    lo, hi = bucket_bounds(index)
    return math.sqrt(lo * hi)


Counts = Sequence[int] | Mapping[int, int]
"""A histogram: dense (a sequence of ``NBUCKETS`` counts) or sparse (bucket -> count)."""


def _items(counts: Counts) -> Iterable[tuple[int, int]]:
    if isinstance(counts, Mapping):
        return sorted((i, n) for i, n in counts.items() if n)
    return ((i, n) for i, n in enumerate(counts) if n)


def dense(counts: Counts) -> list[int]:
    """A dense copy (``NBUCKETS`` ints) of any histogram."""
    out = [0] * NBUCKETS
    add_into(out, counts)
    return out


def sparse(counts: Counts) -> dict[int, int]:
    """A sparse copy (non-zero buckets only) of any histogram."""
    return dict(_items(counts))


def add_into(target: MutableSequence[int], delta: Counts) -> None:
    """Add ``delta`` to the dense histogram ``target`` in place (exact: int sums)."""
    items = delta.items() if isinstance(delta, Mapping) else enumerate(delta)
    for i, n in items:
        if n:
            target[i] += n


def merge(*histograms: Counts) -> list[int]:
    """The sum of ``histograms``: exactly the histogram of the union of their values."""
    out = [0] * NBUCKETS
    for h in histograms:
        add_into(out, h)
    return out


EMPTY: Final = EMPTY_SUMMARY
"""No values (``qdash_mp.models.EMPTY_SUMMARY``)."""


_BULK: Final = 32
"""From this many values on, ``count_values`` sorts and bisects instead of looping."""

_SLICE: Final = 4096
"""Values sorted at a time by ``count_values``."""

_thresholds: list[float] = []
"""``_thresholds[i - 1]``: the least float whose ``bucket_of`` is at least ``i`` (1..417)."""


def thresholds() -> list[float]:
    """For every bucket ``i`` from 1 on, the least float ``x`` with ``bucket_of(x) >= i``.

    Found from ``bucket_of`` itself (its approximate lower edge, then ulp by ulp), so the
    platform's ``pow`` decides the edges here exactly as in ``bucket_of``: for every float
    ``x``, ``bisect_right(thresholds(), x) == bucket_of(x)`` (NaN aside), given that
    ``bucket_of`` never decreases -- which ``tests/test_histogram.py`` checks ulp by ulp
    around every edge. Computed once, on first use (~0.5 ms).
    """
    if not _thresholds:
        out = []
        for i in range(1, NBUCKETS):
            x = LOWEST if i == 1 else HIGHEST if i == OVERFLOW else _edge(i - 1 - _OFFSET)
            while bucket_of(x) < i:
                x = math.nextafter(x, math.inf)
            while bucket_of(math.nextafter(x, -math.inf)) >= i:
                x = math.nextafter(x, -math.inf)
            out.append(x)
        _thresholds[:] = out  # one C call: a racing thread sees it empty or whole
    return _thresholds


def count_values(target: MutableSequence[int], values: Iterable[float]) -> None:
    """Add each of ``values`` (seconds) to the dense histogram ``target``: the bulk form of
    ``target[bucket_of(x)] += 1`` without a call per value.

    All or nothing: a value that is no number raises ``TypeError`` before ``target`` is
    touched. The buckets come from ``bucket_counts``.
    """
    for i, n in bucket_counts(values).items():
        target[i] += n


def bucket_counts(values: Iterable[float]) -> dict[int, int]:
    """bucket -> how many of ``values`` (seconds) it holds, for the buckets that hold any.

    Many values are sorted, 4,096 at a time (a C sort of cache-resident slices, cheap float
    compares), and each occupied bucket's run is found by bisecting against
    ``thresholds()``: ~0.5-0.8x the cost a value of a ``bucket_of`` loop for distinct
    runtimes, far less when values repeat (``benchmarks/README.md``). A few values, NaN
    among them, or anything that cannot be summed or ordered take the loop (which raises
    ``TypeError`` for a value that is no number).
    """
    vals = values if isinstance(values, list) else list(values)
    out: dict[int, int] = {}
    if len(vals) >= _BULK:
        try:
            total = sum(vals)  # NaN anywhere (NaN would break the sort's order) -> NaN
            bulk = not math.isnan(total)
            if bulk:
                # Slices that stay in the CPU caches sort much faster a value.
                runs: list[tuple[int, int]] = []
                for start in range(0, len(vals), _SLICE):
                    _runs(runs, sorted(vals[start : start + _SLICE]))
        except (TypeError, ValueError, OverflowError):
            bulk = False
        if bulk:
            for i, n in runs:
                out[i] = out.get(i, 0) + n
            return out
    lo, hi, off = LOWEST, HIGHEST, _OFFSET
    for x in vals:
        i = frexp(x**16)[1] + off if lo <= x < hi else OVERFLOW if x >= hi else UNDERFLOW
        out[i] = out.get(i, 0) + 1
    return out


def _runs(out: list[tuple[int, int]], ordered: list[float]) -> None:
    """Append ``(bucket, count)`` for each occupied bucket of the sorted ``ordered``."""
    edges = thresholds()
    n = len(ordered)
    last = len(edges)  # OVERFLOW
    start = 0
    while start < n:
        i = bisect_right(edges, ordered[start])  # the bucket of the smallest value left
        if i == last:
            out.append((OVERFLOW, n - start))
            return
        end = bisect_left(ordered, edges[i], start)  # the first value of a higher bucket
        out.append((i, end - start))
        start = end


def percentile(counts: Counts, percent: int) -> float | None:
    """Nearest-rank ``percent``-th percentile (an int 1..100) of a histogram, or None."""
    items = list(_items(counts))
    total = sum(n for _, n in items)
    if not total:
        return None
    rank = max(1, -(-percent * total // 100))
    seen = 0
    for i, n in items:
        seen += n
        if seen >= rank:
            return representative(i)
    raise AssertionError("unreachable: rank <= total")  # pragma: no cover


def summary(counts: Counts, max_seen: float | None = None) -> LatencySummary:
    """Count, p50/p90/p95/p99 and max of a histogram.

    ``max`` is ``max_seen`` when the caller tracked the exact maximum, else the highest
    non-empty bucket's representative; percentiles never exceed ``max``.
    """
    items = list(_items(counts))
    total = sum(n for _, n in items)
    if not total:
        return EMPTY
    top = representative(items[-1][0]) if max_seen is None else max_seen
    ranks = [(max(1, -(-pct * total // 100)), name) for pct, name in PERCENTILES]
    found: dict[str, float] = {}
    seen = 0
    k = 0
    for i, n in items:
        seen += n
        while k < len(ranks) and seen >= ranks[k][0]:
            found[ranks[k][1]] = min(representative(i), top)
            k += 1
        if k == len(ranks):
            break
    return LatencySummary(
        count=total,
        p50=found["p50"],
        p90=found["p90"],
        p95=found["p95"],
        p99=found["p99"],
        max=top,
    )


def cumulative_at_octaves(counts: Counts) -> list[tuple[float, int]]:
    """``(le, values below le)`` at every octave edge 2**-14 .. 2**12, then ``(inf, total)``:
    a Prometheus histogram's buckets (27 + 1), exact sums of ours. Prometheus counts values
    *equal* to ``le`` too; here a value exactly on an octave edge counts in the next one."""
    out: list[tuple[float, int]] = []
    d = dense(counts)
    running = d[UNDERFLOW]
    for octave in range(_HIGH_EXP - _LOW_EXP + 1):
        out.append((math.ldexp(1.0, _LOW_EXP + octave), running))
        start = 1 + octave * SUB_BUCKETS
        running += sum(d[start : start + SUB_BUCKETS])
    out.append((math.inf, running))
    return out


WINDOWS: Final = (("1m", 1), ("5m", 5), ("1h", 60))
"""Rolling windows as (name, minutes)."""


class _Ring:
    """Dense counts for the last ``size`` periods; a period's array exists once it has data."""

    __slots__ = ("_keys", "_slots")

    def __init__(self, size: int) -> None:
        self._keys = [-1] * size
        self._slots: list[array[int] | None] = [None] * size

    def add(self, key: int, delta: Counts) -> None:
        size = len(self._keys)
        if key <= max(self._keys) - size:
            return  # older than anything the ring still holds
        k = key % size
        slot = self._slots[k]
        if self._keys[k] != key or slot is None:
            self._keys[k] = key
            slot = self._slots[k] = array("Q", bytes(8 * NBUCKETS))
        add_into(slot, delta)

    def sum(self, first: int, last: int) -> list[int]:
        out = [0] * NBUCKETS
        for key, slot in zip(self._keys, self._slots, strict=True):
            if slot is not None and first <= key <= last:
                add_into(out, slot)
        return out


class RollingHistogram:
    """Rolling 1 min / 5 min / 1 h windows and the lifetime, from per-minute bucket deltas.

    Minutes are ``int(unix_seconds // 60)``. Two rings of dense counts: 6 one-minute slots
    and 13 five-minute blocks. At minute ``now``:

    * the ``n``-minute window (``n`` <= 5) is minutes ``now - n .. now``: the ``n`` complete
      minutes before ``now`` and the current, partial one (so the 1-minute window is never
      empty just after a minute boundary); it spans ``n`` to ``n + 1`` minutes;
    * the 1-hour window is the current five-minute block and the 12 before it: 60 to 65
      minutes (a window of ``k * 5`` minutes, ``k`` <= 12, likewise).

    A delta older than a ring counts for the lifetime (and the other ring) only. Memory: the
    lifetime (3.3 KiB) plus 3.3 KiB per ring slot that holds data: idle 3.3 KiB, busy at
    most 19 slots, ~66 KiB whatever the distribution (sparse per-minute dicts measured
    ~600 KiB for a wide lognormal at 20,000 jobs a minute).
    """

    FINE: Final = 6
    BLOCK: Final = 5
    COARSE: Final = 13

    __slots__ = ("_blocks", "_lifetime", "_minutes")

    def __init__(self, lifetime: Counts | None = None) -> None:
        self._lifetime = array("Q", bytes(8 * NBUCKETS))
        if lifetime is not None:
            add_into(self._lifetime, lifetime)
        self._minutes = _Ring(self.FINE)
        self._blocks = _Ring(self.COARSE)

    @property
    def lifetime(self) -> list[int]:
        """A copy of the lifetime counts (dense)."""
        return list(self._lifetime)

    def add(self, minute: int, delta: Counts) -> None:
        """Count ``delta`` (bucket counts) as having happened in ``minute``."""
        add_into(self._lifetime, delta)
        self._minutes.add(minute, delta)
        self._blocks.add(minute // self.BLOCK, delta)

    def window(self, now_minute: int, minutes: int) -> list[int]:
        """Dense counts of the ``minutes`` window at ``now_minute`` (see the class doc)."""
        if 0 < minutes < self.FINE:
            return self._minutes.sum(now_minute - minutes, now_minute)
        blocks, rest = divmod(minutes, self.BLOCK)
        if rest or not 0 < blocks < self.COARSE:
            raise ValueError(f"no window of {minutes} minutes: 1..5 or 5-minute steps to 60")
        now_block = now_minute // self.BLOCK
        return self._blocks.sum(now_block - blocks, now_block)

    def summaries(self, now_minute: int) -> dict[str, LatencySummary]:
        """``{"1m", "5m", "1h", "lifetime"}`` -> summary at ``now_minute``."""
        out = {name: summary(self.window(now_minute, n)) for name, n in WINDOWS}
        out["lifetime"] = summary(self._lifetime)
        return out
