"""RQ through a real ``rq worker`` (a forked work horse per job) and a real Redis."""

from __future__ import annotations

import datetime
import math
import os
import signal
from typing import Any

import pytest

from qdash_mp.models import Job

from ._support import Env, wait_until

pytest.importorskip("rq")

from redis import Redis
from rq.job import Job as RqJob
from rq.job import JobStatus

from qdash_mp.integrations import rq as adapter


def _worker(env: Env, cls: str = "Worker", *more: str) -> None:
    env.spawn(
        [env.bin("rq"), "worker", "--url", env.redis_url,
         "--worker-class", f"qdash_mp.integrations.rq.{cls}",
         "--queue-class", "qdash_mp.integrations.rq.Queue",
         "--logging_level", "WARNING", *more, env.queue],
        "worker",
    )  # fmt: skip


def test_the_horses_word_layout() -> None:
    """The shared page's record, byte for byte: finished flag, then float64 LE seconds."""
    assert adapter._WORD.size == 9
    assert adapter._WORD.pack(1, 0.5).hex(" ") == "01 00 00 00 00 00 00 e0 3f"
    assert adapter._WORD.pack(0, 0.0).hex(" ") == "00 00 00 00 00 00 00 00 00"


_T0 = datetime.datetime(2026, 12, 3, 1, 2, 3, 250_000, tzinfo=datetime.UTC)


def _job(status: JobStatus, seconds: float | None) -> RqJob:
    job = RqJob.create("it_rq.add", args=(1, 2), connection=Redis())  # no I/O until used
    job.set_status(status, pipeline=Redis().pipeline())  # in memory (the pipeline is unsent)
    if seconds is not None:
        job.started_at = _T0
        job.ended_at = _T0 + datetime.timedelta(seconds=seconds)
    return job


def test_finished_runtime_reads_only_a_finished_job() -> None:
    assert adapter._finished_runtime(_job(JobStatus.FINISHED, 0.125)) == 0.125
    assert math.isnan(adapter._finished_runtime(_job(JobStatus.FINISHED, None)) or 0.0)
    # a failure, a stop, or a returned Retry (RQ queued it again): Redis is asked instead
    for status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.QUEUED, JobStatus.SCHEDULED):
        assert adapter._finished_runtime(_job(status, 0.125)) is None


class _Calls:
    """A client that records the hooks called (the parent's ``clients.get()``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


def test_the_word_and_redis_agree_on_a_finished_job(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path (what the horse says) and the Redis path (HMGET of the job's hash)
    report a finished job alike: processed, with the runtime RQ recorded."""
    calls = _Calls()
    monkeypatch.setattr(adapter.clients, "get", lambda: calls)
    job = _job(JobStatus.FINISHED, 0.375)
    job.connection = Redis.from_url(env.redis_url)
    job.save()  # status, started_at and ended_at as RQ stores them
    try:
        started = Job(job.id, "it_rq.add")
        adapter._report(job, env.queue, (0, 0), 9.0, started)
        fast = adapter._finished_runtime(job)
        assert calls.calls == [("on_processed", env.queue, started, fast)]
        assert fast == 0.375
    finally:
        job.delete()


def test_counts_failures_and_dashboard_retry(env: Env) -> None:
    _worker(env)
    try:
        env.run([env.bin("python"), "it_rq.py", "5", "2", "1", "0", "1", "1"])
        # 5 ok + 2 failed + 1 flaky (RQ Retry once, then ok) + 1 job that enqueues one more
        # from inside its work horse + 1 that returns a Retry once (the horse ends it well,
        # yet not FINISHED): pushed 11, processed 9, retried 2.
        env.wait_counts((11, 9, 2, 2))
        assert len(env.wait_mark("again-0").read_text().splitlines()) == 2  # ran twice
        env.wait_mark("add-100")
        failed = sorted(env.failed(), key=lambda f: f.job.payload["args"][0])
        assert [f.job.name for f in failed] == ["it_rq.fail", "it_rq.fail"]
        assert [f.job.payload for f in failed] == [
            {"args": [0], "kwargs": {"note": "n0"}, "queue": env.queue},
            {"args": [1], "kwargs": {"note": "n1"}, "queue": env.queue},
        ]
        assert failed[0].error == "ValueError: boom 0"
        assert 'raise ValueError(f"boom {x}")' in failed[0].traceback
        assert "in fail" in failed[0].traceback

        (env.marks / "fixed").touch()
        env.retry(failed[1].id)
        env.wait_mark("ok-1")
        env.wait_counts((12, 10, 2, 3))
        assert [f.id for f in env.failed()] == [failed[0].id]
        # Every job started by id (the parent reports them all, retries re-use the id) was
        # ended by its processed/failed report: nothing stays active.
        wait_until(lambda: env.stat().active == 0, f"active 0, not {env.stat().active}")
    finally:
        env.stop_all()


def test_simple_worker_counts_in_process(env: Env) -> None:
    """``SimpleWorker`` runs jobs in the worker itself: the outcome is read from the job it
    just ran (finished), or from Redis (failed, or put back by a raised or returned Retry)."""
    env.run([env.bin("python"), "it_rq.py", "3", "1", "1", "0", "0", "1"])
    _worker(env, "SimpleWorker", "--burst")  # runs what is queued (retries too), then exits
    try:
        env.wait_counts((6, 5, 1, 2))
        assert [f.job.name for f in env.failed()] == ["it_rq.fail"]
    finally:
        env.stop_all()


def test_horse_killed_mid_job_is_failed(env: Env) -> None:
    _worker(env)
    try:
        env.run([env.bin("python"), "it_rq.py", "0", "0", "0", "1"])
        pid_file = env.marks / "hang-0.pid"
        wait_until(pid_file.exists, "the job to start")
        wait_until(lambda: pid_file.read_text().strip(), "the horse's pid")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        env.wait_counts((1, 0, 1, 0))
        [record] = env.failed()
        assert record.job.name == "it_rq.hang"
        assert record.job.payload == {"args": [0], "kwargs": {}, "queue": env.queue}
        assert record.error.startswith("WorkHorseTerminated: Work-horse terminated unexpectedly")
        assert "signal 9" in record.error
        # started by id in the parent, ended by the failure report: no longer active
        wait_until(lambda: env.stat() is not None and env.stat().active == 0, "active 0")
    finally:
        env.stop_all()
