"""The Celery adapter's worker ``Request`` reports, outcome by outcome, and its fallbacks.

The real worker is in ``test_celery.py``; here each outcome Celery can hand the main process
is fed to the reporting ``Request`` logic directly (``Ignore`` from ``Task.replace``,
``Reject`` with and without requeue, a terminated task), with a recording client.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery, signals
from celery.exceptions import Ignore, Reject, Retry

from qdash_mp.integrations import celery as qcelery


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


@pytest.fixture
def adapter(monkeypatch: pytest.MonkeyPatch) -> Any:
    app = Celery("t", broker="memory://")
    app.conf.task_default_queue = "dq"
    a = qcelery.CeleryAdapter(app, "/nonexistent/q.sock")
    rec = Recorder()
    monkeypatch.setattr(a.clients, "get", lambda: rec)
    a.rec = rec
    return a


def request(**kw: Any) -> Any:
    base = {
        "id": "t-1",
        "name": "it.x",
        "delivery_info": {"routing_key": "q1"},
        "request_dict": {"retries": 2},
        "args": [1],
        "kwargs": {"k": "v"},
        "task": SimpleNamespace(queue=None),
    }
    return SimpleNamespace(**{**base, **kw})


def outcome(adapter: Any, exc: BaseException, runtime: float | None = 0.25) -> tuple[Any, ...]:
    adapter.rec.calls.clear()
    adapter._ended(request(), SimpleNamespace(exception=exc, traceback="TB TEXT"), runtime)
    (call,) = adapter.rec.calls
    return tuple(call)


def test_started_and_processed_with_celerys_runtime(adapter: Any) -> None:
    adapter._accepted(request())
    adapter._succeeded(request(), 0.5)
    (started, processed) = adapter.rec.calls
    assert started[0:2] == ("on_started", "q1")
    assert (started[2].id, started[2].name, started[2].attempts) == ("t-1", "it.x", 3)
    assert processed[0:2] == ("on_processed", "q1")
    assert processed[2].id == "t-1"
    assert processed[3] == 0.5


def test_a_retry_and_a_requeued_reject_count_as_retried(adapter: Any) -> None:
    assert outcome(adapter, Retry("later"))[0:2] == ("on_retried", "q1")
    assert outcome(adapter, Reject("back", requeue=True))[0:2] == ("on_retried", "q1")


def test_an_ignore_counts_as_processed(adapter: Any) -> None:
    """``Task.replace`` raises ``Ignore``: the task handed its work on."""
    name, queue, job, runtime = outcome(adapter, Ignore())
    assert (name, queue, job.id, runtime) == ("on_processed", "q1", "t-1", 0.25)


@pytest.mark.parametrize(
    "exc", [ValueError("boom"), Reject("dropped", requeue=False), RuntimeError("Terminated")]
)
def test_everything_else_is_a_failure_with_payload_and_traceback(
    adapter: Any, exc: BaseException
) -> None:
    name, queue, job, error, runtime = outcome(adapter, exc)
    assert (name, queue, runtime) == ("on_failed", "q1", 0.25)
    assert job.payload == {"args": [1], "kwargs": {"k": "v"}, "queue": "q1"}
    assert job.attempts == 3
    assert error is exc
    assert "TB TEXT" in error.__notes__  # the pool process's traceback text
    assert error.__traceback__ is not None


def test_billiards_wrapper_is_unwrapped_but_a_retry_is_not(adapter: Any) -> None:
    ewt = type("ExceptionWithTraceback", (), {})()
    ewt.exc = ValueError("inner")
    _, _, _, error, _ = outcome(adapter, ewt)  # type: ignore[arg-type]
    assert str(error) == "inner"
    retry = Retry("again", exc=ValueError("cause"))
    assert outcome(adapter, retry)[0] == "on_retried"  # Retry.exc is its cause, not a wrapper


def test_the_queue_falls_back_to_the_tasks_then_the_default(adapter: Any) -> None:
    adapter._accepted(request(delivery_info={}, task=SimpleNamespace(queue="tq")))
    adapter._accepted(request(delivery_info=None))
    assert [c[1] for c in adapter.rec.calls] == ["tq", "dq"]


def test_the_strategy_is_wrapped_once_and_only_for_its_app(
    adapter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import celery.worker.strategy as strategy

    class Base:
        pass

    made: list[Any] = []

    def original(base: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
        made.append(base)
        return type("Request", (base,), {"__slots__": ()})

    monkeypatch.setattr(strategy, "create_request_cls", original)
    assert adapter._report_from_requests()
    wrapper = strategy.create_request_cls
    assert adapter._report_from_requests()  # again: the same wrapper, the adapter once
    assert strategy.create_request_cls is wrapper
    assert wrapper._qdash_adapters == [adapter]
    mine = wrapper(Base, object(), app=adapter.app)
    other = wrapper(Base, object(), app=Celery("other", broker="memory://"))
    assert mine.__name__ == "QdashRequest"
    assert issubclass(mine, Base)
    assert other.__name__ == "Request"  # another app's worker is left alone


def _disconnect_all(adapter: Any) -> None:
    for name in ("task_prerun", "task_success", "task_failure", "task_retry"):
        getattr(signals, name).disconnect(getattr(adapter, name))
    for name, fn in (("before_task_publish", adapter.before_task_publish),
                     ("celeryd_after_setup", adapter.after_setup),
                     ("worker_process_shutdown", adapter.process_shutdown),
                     ("worker_shutdown", adapter.worker_shutdown)):  # fmt: skip
        getattr(signals, name).disconnect(fn)


def _receives(adapter: Any) -> bool:
    return any(getattr(r, "__self__", None) is adapter for _, r in signals.task_prerun.receivers)


def test_in_a_worker_the_pool_signals_are_disconnected(
    adapter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside a worker (eager tasks) they report; the worker's main process drops them
    before the pool forks, so its children pay nothing per task."""
    import celery.worker.strategy as strategy

    monkeypatch.setattr(strategy, "create_request_cls", strategy.create_request_cls)
    adapter.connect()
    try:
        assert _receives(adapter)
        monkeypatch.setattr(adapter.clients, "configure", lambda *a: None)
        adapter.after_setup(instance=None)
        assert not _receives(adapter)
        assert adapter in strategy.create_request_cls._qdash_adapters
    finally:
        _disconnect_all(adapter)


def test_without_create_request_cls_the_signals_stay(
    adapter: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import celery.worker.strategy as strategy

    monkeypatch.delattr(strategy, "create_request_cls")
    adapter.connect()
    try:
        monkeypatch.setattr(adapter.clients, "configure", lambda *a: None)
        with caplog.at_level(logging.WARNING, "qdash_mp.integrations.celery"):
            adapter.after_setup(instance=None)
        assert "reporting through task signals" in caplog.text
        assert _receives(adapter)
    finally:
        _disconnect_all(adapter)
