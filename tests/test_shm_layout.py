"""The block layout: ``qdash_mp.shm.layout``'s byte table against its constants and a live block."""

from __future__ import annotations

import os
import re

from qdash_testing.shm import (  # noqa: F401  (name_fixture: the `name` fixture)
    Clock,
    attach_untracked,
    attach_untracked_buf,
    fresh_name,
    name_fixture,
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
    layout,
)
from qdash_mp.stats import (
    ring_slots,
)


def test_raw_layout_matches_the_docstring(name: str) -> None:
    clock = Clock()
    with SharedStats.create_or_attach(
        name, window=9, capacity=3, client_capacity=5, clock=clock
    ) as stats:
        stats.apply_batch({"a": (3, 2, 1, 0), "é": (1, 0, 0, 0)}, client=("c1", 4))
        h = raw_header(attach_untracked_buf(name))
        assert (h["client_capacity"], h["clients"]) == (5, 1)
        assert h["magic"] == MAGIC
        assert (h["version"], h["ring"], h["capacity"], h["count"]) == (3, ring_slots(9), 3, 2)
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
            rec, d, _, g, entry = raw_offsets(h)
            assert rec == 6 + 2 * 10 + 2 * 418
            assert entry == 8 * (rec + 2)  # records (with their histograms) outgrow clients
            assert shm.size == g + entry * (3 + 1)
        finally:
            shm.close()
        # started (slot 4) and the histograms (H = 6 + 2R on, B = 418 each), per the table.
        stats.apply_batch({}, ("c1", 5), started={"é": 7}, hist={"é": ({0: 2, 417: 3}, {5: 4})})
        shm = attach_untracked(name)
        try:
            at = d + 8 * rec  # record 1, "é"
            slots = memoryview(bytes(shm.buf[at : at + 8 * rec])).cast("q")
            big_h = 6 + 2 * 10
            assert slots[4] == 7
            assert (slots[big_h], slots[big_h + 417], slots[big_h + 418 + 5]) == (2, 3, 4)
            assert sum(slots[big_h:]) == 9
            assert stats.buckets("é") == (
                [2] + [0] * 416 + [3],
                [0] * 5 + [4] + [0] * 412,
            )
        finally:
            shm.close()


HEADER_WORDS = {
    "VERSION": "layout version",
    "RING": "throughput ring slots",
    "CAPACITY": "capacity in queues",
    "COUNT": "queue count N",
    "SEQ": "seqlock sequence",
    "STARTED": "started: Unix second",
    "PID": "pid of the writer",
    "GENERATION": "generation of this block",
    "STATUS": "status: 1 live, 2 superseded (see next), 3 closed",
    "NEXT": "next: generation that superseded",
    "NAME_MAX_SLOT": "NAME_MAX, name bytes per directory entry (248)",
    "LOG_COUNT": "redo-log entries committed",
    "INCARNATION": "incarnation: random id",
    "CLIENT_CAP": "capacity in clients",
    "CLIENTS": "client count M",
}


def doc_rows(section: str) -> list[tuple[int, int, str]]:
    """(offset, size, field) of the fixed-offset rows of a section of the layout table."""
    doc = layout.__doc__ or ""
    lines = doc[doc.index(section) :].splitlines()[1:]
    out = []
    for line in lines:
        m = re.fullmatch(r"    (\d+)\s+(\d+)\s+(\S.*)", line)
        if m is None:
            if line.startswith("    ") and not line.startswith("     "):
                break  # the next section
            continue  # a continuation line
        out.append((int(m[1]), int(m[2]), m[3]))
    return out


def test_the_header_table_matches_the_slot_constants() -> None:
    rows_ = doc_rows("header (16 slots, 128 bytes)")
    assert [(off, size) for off, size, _ in rows_] == [(8 * k, 8) for k in range(16)]
    assert rows_[0][2] == 'magic, the bytes b"QDASHSHM"'
    assert layout.MAGIC == b"QDASHSHM"
    assert rows_[1][2] == f"layout version, {layout.LAYOUT_VERSION}"
    assert layout.HEADER_SIZE == 16 * 8
    for constant, words in HEADER_WORDS.items():
        slot = getattr(layout, constant)
        assert rows_[slot][2].startswith(words) or words in rows_[slot][2], constant
    assert (layout.LIVE, layout.SUPERSEDED, layout.CLOSED) == (1, 2, 3)


def test_the_entry_sizes_and_offsets_match_the_table() -> None:
    doc = layout.__doc__ or ""
    assert f"directory (C entries of {layout.DIR_ENTRY_SIZE} bytes)" in doc
    assert f"clients (K entries of {layout.CLIENT_ENTRY_SIZE} bytes)" in doc
    assert layout.NAME_MAX == 248
    assert layout.CLIENT_SLOTS == 67
    assert layout.CLIENT_HEAD.size == 24
    for ring, cap, clients in [(2, 1, 1), (10, 3, 5), (61, 1024, 4096), (301, 7, 2)]:
        lay = layout.Layout(ring, cap, clients)
        big_h = 6 + 2 * ring
        big_l = big_h + 2 * 418
        w = max(big_l, 67)
        d = 128 + 256 * cap
        e = d + 8 * big_l * cap
        g = e + 536 * clients
        assert (lay.rec_slots, lay.rec_at, lay.cli_at, 8 * lay.log_slot) == (big_l, d, e, g)
        assert lay.head_slots == big_h
        assert lay.log_slots == w + 2
        assert lay.size == g + 8 * (w + 2) * (cap + 1)
        assert 8 * lay.client_slot(2) == e + 536 * 2
        assert layout.Layout.entry_at(3) == 128 + 256 * 3
    assert "redo log (C + 1 entries of 8(W+2) bytes)" in doc
    assert "L = record_len(R) = 6 + 2R + 2B" in doc
    # The default block's size, as documented on DEFAULT_CAPACITY (18.3 MB).
    default = layout.Layout(61, layout.DEFAULT_CAPACITY, layout.DEFAULT_CLIENT_CAPACITY)
    assert round(default.size / 1e6, 1) == 18.3
