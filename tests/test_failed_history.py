"""The retry history: HISTORY records (journal format version 2). The byte-table example
in ``journal.format`` is what the code writes; a retry's ``keep_history`` keeps the removed
failure, readable after a reopen and a compaction, bounded per id; version-1 segments still
open, and an unknown version is refused."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from qdash_mp.errors import JournalCorrupt
from qdash_mp.journal import FORMAT_VERSION, Journal, RecordType, format, record_header
from qdash_mp.journal.segments import HISTORY_PER_ID
from qdash_mp.records import FailedRecord, pack_failed
from tests.qdash_testing.journal import T0, Clock, fj, segments


def test_the_history_example_in_the_format_docstring() -> None:
    record = FailedRecord(
        "j1", "send_email", bytes.fromhex("81a2746fa3614062"), 1, 1700000000.0, "mail",
        "ValueError: boom", "", 1700000001.5,
    )  # fmt: skip
    payload = pack_failed(record)
    head = record_header(int(RecordType.HISTORY), payload)
    doc = format.__doc__ or ""
    row = re.search(r"\n\s+([0-9a-f ]+)\s+\.\.\.\s+cb 41 d9 54 fc 40 60 00 00\n", doc)
    assert row is not None
    shown = bytes.fromhex(row.group(1))
    assert (head + payload).startswith(shown)
    assert (head + payload).endswith(bytes.fromhex("cb41d954fc40600000"))
    assert len(head + payload) == 76
    assert FORMAT_VERSION == 2


def test_a_retry_keeps_the_failure_as_history(jdir: Path) -> None:
    j = Journal.open(jdir, clock=Clock(T0 + 100))
    try:
        first = fj("job-1", at=T0, error="ValueError: first")
        j.stage_failed(first)
        j.commit()
        assert j.stage_removed("job-1", "retried", if_failed_at=T0, keep_history=True)
        j.commit()
        assert "job-1" not in j
        again = fj("job-1", at=T0 + 10, error="ValueError: second")
        j.stage_failed(again)
        j.commit()
        hist = j.history("job-1")
        assert [h.error for h in hist] == ["ValueError: first"]
        assert hist[0].failed_at == datetime.fromtimestamp(T0, UTC)
        assert j.get("job-1").error == "ValueError: second"
        # forget keeps no history; bounded per id
        for k in range(HISTORY_PER_ID + 3):
            j.stage_failed(fj("job-2", at=T0 + k, error=f"E{k}"))
            j.commit()
            j.stage_removed("job-2", "retried", keep_history=True)
            j.commit()
        j.stage_removed("job-1", "forgotten")
        j.commit()
        assert [h.error for h in j.history("job-1")] == ["ValueError: first"]
        want2 = [f"E{k}" for k in reversed(range(3, HISTORY_PER_ID + 3))]
        assert [h.error for h in j.history("job-2")] == want2
        j.compact()
        assert [h.error for h in j.history("job-2")] == want2
    finally:
        j.close()
    j = Journal.open(jdir, clock=Clock(T0 + 100))
    try:
        assert [h.error for h in j.history("job-1")] == ["ValueError: first"]
        assert [h.error for h in j.history("job-2")] == want2
        assert len(j) == 0  # history records are not live failed jobs
    finally:
        j.close()


def _rewrite_version(path: Path, version: int) -> None:
    """Rewrite the SEGMENT record of ``path`` with another format version (same length)."""
    data = bytearray(path.read_bytes())
    _crc, n, _t = format.HEADER.unpack(data[: format.HEADER.size])
    payload = bytearray(data[format.HEADER.size : format.HEADER.size + n])
    i = payload.index(format.MAGIC.encode()) + len(format.MAGIC)
    assert payload[i] in (1, 2)  # a positive fixint right after the magic string
    payload[i] = version
    head = record_header(int(RecordType.SEGMENT), bytes(payload))
    data[: format.HEADER.size + n] = head + payload
    path.write_bytes(bytes(data))


def test_version_1_segments_open_and_unknown_versions_are_refused(jdir: Path) -> None:
    j = Journal.open(jdir, clock=Clock(T0 + 100))
    j.stage_failed(replace(fj(1, at=T0), error="v1 record"))
    j.commit()
    j.close()
    (seg,) = segments(jdir)
    _rewrite_version(seg, 1)
    j = Journal.open(jdir, clock=Clock(T0 + 100))
    try:
        assert j.get("job-1").error == "v1 record"
    finally:
        j.close()
    _rewrite_version(seg, 3)
    with pytest.raises(JournalCorrupt, match="unsupported journal format version 3"):
        Journal.open(jdir, clock=Clock(T0 + 100))
