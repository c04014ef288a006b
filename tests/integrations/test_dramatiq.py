"""Dramatiq through a real ``dramatiq`` worker (2 processes, threads) and a real Redis."""

from __future__ import annotations

import pytest

from ._support import Env, wait_until

pytest.importorskip("dramatiq")


def test_counts_retries_failures_and_dashboard_retry(env: Env) -> None:
    env.spawn(
        [env.bin("dramatiq"), "it_dramatiq", "--processes", "2", "--threads", "2",
         "--queues", env.queue],
        "worker",
    )  # fmt: skip
    try:
        env.run([env.bin("python"), "it_dramatiq.py", "5", "2", "1", "1"])
        # 5 ok; 2 fail (no retries); flaky: retried once, then ok; doomed: retried twice by
        # Dramatiq, then failed once (retries exhausted). pushed 9, processed 6, failed 3,
        # retried 3.
        env.wait_counts((9, 6, 3, 3))
        # Every attempt ended (processed, failed or retried): none stays active, though a
        # retry may run in the other worker process.
        wait_until(lambda: env.stat().active == 0, "active 0")
        assert len((env.marks / "doomed-0").read_text().splitlines()) == 3
        failed = {f.job.name: f for f in env.failed() if f.job.name == "it.doomed"}
        doomed = failed["it.doomed"]
        assert doomed.job.attempts == 3
        assert doomed.error == "RuntimeError: doomed 0"
        assert 'raise RuntimeError(f"doomed {x}")' in doomed.traceback

        fails = sorted(
            (f for f in env.failed() if f.job.name == "it.fail"),
            key=lambda f: f.job.payload["args"][0],
        )
        assert [f.job.payload for f in fails] == [
            {"args": [0], "kwargs": {"note": "n0"}, "queue": env.queue},
            {"args": [1], "kwargs": {"note": "n1"}, "queue": env.queue},
        ]
        assert fails[0].error == "ValueError: boom 0"
        assert "in fail" in fails[0].traceback

        (env.marks / "fixed").touch()
        env.retry(fails[1].id)
        env.wait_mark("ok-1")
        env.wait_counts((10, 7, 3, 4))
        assert fails[1].id not in {f.id for f in env.failed()}
    finally:
        env.stop_all()
