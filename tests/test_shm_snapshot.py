"""The stats snapshot file: round trip, damage, which state wins, and a failing write.

Real files and real segments; the failing write is a real one (``RLIMIT_FSIZE`` in a child
process), not a mock.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from qdash_testing.shm import (  # noqa: F401  (name_fixture: the `name` fixture)
    Clock,
    fresh_name,
    name_fixture,
    remove_segments,
    rows,
    segments,
)

from qdash_mp.errors import QdashError, SnapshotError
from qdash_mp.shm import (
    SNAPSHOT_MAGIC,
    SharedStats,
    SharedStatsReader,
    ShmError,
)
from qdash_mp.stats import (
    record_len,
)

# --- clean restarts: the snapshot file ------------------------------------------------------

SNAP_HEAD = struct.Struct(">8sIIQ")
"""magic, format version, CRC-32 of the body, body length: per the docstring."""


def snapshot_body(path: Path) -> dict[str, Any]:
    """Decode a snapshot file per the docstring, checking its header."""
    raw = path.read_bytes()
    magic, version, crc, length = SNAP_HEAD.unpack_from(raw)
    body = raw[SNAP_HEAD.size :]
    assert (magic, version, length, crc) == (SNAPSHOT_MAGIC, 2, len(body), zlib.crc32(body))
    obj: dict[str, Any] = msgpack.unpackb(body)
    return obj


def with_body(obj: Any, version: int = 2) -> bytes:
    """A snapshot file with a valid header around ``obj``."""
    body = msgpack.packb(obj, use_bin_type=True)
    return SNAP_HEAD.pack(SNAPSHOT_MAGIC, version, zlib.crc32(body), len(body)) + body


def fill(stats: SharedStats, clock: Clock) -> None:
    """Counters, started and histograms over a few seconds (so the rings hold something) and
    three clients."""
    for second in range(5):
        stats.apply_batch(
            {"q1": (3, 2, 1, 0), "é": (1, 1, 0, 0)},
            client=("w1", second + 1),
            started={"q1": 3},
            hist={"q1": ({100 + second: 2, 417: 1}, {0: 3}), "é": ({5: 1}, None)},
        )
        stats.apply_batch({"q1": (0, 1, 0, 1), "\ud800": (2, 0, 0, 0)}, client=("w2", second + 1))
        clock.t += 1
    stats.apply_batch({"a" * 300: (1, 0, 0, 0)}, client=("🙂" * 128, 9))


def test_save_and_restore_round_trip(name: str, tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "stats.snapshot"
    with SharedStats.create_or_attach(name, window=10, capacity=2, clock=clock) as stats:
        fill(stats, clock)
        clock.t += 0.5
        saved_at = clock.t
        # What a table that never stopped would show 3 s later, when the restart is done:
        # the throughput depends on the rings and, 8 s into a 10 s window, on started.
        clock.t += 3
        expected = stats.snapshot()
        clock.t = saved_at
        assert expected.totals.throughput > 0
        assert expected != stats.snapshot()
        seqs = stats.client_seqs()
        hists = {q: stats.buckets(q) for q in ("q1", "é", "\ud800")}
        assert sum(hists["q1"][0]) == 15
        assert hists["q1"][1][0] == 15
        assert expected.totals.runtime.count == 20
        stats.save(path)
        stats.unlink()  # the clean shutdown
    assert segments(name) == []
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.snapshot"]  # no temporary left
    body = snapshot_body(path)
    assert (body["window"], body["started"], body["saved_at"]) == (10, 1_700_000_000, int(saved_at))
    assert len(body["queues"]) == 4
    assert body["clients"][-1] == ["🙂".encode() * 128, 9, int(saved_at)]  # LRU order

    clock.t += 3
    opts: dict[str, Any] = {"window": 10, "capacity": 1, "client_capacity": 1, "clock": clock}
    with SharedStats.create_or_attach(name, **opts, restore_from=path) as stats:
        assert stats.restored
        assert path.exists()  # deleting it is the caller's call
        assert stats.snapshot() == expected
        assert stats.client_seqs() == seqs
        assert {q: stats.buckets(q) for q in hists} == hists
        assert (stats.capacity, stats.client_capacity) == (4, 4)
        with SharedStatsReader(name, clock=clock) as reader:
            assert reader.snapshot() == expected
        stats.apply_batch({"q1": (1, 0, 0, 0)}, client=("w1", 6))  # counting on
        with pytest.raises(ValueError, match="not after 5"):
            stats.apply_batch({"q1": (1, 0, 0, 0)}, client=("w2", 5))  # dedup survived
        assert rows(stats.snapshot())["q1"] == (16, 15, 5, 5)
    # A restored table is an ordinary one: a crash-restart reattaches it.
    with SharedStats.create_or_attach(name, **opts, restore_from=path) as stats:
        assert not stats.restored
        assert stats.client_seq("w1") == 6


BAD_SNAPSHOTS: dict[str, Any] = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[:-1],
    "one flipped bit": lambda good: good[:-5] + bytes([good[-5] ^ 0x10]) + good[-4:],
    "bad magic": lambda good: b"QDASHXXX" + good[8:],
    "future version": lambda good: good[:8] + struct.pack(">I", 3) + good[12:],
    "other window": lambda good: with_body({**msgpack.unpackb(good[24:]), "window": 30}),
    "not a map": lambda good: with_body([1, 2, 3]),
    "bad msgpack": lambda good: SNAP_HEAD.pack(SNAPSHOT_MAGIC, 1, zlib.crc32(b"\xc1"), 1) + b"\xc1",
    "short record": lambda good: with_body(
        {**msgpack.unpackb(good[24:]), "queues": [[b"q", [1, 2, 3]]]}
    ),
    "repeated client": lambda good: with_body(
        {**msgpack.unpackb(good[24:]), "clients": [[b"c", 1, 0], [b"c", 2, 0]]}
    ),
    "negative seq": lambda good: with_body(
        {**msgpack.unpackb(good[24:]), "clients": [[b"c", -1, 0]]}
    ),
    "client id too long": lambda good: with_body(
        {**msgpack.unpackb(good[24:]), "clients": [[b"c" * 129, 1, 0]]}
    ),
    "name not utf-8": lambda good: with_body(
        {**msgpack.unpackb(good[24:]), "queues": [[b"\xff", [0] * record_len(11)]]}
    ),
    "int over int64": lambda good: with_body({**msgpack.unpackb(good[24:]), "started": 2**63}),
    "missing field": lambda good: with_body(
        {k: v for k, v in msgpack.unpackb(good[24:]).items() if k != "clients"}
    ),
}


@pytest.mark.parametrize("damage", BAD_SNAPSHOTS)
def test_a_bad_snapshot_is_set_aside_and_the_table_starts_empty(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    clock = Clock()
    path = tmp_path / "stats.snapshot"
    with SharedStats.create_or_attach(name, window=10, clock=clock) as stats:
        fill(stats, clock)
        stats.save(path)
        stats.unlink()
    bad = BAD_SNAPSHOTS[damage](path.read_bytes())
    path.write_bytes(bad)
    with SharedStats.create_or_attach(name, window=10, clock=clock, restore_from=path) as stats:
        assert not stats.restored
        assert stats.snapshot().queues == []
        assert stats.client_seqs() == {}
    assert not path.exists()
    assert (tmp_path / "stats.snapshot.bad").read_bytes() == bad
    assert "is unusable" in caplog.text
    assert "counters start from 0" in caplog.text


def test_a_surviving_segment_wins_over_the_snapshot(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Crash case: the segment outlived its writer, so the snapshot file is stale."""
    caplog.set_level("INFO", logger="qdash_mp.shm")
    path = tmp_path / "stats.snapshot"
    with SharedStats.create_or_attach(name) as stats:
        stats.apply_batch({"q": (1, 0, 0, 0)}, client=("w", 1))
        stats.save(path)
        stats.apply_batch({"q": (1, 0, 0, 0)}, client=("w", 2))  # after the save
    saved = path.read_bytes()
    with SharedStats.create_or_attach(name, restore_from=path) as stats:
        assert not stats.restored
        assert rows(stats.snapshot()) == {"q": (2, 0, 0, 0)}
        assert stats.client_seq("w") == 2
    assert path.read_bytes() == saved  # left alone
    assert "snapshot, which is stale" in caplog.text


def test_no_snapshot_file_is_a_fresh_start_and_save_errors_are_shm_errors(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with SharedStats.create_or_attach(name, restore_from=tmp_path / "none") as stats:
        assert not stats.restored
        stats.on_pushed("q")
        with pytest.raises(ShmError, match="cannot save"):
            stats.save(tmp_path / "no-such-dir" / "stats.snapshot")
        (tmp_path / "stats.snapshot").mkdir()
        with pytest.raises(ShmError, match="cannot save"):
            stats.save(tmp_path / "stats.snapshot")  # a directory is in the way
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.snapshot"]
        stats.unlink()
        with pytest.raises(ShmError, match="closed"):
            stats.save(tmp_path / "late")
    assert "WARNING" not in caplog.text


# --- hole 3: a snapshot that cannot be written must not cost the counters -------------------

FAILING_SAVE = r"""
import json, resource, signal, sys
from pathlib import Path
from qdash_mp.errors import SnapshotError
from qdash_mp.shm import SharedStats

name, path = sys.argv[1], Path(sys.argv[2])
stats = SharedStats.create_or_attach(name, restore_from=path)
restored = stats.restored
stats.apply_batch({"q": (5, 4, 1, 0), "r": (2, 0, 0, 0)}, client=("w", 7))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # a "full disk" for this process only
try:
    stats.save(path)
except SnapshotError as exc:
    stats.close()  # what a collector's stop must do now: keep the segment
    print(json.dumps({"restored": restored, "error": str(exc)}), flush=True)
    sys.exit(3)
print(json.dumps({"restored": restored, "error": None}), flush=True)
"""


def test_a_failed_save_keeps_the_segment_and_the_next_start_reattaches_it(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hole 3: the save fails for real; the segment, not the older file, carries the counts."""
    caplog.set_level("INFO", logger="qdash_mp.shm")
    path = tmp_path / "stats.snapshot"
    with SharedStats.create_or_attach(name) as stats:  # an earlier clean stop: file, no segment
        stats.apply_batch({"q": (1, 0, 0, 0)}, client=("w", 1))
        stats.save(path)
        stats.unlink()
    older = path.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_SAVE, name, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    assert out["restored"] is True
    assert f"cannot save shared stats {name!r} to {path}" in out["error"]
    assert "File too large" in out["error"]
    assert "still in shared memory" in out["error"]
    assert path.read_bytes() == older  # the previous snapshot is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.snapshot"]  # no temp file
    assert segments(name) == [name]  # the segment was kept
    # The next start (this process) reattaches the kept segment: the file is older.
    with SharedStats.create_or_attach(name, restore_from=path) as stats:
        assert not stats.restored
        assert rows(stats.snapshot()) == {"q": (6, 4, 1, 0), "r": (2, 0, 0, 0)}
        assert stats.client_seq("w") == 7
    assert "snapshot, which is stale" in caplog.text
    assert path.read_bytes() == older


def test_save_errors_are_snapshot_errors_under_qdash_error(name: str, tmp_path: Path) -> None:
    with SharedStats.create_or_attach(name) as stats:
        stats.on_pushed("q")
        with pytest.raises(SnapshotError) as info:
            stats.save(tmp_path / "no-such-dir" / "stats.snapshot")
        assert isinstance(info.value, ShmError)
        assert isinstance(info.value, QdashError)
        assert rows(stats.snapshot()) == {"q": (1, 0, 0, 0)}
        stats.unlink()


def test_a_format_1_snapshot_is_converted(name: str, tmp_path: Path) -> None:
    """Format 1 (records of 4 counters + 2R ring slots) restores its counters and rings;
    started and the histograms start at 0."""
    clock = Clock()
    path = tmp_path / "stats.snapshot"
    with SharedStats.create_or_attach(name, window=10, clock=clock) as stats:
        fill(stats, clock)
        expected = {q: (r.pushed, r.processed, r.throughput) for q, r in view_rows(stats)}
        stats.save(path)
        stats.unlink()
    body = snapshot_body(path)
    ring = 11
    # The same file as format 1 wrote it: no started slot, no histograms.
    body["queues"] = [[n, [*rec[:4], *rec[6 : 6 + 2 * ring]]] for n, rec in body["queues"]]
    path.write_bytes(with_body(body, version=1))
    with SharedStats.create_or_attach(name, window=10, clock=clock, restore_from=path) as stats:
        assert stats.restored
        assert {q: (r.pushed, r.processed, r.throughput) for q, r in view_rows(stats)} == expected
        assert stats.buckets("q1") == ([0] * 418, [0] * 418)
        assert stats.snapshot().totals.runtime.count == 0
        stats.apply_batch({}, started={"q1": 1}, hist={"q1": ({3: 1}, None)})
        assert stats.buckets("q1")[0][3] == 1


def view_rows(stats: SharedStats) -> list[tuple[str, Any]]:
    return [(r.queue, r) for r in stats.snapshot().queues]
