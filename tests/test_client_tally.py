"""The hooks' counters (``qdash_mp.client.tally``) count exactly what a plain dict would.

The hot path counts with ``next(itertools.count)`` instead of ``dict[q] += 1`` (cheaper,
``benchmarks/README.md``); the sender reads the counters through their repr. These tests
hold the two side by side: the same calls, counted by the client and by a plain dict of
ints, give identical counts -- for every hook, first calls of a queue, bad queue names,
str subclasses and threads.
"""

from __future__ import annotations

import itertools
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qdash_mp import Client, Job
from qdash_mp.client import _LockedClient
from qdash_mp.client.tally import new_counts, read, snapshot
from qdash_mp.wire import MAX_NAME


class Named(str):
    """A str subclass as queue name (counted under the plain str)."""


@pytest.fixture
def nowhere() -> Iterator[str]:
    path = Path(tempfile.mkdtemp(prefix="qct"))
    yield str(path / "absent.sock")
    shutil.rmtree(path, ignore_errors=True)


def values(client: Client) -> tuple[dict[str, int], ...]:
    return tuple(snapshot(c) for c in client._counts)


@pytest.mark.parametrize("start", [0, 1, 255, 256, 2**31, 2**63 - 3, 2**64 + 7])
def test_read_gives_the_number_of_nexts(start: int) -> None:
    c = itertools.count(start)
    assert read(c) == start
    for k in range(1, 6):  # across the 2**63 boundary the C counter changes mode
        next(c)
        if start + k == 2**63 - 1:
            continue  # CPython's repr shows count(<NULL>) there (never reached: tally.py)
        assert read(c) == start + k


def test_snapshot_and_new_counts_round_trip() -> None:
    seed = {"a": 0, "b": 7, "é": 2**40}
    counts = new_counts(seed)
    assert snapshot(counts) == seed
    next(counts["b"])
    assert snapshot(counts) == {**seed, "b": 8}
    assert new_counts() == {}


@pytest.mark.parametrize("kind", [Client, _LockedClient])
def test_hooks_count_what_a_plain_dict_counts(nowhere: str, kind: type[Client]) -> None:
    """A random mix of every hook, with and without jobs and runtimes, and bad names."""
    rng = random.Random(9)
    ref: tuple[dict[str, int], ...] = ({}, {}, {}, {})
    processed_by_runtime: dict[str, int] = {}
    queues = ["a", "b", "q" * MAX_NAME, Named("a"), "ü", "", "q" * (MAX_NAME + 1), None, 3]
    queues += [["x"], "\ud800"]
    client = kind(nowhere, flush_interval=0.002)  # its sender drains the runtime lists meanwhile
    try:
        for i in range(5000):
            q = rng.choice(queues)
            good = isinstance(q, str) and 1 <= len(q) <= MAX_NAME and q != "\ud800"
            key = str.__str__(q) if good else ""
            op = rng.randrange(7)
            job = Job(id=f"j{i}", name="t", payload=None)
            if op == 0:
                client.on_pushed(q)  # type: ignore[arg-type]
                kind_ = 0
            elif op == 1:
                client.on_processed(q)  # type: ignore[arg-type]
                kind_ = 1
            elif op == 2:
                client.on_processed(q, runtime=0.5)  # type: ignore[arg-type]
                if good:
                    processed_by_runtime[key] = processed_by_runtime.get(key, 0) + 1
                continue
            elif op == 3:
                client.on_started(q, job)  # type: ignore[arg-type]
                client.on_processed(q, job)  # type: ignore[arg-type]  # timed: a runtime
                if good:
                    processed_by_runtime[key] = processed_by_runtime.get(key, 0) + 1
                continue
            elif op == 4:
                client.on_failed(q, None, "boom")  # type: ignore[arg-type]
                kind_ = 2
            elif op == 5:
                client.on_failed(q, job, ValueError("x"), runtime=0.1)  # type: ignore[arg-type]
                kind_ = 2
            else:
                client.on_retried(q)  # type: ignore[arg-type]
                kind_ = 3
            if good:
                ref[kind_][key] = ref[kind_].get(key, 0) + 1
        assert values(client) == ref
        assert all(type(k) is str for c in client._counts for k in c)
    finally:
        client.close(timeout=0)
    # The sender thread (stopped now) may have drained runtime lists into extra_processed.
    life = client._sender._life
    assert life is not None
    drained, left = life.extra_processed, client._runtimes
    runtimes = {q: len(left.get(q, ())) + drained.get(q, 0) for q in set(left) | set(drained)}
    assert {q: n for q, n in runtimes.items() if n} == processed_by_runtime


def test_threads_creating_and_counting_queues_lose_nothing(nowhere: str) -> None:
    """Racing first calls of a queue (setdefault) and racing nexts: every call counted."""
    n, threads = 20_000, 4
    client = Client(nowhere)
    try:
        barrier = threading.Barrier(threads)

        def work(t: int) -> None:
            barrier.wait()
            for i in range(n):
                q = f"q{i % 50}"
                client.on_processed(q)
                client.on_pushed(q)

        ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        pushed, processed, failed, retried = values(client)
        want = {f"q{k}": threads * n // 50 for k in range(50)}
        assert processed == pushed == want
        assert failed == retried == {}
    finally:
        client.close(timeout=0)
