"""What every adapter shares: the retry payload, and the per-process client's settings."""

from __future__ import annotations

import pytest

from qdash_mp.integrations._common import (
    FLUSH_INTERVAL,
    ProcessClient,
    job_args,
    make_job,
)
from qdash_mp.models import Job
from qdash_mp.testing import CollectorThread


def test_payload_round_trip() -> None:
    job = make_job(7, "t.add", (1, "a"), {"b": [2]}, "emails", attempts=2, enqueued_at=5.0)
    assert (job.id, job.name, job.attempts, job.enqueued_at) == ("7", "t.add", 2, 5.0)
    assert job_args(job) == ([1, "a"], {"b": [2]}, "emails")
    assert job_args(make_job("8", "t", None, None, "")) == ([], {}, None)


@pytest.mark.parametrize(
    "payload",
    ["<not msgpack data>", {"args": "x"}, {"args": [], "kwargs": [1]}],
)
def test_a_payload_that_cannot_be_called_again_is_refused(payload: object) -> None:
    with pytest.raises(ValueError, match="job 'j'"):
        job_args(Job("j", "t", payload))


def test_adapter_clients_batch_every_half_second(qdash_collector: CollectorThread) -> None:
    made = ProcessClient(qdash_collector.socket_path)
    given = ProcessClient(qdash_collector.socket_path, flush_interval=0.05)
    try:
        assert FLUSH_INTERVAL == 0.5
        assert made.get()._config.flush_interval == FLUSH_INTERVAL
        assert given.get()._config.flush_interval == 0.05
        made.get().on_processed("q")
        assert made.get().flush(10)  # a flush does not wait for the next batch's tick
        assert qdash_collector.stats().queue("q").processed == 1
    finally:
        assert made.close(5.0)
        assert given.close(5.0)
