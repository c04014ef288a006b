"""RQ through a real ``rq worker`` (a forked work horse per job) and a real Redis."""

from __future__ import annotations

import os
import signal

import pytest

from ._support import Env, wait_until

pytest.importorskip("rq")


def _worker(env: Env) -> None:
    env.spawn(
        [env.bin("rq"), "worker", "--url", env.redis_url,
         "--worker-class", "qdash_mp.integrations.rq.Worker",
         "--queue-class", "qdash_mp.integrations.rq.Queue",
         "--logging_level", "WARNING", env.queue],
        "worker",
    )  # fmt: skip


def test_counts_failures_and_dashboard_retry(env: Env) -> None:
    _worker(env)
    try:
        env.run([env.bin("python"), "it_rq.py", "5", "2", "1", "0", "1"])
        # 5 ok + 2 failed + 1 flaky (RQ Retry once, then ok) + 1 job that enqueues one more
        # from inside its work horse: pushed 10, processed 8.
        env.wait_counts((10, 8, 2, 1))
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
        env.wait_counts((11, 9, 2, 2))
        assert [f.id for f in env.failed()] == [failed[0].id]
        # Every job started by id (the parent reports them all, retries re-use the id) was
        # ended by its processed/failed report: nothing stays active.
        wait_until(lambda: env.stat().active == 0, f"active 0, not {env.stat().active}")
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
