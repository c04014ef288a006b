"""The latency bucket scheme: exact edges, measured error, exact merge, percentiles, windows."""

from __future__ import annotations

import bisect
import math
import random
import timeit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdash_mp import histogram as h
from qdash_mp.histogram import (
    HIGHEST,
    LOWEST,
    MAX_RELATIVE_ERROR,
    NBUCKETS,
    OVERFLOW,
    UNDERFLOW,
    LatencySummary,
    RollingHistogram,
    bucket_bounds,
    bucket_of,
    merge,
    representative,
    summary,
)

in_range = st.floats(min_value=LOWEST, max_value=HIGHEST, exclude_max=True)
any_float = st.floats(allow_nan=True, allow_infinity=True)


def exact_percentile(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    rank = max(1, -(-percent * len(ordered) // 100))
    return ordered[rank - 1]


def histogram_of(values: list[float]) -> list[int]:
    counts = [0] * NBUCKETS
    for v in values:
        counts[bucket_of(v)] += 1
    return counts


def test_layout_constants() -> None:
    assert NBUCKETS == 418
    assert OVERFLOW == 417
    assert LOWEST < 100e-6
    assert HIGHEST > 3600.0
    assert pytest.approx(0.02190, abs=1e-5) == MAX_RELATIVE_ERROR
    assert bucket_of(LOWEST) == 1
    assert bucket_of(math.nextafter(HIGHEST, 0.0)) == OVERFLOW - 1
    assert bucket_of(HIGHEST) == OVERFLOW


def test_edges_are_contiguous_and_log_spaced() -> None:
    """Octave edges are exact; inner edges hold to the last few ulps (x**16 amplifies an
    ulp of x sixteen times), which the 1e-13 margins cover."""
    previous_hi = LOWEST
    for i in range(1, OVERFLOW):
        lo, hi = bucket_bounds(i)
        assert lo == previous_hi
        assert hi / lo == pytest.approx(2 ** (1 / 16), rel=1e-14)
        assert bucket_of(lo * (1 + 1e-13)) == i
        assert bucket_of(hi * (1 - 1e-13)) == i
        if (i - 1) % 16 == 0:  # an octave edge: exact both ways
            assert bucket_of(lo) == i
            assert bucket_of(math.nextafter(lo, 0.0)) == i - 1
        previous_hi = hi
    assert previous_hi == HIGHEST
    with pytest.raises(IndexError):
        bucket_bounds(NBUCKETS)


@pytest.mark.parametrize(
    ("value", "bucket"),
    [
        (0.0, UNDERFLOW),
        (-1.0, UNDERFLOW),
        (-1e9, UNDERFLOW),
        (float("nan"), UNDERFLOW),
        (float("-inf"), UNDERFLOW),
        (1e-9, UNDERFLOW),
        (float("inf"), OVERFLOW),
        (1e9, OVERFLOW),
    ],
)
def test_out_of_range_values_never_raise(value: float, bucket: int) -> None:
    assert bucket_of(value) == bucket


def test_measured_relative_error_over_a_dense_sweep() -> None:
    """Every value from 61 us to 4096 s, 2000 per octave: the reported value is within
    MAX_RELATIVE_ERROR (the number docs/lifecycle.md quotes)."""
    worst = 0.0
    x = LOWEST
    step = 2.0 ** (1 / 2000)
    while x < HIGHEST:
        rep = representative(bucket_of(x))
        worst = max(worst, abs(rep - x) / x)
        x *= step
    assert worst <= MAX_RELATIVE_ERROR + 1e-12
    assert worst > MAX_RELATIVE_ERROR * 0.99  # the bound is tight, not loose
    # the 100 us .. 1 h target range is inside the tracked range
    for x in (100e-6, 1e-3, 0.5, 60.0, 3600.0):
        assert abs(representative(bucket_of(x)) - x) / x <= MAX_RELATIVE_ERROR


@given(st.lists(any_float, max_size=200), st.integers(min_value=0, max_value=200))
def test_merge_of_splits_is_the_histogram_of_the_union(values: list[float], cut: int) -> None:
    a, b = values[:cut], values[cut:]
    assert merge(histogram_of(a), h.sparse(histogram_of(b))) == histogram_of(values)
    assert sum(merge(histogram_of(a), histogram_of(b))) == len(values)


@given(st.lists(in_range, min_size=1, max_size=300))
def test_percentiles_within_documented_error(values: list[float]) -> None:
    s = summary(histogram_of(values))
    assert s.count == len(values)
    for pct, name in h.PERCENTILES:
        got = getattr(s, name)
        exact = exact_percentile(values, pct)
        assert abs(got - exact) / exact <= MAX_RELATIVE_ERROR + 1e-12
    assert abs(s.max - max(values)) / max(values) <= MAX_RELATIVE_ERROR + 1e-12


@given(st.lists(any_float, max_size=100))
def test_count_values_is_bucket_of_in_bulk(values: list[float]) -> None:
    counts = [0] * NBUCKETS
    h.count_values(counts, values)
    assert counts == histogram_of(values)


def test_thresholds_are_the_exact_edges_of_bucket_of() -> None:
    """Every float within 2,000 ulps of every edge: bisecting the thresholds gives
    ``bucket_of`` (so bucket_of does not decrease there, and the sorted bulk path agrees
    with it even for values on the irrational edges)."""
    edges = h.thresholds()
    assert len(edges) == NBUCKETS - 1
    assert edges[0] == LOWEST
    assert edges[-1] == HIGHEST
    assert edges == sorted(set(edges))
    for i, t in enumerate(edges, start=1):
        assert bucket_of(t) == i
        assert bucket_of(math.nextafter(t, -math.inf)) == i - 1
        x = t
        for _ in range(1000):
            x = math.nextafter(x, -math.inf)
        for _ in range(2000):
            assert bisect.bisect_right(edges, x) == bucket_of(x), x
            x = math.nextafter(x, math.inf)


EDGE_CASES = [0.0, -0.0, -1.0, -math.inf, math.inf, LOWEST, HIGHEST, 1e-300, 1e300, 5e-324]


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(any_float, in_range, st.sampled_from(EDGE_CASES), st.integers(-5, 5000)),
        min_size=h._BULK,
        max_size=400,
    )
)
def test_the_sorted_bulk_path_is_bucket_of(values: list[float]) -> None:
    """Lists long enough for the sorted path (NaN among them takes the loop): the same
    buckets as ``bucket_of`` one by one, for floats anywhere, edges, 0, negatives, inf."""
    counts = [0] * NBUCKETS
    h.count_values(counts, values)
    assert counts == histogram_of(values)


def test_the_sorted_bulk_path_on_every_edge_and_its_neighbours() -> None:
    values = []
    for t in h.thresholds():
        values += [math.nextafter(t, -math.inf), t, math.nextafter(t, math.inf)]
    values += EDGE_CASES * 3
    random.Random(3).shuffle(values)
    for chunk in (values, values[: h._BULK], [values[0]] * 100):
        counts = [0] * NBUCKETS
        h.count_values(counts, iter(chunk))  # any iterable, not just lists
        assert counts == histogram_of(chunk)


def test_many_random_values_bulk_equals_one_by_one() -> None:
    rng = random.Random(12)
    draws = [rng.lognormvariate(-4.0, 2.0) for _ in range(50_000)]
    draws += [math.exp(rng.uniform(-15, 10)) for _ in range(50_000)]
    draws += [math.nan]  # one NaN: the whole list takes the loop
    for values in (draws[:-1], draws):
        counts = [0] * NBUCKETS
        h.count_values(counts, values)
        assert counts == histogram_of(values)


def test_values_that_are_no_numbers_still_raise_type_error() -> None:
    for values in ([0.1] * 40 + ["slow"], [0.1] * 40 + [None], [0.1] * 40 + [1j], [0.1, None]):
        target = [0] * NBUCKETS
        with pytest.raises(TypeError):
            h.count_values(target, values)
        assert target == [0] * NBUCKETS  # all or nothing
        with pytest.raises(TypeError):
            h.bucket_counts(values)
    assert h.bucket_counts([]) == {}
    assert h.bucket_counts([0.1, 0.1, -1.0]) == {bucket_of(0.1): 2, UNDERFLOW: 1}


@pytest.mark.parametrize(
    "draw",
    [
        lambda r: r.lognormvariate(math.log(0.05), 1.5),
        lambda r: r.expovariate(1 / 0.2),
        lambda r: r.uniform(0.0001, 3600.0),
        lambda r: 10 ** r.uniform(-4, math.log10(3600)),
        lambda r: r.choice([0.001, 0.001, 0.001, 2.5]),  # bimodal, heavy ties
    ],
)
def test_percentiles_of_random_distributions(draw: object) -> None:
    rng = random.Random(9)
    for n in (1, 7, 100, 5000):
        values = [min(max(draw(rng), LOWEST), 4000.0) for _ in range(n)]  # type: ignore[operator]
        s = summary(histogram_of(values))
        for pct, name in h.PERCENTILES:
            exact = exact_percentile(values, pct)
            assert abs(getattr(s, name) - exact) / exact <= MAX_RELATIVE_ERROR + 1e-12


def test_summary_of_nothing_and_max_clipping() -> None:
    assert summary([0] * NBUCKETS) == LatencySummary(0)
    assert summary({}).as_dict() == {
        "count": 0,
        "p50": None,
        "p90": None,
        "p95": None,
        "p99": None,
        "max": None,
    }
    s = summary({bucket_of(1.0): 3}, max_seen=1.0)
    assert s.max == 1.0
    assert s.p50 == s.p99 == 1.0  # the bucket's midpoint (1.015) is clipped to the max
    assert summary({UNDERFLOW: 1, OVERFLOW: 1}).p50 == LOWEST
    assert summary({UNDERFLOW: 1, OVERFLOW: 1}).max == HIGHEST


def test_percentile_ranks_are_integer_exact() -> None:
    # 0.9 * 10 == 9.000000000000002 in floats: a float ceil would pick rank 10
    values = [float(i) for i in range(1, 11)]
    s = summary(histogram_of(values))
    assert s.p90 == representative(bucket_of(9.0))
    assert h.percentile(histogram_of(values), 90) == s.p90
    assert h.percentile({}, 50) is None


def test_rolling_windows() -> None:
    r = RollingHistogram()
    b = bucket_of(0.01)
    for minute in range(1000, 1100):  # one value a minute for 100 minutes
        r.add(minute, {b: 1})
    now = 1099
    assert sum(r.window(now, 1)) == 2  # the current minute and the previous one
    assert sum(r.window(now, 5)) == 6
    # the current 5-minute block (1095..1099) and the 12 before it: 1035..1099
    assert sum(r.window(now, 60)) == 65
    assert sum(r.window(now, 10)) == 15
    sums = r.summaries(now)
    assert sums["lifetime"].count == 100
    assert sums["1h"].count == 65
    assert sums["1m"].p50 == representative(b)
    # an idle hour later every window is empty, the lifetime is not
    later = r.summaries(now + 120)
    assert later["1m"].count == later["5m"].count == later["1h"].count == 0
    assert later["lifetime"].count == 100
    # a late delta older than the ring counts for the lifetime only
    r.add(now - 200, {b: 5})
    assert r.summaries(now)["lifetime"].count == 105
    assert r.summaries(now)["1h"].count == 65
    for bad in (0, 7, 61, 65):
        with pytest.raises(ValueError, match="no window"):
            r.window(now, bad)


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 200), in_range), max_size=100))
def test_rolling_lifetime_equals_merge(events: list[tuple[int, float]]) -> None:
    r = RollingHistogram()
    for minute, v in events:
        r.add(minute, {bucket_of(v): 1})
    assert r.lifetime == histogram_of([v for _, v in events])
    if events:
        now = max(m for m, _ in events)
        hour = [v for m, v in events if (now // 5 - 12) * 5 <= m <= now]
        assert r.window(now, 60) == histogram_of(hour)
        five = [v for m, v in events if now - 5 <= m <= now]
        assert r.window(now, 5) == histogram_of(five)


def test_bucket_of_cost_is_reported() -> None:
    """Not a pass/fail benchmark (2 shared cores): prints bucket_of's cost next to a dict
    increment so the number in docs/lifecycle.md can be re-measured with ``-s``."""
    setup = "from qdash_mp.histogram import bucket_of; d = {'q': 0}; c = [0] * 418; x = 0.0123"
    n = 200_000
    base = min(timeit.repeat("d['q'] += 1", setup, number=n, repeat=3)) / n
    call = min(timeit.repeat("bucket_of(x)", setup, number=n, repeat=3)) / n
    print(f"dict increment {base * 1e9:.1f} ns, bucket_of {call * 1e9:.1f} ns")
    assert call < 5e-6


@given(st.lists(any_float, max_size=100))
def test_prometheus_buckets_at_octave_edges(values: list[float]) -> None:
    rows = h.cumulative_at_octaves(histogram_of(values))
    assert len(rows) == 28
    assert rows[0][0] == LOWEST
    assert rows[-2][0] == HIGHEST
    assert rows[-1] == (math.inf, len(values))
    for le, below in rows[:-1]:
        assert below == sum(1 for v in values if not v >= le)  # NaN counts as underflow
