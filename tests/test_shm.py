"""Shared-memory Stats: one writer, readers in other processes, crashes, growth, odd names.

Everything runs on real segments in /dev/shm. The helper processes are this file run as a
script (``python tests/test_shm.py MODE ...``, see ``main`` at the bottom). The snapshot file
is tested in ``test_shm_snapshot.py``, the byte layout in ``test_shm_layout.py``; the decoding
helpers are in ``qdash_testing.shm``.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import uuid
from array import array
from collections.abc import Sequence
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qdash_testing.shm import (  # noqa: F401  (name_fixture: the `name` fixture)
    CLIENT_ENTRY,
    Clock,
    attach_untracked,
    attach_untracked_buf,
    finish,
    first_line,
    fresh_name,
    name_fixture,
    raw_clients,
    raw_header,
    raw_offsets,
    raw_rows,
    remove_segments,
    rows,
    segments,
    write_slot,
)

from qdash_mp.errors import CollectorError, ConfigError, QdashError
from qdash_mp.histogram import NBUCKETS, merge, summary
from qdash_mp.shm import (
    MAGIC,
    NAME_MAX,
    SharedStats,
    SharedStatsReader,
    ShmBusy,
    ShmError,
    ShmIncompatible,
    ShmLocked,
    ShmMissing,
    segment_name,
    stored_queue_name,
)
from qdash_mp.shm import commit as shm_commit
from qdash_mp.stats import (
    Stats,
    StatsBase,
    apply_deltas,
    read_record,
    record_len,
    ring_slots,
)


def raw_started(name: str) -> dict[str, int]:
    """queue -> its ``started`` slot (record slot 4, per ``qdash_mp.stats``), read raw from
    the newest generation."""
    newest = raw_header(attach_untracked_buf(name))["next"]
    shm = attach_untracked(segment_name(name, newest))
    try:
        h = raw_header(shm.buf)
        rec, d, _, _, _ = raw_offsets(h)
        names = [queue for queue, _, _ in raw_rows(shm.buf)]
        return {
            queue: struct.unpack_from("=q", shm.buf, d + 8 * rec * i + 32)[0]
            for i, queue in enumerate(names)
        }
    finally:
        shm.close()


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --- equivalence with Stats ------------------------------------------------------------------

QUEUES = ["default", "emails", "", "队列", "🙂 fun", "a" * 248]

ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "batch", "tick", "snapshot"]),
        st.lists(
            st.tuples(
                st.sampled_from(QUEUES),
                st.tuples(*[st.integers(0, 5)] * 4),
            ),
            min_size=1,
            max_size=3,
        ),
        st.sampled_from([0.0, 0.4, 1.0, 2.0, 7.0]),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(ops=ops, window=st.sampled_from([1, 3, 60]))
def test_snapshot_equals_stats_fed_the_same_calls(
    ops: list[tuple[str, list[tuple[str, tuple[int, ...]]], float]], window: int
) -> None:
    clock = Clock()
    name = fresh_name()
    stats = Stats(window, clock=clock)
    shared = SharedStats.create_or_attach(name, window=window, capacity=2, clock=clock)
    reader = SharedStatsReader(name, clock=clock)
    try:
        for op, items, advance in ops:
            if op == "add":
                for queue, deltas in items:
                    stats.add(queue, *deltas)
                    shared.add(queue, *deltas)
            elif op == "batch":
                batch = dict(items)
                for queue, deltas in batch.items():
                    stats.add(queue, *deltas)
                shared.apply_batch(batch)
            elif op == "tick":
                stats.on_processed(items[0][0])
                shared.on_processed(items[0][0])
            clock.t += advance
            expected = stats.snapshot()
            assert shared.snapshot() == expected
            assert reader.snapshot() == expected
    finally:
        reader.close()
        shared.unlink()
        remove_segments(name)


def test_hooks_and_throughput_match_stats() -> None:
    """The ``on_*`` hooks come from ``StatsBase``; throughput is the ring's, as in ``Stats``."""
    clock = Clock()
    name = fresh_name()
    stats = Stats(10, clock=clock)
    with SharedStats.create_or_attach(name, window=10, clock=clock) as shared:
        assert isinstance(shared, StatsBase)
        assert isinstance(stats, StatsBase)
        assert shared.window == stats.window == 10
        try:
            for second in range(25):
                for target in (stats, shared):
                    target.on_pushed("q")
                    target.on_processed("q", runtime=0.1)
                    if second % 3 == 0:
                        target.on_failed("q")
                        target.on_retried("q")
                clock.t += 1
                assert shared.snapshot() == stats.snapshot()
            assert shared.snapshot().totals.throughput == pytest.approx(1.0)
        finally:
            shared.unlink()
    remove_segments(name)


@settings(max_examples=300, deadline=None)
@given(
    ring=st.sampled_from([2, 3, 7, 61]),
    events=st.lists(st.tuples(st.integers(-200, 3), st.integers(-2, 6)), max_size=80),
    base=st.sampled_from([0, 5, 1_700_000_000]),
    started_ago=st.integers(-2, 100),
)
def test_read_record_fast_paths_match_the_definition(
    ring: int, events: list[tuple[int, int]], base: int, started_ago: int
) -> None:
    """``read_record``'s memcmp fast paths (added for shm snapshots) change no result.

    Throughput is, by definition, the sum of the buckets whose second is in
    ``[now - window, now)``, over ``min(window, now - started)``.
    """
    buf = array("q", bytes(8 * record_len(ring)))
    busy = random.Random(len(events)).random() < 0.5
    if busy:  # make the busy pattern likely: one job in each of the last ring seconds
        events = [(-k, 1) for k in range(ring)] + events
    for offset, delta in events:
        apply_deltas(buf, 0, ring, (0, delta, 0, 0), base + offset)
    now = base
    window = ring - 1
    recent = sum(buf[6 + ring + b] for b in range(ring) if now - window <= buf[6 + b] < now)
    span = min(window, now - (now - started_ago))
    expected = recent / span if span > 0 else 0.0
    for buffer in (buf, memoryview(buf.tobytes()).cast("q"), list(buf)):
        assert read_record(buffer, 0, ring, "q", now, now - started_ago).throughput == expected


# --- crash and reattach ----------------------------------------------------------------------


def test_reattach_after_kill_9_continues_counting(name: str) -> None:
    proc = spawn("write-then-die", name)
    assert first_line(proc) == "written"
    _, err = finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert "leaked" not in err, err
    assert "Traceback" not in err, err

    # The segment outlived its writer (the resource tracker did not unlink it) ...
    with SharedStatsReader(name) as reader:
        assert rows(reader.snapshot()) == {
            "a": (100, 100, 0, 0),
            "b": (200, 0, 100, 0),
            "ü": (0, 0, 0, 300),
        }
    # ... and a new writer counts on from there, in the generation the dead one grew to,
    # knowing which batch of each client it applied last.
    with SharedStats.create_or_attach(name, capacity=2) as stats:
        assert stats.generation == 1
        assert stats.client_seq("worker-1") == 100
        assert stats.client_seq("someone else") == 0
        stats.apply_batch({"a": [1, 1, 0, 0], "c": [5, 0, 0, 0]}, client=("worker-1", 101))
        assert rows(stats.snapshot()) == {
            "a": (101, 101, 0, 0),
            "b": (200, 0, 100, 0),
            "c": (5, 0, 0, 0),
            "ü": (0, 0, 0, 300),
        }
        assert stats.client_seq("worker-1") == 101


def test_kill_9_mid_update_never_leaves_a_half_applied_batch(name: str) -> None:
    """Kill a full-speed writer at random moments; every reattach sees whole batches only.

    Batch n of client "w" adds n to pushed and processed of all 32 queues, so after any
    crash all queues must agree, and equal 1 + 2 + ... + client_seq("w"): a batch and its
    seq are committed together. The next writer must continue exactly from there.
    """
    previous = 0
    for round_ in range(3):
        proc = spawn("write-forever", name)
        assert first_line(proc) == f"go {previous}"  # continues from the repaired state
        time.sleep(random.uniform(0.02, 0.08))  # the point: a random moment to kill at
        proc.send_signal(signal.SIGKILL)
        _, err = finish(proc)
        assert proc.returncode == -signal.SIGKILL, err
        with SharedStats.create_or_attach(name) as stats:  # repairs, if needed
            view = rows(stats.snapshot())
            last = stats.client_seq("w")
            hists = {q: stats.buckets(q) for q in view}
            started = raw_started(name)
        assert len(view) == 32
        values = {n for pushed, processed, _, _ in view.values() for n in (pushed, processed)}
        values |= set(started.values())
        values |= {sum(h) for pair in hists.values() for h in pair}
        assert values == {last * (last + 1) // 2}, f"round {round_}: torn: {sorted(values)}"
        runtime = [0] * NBUCKETS
        for n in range(1, last + 1):
            runtime[n % NBUCKETS] += n
        assert all(r == runtime for r, _ in hists.values())  # every bucket, exactly
        assert last > previous
        previous = last
        with SharedStatsReader(name, timeout=0.5) as reader:
            assert rows(reader.snapshot()) == view


def test_reattach_redoes_a_committed_batch_and_drops_an_uncommitted_one(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """White box, through the documented layout: a writer that died mid-section."""
    clock = Clock()
    with SharedStats.create_or_attach(name, window=5, capacity=4, clock=clock) as stats:
        stats.apply_batch({"a": (1, 1, 0, 0)}, client=("w", 1))
        stats.add("b", pushed=2)
    shm = attach_untracked(name)
    try:
        buf = shm.buf
        h = raw_header(buf)
        rec, d, e, g, entry = raw_offsets(h)
        t = int(clock.t)
        # Died after the commit point of batch 2 of "w", which also brought client "new":
        # log entry 0 = record 0 (whole) with pushed 10, entry 1 = client entry 0 with seq 2,
        # entry 2 = client entry 1 (so far unused: M is 1) for "new" at seq 5; count 3.
        # Each entry: target, slots that count, then the payload.
        buf[g + 16 : g + 16 + 8 * rec] = buf[d : d + 8 * rec]
        write_slot(buf, g // 8, 0)
        write_slot(buf, g // 8 + 1, rec)
        write_slot(buf, g // 8 + 2, 10)
        buf[g + entry + 16 : g + entry + 16 + CLIENT_ENTRY] = buf[e : e + CLIENT_ENTRY]
        write_slot(buf, (g + entry) // 8, -1)
        write_slot(buf, (g + entry) // 8 + 1, CLIENT_ENTRY // 8)
        write_slot(buf, (g + entry) // 8 + 3, 2)
        write_slot(buf, (g + entry) // 8 + 4, t + 1)
        at = g + 2 * entry
        write_slot(buf, at // 8, -2)
        write_slot(buf, at // 8 + 1, CLIENT_ENTRY // 8)
        new_entry = struct.pack("=3q", 3, 5, t + 1) + b"new".ljust(CLIENT_ENTRY - 24, b"\0")
        buf[at + 16 : at + 16 + CLIENT_ENTRY] = new_entry
        write_slot(buf, 12, 3)
        write_slot(buf, 5, h["seq"] + 1)
        with pytest.raises(ShmBusy, match="died in the middle"):
            SharedStatsReader(name, timeout=0.05).snapshot()
        with SharedStats.create_or_attach(name, window=5, clock=clock) as stats:
            assert rows(stats.snapshot())["a"] == (10, 1, 0, 0)
            assert stats.client_seqs() == {"w": 2, "new": 5}
        h = raw_header(buf)
        assert (h["seq"] % 2, h["log_count"], h["clients"]) == (0, 0, 2)
        assert raw_clients(buf) == {"w": (2, t + 1), "new": (5, t + 1)}
        assert "redid its last batch (3 log entries)" in caplog.text

        # Replaying the same log again (died after copying back, before the reset) is a no-op.
        write_slot(buf, 12, 3)
        write_slot(buf, 5, h["seq"] + 1)
        with SharedStats.create_or_attach(name, window=5, clock=clock) as stats:
            assert rows(stats.snapshot())["a"] == (10, 1, 0, 0)
            assert stats.client_seqs() == {"w": 2, "new": 5}
        assert raw_header(buf)["clients"] == 2

        # Died before the commit point: the log holds garbage, nothing must change.
        h = raw_header(buf)
        buf[g + 16 : g + 24] = struct.pack("=q", 999)
        write_slot(buf, (g + entry) // 8 + 3, 3)
        write_slot(buf, 5, h["seq"] + 1)
        with SharedStats.create_or_attach(name, window=5, clock=clock) as stats:
            assert rows(stats.snapshot()) == {"a": (10, 1, 0, 0), "b": (2, 0, 0, 0)}
            assert stats.client_seqs() == {"w": 2, "new": 5}
        assert raw_header(buf)["seq"] % 2 == 0
        assert "nothing to redo" in caplog.text
        del buf
    finally:
        shm.close()


# --- clients: the dedup table ----------------------------------------------------------------


def test_apply_batch_sets_the_client_seq_in_the_same_write(name: str) -> None:
    with SharedStats.create_or_attach(name) as stats, SharedStatsReader(name) as reader:
        assert stats.client_seq("w1") == 0
        assert stats.client_seqs() == {}
        stats.apply_batch({"q": (2, 1, 0, 0)}, client=("w1", 1))
        stats.apply_batch({}, client=("w2", 7))  # failed jobs only: no counters, a seq
        stats.apply_batch({"q": (1, 0, 0, 0)}, ("w1", 2))  # positional, as in the brief
        stats.apply_batch({"q": (1, 0, 0, 0)})  # no client: counters only
        assert stats.client_seqs() == {"w1": 2, "w2": 7}
        assert (stats.client_seq("w1"), stats.client_seq("w2"), stats.client_seq("x")) == (2, 7, 0)
        assert rows(reader.snapshot()) == {"q": (4, 1, 0, 0)}
        # A batch that is not new, or a bad client, is refused and applies nothing.
        for client, error in [
            (("w1", 2), "not after 2"),
            (("w1", 1), "not after 2"),
            (("new", 0), ">= 1"),
            (("", 1), "1..128"),
            (("x" * 129, 1), "1..128"),
        ]:
            with pytest.raises(ValueError, match=error):
                stats.apply_batch({"q": (1, 1, 1, 1), "other": (1, 0, 0, 0)}, client=client)
        with pytest.raises(TypeError):
            stats.apply_batch({"q": (1, 0, 0, 0)}, client=("w1", 3.0))  # type: ignore[arg-type]
        assert rows(reader.snapshot()) == {"q": (4, 1, 0, 0)}
        assert stats.client_seqs() == {"w1": 2, "w2": 7}
    with SharedStats.create_or_attach(name) as stats:  # the table outlives its writer
        assert stats.client_seqs() == {"w1": 2, "w2": 7}


def test_client_ids_are_stored_whole_and_matched_exactly(name: str) -> None:
    """128 four-byte characters fill the 512 id bytes; no two ids share an entry."""
    ids = [
        "🙂" * 128,
        "🙂" * 127 + "😀",  # differs in the last byte only
        "\ud800" * 128,  # lone surrogates, as any str may hold
        "a" * 128,
        "a" * 127,
        "é",
        "uuid-" + uuid.uuid4().hex,
    ]
    with SharedStats.create_or_attach(name, client_capacity=2) as stats:
        for seq, client_id in enumerate(ids, 1):
            stats.apply_batch({"q": (1, 0, 0, 0)}, client=(client_id, seq))
        expected = {client_id: seq for seq, client_id in enumerate(ids, 1)}
        assert stats.client_seqs() == expected
    with SharedStats.create_or_attach(name) as stats:
        assert stats.client_seqs() == expected
        assert stats.client_capacity == 8


def test_a_full_client_table_forgets_idle_clients_and_grows_for_recent_ones(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="qdash_mp.shm")
    clock = Clock()
    opts: dict[str, Any] = {"client_capacity": 8, "client_ttl": 600, "clock": clock}
    with SharedStats.create_or_attach(name, **opts) as stats:
        for i in range(8):
            stats.apply_batch({"q": (1, 0, 0, 0)}, client=(f"old-{i}", 1))
            clock.t += 1
        stats.apply_batch({"q": (1, 0, 0, 0)}, client=("old-0", 2))  # old-0: most recent now
        # 599 s later old-1..old-7 (and not old-0) are idle for 600 s or more: 7 newcomers
        # take their entries, least recently updated first, and the table does not grow.
        clock.t += 599
        for i in range(7):
            stats.apply_batch({"q": (1, 0, 0, 0)}, client=(f"new-{i}", 1))
            assert f"forgot client 'old-{i + 1}'" in caplog.text
        assert stats.client_capacity == 8
        assert stats.generation == 0
        assert sorted(stats.client_seqs()) == [*(f"new-{i}" for i in range(7)), "old-0"]
        # old-0's last batch is 599 s old, under the TTL: the next newcomer grows the table.
        stats.apply_batch({"q": (1, 0, 0, 0)}, client=("new-7", 1))
        assert stats.client_capacity == 16
        assert stats.generation == 1
        assert stats.client_seq("old-0") == 2
        # A forgotten client that comes back is a new client (its seqs start over).
        stats.apply_batch({"q": (1, 0, 0, 0)}, client=("old-1", 1))
        assert stats.client_seq("old-1") == 1
        assert rows(stats.snapshot())["q"] == (18, 0, 0, 0)
        assert len(stats.client_seqs()) == 10
    # After a reattach the least recently updated entry is still the one to go.
    clock.t += 1000
    with SharedStats.create_or_attach(name, **{**opts, "client_capacity": 1}) as stats:
        assert stats.client_capacity == 16  # the block's, not the argument's
        for i in range(7):
            stats.apply_batch({}, client=(f"later-{i}", 1))
        stats.apply_batch({}, client=("new-0", 2))
        clock.t += 1
        stats.apply_batch({}, client=("last", 1))  # the table is full: forgets old-0
        assert "forgot client 'old-0'" in caplog.text
        assert "old-0" not in stats.client_seqs()
        assert stats.client_seq("new-0") == 2


# --- lifetime histograms and started -------------------------------------------------------


def test_lifetime_buckets_are_exact_across_clients_and_resends(name: str) -> None:
    """4 clients x 150 batches of sparse bucket deltas, each batch sent 1-3 times. A resend
    (seq not after the client's last) is refused whole, so every bucket ends at the exact sum
    of the batches, and the summaries are those of that sum."""
    rng = random.Random(9)
    expected = {q: ([0] * NBUCKETS, [0] * NBUCKETS) for q in ("a", "b")}
    started = {"a": 0, "b": 0}
    refused = 0
    with SharedStats.create_or_attach(name, capacity=1) as stats:
        for seq in range(1, 151):
            for c in range(4):
                hist = {}
                for q in rng.sample(["a", "b"], rng.randint(1, 2)):
                    runtime = {rng.randrange(NBUCKETS): rng.randint(1, 9) for _ in range(3)}
                    wait = {rng.randrange(NBUCKETS): rng.randint(1, 9)}
                    hist[q] = (runtime, wait)
                n = rng.randint(0, 3)
                for attempt in range(rng.randint(1, 3)):
                    client = (f"worker-{c}", seq)
                    if attempt == 0:
                        stats.apply_batch({"a": (0, 1, 0, 0)}, client, started={"b": n}, hist=hist)
                        continue
                    with pytest.raises(ValueError, match="not after"):
                        stats.apply_batch({"a": (0, 1, 0, 0)}, client, started={"b": n}, hist=hist)
                    refused += 1
                started["b"] += n
                for q, (runtime, wait) in hist.items():
                    for b, k in runtime.items():
                        expected[q][0][b] += k
                    for b, k in wait.items():
                        expected[q][1][b] += k
        assert refused > 100
        for q in ("a", "b"):
            assert stats.buckets(q) == expected[q]
        assert raw_started(name) == started
        assert stats.buckets("never") == ([0] * NBUCKETS, [0] * NBUCKETS)
        view = stats.snapshot()
        with SharedStatsReader(name) as reader:
            assert reader.snapshot() == view
        for q in ("a", "b"):
            row = view.queue(q)
            assert row is not None
            assert (row.runtime, row.wait) == (summary(expected[q][0]), summary(expected[q][1]))
        merged = [summary(merge(*(expected[q][w] for q in ("a", "b")))) for w in (0, 1)]
        assert (view.totals.runtime, view.totals.wait) == tuple(merged)
        totals = stats.totals()
        assert totals["a"].processed == 600
        assert list(totals["b"].runtime) == expected["b"][0]


def test_bad_histograms_are_refused_before_anything_is_applied(name: str) -> None:
    with SharedStats.create_or_attach(name) as stats:
        for bad in [({NBUCKETS: 1}, None), ({-1: 1}, None), ({"3": 1}, None), ({1: 1.5}, None)]:
            with pytest.raises(ValueError, match="not an int in"):
                stats.apply_batch({"q": (1, 0, 0, 0)}, ("w", 1), hist={"q": bad})
        with pytest.raises(ValueError, match="must be \\(runtime, wait\\)"):
            stats.apply_batch({}, ("w", 1), hist={"q": ({1: 1},)})  # type: ignore[dict-item]
        with pytest.raises(TypeError):
            stats.apply_batch({}, ("w", 1), started={"q": 1.5})  # type: ignore[dict-item]
        assert stats.snapshot().queues == []
        assert stats.client_seq("w") == 0


def test_saturating_histograms_never_wedge_a_queue(name: str) -> None:
    with SharedStats.create_or_attach(name) as stats:
        stats.apply_batch({}, hist={"q": ({7: INT64_MAX}, {7: INT64_MAX})}, started={"q": 2**70})
        stats.apply_batch({}, hist={"q": ({7: 5, 8: 1}, {7: 5})}, started={"q": 1})
        runtime, wait = stats.buckets("q")
        assert (runtime[7], runtime[8], wait[7]) == (INT64_MAX, 1, INT64_MAX)
        assert raw_started(name) == {"q": INT64_MAX}


def test_active_gauges_are_set_read_everywhere_and_zeroed_by_a_new_writer(name: str) -> None:
    with SharedStats.create_or_attach(name) as stats:
        stats.apply_batch({"a": (1, 0, 0, 0), "b": (1, 0, 0, 0)}, started={"a": 5})
        stats.set_active({"a": 3, "b": 2, "unknown": 7})
        with SharedStatsReader(name) as reader:
            view = reader.snapshot()
        assert [(q.queue, q.active) for q in view.queues] == [("a", 3), ("b", 2)]
        assert view.totals.active == 5
        assert view == stats.snapshot()
        stats.set_active({"b": 1})  # "a" not named: 0
        assert [q.active for q in stats.snapshot().queues] == [0, 1]
    # A restarted collector (here: reattaching after close) knows no running job.
    with SharedStats.create_or_attach(name) as stats:
        assert [q.active for q in stats.snapshot().queues] == [0, 0]
        assert raw_started(name) == {"a": 5, "b": 0}  # the counter next to it is kept


# --- crash atomicity of a batch and its seq ------------------------------------------------

KILL_POINTS = ("log", "commit", "copy")
"""Where ``shm_commit._fault_hook`` is called in a write section; see the child's "crash-loop"."""


def crash_cycle(name: str, how: str, point: str, kill_at: int) -> tuple[int, int, int, int]:
    """Run a "crash-loop" child until it is SIGKILLed, reattach; (start, seq, a, b).

    The child applies batch n = start+1, start+2, ...: pushed of "a" +1, processed of "b" +1,
    client "crash" at seq n; "atomic" also adds started of "a" +1 and, to "b", runtime bucket
    ``n % NBUCKETS`` +1 and wait bucket 0 +2 (checked here against the seq, every bucket).
    ``point`` in ``KILL_POINTS``: it kills itself there in batch ``start + kill_at``;
    "random": it sleeps 0.2 ms at each point and we kill it after a random
    delay, almost surely inside a write section.
    """
    proc = spawn("crash-loop", name, how, point, str(kill_at))
    start = int(first_line(proc).split()[1])
    if point == "random":
        time.sleep(random.uniform(0.005, 0.04))  # the point: a random moment to kill at
        proc.send_signal(signal.SIGKILL)
    _, err = finish(proc)
    assert proc.returncode == -signal.SIGKILL, err
    with SharedStats.create_or_attach(name) as stats:  # reattach: repairs, replays
        seq = stats.client_seq("crash")
        view = rows(stats.snapshot())
        runtime, wait = stats.buckets("b")
    if how == "atomic":
        expected = [0] * NBUCKETS
        for n in range(1, seq + 1):
            expected[n % NBUCKETS] += 1
        assert runtime == expected, f"{point}: runtime buckets torn from seq {seq}"
        assert wait == [2 * seq] + [0] * (NBUCKETS - 1)
        assert raw_started(name).get("a", 0) == seq
    return start, seq, view.get("a", (0,) * 4)[0], view.get("b", (0,) * 4)[1]


def test_kill_9_inside_the_write_section_keeps_counters_and_seq_together(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """24 writers killed in every window of the write section: counters == seq, always.

    Killed before the commit point, batch n is gone entirely (seq n - 1); after it, it is
    redone entirely (seq n). Never one without the other: the collector's dedup is exact.
    """
    rng = random.Random()
    caplog.set_level("WARNING", logger="qdash_mp.shm")
    repaired = 0
    previous = 0
    for cycle in range(24):
        point = (*KILL_POINTS, "random")[cycle % 4]
        kill_at = rng.randint(1, 50)
        caplog.clear()
        start, seq, a, b = crash_cycle(name, "atomic", point, kill_at)
        assert start == previous
        assert (a, b) == (seq, seq), f"cycle {cycle} ({point}): counters {a}, {b}, seq {seq}"
        if point in KILL_POINTS:
            assert seq == start + kill_at - (point == "log"), (cycle, point, start, seq)
            assert "died mid-update" in caplog.text
            redone = "redid its last batch (3 log entries)" in caplog.text
            assert redone == (point != "log")
        repaired += "died mid-update" in caplog.text
        previous = seq
    assert repaired >= 19  # the 18 deterministic cycles and most random ones hit a section


def test_control_counters_and_seq_in_two_commits_do_drift(name: str) -> None:
    """The control for the test above: the same kills, but the child commits the counters
    and the seq as two batches. Killed between the two, the counters are ahead of the seq,
    and a resend of that batch would be counted twice. The check above catches it.
    """
    previous = 0
    for kills in range(1, 4):
        start, seq, a, b = crash_cycle(name, "split", "log", random.randint(1, 50))
        assert start == previous
        # What the atomic test must never see: each kill leaves the counters one batch
        # ahead of the seq, and the next writer resends (recounts) that batch.
        assert (a, b) == (seq + kills, seq + kills)
        previous = seq


def test_a_second_writer_is_refused_while_the_first_lives(name: str) -> None:
    first = SharedStats.create_or_attach(name)
    try:
        first.on_pushed("q")
        with pytest.raises(ShmLocked, match=f"pid {os.getpid()}") as info:
            SharedStats.create_or_attach(name)
        assert isinstance(info.value, CollectorError)
    finally:
        first.close()
    with SharedStats.create_or_attach(name) as second:
        second.on_pushed("q")
        assert rows(second.snapshot()) == {"q": (2, 0, 0, 0)}


# --- names and growth ------------------------------------------------------------------------

ODD_NAMES = [
    "",
    " ",
    "default",
    "é",
    "队列",
    "очередь",
    "emoji 🙂",
    "nul\x00byte",
    "tab\tnew\nline",
    "\ud800 lone surrogate",
    "a" * NAME_MAX,
    "a" * (NAME_MAX + 1),
    "🙂" * 100,
    "é" * 200,
    "x" * 10_000,
    "x" * 10_000 + "y",
]


def test_unicode_long_empty_and_odd_names_round_trip(name: str) -> None:
    with SharedStats.create_or_attach(name, capacity=4) as stats:
        for i, queue in enumerate(ODD_NAMES):
            stats.add(queue, pushed=i + 1)
        with SharedStatsReader(name) as reader:
            shown = rows(reader.snapshot())
            assert shown == rows(stats.snapshot())
        stored = [stored_queue_name(q) for q in ODD_NAMES]
        assert len(set(stored)) == len(ODD_NAMES)  # shortened names stay distinct
        for i, (queue, as_stored) in enumerate(zip(ODD_NAMES, stored, strict=True)):
            assert shown[as_stored] == (i + 1, 0, 0, 0)
            raw = queue.encode("utf-8", "surrogatepass")
            if len(raw) <= NAME_MAX:
                assert as_stored == queue
            else:
                assert len(as_stored.encode("utf-8", "surrogatepass")) <= NAME_MAX
                prefix, _, digest = as_stored.rpartition("…")
                assert queue.startswith(prefix)
                assert len(prefix.encode()) > NAME_MAX - 25  # cut at a character boundary
                assert len(digest) == 16
                assert int(digest, 16) >= 0
        # The same long name, or its stored form, counts on the same row.
        stats.on_pushed("x" * 10_000)
        stats.on_pushed(stored_queue_name("x" * 10_000))
        assert rows(stats.snapshot())[stored[14]] == (17, 0, 0, 0)
        assert len(stats.snapshot().queues) == len(ODD_NAMES)


def test_many_queues_grow_the_table_and_readers_follow(name: str) -> None:
    with SharedStats.create_or_attach(name, capacity=64) as stats:
        early = SharedStatsReader(name)  # opened on generation 0
        try:
            for chunk in range(10):
                batch = {f"queue-{chunk * 500 + i}": (1, 0, 0, 0) for i in range(500)}
                stats.apply_batch(batch, client=(f"client-{chunk}", chunk + 1))
                view = early.snapshot()
                assert len(view.queues) == (chunk + 1) * 500
                assert view.totals.pushed == (chunk + 1) * 500
            assert stats.capacity >= 5000
            assert stats.generation >= 3  # 64 → 512 → 1024 → 2048 → 4096 → 8192
            # Only the entry point and the newest generation are left.
            assert segments(name) == sorted([name, segment_name(name, stats.generation)])
            with SharedStatsReader(name) as late:
                assert late.snapshot() == early.snapshot() == stats.snapshot()
            assert [stats.client_seq(f"client-{c}") for c in range(10)] == list(range(1, 11))
        finally:
            early.close()


# --- concurrent readers ----------------------------------------------------------------------

STRESS_QUEUES = [f"q{i:02d}" for i in range(48)]


def test_reader_process_never_sees_a_torn_or_decreasing_counter(name: str) -> None:
    """A full-speed writer here, two reader processes: one with the seqlock, one without.

    Every batch adds the same random k to pushed and processed of all 48 queues, so in a
    consistent snapshot all 96 numbers are equal, and none ever decreases. The reader that
    copies the same bytes but skips the sequence check is the control: it must catch torn
    copies, which shows the check in the other reader is what keeps them out.
    """
    stats = SharedStats.create_or_attach(name)
    try:
        stats.apply_batch({q: (0, 0, 0, 0) for q in STRESS_QUEUES})
        readers = {mode: spawn("read", name, mode, "1.0") for mode in ("seqlock", "raw")}
        for proc in readers.values():
            assert first_line(proc) == "ready"
        rng = random.Random(7)
        batches = 0
        while any(proc.poll() is None for proc in readers.values()):
            k = rng.randint(1, 1000)
            stats.apply_batch({q: (k, k, 0, 0) for q in STRESS_QUEUES})
            batches += 1
        results = {}
        for mode, proc in readers.items():
            out, err = finish(proc)
            assert proc.returncode == 0, err
            results[mode] = json.loads(out.splitlines()[-1])
        if os.environ.get("QDASH_SHM_STRESS_REPORT"):
            print(f"\nbatches={batches} {results}")
    finally:
        stats.unlink()
    safe, raw = results["seqlock"], results["raw"]
    assert batches > 100
    assert safe["snapshots"] >= 20, safe
    assert safe["distinct"] >= 5, safe  # it did overlap the writing
    assert safe["busy"] == 0, safe
    assert safe["violations"] == 0, safe
    assert safe["decreases"] == 0, safe
    assert raw["snapshots"] >= 20, raw
    assert raw["violations"] > 0, f"the control saw no torn copy: {raw}"


def check_snapshots(read: Any, seconds: float) -> dict[str, Any]:
    """Snapshot in a loop; count snapshots breaking the stress test's invariants."""
    counts = {"snapshots": 0, "violations": 0, "decreases": 0, "busy": 0}
    seen: set[int] = set()
    examples: list[Any] = []
    previous: dict[str, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            got: Sequence[tuple[str, int, int]] = read()
        except ShmBusy:
            counts["busy"] += 1
            continue
        counts["snapshots"] += 1
        values = {n for _, pushed, processed in got for n in (pushed, processed)}
        if len(got) != len(STRESS_QUEUES) or len(values) != 1:
            counts["violations"] += 1
            if len(examples) < 3:
                examples.append(sorted(values)[:6])
        for queue, pushed, _ in got:
            if pushed < previous.get(queue, 0):
                counts["decreases"] += 1
            previous[queue] = pushed
        seen.update(values)
    return {**counts, "distinct": len(seen), "examples": examples}


# --- lifecycle and errors --------------------------------------------------------------------


def test_unlink_removes_the_table_and_readers_get_a_clear_error(name: str) -> None:
    stats = SharedStats.create_or_attach(name, capacity=1)
    stats.apply_batch({"a": (1, 0, 0, 0), "b": (1, 0, 0, 0)})  # grows: two segments
    reader = SharedStatsReader(name)
    assert reader.writer_pid == os.getpid()
    reader.snapshot()
    assert len(segments(name)) == 2
    stats.unlink()
    assert segments(name) == []
    with pytest.raises(ShmMissing, match="qdash-mp collector"):
        reader.snapshot()
    reader.close()
    with pytest.raises(ShmMissing, match=r"is the collector running\?.*qdash-mp collector"):
        SharedStatsReader(name)
    with pytest.raises(ShmError, match="closed"):
        stats.add("a", 1)
    with pytest.raises(ShmError, match="closed"):
        stats.unlink()
    stats.close()  # idempotent


def test_missing_segment_error_is_a_collector_error() -> None:
    with pytest.raises(ShmMissing) as info:
        SharedStatsReader(fresh_name())
    assert isinstance(info.value, CollectorError)
    assert isinstance(info.value, QdashError)


def test_a_foreign_segment_is_refused_and_left_alone(name: str) -> None:
    shm = SharedMemory(name, create=True, size=4096)
    resource_tracker.unregister("/" + name, "shared_memory")
    try:
        shm.buf[:8] = b"NOTQDASH"
        with pytest.raises(ShmIncompatible, match="bad magic"):
            SharedStatsReader(name)
        with pytest.raises(ShmIncompatible, match="not a qdash_mp stats table"):
            SharedStats.create_or_attach(name)
        assert bytes(shm.buf[:8]) == b"NOTQDASH"
    finally:
        shm.close()


@pytest.mark.parametrize("version", [1, 2, 99])
def test_another_layout_version_is_refused_by_readers_and_replaced_by_the_writer(
    name: str, caplog: pytest.LogCaptureFixture, version: int
) -> None:
    """Version 1 is the layout before the client table, 2 before the histograms; 99 one from
    the future."""
    with SharedStats.create_or_attach(name, capacity=1) as stats:
        stats.apply_batch({"old": (1, 0, 0, 0), "older": (1, 0, 0, 0)})  # grows: generation 1
    for seg in segments(name):
        shm = attach_untracked(seg)
        write_slot(shm.buf, 1, version)
        shm.close()
    with pytest.raises(ShmIncompatible, match=f"layout version {version}, this qdash_mp reads 3"):
        SharedStatsReader(name)
    with SharedStats.create_or_attach(name) as stats:
        assert stats.snapshot().queues == []
        assert stats.generation == 0
    assert "counters restart from 0" in caplog.text
    if version == 1:  # it shares our header, so its generations are found and removed too
        assert segments(name) == [name]


def test_a_new_window_replaces_the_table_and_readers_move_to_it(name: str) -> None:
    with SharedStats.create_or_attach(name, window=60) as stats:
        stats.on_processed("old")
    reader = SharedStatsReader(name)
    assert rows(reader.snapshot()) == {"old": (0, 1, 0, 0)}
    with SharedStats.create_or_attach(name, window=30) as stats:
        assert stats.window == 30
        stats.on_processed("new")
        assert rows(reader.snapshot()) == {"new": (0, 1, 0, 0)}
    reader.close()


def test_a_batch_is_all_or_nothing_on_bad_input(name: str) -> None:
    with SharedStats.create_or_attach(name) as stats, SharedStatsReader(name) as reader:
        stats.apply_batch({"a": (1, 1, 0, 0)})
        with pytest.raises(ValueError, match="must be 4 ints"):
            stats.apply_batch({"a": (1, 1, 0, 0), "b": (1, 2)})
        with pytest.raises(TypeError):
            stats.apply_batch({"a": (1, 1, 0, 0), "c": (0.5, 0, 0, 0)})
        assert rows(reader.snapshot())["a"] == (1, 1, 0, 0)
        assert "b" not in rows(reader.snapshot())


INT64_MAX = 2**63 - 1


def test_counts_saturate_and_a_huge_delta_never_wedges_a_queue(name: str) -> None:
    """Hole 2: a batch carrying 2**63-1 used to make every later batch of that queue raise."""
    clock = Clock()
    big = INT64_MAX
    batches: list[tuple[dict[str, tuple[int, int, int, int]], tuple[str, int] | None]] = [
        ({"q": (big, big, 0, 0), "other": (1, 0, 0, 0)}, ("w", 1)),
        ({"q": (5, 5, 5, 5)}, ("w", 2)),  # would overflow pushed, processed and the ring
        ({"q": (1, 1, 1, 1), "other": (1, 1, 1, 1)}, ("x", 1)),
        ({"q": (0, 0, big, 2**64)}, ("w", 3)),  # failed saturates, retried is past int64
        ({"q": (1, 0, 0, 0), "third": (2, 0, 0, 0)}, None),
        ({"q": (big, 7, 0, 0), "other": (1, 0, 0, 0)}, ("x", 2)),
    ]
    embedded = Stats(3, clock=clock)
    with SharedStats.create_or_attach(name, window=3, clock=clock) as stats:
        reader = SharedStatsReader(name, clock=clock)
        for batch, client in batches:
            stats.apply_batch(batch, client=client)
            for queue, deltas in batch.items():
                embedded.add(queue, *deltas)
            clock.t += 1
        stats.add("q", pushed=big, processed=big, failed=big, retried=big)
        embedded.add("q", pushed=big, processed=big, failed=big, retried=big)
        stats.on_processed("q")
        embedded.on_processed("q")
        assert stats.client_seqs() == {"w": 3, "x": 2}
        expected = {
            "q": (big, big, big, big),
            "other": (3, 1, 1, 1),
            "third": (2, 0, 0, 0),
        }
        assert rows(stats.snapshot()) == expected
        assert rows(reader.snapshot()) == expected
        assert rows(embedded.snapshot()) == expected
        assert reader.snapshot() == embedded.snapshot() == stats.snapshot()
        reader.close()
        # The low end: an (impossible on the wire) huge negative delta stops at -2**63.
        stats.apply_batch({"low": (-(2**70), 0, 0, 0)})
        assert rows(stats.snapshot())["low"] == (-(2**63), 0, 0, 0)


def test_apply_deltas_saturates_every_slot() -> None:
    ring = ring_slots(3)
    buf = array("q", bytes(8 * record_len(ring)))
    apply_deltas(buf, 0, ring, (INT64_MAX, INT64_MAX, 1, 0), 100)
    apply_deltas(buf, 0, ring, (1, 2**80, 1, -(2**80)), 100)
    assert buf[:4].tolist() == [INT64_MAX, INT64_MAX, 2, -(2**63)]
    assert buf[6 + 100 % ring] == 100
    assert buf[6 + ring + 100 % ring] == INT64_MAX


INT64 = st.integers(-(2**63), INT64_MAX)


@settings(max_examples=300, deadline=None)
@given(
    start=st.lists(INT64, min_size=4, max_size=4),
    deltas=st.lists(st.integers(-(2**65), 2**65) | INT64, min_size=4, max_size=4),
    shared=st.booleans(),
)
def test_apply_deltas_is_the_clamped_sum_on_either_path(
    start: list[int], deltas: list[int], shared: bool
) -> None:
    """The fast path (``+=``) and the saturating one agree with ``clamp(old + delta)``."""
    ring = ring_slots(3)
    raw = array("q", bytes(8 * record_len(ring)))
    raw[:4] = array("q", start)
    buf: Any = memoryview(raw).cast("B").cast("q") if shared else raw
    apply_deltas(buf, 0, ring, deltas, 100)
    clamp = [max(-(2**63), min(INT64_MAX, a + d)) for a, d in zip(start, deltas, strict=True)]
    assert raw[:4].tolist() == clamp
    assert raw[6 + ring + 100 % ring] == (
        max(-(2**63), min(INT64_MAX, deltas[1])) if deltas[1] else 0
    )


def test_bad_names_and_capacity_are_config_errors() -> None:
    for bad in ("", "has/slash", "colon:name", "é", "x" * 201):
        with pytest.raises(ConfigError):
            SharedStats.create_or_attach(bad)
        with pytest.raises(ConfigError):
            SharedStatsReader(bad)
    with pytest.raises(ConfigError, match="capacity"):
        SharedStats.create_or_attach(fresh_name(), capacity=0)


def test_objects_dropped_without_close_leave_no_warning(name: str) -> None:
    stats = SharedStats.create_or_attach(name)
    stats.on_pushed("q")
    reader = SharedStatsReader(name)
    reader.snapshot()
    del stats, reader
    gc.collect()  # filterwarnings=error: an unraisable BufferError would fail the test
    with SharedStats.create_or_attach(name) as stats:  # and the lock went with the object
        assert rows(stats.snapshot()) == {"q": (1, 0, 0, 0)}
    assert raw_header(attach_untracked_buf(name))["magic"] == MAGIC


# --- helper processes ------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    mode, name = argv[0], argv[1]
    if mode == "write-then-die":
        stats = SharedStats.create_or_attach(name, capacity=2)
        for seq in range(1, 101):
            batch = {"a": (1, 1, 0, 0), "b": (2, 0, 1, 0), "ü": (0, 0, 0, 3)}
            stats.apply_batch(batch, client=("worker-1", seq))
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "write-forever":
        stats = SharedStats.create_or_attach(name)
        queues = [f"q{i:02d}" for i in range(32)]
        seq = stats.client_seq("w")
        print("go", seq, flush=True)
        while True:
            seq += 1
            stats.apply_batch(
                {q: (seq, seq, 0, 0) for q in queues},
                client=("w", seq),
                started={q: seq for q in queues},
                hist={q: ({seq % NBUCKETS: seq}, {seq * 7 % NBUCKETS: seq}) for q in queues},
            )
    elif mode == "crash-loop":
        crash_loop(name, *argv[2:])
    elif mode == "read":
        how, seconds = argv[2], float(argv[3])
        if how == "seqlock":
            reader = SharedStatsReader(name, timeout=2.0)
            print("ready", flush=True)

            def read() -> list[tuple[str, int, int]]:
                return [(q.queue, q.pushed, q.processed) for q in reader.snapshot().queues]

            result = check_snapshots(read, seconds)
        else:
            shm = attach_untracked(name)
            print("ready", flush=True)
            result = check_snapshots(lambda: raw_rows(shm.buf), seconds)
        print(json.dumps(result), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def crash_loop(name: str, how: str, point: str, kill_at: str) -> None:
    """Apply batches until killed (see ``crash_cycle``); "split" commits seq apart."""
    stats = SharedStats.create_or_attach(name)
    seq = stats.client_seq("crash")
    target, phase = seq + int(kill_at), ""

    def hook(where: str) -> None:
        if point == "random":
            time.sleep(0.0002)
        elif where == point and seq == target and phase != "counters":
            os.kill(os.getpid(), signal.SIGKILL)

    shm_commit._fault_hook = hook
    print("go", seq, flush=True)
    batch = {"a": (1, 0, 0, 0), "b": (0, 1, 0, 0)}
    while True:
        seq += 1
        if how == "atomic":
            stats.apply_batch(
                batch,
                client=("crash", seq),
                started={"a": 1},
                hist={"b": ({seq % NBUCKETS: 1}, {0: 2})},
            )
        else:  # the control: counters and seq in two commits
            phase = "counters"
            stats.apply_batch(batch)
            phase = "seq"
            stats.apply_batch({}, client=("crash", seq))


if __name__ == "__main__":
    main(sys.argv[1:])
