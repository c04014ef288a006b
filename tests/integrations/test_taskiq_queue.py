"""taskiq middleware without a broker server: the queue each task is counted on.

``pre_execute`` / ``post_execute`` count a task on its ``queue_name`` label (made a str), or
on the broker's queue when the label is missing or empty, before and after ``startup``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from qdash_mp.testing import CollectorThread

taskiq = pytest.importorskip("taskiq")

from qdash_mp.integrations.taskiq import QdashMiddleware  # noqa: E402


def _message(labels: dict[str, Any]) -> Any:
    return taskiq.TaskiqMessage(
        task_id=uuid.uuid4().hex, task_name="t.noop", labels=labels, args=[], kwargs={}
    )


@pytest.mark.parametrize("worker", [True, False], ids=["after-startup", "before-startup"])
def test_each_task_counts_on_its_queue(qdash_collector: CollectorThread, worker: bool) -> None:
    broker = taskiq.InMemoryBroker()
    broker.is_worker_process = worker
    mw = QdashMiddleware(qdash_collector.socket_path)
    broker.add_middlewares(mw)
    if worker:
        asyncio.run(mw.startup())  # reads the broker's default queue now
    ok = taskiq.TaskiqResult(is_err=False, return_value=None, execution_time=0.0)
    cases = [{"queue_name": "emails"}, {}, {"queue_name": ""}, {"queue_name": 7}, {"a": "b"}]
    expected: dict[str, int] = {}
    try:
        for labels in cases:
            message = _message(labels)
            queue = mw._queue(message)
            expected[queue] = expected.get(queue, 0) + 1
            asyncio.run(mw.pre_execute(message))
            asyncio.run(mw.post_execute(message, ok))
        assert mw.clients.get().flush(10)
    finally:
        assert mw.clients.close(5.0)
    assert expected == {"emails": 1, "taskiq": 3, "7": 1}
    stats = qdash_collector.stats()
    for queue, n in expected.items():
        stat = stats.queue(queue)
        assert (stat.processed, stat.active) == (n, 0), queue
        assert stat.runtime.count == n  # timed by the client from pre_execute
