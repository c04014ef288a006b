"""The journal's filter columns agree with a brute-force filter of its records, through
appends, supersedes, removals, flushes, squeezes (maybe_rebuild), compaction and reopening;
snapshots bound what a query and ``snapshot_ids`` see; ``flush_if_unchanged`` refuses once a
failure arrived after the snapshot."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from qdash_mp.failed_filter import FailedFilter, FilterError, parse_filter
from qdash_mp.journal import Journal
from qdash_mp.models import FailedJob, Job
from tests.qdash_testing.journal import T0, Clock

QUEUES = ["mail", "billing", "reports"]
NAMES = ["send", "charge", "render"]
ERRORS = [
    "ValueError: Bad Input",
    "TimeoutError: gateway timeout",
    "KeyError: 'user'",
    "Ünïcode FEHLER",
]


def job(i: int, rng: random.Random, at: float) -> FailedJob:
    jid = f"j{rng.randrange(300)}"  # ids repeat: later failures supersede
    return FailedJob(
        id=jid,
        queue=rng.choice(QUEUES),
        job=Job(id=jid, name=rng.choice(NAMES), payload={"i": i}, attempts=1),
        error=f"{rng.choice(ERRORS)} #{i}",
        failed_at=datetime.fromtimestamp(at, UTC),
    )


def brute(live: dict[str, FailedJob], order: list[str], f: FailedFilter) -> list[str]:
    return [
        id
        for id in reversed(order)
        if id in live
        and f.matches(
            live[id].queue, live[id].job.name, live[id].error, live[id].failed_at.timestamp()
        )
    ]


FILTERS = [
    FailedFilter(),
    FailedFilter(queue="mail"),
    FailedFilter(name="charge"),
    FailedFilter(queue="billing", name="render"),
    FailedFilter(q="timeout"),
    FailedFilter(q="BAD INPUT"),
    FailedFilter(q="ünïcode fehler"),
    FailedFilter(q="#1"),
    FailedFilter(queue="reports", q="error"),
    FailedFilter(after=T0 + 100),
    FailedFilter(before=T0 + 200, q="e"),
    FailedFilter(queue="mail", name="send", q="key", after=T0 + 50, before=T0 + 400),
    FailedFilter(queue="nope"),
    FailedFilter(q="1valueerror"),  # would straddle two slots' texts: no match
    FailedFilter(q="0tim"),
]


def check(j: Journal, live: dict[str, FailedJob], order: list[str]) -> None:
    for f in FILTERS:
        want = brute(live, order, f)
        for offset in (0, 3):
            rows, total, _hw = j.query(f, offset, 7)
            assert total == len(want), f
            assert [r.id for r in rows] == want[offset : offset + 7], f
        # twice: the second total comes from the memo, brought up to date
        assert j.query(f, 0, 1)[1] == len(want)


@pytest.mark.parametrize(("squeeze", "lazy"), [(False, True), (True, True), (False, False)])
def test_filters_match_brute_force_through_every_change(
    jdir: Path, squeeze: bool, lazy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if squeeze:  # the index squeezes its dead slots out at every commit: columns renumber
        monkeypatch.setattr("qdash_mp.journal.index._REBUILD_MIN", 0)
    if not lazy:  # every page cut from the full match list (the deep-page path)
        monkeypatch.setattr("qdash_mp.journal.matching._LAZY_MAX", 0)
    rng = random.Random(7)
    j = Journal.open(jdir, clock=Clock(T0 + 1000))
    live: dict[str, FailedJob] = {}
    order: list[str] = []  # ids by their current record's append order
    try:
        for step in range(1, 9):
            for i in range(200):
                f = job(step * 1000 + i, rng, T0 + rng.uniform(0, 500))
                j.stage_failed(f)
                live[f.id] = f
                if f.id in order:
                    order.remove(f.id)
                order.append(f.id)
            for id in rng.sample(sorted(live), 30):
                j.stage_removed(id, "forgotten")
                del live[id]
            j.commit()
            check(j, live, order)
            if step == 3:
                j.compact()
                check(j, live, order)
            if step == 5:
                j.stage_flush()
                j.commit()
                live.clear()
                check(j, live, order)
        j._index.maybe_rebuild()
        check(j, live, order)
    finally:
        j.close()
    j = Journal.open(jdir, clock=Clock(T0 + 1000))  # recovery rebuilds the columns
    try:
        check(j, live, order)
    finally:
        j.close()


def test_snapshot_bounds_queries_and_ids(jdir: Path) -> None:
    j = Journal.open(jdir, clock=Clock(T0 + 1000))
    try:
        for i in range(10):
            j.stage_failed(
                replace(job(i, random.Random(i), T0), id=f"a{i}", job=Job(id=f"a{i}", name="send"))
            )
        j.commit()
        hw = j.high_water
        assert j.query(FailedFilter(), 0, 50)[1] == 10
        # later failures: a new job, and a job of the snapshot failing again
        j.stage_failed(
            replace(job(99, random.Random(1), T0), id="late", job=Job(id="late", name="send"))
        )
        j.stage_failed(
            replace(job(98, random.Random(2), T0), id="a3", job=Job(id="a3", name="send"))
        )
        j.commit()
        rows, total, _ = j.query(FailedFilter(), 0, 50, snapshot=hw)
        assert total == 9
        assert "late" not in {r.id for r in rows}
        assert "a3" not in {r.id for r in rows}
        assert sorted(j.snapshot_ids(FailedFilter(name="send"), hw)) == sorted(
            f"a{i}" for i in range(10) if i != 3
        )
        assert j.query(FailedFilter(), 0, 50, since=hw)[1] == 2
        assert not j.flush_if_unchanged(hw)  # failures arrived since: refuse the O(1) flush
        assert j.flush_if_unchanged(j.high_water)
        j.commit()
        assert len(j) == 0
    finally:
        j.close()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"after": "yesterday"}, "after must be Unix seconds or an ISO 8601 time"),
        ({"before": "nan"}, "before is out of range"),
        ({"after": "200", "before": "100"}, "after must be earlier than before"),
        ({"q": "x" * 201}, "q is longer than 200 characters"),
        ({"queue": "q" * 256}, "queue is longer than 255 characters"),
    ],
)
def test_invalid_filters_say_why(query: dict[str, str], message: str) -> None:
    with pytest.raises(FilterError, match=message):
        parse_filter(query)


def test_filter_round_trips_through_the_url() -> None:
    f = parse_filter(
        {"queue": "mail", "q": "Boom", "after": "2026-12-02T06:00:00Z", "before": "1800000000.5"}
    )
    assert f.after == datetime(2026, 12, 2, 6, tzinfo=UTC).timestamp()
    assert parse_filter(f.to_query()) == f
    assert parse_filter({"queue": "", "q": "  "}) == FailedFilter()


def test_a_match_hidden_behind_a_straddling_one_is_found() -> None:
    from qdash_mp.journal.columns import Columns

    cols = Columns()
    cols.append(0, [1.0, 2.0, 3.0], [("q", "n", "xa"), ("q", "n", "aab"), ("q", "n", "b")])
    alive = bytearray(b"\x01\x01\x01")
    sel = cols.select(FailedFilter(q="aa"), alive, 3, 0, 10)
    assert (sel.slots, sel.total) == ([1], 1)
    assert cols._all_matches(FailedFilter(q="aa"), (None, None), alive, 0, 3) == [1]
    assert cols._all_matches(FailedFilter(q="ab"), (None, None), alive, 0, 3) == [1]
    assert cols._all_matches(FailedFilter(q="bb"), (None, None), alive, 0, 3) == []


def test_time_range_blocks_skip_take_and_check() -> None:
    """failed_at growing with the slots (blocks wholly outside, inside, straddling), a few
    out of order, some dead: the block-pruned walk equals a slot-by-slot check."""
    from qdash_mp.journal.columns import Columns

    rng = random.Random(3)
    n = 5000
    fats = [float(i) if rng.random() > 0.01 else rng.uniform(0, n) for i in range(n)]
    cols = Columns()
    for start in range(0, n, 700):  # batches across block boundaries
        part = fats[start : start + 700]
        cols.append(start, part, [("q", "n", "e")] * len(part))
    alive = bytearray(int(rng.random() > 0.2) for _ in range(n))
    for f in (
        FailedFilter(after=2500.5),
        FailedFilter(before=1200),
        FailedFilter(after=1000, before=4100.5),
        FailedFilter(after=n + 1),
    ):
        want = [p for p in range(n) if alive[p] and f.matches("q", "n", "e", fats[p])]
        assert cols._all_matches(f, (None, None), alive, 0, n) == want
        assert cols._all_matches(f, (None, None), alive, 1500, 3333) == [
            p for p in want if 1500 <= p < 3333
        ]
