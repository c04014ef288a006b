"""The hooks contract (``qdash_mp.Hooks``), and the client's two hook paths agreeing.

``Client`` and the embedded ``Stats`` are both ``Hooks``, so integrations can call either
the same way. ``Client`` has a plain (GIL) hook path and a locked one for free-threaded
builds (``_LockedClient``); the same calls must give the same counts and the same frames.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qdash_mp import Client, Hooks, Job, Stats
from qdash_mp.client import _LockedClient
from qdash_mp.client.batcher import Batcher
from qdash_mp.client.tally import snapshot
from qdash_mp.stats import StatsBase
from qdash_mp.wire import Batch, FailedRecord, FrameDecoder, unpack_failed

ODD_ERROR = object()
"""Neither an exception nor a str (its repr, with its address, becomes the error text)."""

HOOKS = ("on_pushed", "on_started", "on_processed", "on_failed", "on_retried")


def values(client: Client) -> tuple[dict[str, int], ...]:
    """The client's four cumulative counters (pushed, processed, failed, retried) now."""
    return tuple(snapshot(c) for c in client._counts)


@pytest.fixture
def nowhere() -> Iterator[str]:
    """A socket path nobody listens on: the clients keep everything in memory."""
    path = Path(tempfile.mkdtemp(prefix="qch"))
    yield str(path / "absent.sock")
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- the contract


def test_client_and_stats_are_hooks() -> None:
    assert issubclass(Client, Hooks)
    assert issubclass(_LockedClient, Hooks)
    assert issubclass(StatsBase, Hooks)
    assert issubclass(Stats, Hooks)


def test_the_base_hooks_do_nothing() -> None:
    hooks = Hooks()
    job = Job(id="j", name="t", payload=None)
    hooks.on_pushed("q", job)
    hooks.on_started("q", job)
    hooks.on_processed("q", job, runtime=0.5)
    hooks.on_failed("q", job, ValueError("x"), runtime=0.5)
    hooks.on_retried("q")
    for name in HOOKS:
        doc = inspect.getdoc(getattr(Hooks, name))
        assert doc is not None
        assert "\n" not in doc  # one line each


def test_every_implementation_takes_the_contracts_arguments(nowhere: str) -> None:
    """Each hook called with the contract's full arguments, positionally and by keyword."""
    job = Job(id="j", name="t", payload=None)
    stats = Stats()
    with Client(nowhere) as client:
        for target in (stats, client):
            target.on_pushed("q", job)
            target.on_started("q", job)
            target.on_processed("q", job, 0.25)
            target.on_processed("q", job=job, runtime=0.25)
            target.on_failed("q", job, ValueError("x"), 0.25)
            target.on_failed("q", job=job, error="boom", runtime=0.25)
            target.on_retried("q")
        # processed with a runtime: in the runtime list (the sender counts it), not the dict
        assert values(client) == ({"q": 1}, {}, {"q": 2}, {"q": 1})
        assert client._runtimes == {"q": [0.25, 0.25]}
        assert client._fruntimes == {"q": [0.25, 0.25]}
        assert client._started == {"q": 1}
    # Existing embedded calls keep working: on_failed(queue) alone, runtime by keyword.
    stats.on_failed("q")
    stats.on_processed("q", runtime=0.1)
    row = stats.snapshot().queues[0]
    assert (row.pushed, row.processed, row.failed, row.retried) == (1, 3, 3, 1)


def counted(client: Client) -> tuple[dict[str, int], ...]:
    """The client's cumulative counts, with the jobs still in its runtime lists."""
    pushed, processed, failed, retried = values(client)
    for q, lst in client._runtimes.items():
        processed[q] = processed.get(q, 0) + len(lst)
    return pushed, processed, failed, retried


def test_integrations_can_feed_any_hooks(nowhere: str) -> None:
    """One function written against ``Hooks`` feeds the client and the embedded stats."""

    def worker_loop(hooks: Hooks) -> None:
        for i in range(10):
            job = Job(id=f"j{i}", name="t", payload={"i": i})
            hooks.on_pushed("emails", job)
            hooks.on_started("emails", job)
            if i % 3:
                hooks.on_processed("emails", job, runtime=0.01)
            else:
                hooks.on_failed("emails", job, RuntimeError("x"), runtime=0.01)

    stats = Stats()
    worker_loop(stats)
    with Client(nowhere) as client:
        worker_loop(client)
        counts = counted(client)
    row = stats.snapshot().queues[0]
    assert [row.pushed, row.processed, row.failed, row.retried] == [
        c.get("emails", 0) for c in counts
    ]


# --------------------------------------------------------------------------- two hook paths


def calls(client: Client) -> None:
    """One fixed sequence of hook calls, odd arguments included."""
    weird: Any = Job(id=5, name=None, payload=object(), attempts="x", enqueued_at="y")  # type: ignore[arg-type]
    for i in range(300):
        client.on_pushed("a")
        client.on_processed("a", None, 0.1)
        if i % 7 == 0:
            job = Job(id=f"j{i}", name="t", payload={"i": i}, attempts=i, enqueued_at=1.5)
            try:
                raise ValueError(f"e{i}")
            except ValueError as exc:
                client.on_failed("a", job, exc)
        if i % 11 == 0:
            client.on_retried("b")
            client.on_failed("b", None, "no job")
        if i % 50 == 0:
            client.on_pushed(f"new-{i}")
    client.on_pushed(None)  # type: ignore[arg-type]
    client.on_processed(123)  # type: ignore[arg-type]
    client.on_retried(["unhashable"])  # type: ignore[arg-type]
    client.on_failed("", Job(id="e", name="t", payload=None), "empty queue name")
    client.on_failed("q" * 300, Job(id="l", name="t", payload=None), "long queue name")
    client.on_pushed("bad\ud800")
    client.on_failed("a", weird, "weird job")
    client.on_failed("a", Job(id="s\ud800", name="t", payload=None), "e\ud800")
    client.on_failed("a", Job(id="big", name="t", payload=b"x" * 100), ODD_ERROR)  # type: ignore[arg-type]


def without_time(raw: bytes) -> FailedRecord:
    return dataclasses.replace(unpack_failed(raw), failed_at=0.0)


def first_batch(client: Client) -> tuple[bytes, Batch]:
    """Batch 1 as the sender would build it from this client's counts and failed jobs."""
    batcher = Batcher(client._counts, client._failed_jobs, 10_000)
    built = batcher.next_batch(1, batcher.deltas(), 0)
    assert built is not None
    frame, _taken = built
    (msg,) = FrameDecoder().feed(frame)
    assert isinstance(msg, Batch)
    return frame, msg


def test_locked_and_plain_hooks_give_the_same_counts_and_frames(nowhere: str) -> None:
    plain = Client(nowhere, client_id="same")
    locked = _LockedClient(nowhere, client_id="same")
    try:
        assert type(plain) is Client  # this build has the GIL
        assert type(locked) is _LockedClient
        calls(plain)
        calls(locked)
        assert values(plain) == values(locked)
        assert values(plain)[0]["a"] == 300
        assert plain.dropped_failed == locked.dropped_failed == 0
        records = [without_time(r) for r in plain._failed_jobs]
        assert records == [without_time(r) for r in locked._failed_jobs]
        assert len(records) == 43 + 3  # jobs given; a None job is counted only
        # Counter rows alone: byte-identical frames.
        counts_only = [Batcher(c._counts, type(c._failed_jobs)(), 1) for c in (plain, locked)]
        frames = [b.next_batch(1, b.deltas(), 0) for b in counts_only]
        assert frames[0] is not None
        assert frames[0] == frames[1]
        # Whole batch: identical but for the failure times.
        (_, p), (_, q) = first_batch(plain), first_batch(locked)
        assert p.counters == q.counters
        assert [without_time(r) for r, _, _ in p.failed] == [
            without_time(r) for r, _, _ in q.failed
        ]
        assert [queue for _, queue, _ in p.failed] == [queue for _, queue, _ in q.failed]
    finally:
        plain.close(timeout=0)
        locked.close(timeout=0)


def test_client_picks_the_locked_hooks_when_the_gil_is_disabled(
    nowhere: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qdash_mp.client.hooks as hooks_module

    monkeypatch.setattr(hooks_module, "gil_disabled", lambda: True)
    with Client(nowhere) as client:
        assert type(client) is _LockedClient
        client.on_processed("a")
        assert values(client)[1]["a"] == 1  # processed
