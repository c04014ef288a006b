"""Celery through a real ``celery worker -P prefork`` and a real Redis broker."""

from __future__ import annotations

import pytest

from ._support import Env

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
        env.run([env.bin("python"), "it_celery.py", "6", "2", "1"])
        # 6 ok + 2 failed + 1 flaky (retried once, then ok): pushed 9, processed 7.
        env.wait_counts((9, 7, 2, 1))
        failed = sorted(env.failed(), key=lambda f: f.job.payload["args"][0])
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
        env.wait_counts((10, 8, 2, 2))
        assert [f.id for f in env.failed()] == [failed[0].id]
    finally:
        env.stop_all()
