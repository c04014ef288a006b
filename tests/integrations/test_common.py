"""What every adapter shares: the retry payload, and the per-process client's settings."""

from __future__ import annotations

import pytest

from qdash_mp.errors import ConfigError
from qdash_mp.integrations._common import (
    FLUSH_ENV,
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


def test_adapter_clients_batch_every_second(
    qdash_collector: CollectorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(FLUSH_ENV, raising=False)
    made = ProcessClient(qdash_collector.socket_path)
    given = ProcessClient(qdash_collector.socket_path, flush_interval=0.05)
    try:
        assert FLUSH_INTERVAL == 1.0
        assert made.get()._config.flush_interval == FLUSH_INTERVAL
        assert given.get()._config.flush_interval == 0.05
        made.get().on_processed("q")
        assert made.get().flush(10)  # a flush does not wait for the next batch's tick
        assert qdash_collector.stats().queue("q").processed == 1
    finally:
        assert made.close(5.0)
        assert given.close(5.0)


def test_the_batch_interval_can_be_set_for_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FLUSH_ENV, " 2.5 ")
    assert ProcessClient("/nonexistent/s.sock").client_kw["flush_interval"] == 2.5
    given = ProcessClient("/nonexistent/s.sock", flush_interval=0.05)  # the argument wins
    assert given.client_kw["flush_interval"] == 0.05
    monkeypatch.setenv(FLUSH_ENV, "")
    assert ProcessClient("/nonexistent/s.sock").client_kw["flush_interval"] == FLUSH_INTERVAL


@pytest.mark.parametrize("text", ["0", "-1", "abc", "nan", "inf", "3601", "0x10"])
def test_a_bad_batch_interval_says_what_it_must_be(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv(FLUSH_ENV, text)
    with pytest.raises(ConfigError, match=r"QDASH_FLUSH_INTERVAL must be .* such as 0.5"):
        ProcessClient("/nonexistent/s.sock")
