"""RQ through a real ``rq worker`` (a forked work horse per job) and a real Redis."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qdash_testing.http import get_json

from qdash_mp.models import Job

from ._support import Env, wait_until

pytest.importorskip("rq")

from redis import Redis
from rq.job import Job as RqJob
from rq.job import JobStatus

from qdash_mp.integrations import rq as adapter
from qdash_mp.integrations import rq_reporter as reporter


def _worker(env: Env, cls: str = "Worker", *more: str) -> subprocess.Popen[bytes]:
    return env.spawn(
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
    assert adapter.finished_runtime(_job(JobStatus.FINISHED, 0.125)) == 0.125
    assert math.isnan(adapter.finished_runtime(_job(JobStatus.FINISHED, None)) or 0.0)
    # a failure, a stop, or a returned Retry (RQ queued it again): Redis is asked instead
    for status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.QUEUED, JobStatus.SCHEDULED):
        assert adapter.finished_runtime(_job(status, 0.125)) is None


class _Calls:
    """A client that records the hooks called (the reporter's ``clients.get()``)."""

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
    monkeypatch.setattr(reporter.clients, "get", lambda: calls)
    job = _job(JobStatus.FINISHED, 0.375)
    job.connection = Redis.from_url(env.redis_url)
    job.save()  # status, started_at and ended_at as RQ stores them
    try:
        started = Job(job.id, "it_rq.add")
        reporter.report(job, env.queue, (0, 0), 9.0, started)
        fast = adapter.finished_runtime(job)
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


def _children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(c) for c in text.split()}


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (an orphan's reaper may be slow, or none)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_reporter_is_replaced_and_a_stopped_worker_leaves_none(env: Env) -> None:
    """The worker reports through a reporter process it forked: one killed is replaced at
    the next job (nothing counted twice, nothing lost between jobs), and a worker stopped
    with SIGTERM (to its whole process group, as a supervisor does) flushes it and leaves
    no process behind."""
    worker = _worker(env)
    try:
        [first] = wait_until(lambda: _children(worker.pid), "the worker's reporter")
        env.run([env.bin("python"), "it_rq.py", "2", "0", "0", "0"])
        env.wait_counts((2, 2, 0, 0))
        # The Workers page shows the worker (its pid in the name), served by its reporter.
        workers = get_json(f"{env.collector.url}/queues/api/workers")["workers"]
        [shown] = [w for w in workers if w["state"] == "connected"]
        assert (shown["name"], shown["pid"]) == (f"rq:{worker.pid}", first)
        assert shown["queues"] == [env.queue]
        os.kill(first, signal.SIGKILL)
        env.run([env.bin("python"), "it_rq.py", "3", "0", "0", "0"])
        env.wait_counts((5, 5, 0, 0))
        [second] = wait_until(lambda: _children(worker.pid) - {first}, "a new reporter")
        assert env.stop(worker) == 0
        for pid in (first, second):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert env.counts() == (5, 5, 0, 0)
    finally:
        env.stop_all()


def test_the_worker_itself_imports_no_client(env: Env) -> None:
    """What the worker holds is copied in every horse it forks: its module set stays the
    few it needs to write records (the client lives in the reporter)."""
    code = (
        "import sys, rq.worker; before = set(sys.modules); import qdash_mp.integrations.rq; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    added = env.run([env.bin("python"), "-c", code]).split()
    assert added == [
        "mmap",  # the horse's word (a C module of the standard library)
        "qdash_mp",
        "qdash_mp.integrations",
        "qdash_mp.integrations.rq",
        "qdash_mp.integrations.rq_pipe",
    ]


def test_a_killed_worker_loses_no_finished_job(env: Env) -> None:
    """SIGKILL of the worker (its horse busy with a long job): the jobs it had ended are
    in its reporter's pipe, not in a client that dies with it; the reporter, seeing the
    pipe close, reports them and leaves."""
    worker = _worker(env)
    try:
        [reporter] = wait_until(lambda: _children(worker.pid), "the worker's reporter")
        env.run([env.bin("python"), "it_rq.py", "4", "0", "0", "1"])
        pid_file = env.marks / "hang-0.pid"
        wait_until(pid_file.exists, "the long job to start")
        horse = int(wait_until(lambda: pid_file.read_text().strip(), "the horse's pid"))
        worker.kill()  # SIGKILL: no shutdown code runs in the worker
        worker.wait()
        # the horse still runs (its own process group), yet the reporter has seen EOF
        os.kill(horse, 0)
        wait_until(lambda: _gone(reporter), "the reporter to leave")
        # pushed 4 + 1, processed the 4 ended before the kill (the long one stays active)
        wait_until(lambda: env.counts()[:2] == (5, 4), f"5 pushed, 4 processed: {env.counts()}")
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int((env.marks / "hang-0.pid").read_text()), signal.SIGKILL)
        env.stop_all()
