"""Dramatiq through a real ``dramatiq`` worker (2 processes, threads) and a real Redis."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from qdash_mp.testing import CollectorThread

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


def test_a_worker_started_in_process_reports_through_its_run_log(
    collector: CollectorThread,
) -> None:
    """A program's own ``Worker`` (a StubBroker, as in a user's tests) gets no process_boot:
    the client is made at worker boot. Jobs skipped by a middleware after this one (whose
    start hook ran) leave no job active; a failure keeps its error and payload."""
    import dramatiq
    from dramatiq.brokers.stub import StubBroker
    from dramatiq.middleware import Middleware, Retries, SkipMessage

    from qdash_mp.integrations.dramatiq import QdashMiddleware

    queue = f"ip-{uuid.uuid4().hex[:8]}"
    broker = StubBroker()
    middleware = QdashMiddleware(collector.socket_path)
    broker.add_middleware(middleware, before=Retries)

    class Skipper(Middleware):  # type: ignore[misc]
        def before_process_message(self, broker: object, message: Any) -> None:
            if message.actor_name == "ip.skipped":
                raise SkipMessage()

    broker.add_middleware(Skipper())

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name="ip.ok")
    def ok() -> None:
        pass

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name="ip.bad", max_retries=0)
    def bad(x: int) -> None:
        raise ValueError(f"bad {x}")

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name="ip.skipped")
    def skipped() -> None:
        pass

    worker = dramatiq.Worker(broker, worker_timeout=50)
    worker.start()
    try:
        for i in range(3):
            ok.send()
            bad.send(i)
            skipped.send()
        broker.join(queue, fail_fast=False)
        worker.join()
        # Connected still: a job left active would show (a closed client's jobs do not).
        assert middleware.clients.get().flush(30)
        row = collector.stats().queue(queue)
        assert row is not None
        assert (row.pushed, row.processed, row.failed, row.retried) == (9, 3, 3, 0)
        assert row.active == 0
        assert (row.runtime.count, row.wait.count) == (6, 9)  # runs timed; starts waited
    finally:
        worker.stop()  # after_worker_shutdown: the client flushes and closes
    jobs = sorted(
        (collector.failed_job(v.id) for v in collector.failed() if v.queue == queue),
        key=lambda f: f.job.payload["args"][0],
    )
    assert [(f.job.name, f.error, f.job.payload) for f in jobs] == [
        ("ip.bad", f"ValueError: bad {i}", {"args": [i], "kwargs": {}, "queue": queue})
        for i in range(3)
    ]
