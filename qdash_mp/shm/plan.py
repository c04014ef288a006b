"""Planning a batch for ``SharedStats``: which record each queue uses, which are new, what else.

Pure: it reads the writer's name index and writes nothing. Everything that can raise on a bad
batch (a wrong number of counters, a bad started count, a malformed histogram) raises here,
before the writer opens its write section, so a batch is committed whole or not at all.
"""

from __future__ import annotations

import operator
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

from qdash_mp.shm.layout import stored_name
from qdash_mp.stats import COUNTERS, check_hist

_N = len(COUNTERS)
_NONE: frozenset[int] = frozenset()

Hist = Mapping[str, tuple[Mapping[int, int] | None, Mapping[int, int] | None]]


@dataclass(slots=True)
class Plan:
    """What one batch changes, by record index (``index`` holds the table's names, ``count``)."""

    counters: list[tuple[int, Sequence[int]]]
    """``(record, deltas)`` per queue of the batch's counters."""
    fresh: dict[str, int]
    """Names not in the table yet (as given, and in stored form) -> their new record."""
    new: list[tuple[str, bytes]]
    """The directory entries to add, in record order: ``(key, stored name bytes)``."""
    lifecycle: list[tuple[int, int, Mapping[int, int] | None, Mapping[int, int] | None]]
    """``(record, started, runtime buckets, wait buckets)`` of queues with lifecycle parts."""
    full: Container[int]
    """Records whose histograms change: logged (and copied back) whole, not just the head."""


def plan_batch(
    items: Iterable[tuple[str, Sequence[int]]],
    started: Mapping[str, int] | None,
    hist: Hist | None,
    index: Mapping[str, int],
    count: int,
) -> Plan:
    """Plan a batch against a table whose directory maps ``index`` (``count`` names)."""
    fresh: dict[str, int] = {}
    new: list[tuple[str, bytes]] = []
    counters: list[tuple[int, Sequence[int]]] = []
    plan = Plan(counters, fresh, new, [], _NONE)

    def record_of(queue: str) -> int:
        """A name not in ``index``: its stored form's record, or a new one."""
        idx = fresh.get(queue)
        if idx is None:
            stored = stored_name(queue)
            key = stored.decode("utf-8", "surrogatepass")
            idx = index.get(key, fresh.get(key))
            if idx is None:
                idx = fresh[key] = count + len(new)
                new.append((key, stored))
            fresh[queue] = idx
        return idx

    for queue, deltas in items:
        if len(deltas) != _N:
            raise ValueError(f"counters of {queue!r} must be {_N} ints {COUNTERS}, not {deltas!r}")
        idx = index.get(queue)
        counters.append((record_of(queue) if idx is None else idx, deltas))
    if started or hist:  # absent from the counters hot path
        plan.full = touched = set()
        for queue in dict.fromkeys((*(started or ()), *(hist or ()))):
            n = operator.index((started or {}).get(queue, 0))
            pair = (hist or {}).get(queue)
            runtime = wait = None
            if pair is not None:
                check_hist(queue, pair)
                runtime, wait = pair
            if not (n or runtime or wait):
                continue
            idx = index.get(queue)
            if idx is None:
                idx = record_of(queue)
            plan.lifecycle.append((idx, n, runtime, wait))
            if runtime or wait:
                touched.add(idx)
    return plan
