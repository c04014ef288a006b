"""The embedded (one-process) API, promise by promise: Stats, MemoryFailedJobs, new_inspector,
Sampler."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from qdash_mp import (
    PAGE_SIZE,
    FailedJob,
    FailedJobs,
    Inspector,
    Job,
    MemoryFailedJobs,
    NotFound,
    QdashError,
    QueueStat,
    Sampler,
    Stats,
    StatsView,
    new_inspector,
)

# -- Stats -------------------------------------------------------------------------------------


def test_stats_exact_under_threads() -> None:
    stats = Stats()
    threads_n, per_thread = 8, 100_000
    start = threading.Barrier(threads_n)

    def work(i: int) -> None:
        queue = f"q{i % 2}"
        hooks = (stats.on_pushed, stats.on_processed, stats.on_failed, stats.on_retried)
        start.wait()
        for _ in range(per_thread // 4):
            for hook in hooks:
                hook(queue)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    view = stats.snapshot()
    each = threads_n * per_thread // 4
    assert view.totals.pushed == each
    assert view.totals.processed == each
    assert view.totals.failed == each
    assert view.totals.retried == each
    for q in view.queues:
        assert (q.pushed, q.processed, q.failed, q.retried) == (each // 2,) * 4
    assert sum(q.pushed + q.processed + q.failed + q.retried for q in view.queues) == 800_000


def test_stats_hooks_bump_their_counter() -> None:
    stats = Stats()
    stats.on_pushed("q")
    stats.on_pushed("q")
    stats.on_processed("q", runtime=0.25)
    stats.on_failed("q")
    stats.on_retried("q")
    q = stats.snapshot().queue("q")
    assert q is not None
    assert (q.pushed, q.processed, q.failed, q.retried, q.pending) == (2, 1, 1, 1, 0)
    assert stats.snapshot().queue("never") is None


@pytest.mark.parametrize(
    "label",
    ["", " ", "émails", "队列", "🚀 rockets", "a" * 10_000, "\x00nul", "<script>", "a/b\\c"],
)
def test_stats_odd_queue_labels(label: str) -> None:
    stats = Stats()
    stats.on_pushed(label)
    stats.on_pushed("other")
    view = stats.snapshot()
    q = view.queue(label)
    assert q is not None
    assert q.queue == label
    assert q.pushed == 1
    assert view.totals.pushed == 2


def test_snapshot_sorted_with_totals() -> None:
    stats = Stats()
    for name in ("zeta", "alpha", "Mid", "beta"):
        stats.on_pushed(name)
    stats.on_processed("beta")
    stats.on_failed("zeta")
    view = stats.snapshot()
    assert isinstance(view, StatsView)
    assert [q.queue for q in view.queues] == sorted(["zeta", "alpha", "Mid", "beta"])
    assert view.totals == QueueStat(
        queue="total", pushed=4, processed=1, failed=1, retried=0, pending=2, throughput=0.0
    )
    assert view.to_dict()["totals"]["pushed"] == 4
    assert Stats().snapshot() == StatsView()


def test_pending_is_floored_at_zero() -> None:
    stats = Stats()
    stats.on_pushed("q")
    for _ in range(3):
        stats.on_processed("q")
    stats.on_failed("q")
    stats.on_pushed("r")
    view = stats.snapshot()
    assert view.queue("q").pending == 0  # type: ignore[union-attr]
    assert view.queue("r").pending == 1  # type: ignore[union-attr]
    assert view.totals.pending == 0  # 2 pushed - 3 processed - 1 failed, floored


def test_throughput_with_an_injected_clock() -> None:
    now = [1_000.0]
    stats = Stats(window=10, clock=lambda: now[0])
    assert stats.window == 10
    for _ in range(20):
        stats.on_processed("q")

    def rate() -> float:
        q = stats.snapshot().queue("q")
        assert q is not None
        return q.throughput

    assert rate() == 0.0  # nothing has been running for a completed second yet
    now[0] = 1_005.0
    assert rate() == pytest.approx(20 / 5)  # averaged over the 5 s since start
    now[0] = 1_010.0
    assert rate() == pytest.approx(20 / 10)
    now[0] = 1_011.0
    assert rate() == 0.0  # the busy second left the window
    for _ in range(3):  # lands in the same ring bucket as second 1000: must restart at 0
        stats.on_processed("q")
    now[0] = 1_012.0
    assert rate() == pytest.approx(3 / 10)
    assert stats.snapshot().totals.throughput == pytest.approx(3 / 10)


def test_stats_window_default_for_nonsense() -> None:
    assert Stats(window=0).window == 60
    assert Stats(window=-5).window == 60
    assert Stats(window=math.nan).window == 60
    assert Stats(window=2.5).window == 3


# -- MemoryFailedJobs --------------------------------------------------------------------------


def job(i: int | str, **kw: object) -> Job:
    return Job(id=f"job-{i}", name="SendWelcomeEmail", **kw)  # type: ignore[arg-type]


def test_failed_store_is_a_failed_jobs() -> None:
    assert isinstance(MemoryFailedJobs(), FailedJobs)


def test_newest_first_and_record_keeps_everything() -> None:
    store = MemoryFailedJobs()
    before = datetime.now(UTC)
    for i in range(3):
        store.record(job(i, attempts=i, payload={"n": i}), "emails", RuntimeError(f"e{i}"))
    store.record(job("s"), "sms", "plain text reason")
    after = datetime.now(UTC)
    listed = store.list()
    assert [f.id for f in listed] == ["job-s", "job-2", "job-1", "job-0"]
    f = listed[1]
    assert isinstance(f, FailedJob)
    assert f.queue == "emails"
    assert f.job == job(2, attempts=2, payload={"n": 2})
    assert f.error == "RuntimeError: e2"
    assert f.failed_at.tzinfo is not None
    assert f.failed_at.utcoffset() == timedelta(0)
    assert before <= f.failed_at <= after
    assert listed[0].error == "plain text reason"
    assert listed[0].traceback == ""


def test_record_keeps_traceback_of_raised_exception() -> None:
    store = MemoryFailedJobs()
    try:
        raise ValueError("bad input")
    except ValueError as exc:
        store.record(job(1), "q", exc)
    f = store.list()[0]
    assert f.error == "ValueError: bad input"
    assert "Traceback (most recent call last)" in f.traceback
    store.record(job(2), "q", KeyError())
    assert store.list()[0].error == "KeyError"


def test_same_job_id_replaces_and_becomes_newest() -> None:
    store = MemoryFailedJobs()
    store.record(job(1, attempts=1), "q", "first")
    store.record(job(2), "q", "other")
    store.record(job(1, attempts=2), "q", "second")
    listed = store.list()
    assert [f.id for f in listed] == ["job-1", "job-2"]
    assert listed[0].error == "second"
    assert listed[0].job.attempts == 2
    assert len(store) == 2


def test_retry_calls_requeue_and_drops_only_on_success() -> None:
    requeued: list[Job] = []
    store = MemoryFailedJobs(requeued.append)
    store.record(job(1, payload=[1]), "q", "e")
    store.record(job(2), "q", "e")
    store.retry("job-1")
    assert requeued == [job(1, payload=[1], attempts=1)]  # a retry is one more attempt
    assert [f.id for f in store.list()] == ["job-2"]


def test_requeue_raising_keeps_record_and_propagates() -> None:
    calls: list[str] = []

    def requeue(j: Job) -> None:
        calls.append(j.id)
        raise ConnectionError("broker down")

    store = MemoryFailedJobs(requeue)
    stats = Stats()
    store.with_stats(stats)
    store.record(job(1), "q", "e")
    with pytest.raises(ConnectionError, match="broker down"):
        store.retry("job-1")
    assert calls == ["job-1"]
    assert [f.id for f in store.list()] == ["job-1"]
    assert stats.snapshot().totals.retried == 0
    with pytest.raises(ConnectionError):  # and it can be tried again
        store.retry("job-1")
    assert len(store) == 1


def test_requeue_none_is_forget_only() -> None:
    store = MemoryFailedJobs(None)
    store.record(job(1), "q", "e")
    store.retry("job-1")
    assert store.list() == []


def test_with_stats_bumps_retried_on_success() -> None:
    stats = Stats()
    store = MemoryFailedJobs(lambda j: None)
    assert store.with_stats(stats) is store
    store.record(job(1), "emails", "e")
    store.record(job(2), "sms", "e")
    store.retry("job-1")
    store.retry("job-2")
    view = stats.snapshot()
    assert view.queue("emails").retried == 1  # type: ignore[union-attr]
    assert view.queue("sms").retried == 1  # type: ignore[union-attr]
    assert view.queue("sms").pushed == 1  # type: ignore[union-attr]  # enqueued again
    store.record(job(3), "sms", "e")
    store.forget("job-3")
    assert stats.snapshot().totals.retried == 2  # forget is not a retry


def test_unknown_ids_raise_not_found() -> None:
    store = MemoryFailedJobs(lambda j: None)
    store.record(job(1), "q", "e")
    for op in (store.retry, store.forget):
        with pytest.raises(NotFound):
            op("nope")
        with pytest.raises(LookupError):
            op("nope")
    assert issubclass(NotFound, LookupError)
    assert issubclass(NotFound, QdashError)
    store.forget("job-1")
    with pytest.raises(NotFound):
        store.forget("job-1")
    with pytest.raises(NotFound):
        store.retry("job-1")


def test_len_and_forget() -> None:
    store = MemoryFailedJobs()
    assert len(store) == 0
    assert store.len() == 0
    for i in range(5):
        store.record(job(i), "q", "e")
    assert len(store) == store.len() == 5
    store.forget("job-2")
    assert store.len() == 4
    assert [f.id for f in store.list()] == ["job-4", "job-3", "job-1", "job-0"]


# -- new_inspector -----------------------------------------------------------------------------


async def test_new_inspector_with_none_parts() -> None:
    insp = new_inspector(None, None)
    assert isinstance(insp, Inspector)
    assert await insp.stats() == StatsView()
    assert await insp.failed(1) == []
    assert await insp.pending("q", 1) == []
    assert await insp.flush_failed() == 0
    for op in (insp.retry, insp.forget):
        with pytest.raises(NotFound):
            await op("x")

    stats = Stats()
    stats.on_pushed("q")
    only_stats = new_inspector(stats, None)
    assert (await only_stats.stats()).totals.pushed == 1
    assert await only_stats.failed(1) == []

    store = MemoryFailedJobs()
    store.record(job(1), "q", "e")
    only_failed = new_inspector(None, store)
    assert await only_failed.stats() == StatsView()
    assert [v.id for v in await only_failed.failed(1)] == ["job-1"]


async def test_inspector_pages_and_actions() -> None:
    store = MemoryFailedJobs(None)
    for i in range(PAGE_SIZE + 3):
        store.record(job(i, attempts=2), "q", "e")
    insp = new_inspector(Stats(), store)
    first = await insp.failed(1)
    assert len(first) == PAGE_SIZE
    assert first[0].id == f"job-{PAGE_SIZE + 2}"
    assert (first[0].name, first[0].queue, first[0].attempts) == ("SendWelcomeEmail", "q", 2)
    assert [v.id for v in await insp.failed(2)] == ["job-2", "job-1", "job-0"]
    assert await insp.failed(3) == []
    assert await insp.failed(10**30) == []  # huge pages are just past the end
    assert [v.id for v in await insp.failed(0)] == [v.id for v in first]  # < 1 means 1
    await insp.forget("job-0")
    await insp.retry("job-1")
    assert [v.id for v in await insp.failed(2)] == ["job-2"]
    assert await insp.flush_failed() == PAGE_SIZE + 1
    assert len(store) == 0


# -- Sampler -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_sampler_rate_and_window() -> None:
    stats, clock = Stats(), Clock()
    sampler = Sampler(new_inspector(stats, None), interval=5, window=60, clock=clock)
    assert sampler.rate("q") == 0.0
    assert sampler.window("q") == []
    stats.on_pushed("q")
    await sampler.sample()
    assert sampler.rate("q") == 0.0  # one reading is not a rate
    for _ in range(30):
        stats.on_processed("q")
    clock.now = 30
    await sampler.sample()
    assert sampler.rate("q") == pytest.approx(60.0)  # 30 jobs in 30 s = 60 jobs/min
    readings = sampler.window("q")
    assert [(r.at, r.processed) for r in readings] == [(0, 0), (30, 30)]
    assert readings[1].rate == pytest.approx(60.0)
    assert readings[0].rate == 0.0

    clock.now = 90
    await sampler.sample()  # no work in the last 60 s; the window starts at 30
    assert [r.at for r in sampler.window("q")] == [30, 90]
    assert sampler.rate("q") == 0.0
    for _ in range(10):
        stats.on_processed("q")
    clock.now = 120
    await sampler.sample()
    # oldest first; the last reading at or before the horizon (60) stays to anchor the window
    assert [r.at for r in sampler.window("q")] == [30, 90, 120]
    assert sampler.rate("q") == pytest.approx(10 * 60 / 90)
    clock.now = 150
    await sampler.sample()
    assert [r.at for r in sampler.window("q")] == [90, 120, 150]
    assert sampler.rate("q") == pytest.approx(10 * 60 / 60)


async def test_sampler_same_time_readings_do_not_divide_by_zero() -> None:
    stats, clock = Stats(), Clock()
    sampler = Sampler(new_inspector(stats, None), clock=clock)
    stats.on_processed("q")
    await sampler.sample()
    await sampler.sample()
    assert sampler.rate("q") == 0.0


def test_sampler_nonpositive_settings_mean_defaults() -> None:
    insp = new_inspector(None, None)
    for bad in (0, -1, math.nan):
        sampler = Sampler(insp, interval=bad, window=bad)
        assert sampler.interval == 5.0
        assert sampler.window_seconds == 60.0
    assert Sampler(insp, interval=0.5, window=10).interval == 0.5


def _sampler_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "qdash_mp.sampler"]


async def test_sampler_start_is_idempotent_and_stop_too() -> None:
    stats = Stats()
    stats.on_processed("q")
    sampler = Sampler(new_inspector(stats, None), interval=3600)
    await sampler.stop()  # safe without start
    sampler.start()
    sampler.start()
    assert len(_sampler_tasks()) == 1
    deadline = time.monotonic() + 5
    while not sampler.window("q"):  # the first reading is taken right away
        assert time.monotonic() < deadline, "sampler never sampled"
        await asyncio.sleep(0)
    await sampler.stop()
    await sampler.stop()
    assert _sampler_tasks() == []
    sampler.start()  # and it can start again
    assert len(_sampler_tasks()) == 1
    await sampler.stop()


def test_sampler_start_needs_a_running_loop() -> None:
    sampler = Sampler(new_inspector(None, None))
    with pytest.raises(RuntimeError):
        sampler.start()


def test_to_dict_keys_are_exactly_the_field_names() -> None:
    """The JSON API promises the dataclass field names as keys (to_dict is built by hand)."""
    import dataclasses
    from datetime import UTC, datetime

    from qdash_mp.models import JobView, QueueStat

    q = QueueStat("q", 1, 2, 3, 4, 5, 6.5)
    assert q.to_dict() == dataclasses.asdict(q)
    v = JobView("id", "q", "name", "err", 2, datetime(2026, 1, 2, tzinfo=UTC))
    assert list(v.to_dict()) == [f.name for f in dataclasses.fields(JobView)]
    assert v.to_dict()["failed_at"] == "2026-01-02T00:00:00+00:00"


# -- the package ------------------------------------------------------------------------------


def test_the_package_imports_its_public_names_on_first_use() -> None:
    """``import qdash_mp`` loads no submodule (an RQ worker imports its adapter and pays for
    every page it holds in each horse it forks); each public name still resolves, to the
    object its module defines, and ``dir()`` lists them all."""
    code = """
import importlib, sys
import qdash_mp
loaded = sorted(m for m in sys.modules if m.startswith("qdash_mp"))
assert loaded == ["qdash_mp"], loaded
for name in qdash_mp.__all__:
    value = getattr(qdash_mp, name)
    home = importlib.import_module(qdash_mp._WHERE[name])
    assert value is getattr(home, name), name
assert set(qdash_mp.__all__) == set(qdash_mp._WHERE)
assert set(qdash_mp.__all__) <= set(dir(qdash_mp))
try:
    qdash_mp.nothing_here
except AttributeError as exc:
    assert "nothing_here" in str(exc)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr
