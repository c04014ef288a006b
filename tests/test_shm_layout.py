"""The block layout: ``qdash_mp.shm.layout``'s byte table against its constants and a live block."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from qdash_testing.shm import (
    Clock,
    attach_untracked,
    attach_untracked_buf,
    fresh_name,
    raw_clients,
    raw_header,
    raw_offsets,
    raw_rows,
    remove_segments,
)

from qdash_mp.shm import (
    MAGIC,
    NAME_MAX,
    SharedStats,
)
from qdash_mp.stats import (
    ring_slots,
)


@pytest.fixture
def name() -> Iterator[str]:
    """A unique table name; whatever segments a test leaves behind are removed."""
    n = fresh_name()
    yield n
    remove_segments(n)


def test_raw_layout_matches_the_docstring(name: str) -> None:
    clock = Clock()
    with SharedStats.create_or_attach(
        name, window=9, capacity=3, client_capacity=5, clock=clock
    ) as stats:
        stats.apply_batch({"a": (3, 2, 1, 0), "é": (1, 0, 0, 0)}, client=("c1", 4))
        h = raw_header(attach_untracked_buf(name))
        assert (h["client_capacity"], h["clients"]) == (5, 1)
        assert h["magic"] == MAGIC
        assert (h["version"], h["ring"], h["capacity"], h["count"]) == (2, ring_slots(9), 3, 2)
        assert (h["started"], h["pid"], h["generation"], h["status"]) == (
            int(clock.t),
            os.getpid(),
            0,
            1,
        )
        assert (h["next"], h["name_max"], h["log_count"], h["seq"] % 2) == (0, NAME_MAX, 0, 0)
        shm = attach_untracked(name)
        try:
            assert raw_rows(shm.buf) == [("a", 3, 2), ("é", 1, 0)]
            assert raw_clients(shm.buf) == {"c1": (4, int(clock.t))}
            _, _, _, g, entry = raw_offsets(h)
            assert entry == 8 * (67 + 1)  # a 9 s window: records are shorter than clients
            assert shm.size == g + entry * (3 + 1)
        finally:
            shm.close()
