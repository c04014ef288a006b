"""The integrations benchmark's round plan (the order of the modes, the blocks' sizes) and its
check that the adapter under measurement really reported.

The order matters more than it looks: rotating two modes (A B | B A | A B) runs one mode twice
in a row at every round boundary, and on a 2-vCPU VM the second run of such a pair was up to
2x slower, which made Huey's ratio swing between 0.98 and 1.23 (benchmarks/README.md).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_integrations
from _common import BenchError, Config
from bench_integrations import _Mode, _modes, _order, _Sizes, _worker_argv


@pytest.mark.parametrize("n_modes", [2, 3, 4])
def test_no_mode_runs_twice_in_a_row(n_modes: int) -> None:
    names = [f"m{i}" for i in range(n_modes)]
    rounds = 6 * n_modes
    sequence = [name for rnd in range(rounds) for name in _order(names, rnd)]
    assert all(a != b for a, b in itertools.pairwise(sequence)), sequence
    assert Counter(sequence) == dict.fromkeys(names, rounds)  # every mode once a round


def test_three_modes_take_turns_being_first() -> None:
    names = ["plain", "qdash", "events"]
    firsts = Counter(_order(names, rnd)[0] for rnd in range(9))
    assert firsts == dict.fromkeys(names, 3)


@pytest.mark.parametrize(("rounds", "blocks"), [(30, 5), (8, 2), (7, 3), (2, 5), (1, 1)])
def test_blocks_add_up_to_the_rounds(
    monkeypatch: pytest.MonkeyPatch, rounds: int, blocks: int
) -> None:
    monkeypatch.setenv("QDASH_BENCH_ROUNDS", str(rounds))
    monkeypatch.setenv("QDASH_BENCH_BLOCKS", str(blocks))
    monkeypatch.delenv("QDASH_BENCH_TASKS", raising=False)
    sizes = _Sizes(Config(quick=False))
    assert sizes.blocks == min(blocks, rounds)
    per_block = [sizes.per_block(b) for b in range(sizes.blocks)]
    assert sum(per_block) == rounds
    assert max(per_block) - min(per_block) <= 1
    assert min(per_block) >= 1
    assert sizes.fixed is None  # rounds sized in time unless QDASH_BENCH_TASKS says


def test_fixed_tasks_a_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QDASH_BENCH_TASKS", "5")
    assert _Sizes(Config(quick=True)).fixed == 20  # at least 20: (last - first) / (N - 1)


def test_the_modes_of_each_library() -> None:
    assert _modes("celery") == ["plain", "qdash", "events"]
    assert _modes("rq") == ["plain", "qdash", "import"]
    assert _modes("huey") == ["plain", "qdash"]


def test_rq_modes_differ_only_in_the_worker_class() -> None:
    plain, qdash, imported = (_worker_argv("rq", m, "q", "redis://x") for m in _modes("rq"))
    assert "--worker-class" not in plain
    assert qdash[qdash.index("--worker-class") + 1] == "qdash_mp.integrations.rq.Worker"
    assert imported[imported.index("--worker-class") + 1] == "bapp_rq_import.ImportOnly"
    cls = ("--worker-class", "bapp_rq_import.ImportOnly")
    assert [a for a in imported if a not in cls] == plain


class _Reader:
    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def snapshot(self) -> SimpleNamespace:
        queues = [SimpleNamespace(queue=q, processed=n) for q, n in self.counts.items()]
        return SimpleNamespace(queues=queues)


def _mode(ran: int) -> _Mode:
    mode = object.__new__(_Mode)  # no worker process: only what check_reported reads
    mode.lib, mode.mode, mode.queue, mode.ran = "huey", "qdash", "b-huey-1", ran
    mode._signal = lambda sig: None  # type: ignore[method-assign]
    return mode


def test_a_worker_whose_every_task_was_counted_passes() -> None:
    _mode(300).check_reported(_Reader({"b-huey-1": 300, "other": 7}))


@pytest.mark.parametrize("counted", [0, 299, 301])
def test_an_adapter_that_did_not_report_exactly_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, counted: int
) -> None:
    """A broken adapter (nothing reported) would otherwise measure as free."""
    monkeypatch.setattr(bench_integrations, "REPORT_WAIT", 0.05)
    with pytest.raises(BenchError, match=f"counted {counted} processed of the 300 tasks"):
        _mode(300).check_reported(_Reader({"b-huey-1": counted}))


def _objects_at_start(tmp_path: Path, layout: str) -> tuple[int, int]:
    """(gc-tracked objects, ``_Layout`` types) of a fresh interpreter whose sitecustomize is
    the benchmark's ``LAYOUT``, with ``BENCH_LAYOUT=layout``."""
    (tmp_path / "sitecustomize.py").write_text(bench_integrations.LAYOUT)
    code = (
        "import gc; objs = gc.get_objects(); "
        "print(len(objs), sum(1 for o in objs if type(o) is type and "
        "o.__name__.startswith('_Layout')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(tmp_path), "BENCH_LAYOUT": layout},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_a_block_draws_one_layout_for_all_its_processes(tmp_path: Path) -> None:
    """The same seed gives every process of a block the same extra types and objects; other
    seeds give others; 0 (``QDASH_BENCH_LAYOUT=0``) gives none."""
    off = _objects_at_start(tmp_path, "0")
    assert off[1] == 0
    first, again = _objects_at_start(tmp_path, "3"), _objects_at_start(tmp_path, "3")
    assert first == again
    assert first[1] > 0
    assert first[0] > off[0]
    draws = {_objects_at_start(tmp_path, str(seed)) for seed in range(1, 6)}
    assert len(draws) > 1


def test_modes_of_a_block_share_its_hash_seed_and_layout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[dict[str, str]] = []

    class Popen:
        def __init__(self, argv: list[str], **kw: Any) -> None:
            seen.append(kw["env"])
            self.pid, self.stdin, self.stdout = 0, None, None

    monkeypatch.setattr(bench_integrations.subprocess, "Popen", Popen)
    monkeypatch.setattr(bench_integrations, "_control", lambda: False)
    monkeypatch.setitem(sys.modules, "redis", SimpleNamespace(Redis=SimpleNamespace(from_url=str)))
    for mode in ("plain", "qdash"):
        _Mode(tmp_path, "rq", mode, "redis://x", "/s", 1.0, 4)
    assert {(e["PYTHONHASHSEED"], e["BENCH_LAYOUT"]) for e in seen} == {("4", "4")}
    monkeypatch.setenv("QDASH_BENCH_LAYOUT", "0")
    seen.clear()
    _Mode(tmp_path, "rq", "plain", "redis://x", "/s", 1.0, 4)
    assert {e["BENCH_LAYOUT"] for e in seen} == {"0"}


def test_a_sliced_run_stretches_the_adapters_batch_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With k modes a worker runs one turn in k while its sender ticks on wall time, so
    the qdash worker is started with k x the adapters' interval (the variable they read)."""
    from qdash_mp.integrations import _common as adapters

    monkeypatch.delenv("QDASH_BENCH_SLICE", raising=False)
    assert bench_integrations._slice() == bench_integrations.TURN == 0.03
    assert bench_integrations._stretched_interval("taskiq") == 2 * adapters.FLUSH_INTERVAL
    assert bench_integrations._stretched_interval("celery") == 3 * adapters.FLUSH_INTERVAL
    monkeypatch.setenv(adapters.FLUSH_ENV, str(bench_integrations._stretched_interval("rq")))
    assert adapters.ProcessClient("/nonexistent/s.sock").client_kw["flush_interval"] == (
        3 * adapters.FLUSH_INTERVAL
    )
    monkeypatch.setenv("QDASH_BENCH_SLICE", "0")
    assert bench_integrations._slice() == 0.0


def test_the_turns_reach_a_child_in_a_session_of_its_own() -> None:
    """RQ's horse calls setsid: the harness signals a worker's children by pid as well."""
    script = (
        "import os, subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],"
        " start_new_session=True)\n"
        "print(kid.pid, flush=True)\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        kid = int(parent.stdout.readline())
        assert os.getpgid(kid) != os.getpgid(parent.pid)
        assert kid in bench_integrations._descendants(parent.pid)
        assert bench_integrations._descendants(kid) == []
    finally:
        for pid in bench_integrations._descendants(parent.pid):
            os.kill(pid, 9)
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_the_collectors_idle_cpu_is_a_rate_and_can_be_kept_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_collector_idle`` reads a process's CPU seconds a second: ~1 for a busy loop (on
    its own CPU or sharing one, at most 1), ~0 for a sleeper; 0 when told to keep it in."""
    import subprocess
    import sys

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monkeypatch.delenv("QDASH_BENCH_IDLE", raising=False)
        assert 0.2 < bench_integrations._collector_idle(busy.pid, 0.3) <= 1.05
        assert bench_integrations._collector_idle(sleeper.pid, 0.3) < 0.05
        monkeypatch.setenv("QDASH_BENCH_IDLE", "0")
        assert bench_integrations._collector_idle(busy.pid, 0.3) == 0.0
    finally:
        for p in (busy, sleeper):
            p.kill()
            p.wait()
