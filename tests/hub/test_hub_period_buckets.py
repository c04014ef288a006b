"""``PeriodBuckets``: which history periods get exact bucket counts, on a real ``History``
(a temp directory, a hand-moved clock): observed every minute -> every minute; minutes that
closed unobserved -> known only when the earlier ones were empty; totals that went back ->
none; hours -> the hour's counts whatever was observed, as long as the sums agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qdash_mp import histogram
from qdash_mp.history import History, QueueTotals
from qdash_mp.hub.period_buckets import PeriodBuckets

T0 = 1_800_000_000 - 1_800_000_000 % 3600


class Clock:
    def __init__(self) -> None:
        self.t = float(T0)

    def __call__(self) -> float:
        return self.t


class Host:
    """A queue's lifetime counts and its history, ticked minute by minute."""

    def __init__(self, tmp: Path) -> None:
        self.clock = Clock()
        self.history = History(tmp, self.clock, durable=False)
        self.values: list[float] = []
        self.periods = PeriodBuckets()
        self.tick()  # opens the first minute

    def tick(self) -> None:
        counts = histogram.bucket_counts(self.values)
        totals = {"q": QueueTotals(0, len(self.values), 0, histogram.dense(counts))}
        self.history.tick(totals, self.clock.t)

    def minute(self, values: list[float], *, observe: bool = True) -> None:
        """``values`` run in the current minute, then the minute closes."""
        self.values += values
        self.tick()
        self.clock.t += 60
        self.tick()
        if observe:
            self.periods.observe(self.history)

    def known(self, res: str = "m") -> dict[int, Any]:
        points = self.history.points("q", "minute" if res == "m" else "hour")
        return {p["t"]: self.periods.buckets_for("q", res, p) for p in points}


def test_observed_minutes_and_the_hour_are_exact(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.periods.observe(h.history)
    batches = [[0.01, 0.02], [], [0.5, 0.5, 3.0]]
    for b in batches:
        h.minute(b)
    want = [histogram.bucket_counts(b) or None for b in batches]
    assert list(h.known().values()) == want
    assert list(h.known("h").values()) == [histogram.bucket_counts(h.values)]
    h.history.close()


def test_unobserved_minutes(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.periods.observe(h.history)
    h.minute([], observe=False)  # empty and unobserved: the next one is still exact
    h.minute([0.1, 0.2])
    assert list(h.known().values()) == [None, histogram.bucket_counts([0.1, 0.2])]
    h.minute([0.3], observe=False)  # non-empty and unobserved: the next one is unknown
    h.minute([0.4])
    assert list(h.known().values())[2:] == [None, None]
    h.minute([0.5])  # observed again: known again
    assert list(h.known().values())[-1] == histogram.bucket_counts([0.5])
    # the hour's counts are the state's: known whatever was observed
    assert list(h.known("h").values()) == [histogram.bucket_counts(h.values)]
    h.history.close()


def test_totals_that_went_back_give_no_buckets(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.minute([0.1, 0.2, 0.3])
    h.values = [0.7]  # the counters were reset: the history counts from zero
    h.minute([])
    assert list(h.known().values())[-1] is None
    h.history.close()


def test_acknowledged_minutes_are_forgotten_and_memory_is_capped(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.periods = PeriodBuckets(max_minutes=2)
    h.periods.observe(h.history)
    for v in (0.1, 0.2, 0.3):
        h.minute([v])
    ts = list(h.known())
    assert [b is not None for b in h.known().values()] == [False, True, True]  # capped
    h.periods.acknowledged("q", ts[1])
    assert [b is not None for b in h.known().values()] == [False, False, True]
    h.history.close()
