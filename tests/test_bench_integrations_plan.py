"""The integrations benchmark's round plan (the order of the modes, the blocks' sizes) and its
check that the adapter under measurement really reported.

The order matters more than it looks: rotating two modes (A B | B A | A B) runs one mode twice
in a row at every round boundary, and on a 2-vCPU VM the second run of such a pair was up to
2x slower, which made Huey's ratio swing between 0.98 and 1.23 (benchmarks/README.md).
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

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
