"""Celery through a real ``celery worker -P prefork`` and a real Redis broker."""

from __future__ import annotations

import pytest

from ._support import Env, wait_until

pytest.importorskip("celery")


def _worker(env: Env, *extra: str) -> None:
    env.spawn(
        [env.bin("celery"), "-A", "it_celery", "worker", "-P", "prefork", "-c", "2",
         "-Q", env.queue, "--without-heartbeat", "--without-gossip", "--without-mingle",
         "-l", "warning", *extra],
        "worker",
    )  # fmt: skip


def test_counts_failures_and_dashboard_retry(env: Env) -> None:
    # max_tasks_per_child=1: every task ends its pool child through os._exit, so a count
    # only arrives if the adapter closes the client on worker_process_shutdown.
    _worker(env, "--max-tasks-per-child", "1")
    try:
        env.run([env.bin("python"), "it_celery.py", "6", "2", "1", "1", "1"])
        # 6 ok + 2 failed + 1 flaky (retried once, then ok) + 1 killed pool child (reported
        # by the parent as WorkerLostError) + 1 past its hard time limit (the parent kills
        # the pool child and reports TimeLimitExceeded): pushed 11, processed 7, failed 4,
        # retried 1.
        env.wait_counts((11, 7, 4, 1))
        # Everything is reported by the worker's main process: Celery's runtimes for the 7
        # successes and the 2 failures, and for the lost and the killed pool child the time
        # from its start (on_accepted) until the end was seen; nothing stays active.
        wait_until(
            lambda: (s := env.stat()) is not None and (s.runtime.count, s.active) == (11, 0),
            f"11 runtimes and nothing active, not {env.stat()}",
        )
        lost = [f for f in env.failed() if f.job.name == "it.die"]
        assert len(lost) == 1
        assert lost[0].error.startswith("WorkerLostError"), lost[0].error
        assert lost[0].job.payload == {"args": [0], "kwargs": {}, "queue": env.queue}
        hung = [f for f in env.failed() if f.job.name == "it.hang"]
        assert len(hung) == 1
        assert hung[0].error.startswith("TimeLimitExceeded"), hung[0].error
        assert hung[0].job.payload == {"args": [0], "kwargs": {}, "queue": env.queue}
        failed = [f for f in env.failed() if f.job.name not in ("it.die", "it.hang")]
        failed.sort(key=lambda f: f.job.payload["args"][0])
        assert [f.job.name for f in failed] == ["it.fail", "it.fail"]
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
        # the retry is pushed through Celery again and processed; the collector counts it.
        env.wait_counts((12, 8, 4, 2))
        assert sorted(f.id for f in env.failed()) == sorted([failed[0].id, lost[0].id, hung[0].id])
    finally:
        env.stop_all()
