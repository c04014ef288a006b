"""``RunLog``: hooks recorded as tuples and replayed by the sender agree with direct hooks.

The fast path (an adapter appends ``(obj, mono)`` ...) and the plain path (``on_started`` /
``on_processed`` / ``on_failed`` / ``on_retried``) must put the same counts, runtimes, waits,
active jobs and failed records on the wire; a flush covers every record appended before it;
a forked child does not report its parent's records; a log no client replays keeps nothing.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qdash_testing.collector import CollectorProc, short_dir
from qdash_testing.forking import fork_quietly
from qdash_testing.peer import WAIT, Peer, totals, welcome_v2

from qdash_mp.client import Client, runlog
from qdash_mp.client.runlog import DROPPED, FAILED, PROCESSED, RETRIED, RunLog
from qdash_mp.histogram import bucket_of
from qdash_mp.models import Job
from qdash_mp.records import FailedRecord, unpack_failed
from qdash_mp.shm import SharedStatsReader


@pytest.fixture
def where() -> Iterator[Path]:
    path = short_dir("qrl")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Msg:
    """What an adapter's hook holds (a library's message): described on the sender thread."""

    def __init__(self, queue: str, jid: str, name: str, enqueued: float, args: list[Any]):
        self.queue, self.jid, self.name, self.enqueued, self.args = queue, jid, name, enqueued, args


def describe(msg: Msg, full: bool) -> tuple[str, Job]:
    payload = {"args": msg.args, "kwargs": {}, "queue": msg.queue} if full else None
    return msg.queue, Job(msg.jid, msg.name, payload, 1, msg.enqueued)


def job_of(msg: Msg) -> Job:
    return describe(msg, True)[1]


def failed_of(peer: Peer) -> list[FailedRecord]:
    return [unpack_failed(data) for b in peer.batches() for data, _, _ in b.failed]


def test_replayed_records_agree_with_the_direct_hooks(where: Path) -> None:
    """The same jobs through both paths: identical batches, to the bucket (runtimes given to
    the direct path are the recorded ones, so both land in the same buckets)."""
    now = time.time()
    msgs = [Msg("q" if i % 3 else "r", f"j{i}", "t", now - 0.5 - i / 100, [i]) for i in range(30)]
    peers = [Peer(str(where / f"{k}.sock"), welcome_v2) for k in "ab"]
    log = RunLog(describe)
    direct = Client(peers[0].listener.getsockname(), flush_interval=10.0)
    logged = Client(peers[1].listener.getsockname(), flush_interval=10.0, run_log=log)
    try:
        error = ValueError("boom")
        for i, m in enumerate(msgs):
            start = time.monotonic()
            runtime = 0.001 * (i + 1)
            log.records.append((m, start))
            direct.on_started(m.queue, describe(m, False)[1])
            if i == len(msgs) - 1:
                continue  # still running: active in both
            end = start + runtime
            if i % 5 == 0:
                log.records.append((m, end, FAILED, error))
                direct.on_failed(m.queue, job_of(m), error, runtime)
            elif i % 7 == 0:
                log.records.append((m, end, RETRIED, None))
                direct.on_retried(m.queue, describe(m, False)[1])
            elif i % 11 == 0:
                log.records.append((m, end, DROPPED, None))
                direct._jobs.pop(m.jid)  # what a skip does on the plain path
            else:
                log.records.append((m, end, PROCESSED, None))
                direct.on_processed(m.queue, describe(m, False)[1], runtime)
        assert direct.flush(WAIT)
        assert logged.flush(WAIT)
        assert log.pending() == 0
        got = [totals(p.batches()) for p in peers]
        # The start's wall time is the recorded monotonic time moved by the clocks' offset
        # at the replay: the same instant to within the offset's jitter.
        starts = [[row[3] for row in t.pop("jobs")] for t in got]  # type: ignore[attr-defined]
        assert starts[1] == pytest.approx(starts[0], abs=0.001)
        assert got[0] == got[1]
        t = got[1]
        assert t["counters"] == {"q": [0, 10, 4, 3], "r": [0, 7, 2, 1]}
        assert t["started"] == {"q": 20, "r": 10}
        assert t["active"] == {"q": 1}
        assert len(starts[1]) == 1  # j29
        runtime = t["runtime"]
        assert isinstance(runtime, dict)
        assert runtime["q"][bucket_of(0.002)] == 1  # j1, processed in 2 ms
        wait = t["wait"]
        assert isinstance(wait, dict)
        assert sum(wait["q"].values()) + sum(wait["r"].values()) == 30
        failed = [[(f.job_id, f.payload, f.error) for f in failed_of(p)] for p in peers]
        assert failed[0] == failed[1]
        assert [f[0] for f in failed[1]] == [f"j{i}" for i in range(0, 29, 5)]
    finally:
        direct.close(WAIT)
        logged.close(WAIT)
        for p in peers:
            p.close()


@pytest.fixture
def logged(where: Path) -> Iterator[tuple[Peer, RunLog, Client]]:
    """A fake collector, a run log and a client replaying it to that collector."""
    peer = Peer(str(where / "c.sock"), welcome_v2)
    log = RunLog(describe)
    client = Client(peer.listener.getsockname(), flush_interval=10.0, run_log=log)
    try:
        yield peer, log, client
    finally:
        client.close(WAIT)
        peer.close()


def test_a_failure_keeps_its_traceback_and_payload(
    logged: tuple[Peer, RunLog, Client],
) -> None:
    peer, log, client = logged
    m = Msg("q", "bad", "task.bad", time.time(), [1, "x"])
    try:
        raise KeyError("missing")
    except KeyError as exc:
        error = exc
    log.records.append((m, time.monotonic()))
    log.records.append((m, time.monotonic(), FAILED, error))
    del error
    assert client.flush(WAIT)
    (failed,) = failed_of(peer)
    assert failed.payload == {"args": [1, "x"], "kwargs": {}, "queue": "q"}
    assert failed.error == "KeyError: 'missing'"
    assert 'raise KeyError("missing")' in failed.traceback


def test_a_record_that_cannot_be_described_is_dropped_alone(
    logged: tuple[Peer, RunLog, Client], caplog: pytest.LogCaptureFixture
) -> None:
    peer, log, client = logged
    good = Msg("q", "g", "t", time.time(), [])
    log.records.append(("not a message", time.monotonic()))
    log.records.append((good, time.monotonic()))
    log.records.append((good, time.monotonic(), PROCESSED, None))
    assert client.flush(WAIT)
    assert totals(peer.batches())["counters"] == {"q": [0, 1, 0, 0]}
    assert "a job record could not be reported" in caplog.text


def test_an_end_reuses_its_starts_description_but_a_failure_asks_for_the_payload(
    where: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``describe`` a job that ends well or is retried; a failure's end asks again with
    ``full``; an end whose start this log never saw (or forgot: ``MAX_OPEN``) is described
    itself. The counts are those of the plain path either way."""
    calls: list[tuple[str, bool]] = []

    def counting(msg: Msg, full: bool) -> tuple[str, Job]:
        calls.append((msg.jid, full))
        return describe(msg, full)

    nowhere = str(where / "absent.sock")
    log = RunLog(counting)
    client = Client(nowhere, flush_interval=3600.0, run_log=log)
    try:
        ok, retried, bad, unseen = (Msg("q", j, "t", time.time(), []) for j in "abcd")
        for m in (ok, retried, bad):
            log.records.append((m, 1.0))
        log.records.append((ok, 1.5, PROCESSED, None))
        log.records.append((retried, 1.5, RETRIED, None))
        log.records.append((bad, 1.5, FAILED, "boom"))
        log.records.append((unseen, 1.5, PROCESSED, None))
        client._replay()
        assert calls == [
            ("a", False),
            ("b", False),
            ("c", False),
            ("c", True),
            ("d", False),
        ]
        assert client._jobs == {}
        assert next(iter(client._failed_jobs), None) is not None  # the payload's record

        calls.clear()
        monkeypatch.setattr(runlog, "MAX_OPEN", 3)
        starts = [Msg("q", f"s{i}", "t", time.time(), []) for i in range(5)]
        for m in starts:
            log.records.append((m, 2.0))
        client._replay()  # 5 open > 3: forgotten (the client still has them as active)
        assert len(client._jobs) == 5
        for m in starts:
            log.records.append((m, 2.5, PROCESSED, None))
        client._replay()
        assert calls == [(m.jid, False) for m in starts] * 2  # the ends described again
        assert client._jobs == {}
    finally:
        client.close(timeout=0)


def test_a_flush_covers_every_record_appended_before_it(
    running_collector: CollectorProc, client_factory: Callable[..., Client]
) -> None:
    """Four threads append start and end records while the sender replays them at its own
    ticks; after one flush the collector's counts and runtimes are exact, none active."""
    log = RunLog(describe)
    client = client_factory(running_collector.socket, flush_interval=0.005, run_log=log)
    per_thread = 2_500

    def work(k: int) -> None:
        for i in range(per_thread):
            m = Msg("rl", f"{k}-{i}", "t", time.time(), [])
            t = time.monotonic()
            log.records.append((m, t))
            log.records.append((m, t + 0.01, PROCESSED, None))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert client.flush(WAIT)
    with SharedStatsReader(running_collector.shm) as reader:
        (row,) = [s for s in reader.snapshot().queues if s.queue == "rl"]
    assert row.processed == 4 * per_thread
    assert row.active == 0
    assert row.runtime.count == 4 * per_thread
    assert row.runtime.p50 == pytest.approx(0.01, rel=0.1)


def test_a_log_keeps_records_only_while_a_client_replays_it(where: Path) -> None:
    log = RunLog(describe)
    m = Msg("q", "a", "t", time.time(), [])
    log.records.append((m, 1.0))
    assert log.pending() == 0  # no client yet: nothing piles up
    nowhere = str(where / "absent.sock")
    first = Client(nowhere, flush_interval=3600.0, run_log=log)
    log.records.append((m, 1.0))
    assert log.pending() == 1
    second = Client(nowhere, flush_interval=3600.0, run_log=log)  # takes the log over
    first.close(timeout=0)
    log.records.append((m, 2.0, PROCESSED, None))
    assert log.pending() >= 1  # still kept: the second client replays it
    second._replay()
    assert log.pending() == 0
    second.close(timeout=0)
    for _ in range(1000):
        log.records.append((m, 3.0))
    assert log.pending() == 0  # closed: dropped as they come


def test_a_forked_child_reports_its_own_records_not_its_parents(
    running_collector: CollectorProc, client_factory: Callable[..., Client]
) -> None:
    log = RunLog(describe)
    client = client_factory(running_collector.socket, flush_interval=3600.0, run_log=log)
    for i in range(3):  # recorded in the parent, not replayed at fork time
        m = Msg("fk", f"p{i}", "t", time.time(), [])
        log.records.append((m, time.monotonic()))
        log.records.append((m, time.monotonic(), PROCESSED, None))
    pid = fork_quietly()
    if pid == 0:  # child
        code = 1
        try:
            empty = log.pending() == 0
            for i in range(5):
                m = Msg("fk", f"c{i}", "t", time.time(), [])
                log.records.append((m, time.monotonic()))
                log.records.append((m, time.monotonic(), PROCESSED, None))
            code = 0 if empty and client.flush(WAIT) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.flush(WAIT)
    with SharedStatsReader(running_collector.shm) as reader:
        (row,) = [s for s in reader.snapshot().queues if s.queue == "fk"]
    assert (row.processed, row.active) == (3 + 5, 0)
