"""taskiq through a real ``taskiq worker`` (2 processes) and a real Redis."""

from __future__ import annotations

import pytest

from ._support import Env

pytest.importorskip("taskiq")
pytest.importorskip("taskiq_redis")


def test_counts_failures_and_dashboard_retry(env: Env) -> None:
    env.spawn(
        [
            env.bin("taskiq"),
            "worker",
            "it_taskiq:broker",
            "--workers",
            "2",
            "--no-configure-logging",
        ],
        "worker",
        grace=3.0,  # taskiq's worker blocks in BRPOP at shutdown; counts are checked by then
    )
    try:
        env.run([env.bin("python"), "it_taskiq.py", "5", "2", "1", "1"])
        # 5 ok; 2 fail (no retry label); flaky: retried once, then ok; doomed: retried once,
        # then failed. pushed 9, processed 6, failed 3, retried 2.
        env.wait_counts((9, 6, 3, 2))
        stat = env.stat()
        assert stat is not None
        assert stat.runtime.p50 is not None
        assert stat.runtime.p50 >= 0.0035  # 5 of 6 runs slept 4 ms: timed, not rounded
        doomed = [f for f in env.failed() if f.job.name == "it.doomed"]
        assert len(doomed) == 1
        assert doomed[0].job.attempts == 2
        fails = sorted(
            (f for f in env.failed() if f.job.name == "it.fail"),
            key=lambda f: f.job.payload["args"][0],
        )
        assert [f.job.payload for f in fails] == [
            {"args": [0], "kwargs": {"note": "n0"}, "queue": env.queue},
            {"args": [1], "kwargs": {"note": "n1"}, "queue": env.queue},
        ]
        assert fails[0].error == "ValueError: boom 0"
        assert 'raise ValueError(f"boom {x}")' in fails[0].traceback

        (env.marks / "fixed").touch()
        env.retry(fails[1].id)  # kiq on the worker's loop
        env.wait_mark("ok-1")
        env.wait_counts((10, 7, 3, 3))
        assert fails[1].id not in {f.id for f in env.failed()}
    finally:
        env.stop_all()
