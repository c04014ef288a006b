"""Per-queue history files: points per minute/hour, restarts, kill -9, bounded size, damage."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdash_mp import history_format as fmt
from qdash_mp.errors import HistoryCorrupt, HistoryError, QdashError
from qdash_mp.histogram import MAX_RELATIVE_ERROR, bucket_of, representative
from qdash_mp.history import History, QueueTotals

T0 = 1_764_633_600  # 2025-12-02 00:00 UTC, an hour boundary
B1, B2 = bucket_of(0.01), bucket_of(0.5)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def totals(i: int) -> QueueTotals:
    """Cumulative totals after ``i`` minutes of 7 pushed, 5 processed, 1 failed a minute
    and 3 runtimes (one of ~10 ms, two of ~0.5 s)."""
    return QueueTotals(7 * i, 5 * i, i, {B1: i, B2: 2 * i})


def run_minutes(h: History, clock: Clock, first: int, last: int, queue: str = "q") -> None:
    """Tick once at the start of each minute ``first..last`` with ``totals(minute)``."""
    for i in range(first, last + 1):
        clock.now = T0 + i * 60
        h.tick({queue: totals(i)})


def sums(points: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    return (
        sum(p["pushed"] for p in points),
        sum(p["processed"] for p in points),
        sum(p["failed"] for p in points),
        sum(p["runtime"]["count"] for p in points),
    )


# -- the documented layout --------------------------------------------------------------


def test_docstring_hex_dump_is_the_encoder_output() -> None:
    doc = fmt.__doc__ or ""
    start = doc.index("For example the minute")
    rows = re.findall(
        r"^    ((?:[0-9a-f]{2} ){7}[0-9a-f]{2})  ((?:[0-9a-f]{2} ?){8})", doc[start:], re.M
    )
    dump = bytes.fromhex("".join(a + b for a, b in rows[:4]))
    p = fmt.Point(T0, 120, 118, 2, 118, 0.05, 0.2, 0.4, 1.5, 2.0)
    assert fmt.pack_slot(p) == dump
    assert fmt.unpack_slot(dump, "doc") == fmt.Point(*fmt._SLOT.unpack(dump[:60]))


def test_docstring_offsets_are_the_constants() -> None:
    doc = fmt.__doc__ or ""
    table = {
        "header": 0,
        "queue name": 64,
        "state copy A": fmt.STATE_A,
        "state copy B": fmt.STATE_B,
        "minute ring": fmt.MINUTE_RING,
        "hour ring": fmt.HOUR_RING,
    }
    for name, offset in table.items():
        assert re.search(rf"^    {offset}\s+\d+\s+{name}", doc, re.M), name
    assert f"{fmt.FILE_SIZE:,}" in doc
    assert fmt.HOUR_RING + fmt.HOUR_SLOTS * fmt.SLOT_SIZE == fmt.FILE_SIZE
    state = fmt.State(seq=3, hour_t=T0, hour=[1, 2, 3], base=[4, 5, 6])
    state.hour_counts[B1] = 9
    raw = fmt.pack_state(state)
    assert len(raw) == fmt.STATE_SIZE == 6848
    assert raw[128 + 8 * B1 : 136 + 8 * B1] == (9).to_bytes(8, "little")
    assert fmt.unpack_state(raw, "x") == state
    assert issubclass(HistoryCorrupt, QdashError)


# -- points ------------------------------------------------------------------------------


def test_points_appear_per_minute(tmp_path: Path) -> None:
    clock = Clock()
    with History(tmp_path, clock) as h:
        assert h.points("q") == []
        run_minutes(h, clock, 0, 3)
        points = h.points("q")
        assert [p["t"] for p in points] == [T0, T0 + 60, T0 + 120]
        for p in points:
            assert (p["pushed"], p["processed"], p["failed"]) == (7, 5, 1)
            rt = p["runtime"]
            assert rt["count"] == 3
            assert rt["p50"] == pytest.approx(representative(B2), rel=1e-6)
            assert rt["max"] == pytest.approx(0.5, rel=MAX_RELATIVE_ERROR + 1e-6)
        # the hour resolution shows the hour in progress
        (hour,) = h.points("q", "hour")
        assert hour["t"] == T0
        assert sums([hour]) == (21, 15, 3, 9)
        # a tick within the same minute closes nothing
        assert h.tick({"q": totals(4)}) == 0
        assert h.queues() == ["q"]
        with pytest.raises(ValueError, match="resolution"):
            h.points("q", "day")  # type: ignore[arg-type]


def test_idle_minutes_are_zero_points_and_empty_runtime_is_none(tmp_path: Path) -> None:
    clock = Clock()
    with History(tmp_path, clock) as h:
        run_minutes(h, clock, 0, 1)
        clock.now += 60
        h.tick({"q": totals(1)})  # nothing new
        last = h.points("q")[-1]
        assert (last["pushed"], last["processed"], last["failed"]) == (0, 0, 0)
        assert last["runtime"] == {
            "count": 0,
            "p50": None,
            "p90": None,
            "p95": None,
            "p99": None,
            "max": None,
        }


def test_record_deltas_and_clock_stepping_back(tmp_path: Path) -> None:
    clock = Clock(T0 + 3600)
    with History(tmp_path, clock) as h:
        h.record("r", T0 + 61, 3, 2, 1, {B1: 2})
        h.record("r", T0 + 120, 1, 1, 0, [0] * 418)
        h.record("r", T0, 5, 5, 0)  # earlier than the last minute: credited after it
        pts = h.points("r")
        assert [p["t"] for p in pts] == [T0 + 60, T0 + 120, T0 + 180]
        assert sums(pts) == (9, 8, 1, 2)


def test_hours_roll_over_and_restart_keeps_everything(tmp_path: Path) -> None:
    clock = Clock()
    with History(tmp_path, clock) as h:
        run_minutes(h, clock, 0, 150)  # two and a half hours
        before_m, before_h = h.points("q"), h.points("q", "hour")
    assert [p["t"] for p in before_h] == [T0, T0 + 3600, T0 + 7200]
    assert sums(before_h[:1]) == (7 * 60, 5 * 60, 60, 180)
    assert sums(before_h) == sums(before_m) == (7 * 150, 5 * 150, 150, 450)
    with History(tmp_path, clock) as h:
        assert h.points("q") == before_m
        assert h.points("q", "hour") == before_h
        # a restart: the first tick opens a minute; totals since the last point are kept
        run_minutes(h, clock, 160, 170)
        assert sums(h.points("q", "hour")) == (7 * 170, 5 * 170, 170, 510)
        assert sums(h.points("q")) == (7 * 170, 5 * 170, 170, 510)


def test_counters_reset_are_counted_from_zero(tmp_path: Path, caplog: Any) -> None:
    clock = Clock()
    with History(tmp_path, clock) as h:
        run_minutes(h, clock, 0, 5)
        clock.now += 60
        h.tick({"q": totals(1)})
        assert "went back" in caplog.text
        assert sums(h.points("q")[-1:]) == (7, 5, 1, 3)


def test_one_writer_only(tmp_path: Path) -> None:
    with History(tmp_path), pytest.raises(HistoryError, match="another process"):
        History(tmp_path)


# -- bounded size ------------------------------------------------------------------------


def test_bounded_after_three_days_and_thirty_days_of_hours(tmp_path: Path) -> None:
    clock = Clock()
    with History(tmp_path, clock, durable=False) as h:
        for i in range(3 * 24 * 60 + 1):
            clock.now = T0 + i * 60
            h.tick({"a": totals(i), "b": totals(2 * i)})
        sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
        assert sorted(sizes.values()) == [0, fmt.FILE_SIZE, fmt.FILE_SIZE]  # lock + 2 queues
        minutes = h.points("a")
        assert len(minutes) == 1440
        assert minutes[0]["t"] == clock.now - 1440 * 60
        assert len(h.points("a", "hour")) == 72
        # hourly ticks for 40 more days: the hour ring keeps 30 days
        start = clock.now
        for d in range(40 * 24):
            clock.now = start + (d + 1) * 3600
            h.tick({"a": totals(0)})
        hours = h.points("a", "hour")
        assert 719 <= len(hours) <= 721
        assert hours[0]["t"] + 3600 > clock.now - 30 * 86400
        assert len(h.points("a")) <= 24
        # "b" stopped 40 days ago and is not reported any more: its file goes
        assert h.queues() == ["a"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["history.lock", fmt.file_name("a")]


# -- kill -9 of a writer -----------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from qdash_mp.history import History, QueueTotals
    from qdash_mp.histogram import bucket_of
    T0 = int(sys.argv[2])
    B1, B2 = bucket_of(0.01), bucket_of(0.5)
    now = [T0]
    h = History(sys.argv[1], lambda: now[0])
    for i in range(20000):
        now[0] = T0 + i * 60
        h.tick({"q": QueueTotals(7 * i, 5 * i, i, {B1: i, B2: 2 * i})})
        print(i, flush=True)
    """
)


@pytest.mark.slow
def test_kill9_of_a_writer_mid_run_loses_nothing(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), str(T0)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        for _ in range(40):
            seen = int(child.stdout.readline())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    clock = Clock()
    with History(tmp_path, clock) as h:
        points = h.points("q")
        # every minute the child closed is there, consecutive and exact
        reached = len(points)
        assert reached >= seen
        assert [p["t"] for p in points] == [T0 + 60 * m for m in range(reached)]
        assert all(sums([p]) == (7, 5, 1, 3) for p in points)
        # carry on with the totals from where the child was: nothing lost, nothing doubled
        run_minutes(h, clock, 25000, 25001)
        assert sums(h.points("q", "hour")) == (7 * 25001, 5 * 25001, 25001, 75003)


# -- damage ------------------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def made(tmp_path: Path, minutes: int = 5) -> Path:
    clock = Clock()
    with History(tmp_path, clock) as h:
        run_minutes(h, clock, 0, minutes)
    return tmp_path / fmt.file_name("q")


def test_torn_ring_slot_is_skipped(tmp_path: Path, caplog: Any) -> None:
    path = made(tmp_path)
    flip(path, fmt.MINUTE_RING + 1 * fmt.SLOT_SIZE + 10)  # the second minute
    with History(tmp_path, Clock(T0 + 600)) as h:
        assert [p["t"] for p in h.points("q")] == [T0, T0 + 120, T0 + 180, T0 + 240]
    assert "torn" in caplog.text


def test_last_minute_slot_is_redone_from_the_state(tmp_path: Path) -> None:
    path = made(tmp_path)
    with path.open("r+b") as f:  # the slot write after the state write never happened
        f.seek(fmt.MINUTE_RING + 4 * fmt.SLOT_SIZE)
        f.write(bytes(fmt.SLOT_SIZE))
    with History(tmp_path, Clock(T0 + 600)) as h:
        assert len(h.points("q")) == 5


def test_torn_state_falls_back_to_the_other_copy(tmp_path: Path) -> None:
    """A crash while writing the state of minute 4: that copy is torn and the minute's slot
    was never written. The older copy rules; the next minute carries minute 4's counts."""
    path = made(tmp_path)
    newest = fmt.STATE_A if 5 % 2 == 0 else fmt.STATE_B  # 5 closes: seq 5 went to copy B
    flip(path, newest + 3000)
    with path.open("r+b") as f:
        f.seek(fmt.MINUTE_RING + 4 * fmt.SLOT_SIZE)
        f.write(bytes(fmt.SLOT_SIZE))
    clock = Clock(T0 + 600)
    with History(tmp_path, clock) as h:
        assert len(h.points("q")) == 4
        run_minutes(h, clock, 10, 11)
        assert sums(h.points("q")) == (77, 55, 11, 33)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: flip(p, 3), "header checksum"),
        (lambda p: flip(p, 70), "header checksum"),
        (lambda p: os.truncate(p, fmt.FILE_SIZE - 64), "bytes, a history file has"),
        (lambda p: (flip(p, fmt.STATE_A + 9), flip(p, fmt.STATE_B + 9)), "both state"),
        (lambda p: p.rename(p.with_name(fmt.file_name("other"))), "not this file's"),
    ],
)
def test_corruption_raises(tmp_path: Path, damage: Any, message: str) -> None:
    damage(made(tmp_path))
    with pytest.raises(HistoryCorrupt, match=message):
        History(tmp_path)
    # the lock was released: a repaired directory opens
    for p in tmp_path.glob("*.qh"):
        p.unlink()
    History(tmp_path).close()


def test_a_slot_in_the_wrong_place_raises(tmp_path: Path) -> None:
    path = made(tmp_path)
    with path.open("r+b") as f:
        f.seek(fmt.MINUTE_RING)
        slot = f.read(fmt.SLOT_SIZE)
        f.seek(fmt.MINUTE_RING + 100 * fmt.SLOT_SIZE)
        f.write(slot)
    with History(tmp_path, Clock(T0 + 600)) as h, pytest.raises(HistoryCorrupt, match="not this"):
        h.points("q")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("image")
    return made(d, 70).read_bytes()  # more than an hour: both rings and states in use


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.integers(0, fmt.FILE_SIZE - 1), st.integers(1, 255)), min_size=1, max_size=4
    )
)
def test_any_damage_is_skipped_or_history_corrupt(
    tmp_path: Path, image: bytes, flips: list[tuple[int, int]]
) -> None:
    """Flipped bits anywhere: the file opens and reads (damage skipped) or HistoryCorrupt,
    never another exception."""
    d = tmp_path / str(abs(hash(tuple(flips))))
    d.mkdir()
    raw = bytearray(image)
    for offset, mask in flips:
        raw[offset] ^= mask
    (d / fmt.file_name("q")).write_bytes(raw)
    try:
        with History(d, Clock(T0 + 3600)) as h:
            for resolution in ("minute", "hour"):
                for p in h.points("q", resolution):  # type: ignore[arg-type]
                    assert p["t"] >= T0
    except HistoryCorrupt:
        pass
