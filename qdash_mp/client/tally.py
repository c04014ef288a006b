"""The hooks' cumulative counters: one ``itertools.count`` per queue, read by the sender.

A hook counts with ``next(counts[queue])``: one dict lookup and one C call, atomic under
the GIL like ``counts[queue] += 1`` (which costs a second dict lookup and the store; the
plain hook is ~10 % cheaper this way, ``benchmarks/README.md``). The sender reads a counter
through its repr (``count(N)``), one C call as well, so a value is never torn; which of two
racing hooks a read sees does not matter, the counts are cumulative.

(CPython 3.11-3.13 shows ``count(<NULL>)`` for the one value ``2**63 - 1``, where the C
counter moves to Python ints; ``read`` would raise there. At 10^8 calls a second that is
~2,900 years of one queue's counting, so it is not handled.)

A missing queue is created with ``dict.setdefault`` (one C call): two threads creating it
at once both count on the one counter that won.
"""

from __future__ import annotations

import itertools

__all__ = ["Counts", "new_counts", "read", "snapshot"]

Counts = dict[str, "itertools.count[int]"]
"""queue -> its counter (only hooks call ``next`` on it)."""


def new_counts(values: dict[str, int] | None = None) -> Counts:
    """Counters starting at ``values`` (none: empty), e.g. to seed a test."""
    return {q: itertools.count(n) for q, n in (values or {}).items()}


def read(counter: itertools.count[int]) -> int:
    """The counter's value: how many times ``next`` was called on it (plus its start)."""
    text = repr(counter)  # "count(N)": our counters start at an int and step by 1
    return int(text[6:-1])


def snapshot(counts: Counts) -> dict[str, int]:
    """queue -> value now (the dict is copied in one C call first: hooks may add queues)."""
    return {q: read(c) for q, c in counts.copy().items()}
