"""The count-pruning twins agree: a batch staged at ``max_jobs`` with its prunes ahead of it
as one run (``batch_prunes``, the default) leaves the same journal as staging it record by
record (``batch_prunes = False``): the same records in the same order, the same index, the
same pending state and pruned counts, before and after a commit, a reopen and a ``kill -9``.
"""

from __future__ import annotations

import itertools
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from qdash_mp.journal import Journal, RecordType
from qdash_mp.journal.format import encode_removed, encode_removed_many
from qdash_mp.journal.index import LOC_SHIFT, Index, loc_of
from qdash_mp.records import FailedRecord, PackedFailed, pack_failed_record
from tests.qdash_testing.journal import SHM, T0, Clock, ids_of, records, segments

MAX = 40
_REMOVED = int(RecordType.REMOVED)
_FAILED = int(RecordType.FAILED)


def rec(key: str, n: int) -> PackedFailed:
    """The ``n``-th failure of job ``key`` (``n`` makes each failure's bytes differ)."""
    return pack_failed_record(
        FailedRecord(
            key,
            "tasks.work",
            b"\x92\xa1x\xcd" + n.to_bytes(2, "big"),
            n % 5,
            T0 - 9,
            "q",
            f"boom {n}",
            "tb",
            T0 + n * 1e-3,
        )
    )


def twins(root: Path, max_jobs: int = MAX) -> tuple[Journal, Journal]:
    fast = Journal.open(root / "fast", max_jobs=max_jobs, clock=Clock())
    plain = Journal.open(root / "plain", max_jobs=max_jobs, clock=Clock())
    plain.batch_prunes = False
    return fast, plain


def pending(j: Journal, universe: set[str]) -> tuple[Any, ...]:
    with j._lock:
        return (
            j._pending_len(),
            sorted(i for i in universe if j._p_live(i)),
            [(op[0], op[1], op[2], op[3]) for op in j._ops if op[0] != _REMOVED],
            sorted(op[1] for op in j._ops if op[0] == _REMOVED),
            [op[1] for op in j._ops if op[0] == _REMOVED and op[3] == "pruned:count"],
        )


def committed(j: Journal) -> tuple[Any, ...]:
    index = j._index
    live = [index.ids[p] for p in index.live_slots()]
    return (
        ids_of(j),
        [j.get_raw(i) for i in ids_of(j)],
        live,
        sorted(index.pos.items(), key=lambda kv: kv[1])
        == sorted(zip(live, index.live_slots(), strict=True), key=lambda kv: kv[1]),
        len(j),
        j.live_bytes,
        j.pruned_total,
        list(index.blocks),
    )


def check_same(fast: Journal, plain: Journal, universe: set[str]) -> None:
    assert pending(fast, universe) == pending(plain, universe)
    assert committed(fast) == committed(plain)


def reopen_same(root: Path, fast: Journal, plain: Journal, max_jobs: int = MAX) -> None:
    fast.close()
    plain.close()
    a = Journal.open(root / "fast", max_jobs=max_jobs, clock=Clock())
    b = Journal.open(root / "plain", max_jobs=max_jobs, clock=Clock())
    try:
        assert committed(a) == committed(b)
    finally:
        a.close()
        b.close()


@pytest.fixture
def root() -> Any:
    with tempfile.TemporaryDirectory(dir=SHM) as d:
        yield Path(d)


def test_at_the_cap_a_batch_stages_its_prunes_first_and_matches_record_by_record(
    root: Path,
) -> None:
    fast, plain = twins(root)
    universe = set()
    n = 0
    for j in (fast, plain):
        j.stage_failed_packed([rec(f"a{k}", k) for k in range(MAX)])
        j.commit()
    universe |= {f"a{k}" for k in range(MAX)}
    for step in range(6):
        batch = [rec(f"b{step}-{k}", n + k) for k in range(17)]
        n += 17
        universe |= {r[1] for r in batch}
        for j in (fast, plain):
            j.stage_failed_packed(batch)
        # The fast twin took the one-run path: its prunes, then the batch, back to back.
        kinds = [op[0] for op in fast._ops]
        assert kinds == [_REMOVED] * 17 + [_FAILED] * 17
        assert [op[0] for op in plain._ops] == [_FAILED, _REMOVED] * 17
        check_same(fast, plain, universe)
        for j in (fast, plain):
            j.commit()
        check_same(fast, plain, universe)
    assert fast.pruned_total == 6 * 17
    reopen_same(root, fast, plain)


def test_a_batch_that_refails_an_id_being_pruned_falls_back_and_matches(root: Path) -> None:
    fast, plain = twins(root)
    for j in (fast, plain):
        j.stage_failed_packed([rec(f"a{k}", k) for k in range(MAX)])
        j.commit()
    universe = {f"a{k}" for k in range(MAX)} | {"new1", "new2", "new3"}
    # a0 and a1 are the oldest: the first two prunes; the batch fails a1 again (and a new
    # job twice, and a live one that is not pruned).
    batch = [
        rec("new1", 100),
        rec("a1", 101),
        rec("new2", 102),
        rec("a30", 103),
        rec("new2", 104),
        rec("new3", 105),
    ]
    for j in (fast, plain):
        j.stage_failed_packed(batch)
    assert [op[0] for op in fast._ops][:2] == [_FAILED, _REMOVED]  # record by record
    check_same(fast, plain, universe)
    for j in (fast, plain):
        j.commit()
    check_same(fast, plain, universe)
    assert "a1" in fast
    assert "a0" not in fast
    assert "a2" not in fast
    reopen_same(root, fast, plain)


def test_prunes_of_staged_records_and_refails_of_live_ones_match(root: Path) -> None:
    fast, plain = twins(root)
    universe: set[str] = set()
    for j in (fast, plain):
        j.stage_failed_packed([rec(f"a{k}", k) for k in range(MAX - 5)])
        j.commit()
    # Several batches staged before one commit: later ones prune staged records; a batch
    # re-fails live ids that are not among those pruned (fast path, fewer prunes).
    batches = [
        [rec(f"b{k}", 200 + k) for k in range(30)],
        [rec("a20", 300), rec("b3", 301)] + [rec(f"c{k}", 310 + k) for k in range(20)],
        [rec(f"d{k}", 400 + k) for k in range(45)],
    ]
    for batch in batches:
        universe |= {r[1] for r in batch}
        for j in (fast, plain):
            j.stage_failed_packed(batch)
        check_same(fast, plain, universe | {f"a{k}" for k in range(MAX)})
    for j in (fast, plain):
        j.commit()
    check_same(fast, plain, universe)
    reopen_same(root, fast, plain)


def test_over_the_cap_at_open_the_first_batch_prunes_the_surplus_alike(root: Path) -> None:
    fast, plain = twins(root, max_jobs=3 * MAX)
    for j in (fast, plain):
        j.stage_failed_packed([rec(f"a{k}", k) for k in range(3 * MAX)])
        j.close()
    fast = Journal.open(root / "fast", max_jobs=MAX, clock=Clock())
    plain = Journal.open(root / "plain", max_jobs=MAX, clock=Clock())
    plain.batch_prunes = False
    universe = {f"a{k}" for k in range(3 * MAX)} | {"z"}
    for j in (fast, plain):
        j.stage_failed_packed([rec("a119", 500), rec("z", 501), rec("a118", 502)])
    assert fast._ops[0][0] == _REMOVED
    check_same(fast, plain, universe)
    for j in (fast, plain):
        j.commit()
    check_same(fast, plain, universe)
    assert len(fast) == MAX
    reopen_same(root, fast, plain)


@pytest.mark.parametrize("seed", range(12))
def test_random_histories_leave_the_same_journal(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    max_jobs = rng.choice([1, 3, 25, 60])
    fast, plain = twins(root, max_jobs)
    universe: set[str] = set()
    fresh = 0
    n = 0
    for _ in range(60):
        roll = rng.random()
        if roll < 0.6:
            batch = []
            for _ in range(rng.randint(1, 40)):
                if universe and rng.random() < 0.25:  # an old id again: live, pruned or gone
                    key = rng.choice(sorted(universe))
                elif batch and rng.random() < 0.05:  # twice in one batch
                    key = batch[-1][1]
                else:
                    key = f"n{fresh}"
                    fresh += 1
                batch.append(rec(key, n))
                n += 1
            universe |= {r[1] for r in batch}
            for j in (fast, plain):
                j.stage_failed_packed(batch)
        elif roll < 0.85:
            for j in (fast, plain):
                j.commit()
        elif roll < 0.95:
            live = sorted(i for i in universe if fast._p_live(i))
            if live:
                key = rng.choice(live)
                for j in (fast, plain):
                    j.stage_removed(key, "forgotten")
        elif roll < 0.98:
            for j in (fast, plain):
                j.enforce_retention()
        else:
            for j in (fast, plain):
                j.stage_flush()
        check_same(fast, plain, universe)
    for j in (fast, plain):
        j.commit()
    check_same(fast, plain, universe)
    reopen_same(root, fast, plain, max_jobs)


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from qdash_mp.journal import Journal
    from tests.test_journal_pruning import Clock, batch_of

    j = Journal.open(Path(sys.argv[1]), max_jobs=int(sys.argv[2]), clock=Clock())
    for step in range(int(sys.argv[3])):
        j.stage_failed_packed(batch_of(step))
        j.commit()
    print("committed", flush=True)
    sys.stdin.read()  # held open (files, staged nothing) until the parent kills us
    """
)


def batch_of(step: int) -> list[PackedFailed]:
    """The kill -9 test's batch ``step``: new jobs, and a live one failing again."""
    batch = [rec(f"s{step}-{k}", step * 100 + k) for k in range(30)]
    if step >= 2:
        batch.append(rec(f"s{step - 1}-7", step * 100 + 50))
    return batch


def test_sigkill_after_pruning_commits_recovers_the_plain_twins_state(root: Path) -> None:
    steps = 8
    env_root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root / "fast"), str(MAX), str(steps)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=env_root,
        env={"PYTHONPATH": str(env_root), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        assert proc.stdout.readline() == "committed\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.stdin.close()
        proc.stdout.close()
        if proc.returncode is None:  # pragma: no cover - only if the child went wrong
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    plain = Journal.open(root / "plain", max_jobs=MAX, clock=Clock())
    plain.batch_prunes = False
    for step in range(steps):
        plain.stage_failed_packed(batch_of(step))
        plain.commit()
    # The fast twin's segment does hold prunes ahead of the failures that caused them.
    kinds = [t for _off, _size, t in records(segments(root / "fast")[-1].read_bytes())]
    assert any(a == _REMOVED and b == _FAILED for a, b in itertools.pairwise(kinds))
    fast = Journal.open(root / "fast", max_jobs=MAX, clock=Clock())
    try:
        assert committed(fast)[:-2] == committed(plain)[:-2]  # pruned_total counts since open
    finally:
        fast.close()
        plain.close()


@pytest.mark.parametrize("seed", range(4))
def test_a_lone_failed_record_applies_as_a_run_of_one_does(seed: int) -> None:
    """``Index.append_one`` (``_apply``'s path for a FAILED record alone) and
    ``append_failed`` of a run of one leave the same index, supersedes and removals included.
    """
    rng = random.Random(seed)
    one, run = Index(), Index()
    off = 0
    for _ in range(3000):
        key = f"k{rng.randrange(400)}"
        if rng.random() < 0.2:
            one.remove(key)
            run.remove(key)
            continue
        size = rng.randrange(20, 90)
        one.append_one(loc_of(3, off), key, size)
        assert run.append_failed(3 << LOC_SHIFT, off, [(_FAILED, key, size, 1.0)]) == off + size
        off += size
    for name in ("alive", "loc", "size", "blocks", "pos", "dead", "live_bytes"):
        assert getattr(one, name) == getattr(run, name), name
    assert list(one.ids) == list(run.ids)


def test_removing_many_at_once_matches_one_by_one_and_id_slices_match() -> None:
    """``Index.remove_many`` (``_apply``'s path for a run of prunes) leaves what ``remove``
    of each leaves; ``_Ids.slice`` gives what indexing slot by slot gives."""
    rng = random.Random(5)
    many, each = Index(), Index()
    off = 0
    for round_ in range(40):
        run = [(_FAILED, f"k{rng.randrange(3000)}", rng.randrange(20, 90), 1.0) for _ in range(100)]
        for index in (many, each):
            index.append_failed(3 << LOC_SHIFT, off, run)
        off += sum(op[2] for op in run)
        doomed = [f"k{rng.randrange(3000)}" for _ in range(rng.randrange(60))]
        doomed = list(dict.fromkeys(doomed))  # a run of prunes names each id once
        many.remove_many(doomed)
        for key in doomed:
            each.remove(key)
        for name in ("alive", "loc", "size", "blocks", "pos", "dead", "live_bytes"):
            assert getattr(many, name) == getattr(each, name), (round_, name)
    ids = list(many.ids)
    for _ in range(200):
        a = rng.randrange(len(ids) + 5)
        b = rng.randrange(a, len(ids) + 2000)
        assert many.ids.slice(a, b) == ids[a:b]


def test_removed_payloads_packed_at_once_match_one_by_one() -> None:
    ids = ["a", "", "é" * 40, "x" * 300, "job-7", "\x00"]
    for reason in ("pruned", "retried", "forgotten"):
        assert encode_removed_many(ids, reason) == [encode_removed(i, reason) for i in ids]
    assert encode_removed_many([], "pruned") == []
