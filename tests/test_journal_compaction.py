"""Journal compaction: a crash after each step leaves the old state or the new one, the
live set is kept, commits and flushes during a compaction are kept.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from qdash_testing.journal import (
    T0,
    Clock,
    fj,
    ids_of,
    open_j,
    segments,
    state_of,
)

from qdash_mp.journal import (
    COMPACTION_STEPS,
    Journal,
    SimulatedCrash,
)

# -- compaction --------------------------------------------------------------------------------


def _churned(jdir: Path, clock: Clock) -> Journal:
    j = open_j(jdir, segment_bytes=4096, clock=clock)
    for i in range(300):
        j.stage_failed(fj(i, at=T0 + i))
        if i % 4 == 0:
            j.commit()
    j.commit()
    for i in range(0, 300, 3):
        j.stage_removed(f"job-{i}", "retried" if i % 2 else "forgotten")
    for i in range(1, 40, 3):
        j.stage_failed(fj(i, error="again", at=T0 + 1000 + i))
    for c in range(5):
        for s in range(1, 4):
            j.stage_client_seq(f"client-{c}", s * 10 + c)
    j.commit()
    return j


@pytest.mark.parametrize("step", COMPACTION_STEPS)
def test_crash_after_each_compaction_step_leaves_old_or_new_state(jdir: Path, step: str) -> None:
    clock = Clock()
    j = _churned(jdir, clock)
    before = state_of(j)
    seqs = dict(j.client_seqs)
    with pytest.raises(SimulatedCrash):
        j.compact(_crash_after=step)
    j._abandon()  # the process died here: no cleanup of any kind
    for _ in range(2):
        with open_j(jdir, clock=clock) as again:
            assert state_of(again) == before
            assert again.client_seqs == seqs
            names = [p.name for p in jdir.iterdir()]
            assert not [n for n in names if n.endswith(".tmp")]
            compacted = [n for n in names if n.endswith(".seg") and not n.endswith(".0000.seg")]
            if step in ("prepare", "write"):
                assert compacted == []
            else:
                assert len(compacted) == 1
                assert sorted(n for n in names if n.endswith(".seg"))[0] == compacted[0]
    with open_j(jdir, clock=clock) as again:  # and it keeps working
        again.stage_failed(fj("after"))
        again.stage_removed("job-1", "forgotten")
        again.commit()
        assert again.maybe_compact() in (True, False)
        expected = [("after", fj("after"))] + [(i, f) for i, f in before if i != "job-1"]
        assert state_of(again) == expected
    with open_j(jdir, clock=clock) as again:
        assert state_of(again) == expected


def test_compaction_shrinks_and_keeps_the_live_set(jdir: Path) -> None:
    clock = Clock()
    j = _churned(jdir, clock)
    before = state_of(j)
    size_before = sum(p.stat().st_size for p in segments(jdir))
    j.compact()
    assert state_of(j) == before
    size_after = sum(p.stat().st_size for p in segments(jdir))
    assert size_after < size_before * 0.6
    assert j.total_bytes == size_after
    assert j.total_bytes - j.live_bytes < 1000  # two headers, a COMMIT, the client seqs
    j.close()
    with open_j(jdir, clock=clock) as j:
        assert state_of(j) == before
        assert j.client_seqs == {f"client-{c}": 30 + c for c in range(5)}


def test_maybe_compact_waits_for_dead_data_to_dominate(jdir: Path) -> None:
    with open_j(jdir, compact_min_bytes=0) as j:
        for i in range(50):
            j.stage_failed(fj(i))
        j.commit()
        assert not j.maybe_compact()
        for i in range(40):
            j.stage_removed(f"job-{i}", "forgotten")
        j.commit()
        assert j.maybe_compact()
        assert j.total_bytes - j.live_bytes < j.live_bytes
        assert not j.maybe_compact()
        assert len(j) == 10


def test_commits_during_compaction_are_kept(jdir: Path) -> None:
    clock = Clock()
    j = _churned(jdir, clock)
    model = dict(state_of(j))
    plan = j._compact_prepare()
    # While the copy is under way: new failures, removals of copied jobs, a supersede.
    j.stage_failed(fj("new"))
    j.stage_removed("job-2", "forgotten")
    j.stage_failed(fj(4, error="during", at=T0 + 5000))
    j.commit()
    j._compact_write(plan)
    j.stage_removed("job-5", "retried")
    j.commit()
    j._compact_rename(plan)
    j._compact_install(plan)
    j._compact_delete(plan)
    del model["job-2"], model["job-5"]
    model["new"] = fj("new")
    model["job-4"] = fj(4, error="during", at=T0 + 5000)
    assert dict(state_of(j)) == model
    assert ids_of(j)[:2] == ["job-4", "new"]
    j.close()
    with open_j(jdir, clock=clock) as j:
        assert dict(state_of(j)) == model
        assert ids_of(j)[:2] == ["job-4", "new"]


def test_flush_during_compaction(jdir: Path) -> None:
    clock = Clock()
    j = _churned(jdir, clock)
    plan = j._compact_prepare()
    j.stage_flush()
    j.stage_failed(fj("survivor"))
    j.commit()
    j._compact_write(plan)
    j._compact_rename(plan)
    j._compact_install(plan)
    j._compact_delete(plan)
    assert ids_of(j) == ["survivor"]
    j.close()
    with open_j(jdir, clock=clock) as j:
        assert ids_of(j) == ["survivor"]


def test_compaction_drops_clients_not_seen_within_max_age(jdir: Path) -> None:
    clock = Clock()
    with open_j(jdir, clock=clock, max_age=100.0) as j:
        j.stage_client_seq("old", 5)
        j.commit()
        clock.now += 90
        j.stage_client_seq("young", 7)
        j.commit()
        clock.now += 20
        j.compact()
        assert j.client_seqs == {"old": 5, "young": 7}  # in memory until reopened
    with open_j(jdir, clock=clock, max_age=100.0) as j:
        assert j.client_seqs == {"young": 7}


def test_client_seqs_keep_the_highest_seq(jdir: Path) -> None:
    with open_j(jdir) as j:
        j.stage_client_seq("a", 3)
        j.stage_client_seq("a", 9)
        j.stage_client_seq("a", 4)
        j.stage_client_seq("b", 1)
        assert j.client_seqs == {}
        j.commit()
        assert j.client_seqs == {"a": 9, "b": 1}
        with pytest.raises(ValueError, match="seq"):
            j.stage_client_seq("a", -1)
        with pytest.raises(ValueError, match="client_id"):
            j.stage_client_seq("", 1)
    with open_j(jdir) as j:
        assert j.client_seqs == {"a": 9, "b": 1}
