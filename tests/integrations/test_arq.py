"""arq through a real ``arq`` worker (one asyncio loop) and a real Redis."""

from __future__ import annotations

import pytest

from ._support import Env

pytest.importorskip("arq")


def test_counts_failures_and_dashboard_retry(env: Env) -> None:
    env.spawn([env.bin("arq"), "it_arq.WorkerSettings"], "worker")
    try:
        env.run([env.bin("python"), "it_arq.py", "5", "2", "1", "1"])
        # 5 ok; 2 fail; flaky: Retry once, then ok; doomed: Retry at try 1 (retried), Retry at
        # try 2 = max_tries (failed; arq then fails it unrun). pushed 9, processed 6,
        # failed 3, retried 2.
        env.wait_counts((9, 6, 3, 2))
        doomed = [f for f in env.failed() if f.job.name == "doomed"]
        assert len(doomed) == 1
        assert doomed[0].job.attempts == 2
        fails = sorted(
            (f for f in env.failed() if f.job.name == "fail"),
            key=lambda f: f.job.payload["args"][0],
        )
        assert [f.job.payload for f in fails] == [
            {"args": [0], "kwargs": {"note": "n0"}, "queue": env.queue},
            {"args": [1], "kwargs": {"note": "n1"}, "queue": env.queue},
        ]
        assert fails[0].error == "ValueError: boom 0"
        assert 'raise ValueError(f"boom {x}")' in fails[0].traceback

        (env.marks / "fixed").touch()
        env.retry(fails[1].id)  # through run_coroutine_threadsafe onto the worker's loop
        env.wait_mark("ok-1")
        env.wait_counts((10, 7, 3, 3))
        assert fails[1].id not in {f.id for f in env.failed()}
    finally:
        env.stop_all()
