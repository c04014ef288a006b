"""The audit log: byte layout, torn tails cut, corruption refused, retention, and entries that
survive ``kill -9`` of a real collector."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from qdash_testing.collector import CollectorProc, short_dir

import qdash_mp.audit_format as fmt
from qdash_mp import Client, Job
from qdash_mp.audit import AuditEntry, FileAuditLog, MemoryAuditLog
from qdash_mp.errors import AuditCorrupt, AuditError

TOKEN = "audit-test-token-0123456789"


def entry(i: int, t: float = 1_700_000_000.0) -> AuditEntry:
    return AuditEntry(
        t=t + i, who="alice", remote="127.0.0.1", action="forget", ids=(f"j{i}",), count=1
    )


def test_header_bytes_match_the_docstring() -> None:
    dump = re.search(r"The header as hex::\n\n\s+(.+)\n", fmt.__doc__ or "")
    assert dump is not None
    assert bytes.fromhex(dump.group(1).replace("  ", " ")) == fmt.HEADER
    assert len(fmt.HEADER) == fmt.HEADER_SIZE


def test_record_layout() -> None:
    rec = fmt.encode_record({"a": 1})
    assert rec[:4] == (7).to_bytes(4, "little")
    assert rec[8:] == b'{"a":1}'
    decoded = fmt.decode(fmt.HEADER + rec + rec)
    assert decoded.entries == [{"a": 1}, {"a": 1}]
    assert decoded.torn is None


@pytest.mark.parametrize("cut", range(1, 15))
def test_torn_tail_is_cut(cut: int) -> None:
    good = fmt.HEADER + fmt.encode_record({"n": 1})
    rec = fmt.encode_record({"n": 2})
    decoded = fmt.decode(good + rec[:cut])
    assert decoded.entries == [{"n": 1}]
    assert decoded.end == len(good)
    assert decoded.torn is not None


def test_garbled_last_record_is_torn_but_garbled_middle_is_corrupt() -> None:
    a, b = fmt.encode_record({"n": 1}), fmt.encode_record({"n": 2})
    bad_b = b[:-1] + bytes([b[-1] ^ 0xFF])
    assert fmt.decode(fmt.HEADER + a + bad_b).torn is not None
    bad_a = a[:-1] + bytes([a[-1] ^ 0xFF])
    with pytest.raises(AuditCorrupt, match="records follow"):
        fmt.decode(fmt.HEADER + bad_a + b)
    with pytest.raises(AuditCorrupt, match="bad header"):
        fmt.decode(b"X" * 16 + a)


def test_file_log_recovers_a_torn_tail_and_keeps_appending(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = FileAuditLog(path)
    for i in range(3):
        log.append_sync(entry(i))
    log.close()
    with path.open("ab") as f:
        f.write(fmt.encode_record(entry(9).to_dict())[:11])
    again = FileAuditLog(path)
    assert [e.ids for e in again.page(0, 10)] == [("j2",), ("j1",), ("j0",)]
    again.append_sync(entry(3))
    again.close()
    assert [e.ids[0] for e in FileAuditLog(path).page(0, 2)] == ["j3", "j2"]


def test_file_log_refuses_corruption(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = FileAuditLog(path)
    for i in range(3):
        log.append_sync(entry(i))
    log.close()
    data = bytearray(path.read_bytes())
    data[fmt.HEADER_SIZE + 12] ^= 0x20  # inside the first record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(AuditCorrupt):
        FileAuditLog(path)


def test_retention_by_count_and_age(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = FileAuditLog(path, max_entries=8)
    for i in range(30):
        log.append_sync(entry(i))
    assert 8 <= len(log) <= 10
    assert log.page(0, 1)[0].ids == ("j29",)
    log.close()
    reopened = FileAuditLog(path, max_entries=8)
    assert len(reopened) == 8
    assert reopened.page(0, 8)[-1].ids == ("j22",)
    reopened.close()
    aged = FileAuditLog(path, max_entries=100, max_age=3.5)
    aged.append_sync(entry(40))  # t = base + 40: everything older than base + 36.5 goes
    assert [e.ids[0] for e in aged.page(0, 10)] == ["j40"]
    aged.close()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


async def test_memory_log_pages_newest_first() -> None:
    log = MemoryAuditLog(max_entries=5)
    for i in range(7):
        await log.append(entry(i))
    assert len(log) == 5
    assert [e.ids[0] for e in log.page(0, 2)] == ["j6", "j5"]
    assert [e.ids[0] for e in log.page(4, 2)] == ["j2"]


def _post(base: str, path: str) -> Any:
    req = urllib.request.Request(
        base + path,
        method="POST",
        data=b"",
        headers={"Accept": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _get(base: str, path: str) -> Any:
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_audit_entries_survive_kill_9() -> None:
    data = short_dir("qaud")
    token = data / "token"
    data.mkdir(exist_ok=True)
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    proc = CollectorProc(data, args=("--auth-token-file", str(token)))
    try:
        proc.start()
        with Client(proc.socket) as client:
            for i in range(3):
                client.on_failed("q", Job(id=f"k{i}", name="t"), "boom")
            assert client.flush(timeout=30)
        assert _post(proc.http, "/queues/failed/k0/forget") == {
            "ok": True,
            "action": "forget",
            "id": "k0",
        }
        assert _post(proc.http, "/queues/failed/flush")["flushed"] == 2
        proc.kill()  # SIGKILL right after the answers: no clean shutdown
        log = FileAuditLog(data / "audit.log")
        got = [(e.who, e.action, e.ids, e.count, e.status) for e in log.page(0, 10)]
        log.close()
        assert got == [
            ("token", "flush", (), 2, 200),
            ("token", "forget", ("k0",), 1, 200),
        ]
        proc.start()  # the restarted collector shows them
        page = _get(proc.http, "/queues/api/audit")
        assert [e["action"] for e in page["entries"]] == ["flush", "forget"]
        assert page["total"] == 2
    finally:
        proc.cleanup()


def test_file_is_created_by_the_first_action(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = FileAuditLog(path)
    assert not path.exists()  # a collector that fails to start leaves nothing behind
    assert log.page(0, 5) == []
    log.append_sync(entry(1))
    assert path.stat().st_mode & 0o777 == 0o600
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append_sync(entry(2))
