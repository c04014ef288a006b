"""The client's lifecycle hooks on the wire: runtimes, waits, started, active, jobs, tracking.

A scripted peer (a real Unix socket, our real decoder) records every BATCH a real ``Client``
sends; what the hooks reported must arrive exactly (counters, bucket counts) or as the latest
snapshot (gauges). Also: version negotiation with a v1 collector, and deltas above
``MAX_DELTA`` split over batches.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qdash_testing.collector import CollectorProc, short_dir, wait_for
from qdash_testing.peer import WAIT, Peer, totals, welcome_v2

from qdash_mp.client import Client, _LockedClient
from qdash_mp.client.batcher import Batcher
from qdash_mp.client.lifecycle import LifeBatcher, LifeState
from qdash_mp.client.tally import new_counts, snapshot
from qdash_mp.histogram import bucket_of
from qdash_mp.models import Job
from qdash_mp.wire import (
    MAX_DELTA,
    Batch,
    ErrorCode,
    ErrorMsg,
    FrameDecoder,
    Hello,
    Message,
    Welcome,
)


@pytest.fixture
def where() -> Iterator[Path]:
    path = short_dir("qlc")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def peer(where: Path) -> Iterator[Peer]:
    p = Peer(str(where / "c.sock"), welcome_v2)
    yield p
    p.close()


def make(peer: Peer, **kw: object) -> Client:
    return Client(
        peer.listener.getsockname(),
        flush_interval=0.02,
        reconnect_max=0.05,
        **kw,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- the batcher


def test_a_delta_above_max_delta_is_split_over_batches() -> None:
    """The wire refuses a delta above MAX_DELTA: the batcher caps it, the rest follows."""
    counts = tuple(new_counts(c) for c in ({"q": MAX_DELTA + 5}, {}, {}, {"q": 3}))
    batcher = Batcher(counts, collections.deque(), 10)
    got = []
    for seq in (1, 2, 3):
        built = batcher.next_batch(seq, batcher.deltas(), 0)
        if built is None:
            break
        (msg,) = FrameDecoder().feed(built[0])
        assert isinstance(msg, Batch)
        got.append(msg.counters["q"])
    assert got == [(MAX_DELTA, 0, 0, 3), (5, 0, 0, 0)]
    assert not batcher.has_news()


def test_bucket_deltas_above_max_delta_are_split_too() -> None:
    life = LifeState()
    batcher = Batcher(({}, {}, {}, {}), collections.deque(), 10, LifeBatcher(life))
    life.started["q"] = MAX_DELTA + 1
    first = batcher.next_batch(1, batcher.deltas(), 0)
    second = batcher.next_batch(2, batcher.deltas(), 0)
    assert first is not None
    assert second is not None
    msgs = [FrameDecoder().feed(f)[0] for f, _ in (first, second)]
    assert [m.started for m in msgs if isinstance(m, Batch)] == [{"q": MAX_DELTA}, {"q": 1}]


def test_runtimes_that_are_not_numbers_are_dropped_but_counted() -> None:
    life = LifeState()
    batcher = Batcher(({}, {}, {}, {}), collections.deque(), 10, LifeBatcher(life))
    life.runtimes["q"] = [0.05, "slow", None, 0.05, float("nan")]
    built = batcher.next_batch(1, batcher.deltas(), 0)
    assert built is not None
    (msg,) = FrameDecoder().feed(built[0])
    assert isinstance(msg, Batch)
    assert msg.counters["q"] == (0, 5, 0, 0)
    assert msg.hist["q"] == ({bucket_of(0.05): 2, 0: 1}, {})


# --------------------------------------------------------------------------- on the wire


def test_runtimes_waits_started_and_active_reach_the_collector(peer: Peer) -> None:
    client = make(peer, name="worker-7")
    try:
        for _ in range(3):
            client.on_processed("q", runtime=0.05)
        client.on_failed("q", None, "boom", runtime=2.0)
        job = Job(id="j1", name="send", payload=None, enqueued_at=time.time() - 1.2)
        client.on_started("q", job)
        client.on_started("anon")
        assert client.flush(WAIT)
        now = totals(peer.batches())
        assert now["active"] == {"q": 1, "anon": 1}
        jobs = now["jobs"]
        assert isinstance(jobs, tuple)
        assert [(q, i, n) for q, i, n, _ in jobs] == [("q", "j1", "send")]
        assert abs(jobs[0][3] - time.time()) < 60
        client.on_processed("q", job)  # timed from on_started
        client.on_processed("anon")
        assert client.flush(WAIT)
    finally:
        client.close(WAIT)
    t = totals(peer.batches())
    assert t["counters"] == {"q": [0, 4, 1, 0], "anon": [0, 1, 0, 0]}
    assert t["started"] == {"q": 1, "anon": 1}
    runtime = t["runtime"]
    assert isinstance(runtime, dict)
    assert sum(runtime["q"].values()) == 5
    assert runtime["q"][bucket_of(0.05)] >= 3
    assert runtime["q"][bucket_of(2.0)] == 1
    wait = t["wait"]
    assert isinstance(wait, dict)
    (bucket,) = wait["q"]
    assert abs(bucket - bucket_of(1.2)) <= 3  # a few ms of scheduling
    assert t["active"] == {}
    assert t["jobs"] == ()
    assert t["events"] == []  # nothing tracked
    hello = peer.conns[0].hello
    assert hello is not None
    assert (hello.version, hello.name, hello.track) == (2, "worker-7", None)


def test_gauges_are_sent_again_after_each_welcome(where: Path) -> None:
    peer = Peer(str(where / "c.sock"), welcome_v2, hang_up_after=1)
    client = make(peer)
    try:
        client.on_started("q", Job(id="a", name="n", payload=None))
        wait_for(lambda: len(peer.conns) >= 2 and peer.conns[1].batches, WAIT, "a reconnect")
        assert client.flush(WAIT)
        first = peer.conns[1].batches[0]
        assert first.active == {"q": 1}
        assert first.jobs is not None
        assert [j[1] for j in first.jobs] == ["a"]
    finally:
        client.close(WAIT)
        peer.close()


def test_tracked_queues_send_events(peer: Peer) -> None:
    client = make(peer, track_jobs=["q"])
    try:
        for queue in ("q", "other"):
            job = Job(id=f"{queue}-1", name="send", payload=None)
            client.on_pushed(queue, job)
            client.on_started(queue, job)
            client.on_processed(queue, job, runtime=0.5)
            job2 = Job(id=f"{queue}-2", name="send", payload=None)
            client.on_pushed(queue, job2)
            client.on_started(queue, job2)
            client.on_failed(queue, job2, "boom")
        assert client.flush(WAIT)
    finally:
        client.close(WAIT)
    events = totals(peer.batches())["events"]
    assert isinstance(events, list)
    assert [(e[0], e[1], e[2]) for e in events] == [
        ("p", "q", "q-1"),
        ("s", "q", "q-1"),
        ("d", "q", "q-1"),
        ("p", "q", "q-2"),
        ("s", "q", "q-2"),
        ("f", "q", "q-2"),
    ]
    assert events[2][5] == 0.5
    assert events[5][5] is not None  # measured
    hello = peer.conns[0].hello
    assert hello is not None
    assert hello.track == ("q",)


def test_a_v1_collector_gets_v1_hello_and_batches(where: Path) -> None:
    def v1_only(n: int, hello: Hello) -> Message:
        if hello.version != 1:
            return ErrorMsg(ErrorCode.VERSION, f"protocol version {hello.version} unsupported")
        return Welcome(last_seq=0, version=1)

    peer = Peer(str(where / "c.sock"), v1_only)
    client = make(peer)
    try:
        client.on_started("q", Job(id="a", name="n", payload=None))
        client.on_processed("q", runtime=0.05)
        client.on_processed("q", Job(id="a", name="n", payload=None))
        assert client.flush(WAIT)
    finally:
        client.close(WAIT)
        peer.close()
    assert [c.hello.version for c in peer.conns if c.hello] == [2, 1]
    batches = peer.batches()
    assert batches
    assert not any(b.has_ext for b in batches)
    assert totals(batches)["counters"] == {"q": [0, 2, 0, 0]}


def test_locked_twin_agrees_on_the_lifecycle_hooks(where: Path) -> None:
    nowhere = str(where / "absent.sock")
    plain = Client(nowhere, client_id="same")
    locked = _LockedClient(nowhere, client_id="same")
    try:
        for c in (plain, locked):
            for i in range(20):
                job = Job(id=f"j{i}", name="t", payload=None, enqueued_at=1.0)
                c.on_started("q", job)
                if i % 2:
                    c.on_processed("q", job, runtime=0.01)
                elif i % 3:
                    c.on_failed("q", job, "x", runtime=0.02)
            c.on_started("q")
            c.on_processed("q", runtime=0.03)
        assert type(plain) is Client
        assert [snapshot(c) for c in plain._counts] == [snapshot(c) for c in locked._counts]
        assert plain._runtimes == locked._runtimes
        assert plain._fruntimes == locked._fruntimes
        assert plain._started == locked._started
        assert plain._life.started_ids == locked._life.started_ids == {"q": 20}
        assert plain._life.done_ids == locked._life.done_ids == {"q": 16}
        assert sorted(plain._jobs) == sorted(locked._jobs) == ["j0", "j12", "j18", "j6"]
        assert len(plain._wait_lists["q"]) == len(locked._wait_lists["q"]) == 20
    finally:
        plain.close(timeout=0)
        locked.close(timeout=0)


def test_lifecycle_hooks_never_raise_on_bad_arguments(where: Path) -> None:
    client = Client(str(where / "absent.sock"), track_jobs=True)
    try:
        client.on_started("", Job(id="x", name="n", payload=None))  # bad queue: dropped
        client.on_started("q", object())  # type: ignore[arg-type]  # no id
        client.on_started("q", Job(id=["unhashable"], name="n", payload=None))  # type: ignore[arg-type]
        client.on_processed("q", object())  # type: ignore[arg-type]
        client.on_processed("q", runtime="slow")  # type: ignore[arg-type]
        client.on_failed("q", None, "x", runtime=object())  # type: ignore[arg-type]
        client.on_processed("bad\ud800", runtime=0.1)
        client.on_started("q", Job(id="w", name="n", payload=None, enqueued_at="soon"))  # type: ignore[arg-type]
        assert "bad\ud800" not in client._runtimes
        assert "" not in client._started
        assert client._started["q"] == 3
        assert list(client._jobs) == ["w"]
        assert "q" not in client._wait_lists  # enqueued_at not a number
    finally:
        client.close(timeout=0)


def test_tracking_events_are_bounded(where: Path) -> None:
    from qdash_mp.client.lifecycle import MAX_PENDING_EVENTS

    client = Client(str(where / "absent.sock"), track_jobs=["q"])
    try:
        job = Job(id="j", name="n", payload=None)
        for _ in range(MAX_PENDING_EVENTS + 5):
            client.on_pushed("q", job)
        assert len(client._events) == MAX_PENDING_EVENTS
        assert client._life.dropped_events == 5
    finally:
        client.close(timeout=0)


def test_track_jobs_and_name_are_checked(where: Path) -> None:
    from qdash_mp.errors import ConfigError

    nowhere = str(where / "absent.sock")
    with pytest.raises(ConfigError, match="track_jobs"):
        Client(nowhere, track_jobs="q")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a queue name"):
        Client(nowhere, track_jobs=[""])
    with pytest.raises(ConfigError, match="name must be a str"):
        Client(nowhere, name="n" * 300)


def test_bucket_counts_are_exact_across_threads_and_a_reconnect(where: Path) -> None:
    """4 threads time jobs while the sender drains their lists; the connection drops once
    (unACKed batches resent): the bucket counts received equal those of the data."""
    import random

    from qdash_mp.histogram import NBUCKETS, count_values

    peer = Peer(str(where / "c.sock"), welcome_v2, hang_up_after=1)
    client = Client(peer.listener.getsockname(), flush_interval=0.002, reconnect_max=0.05)
    per_thread = 5_000
    rngs = [random.Random(t) for t in range(4)]
    data = [[rng.lognormvariate(-3, 1.5) for _ in range(per_thread)] for rng in rngs]
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        for i, rt in enumerate(data[t]):
            if i % 100 == 0:
                job = Job(id=f"{t}-{i}", name="n", payload=None, enqueued_at=time.time() - 1)
                client.on_started("q", job)
                client.on_processed("q", job, runtime=rt)
            else:
                client.on_processed("q", runtime=rt)

    client.on_pushed("warm-up")  # batch 1, lost with the first connection
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert client.flush(WAIT)
    finally:
        client.close(WAIT)
        peer.close()
    assert len(peer.conns) >= 2
    want = [0] * NBUCKETS
    for d in data:
        count_values(want, d)
    t = totals(peer.batches())
    runtime = t["runtime"]
    assert isinstance(runtime, dict)
    got = [runtime["q"].get(i, 0) for i in range(NBUCKETS)]
    assert got == want
    assert t["counters"] == {"q": [0, 4 * per_thread, 0, 0], "warm-up": [1, 0, 0, 0]}
    assert t["started"] == {"q": 4 * per_thread // 100}
    wait = t["wait"]
    assert isinstance(wait, dict)
    assert sum(wait["q"].values()) == 4 * per_thread // 100
    assert t["active"] == {}


# --------------------------------------------------------------------------- real collector


@pytest.mark.xfail(
    importlib.util.find_spec("qdash_mp.collector.lifecycle") is None,
    reason="the collector applies BATCH v2 bucket deltas from w2/l3 on (passes merged with it)",
    strict=True,
)
def test_round_trip_through_a_real_collector(
    running_collector: CollectorProc, client_factory: Callable[..., Client]
) -> None:
    """Runtimes and waits of a real client land in a real collector's shared memory
    exactly: counts, and summaries equal to those of the same data's buckets."""
    import random

    from qdash_mp.histogram import NBUCKETS, count_values, summary
    from qdash_mp.shm import SharedStatsReader

    rng = random.Random(9)
    data = [rng.lognormvariate(-3, 1) for _ in range(2_000)]
    client = client_factory(running_collector.socket, name="round-trip")
    for rt in data:
        client.on_pushed("rt")
        client.on_processed("rt", runtime=rt)
    job = Job(id="live", name="n", payload=None, enqueued_at=time.time() - 2.0)
    client.on_started("rt", job)
    assert client.flush(WAIT)
    with SharedStatsReader(running_collector.shm) as reader:
        (row,) = [s for s in reader.snapshot().queues if s.queue == "rt"]
    assert (row.pushed, row.processed) == (2_000, 2_000)
    runtime = getattr(row, "runtime", None)
    if runtime is None:
        pytest.skip("the shared stats do not carry runtime histograms yet")
    want = [0] * NBUCKETS
    count_values(want, data)
    expected = summary(want)
    assert runtime.count == 2_000
    assert (runtime.p50, runtime.p90, runtime.p95, runtime.p99) == (
        expected.p50,
        expected.p90,
        expected.p95,
        expected.p99,
    )
    assert row.wait.count == 1
    client.on_processed("rt", job)
    assert client.flush(WAIT)
    with SharedStatsReader(running_collector.shm) as reader:
        (row,) = [s for s in reader.snapshot().queues if s.queue == "rt"]
    assert row.runtime.count == 2_001
    assert row.processed == 2_001


def test_runtime_lists_are_drained_without_a_collector(where: Path) -> None:
    """The hooks' runtime lists stay small while the collector is away: the sender drains
    them into its cumulative buckets whether or not it can send."""
    client = Client(str(where / "absent.sock"), flush_interval=0.01, reconnect_max=0.05)
    try:
        for _ in range(1000):
            client.on_processed("q", runtime=0.01)
        wait_for(lambda: not client._runtimes["q"], WAIT, "the runtime list drained")
        life = client._sender._life
        assert life is not None
        assert life.extra_processed == {"q": 1000}
    finally:
        client.close(timeout=0)


def test_jobs_started_without_an_id_are_active_until_as_many_finish() -> None:
    life = LifeState()
    counts = tuple(new_counts(c) for c in ({}, {"other": 5}, {}, {}))
    batcher = Batcher(counts, collections.deque(), 10, LifeBatcher(life))
    assert batcher.life is not None
    life.started["q"] = 3
    assert batcher.life.gauges()[0] == {"q": 3}
    counts[1]["q"] = itertools.count(1)
    life.runtimes["q"] = [0.1]
    assert batcher.life.gauges()[0] == {"q": 1}
    counts[2]["q"] = itertools.count(1)
    assert batcher.life.gauges()[0] == {}
    counts[2]["q"] = itertools.count(5)  # more finishes than starts: never below 0
    assert batcher.life.gauges()[0] == {}


def test_a_finish_hook_bound_before_the_first_start_still_ends_the_job(where: Path) -> None:
    """Integrations keep bound hooks (``done = client.on_processed``) from before their first
    ``on_started``; the job must still end and be timed (a class switch broke this)."""
    client = Client(str(where / "absent.sock"))
    try:
        start, done = client.on_started, client.on_processed
        job = Job(id="j", name="n", payload=None)
        start("q", job)
        done("q", job)
        assert client._jobs == {}
        assert len(client._runtimes["q"]) == 1
        assert client._life.done_ids == {"q": 1}
    finally:
        client.close(timeout=0)


def test_a_retried_attempt_is_no_longer_active(peer: Peer) -> None:
    """A library retry ends the attempt here (the next may run in another process): counted
    retried, not active, no runtime recorded. Without ``job`` only the count changes."""
    client = make(peer)
    try:
        job = Job(id="r1", name="flaky")
        client.on_started("q", job)
        client.on_started("q", Job(id="r2", name="flaky"))
        assert client.flush(WAIT)
        assert totals(peer.batches())["active"] == {"q": 2}
        client.on_retried("q", job)
        client.on_retried("q")  # no job: r2 stays active
        assert client.flush(WAIT)
        t = totals(peer.batches())
        assert t["active"] == {"q": 1}
        jobs = t["jobs"]
        assert isinstance(jobs, tuple)
        assert [i for _, i, _, _ in jobs] == ["r2"]
    finally:
        client.close(WAIT)
    t = totals(peer.batches())
    assert t["counters"] == {"q": [0, 0, 0, 2]}
    assert t["runtime"] == {}


def test_dirty_buckets_give_the_deltas_of_a_full_scan() -> None:
    """The sender tick looks only at buckets marked dirty; that must give exactly what a
    scan of all 2 x 418 cumulative-vs-sent buckets gives, through partial sends (a batch
    lost before its ACK leaves its deltas to the next tick) and bad values."""
    rng = random.Random(5)
    life = LifeState()
    lb = LifeBatcher(life)

    def full_scan() -> list[tuple[str, dict[int, int], dict[int, int]]]:
        out = []
        for q, (rt, wt) in lb._cum.items():
            srt, swt = lb._sent[q]
            dr = {i: c - s for i, (c, s) in enumerate(zip(rt, srt, strict=True)) if c != s}
            dw = {i: c - s for i, (c, s) in enumerate(zip(wt, swt, strict=True)) if c != s}
            if dr or dw:
                out.append((q, dr, dw))
        return out

    for _ in range(200):
        for q in ("a", "b", "c"):
            k = rng.choice([0, 0, 1, 5, 40, 300])
            life.runtimes.setdefault(q, []).extend(rng.lognormvariate(-4, 3) for _ in range(k))
            life.fruntimes.setdefault(q, []).extend([0.5] * rng.randrange(2))
            life.waits.setdefault(q, []).extend(rng.expovariate(3) for _ in range(k // 2))
        if rng.random() < 0.05:
            life.runtimes["a"].append("not a number")
        lb.drain()
        got = lb.hist_deltas()
        assert got == full_scan()
        assert lb.has_news(True) == bool(got)
        for q, dr, dw in got:
            if rng.random() < 0.6:  # the others are resent next tick
                lb.hist_sent(q, dr, dw)
    for q, dr, dw in lb.hist_deltas():
        lb.hist_sent(q, dr, dw)
    assert lb._cum == lb._sent
    assert not lb.has_news(True)
