"""The FAILED record (``qdash_mp.records``): its fields, its one check, its packers.

The same bytes travel in BATCH and REQUEUE frames and are the journal's FAILED records, so
what is tested here holds for both.
"""

from __future__ import annotations

import ast
import inspect
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qdash_testing.records import FAILED, failed_array, json_like

import qdash_mp.payload
import qdash_mp.records
import qdash_mp.strict_msgpack
from qdash_mp.errors import ProtocolError
from qdash_mp.models import FailedJob, Job
from qdash_mp.records import (
    FIELDS,
    FailedRecord,
    check_failed,
    pack_failed,
    pack_failed_fields,
    pack_failed_record,
    pack_payload,
    unpack_failed,
)
from qdash_mp.wire import FrameDecoder, Requeue, encode

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# --------------------------------------------------------------------------- one definition


def _table_fields(text: str, row: str) -> list[str]:
    """The field names of the rows of a field table (``row`` matches one, group 1 the name)."""
    return re.findall(row, text, flags=re.MULTILINE)


def test_the_nine_fields_are_written_once() -> None:
    assert len(FIELDS) == 9
    assert tuple(FailedRecord.__dataclass_fields__) == FIELDS
    assert tuple(inspect.signature(pack_failed_fields).parameters) == FIELDS
    doc = qdash_mp.records.__doc__
    assert doc is not None
    # The module docstring's table, its hex dump, and the table in docs/protocol.md.
    assert _table_fields(doc, r"^    [0-8]  (\w+) ") == list(FIELDS)
    dump = doc.split("(67 bytes)::", 1)[1]
    assert _table_fields(dump, r"^ {4}[0-9a-f ]*? {2,}[0-8] (\w+) ") == list(FIELDS)
    failed_table = DOCS.read_text().split("FAILED, one failed job", 1)[1]
    assert _table_fields(failed_table, r"^\| [0-8] \| `(\w+)` \|") == list(FIELDS)


def test_the_docstring_hex_dump_is_the_packed_record() -> None:
    doc = qdash_mp.records.__doc__
    assert doc is not None
    dump = doc.split("(67 bytes)::", 1)[1]
    hex_bytes = re.findall(r"^    ((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:  |$)", dump, re.MULTILINE)
    data = bytes.fromhex("".join(hex_bytes))
    job = Job("j1", "send_email", {"to": "a@b"}, 1, 1_700_000_000.0)
    record = FailedRecord.from_job(job, "mail", "ValueError: boom", "", 1_700_000_001.5)
    assert len(data) == 67
    assert data == pack_failed(record)
    assert unpack_failed(data) == record


def test_records_import_neither_the_wire_nor_the_journal() -> None:
    # The disk format must not depend on the wire module (nor the other way round, here).
    for module in (qdash_mp.records, qdash_mp.payload, qdash_mp.strict_msgpack):
        assert module.__file__ is not None
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and m.startswith(("qdash_mp.wire", "qdash_mp.jour"))}


# --------------------------------------------------------------------------- packing


def test_tuples_in_payload_come_back_as_lists() -> None:
    failed = FailedRecord.from_job(Job("id", "n", (1, (2, 3))), "q", "e", failed_at=1.0)
    out = unpack_failed(pack_failed(failed))
    assert out.payload == [1, [2, 3]]


def test_pack_failed_round_trips_and_snapshots_the_payload() -> None:
    payload: dict[str, Any] = {"items": [1, 2]}
    wire = FailedRecord.from_job(Job("j", "n", payload), "q", "e", failed_at=2.0)
    payload["items"].append(3)
    packed = pack_failed(wire)
    out = unpack_failed(packed)
    assert out == wire
    assert out.payload == {"items": [1, 2]}
    assert out.job() == Job("j", "n", {"items": [1, 2]})
    assert pack_failed_record(wire) == (packed, "j", 2.0)


def test_pack_failed_fields_is_the_same_array_unchecked() -> None:
    args = [getattr(FAILED, f) for f in FailedRecord.__dataclass_fields__]
    assert pack_failed_fields(*args) == pack_failed(FAILED)
    # Not checked (its caller makes every field valid): a decoder is what refuses this.
    unchecked = pack_failed_fields("", "n", b"\xc0", 0, None, "q", "e", "", 1.0)
    with pytest.raises(ProtocolError, match=r"FAILED\.job_id must not be empty"):
        unpack_failed(unchecked)
    with pytest.raises(ProtocolError, match="FAILED cannot be encoded"):
        pack_failed_fields("\udcff", "n", b"\xc0", 0, None, "q", "e", "", 1.0)


# --------------------------------------------------------------------------- FailedJob <-> wire


def test_failed_job_conversion_round_trips_with_utc_datetimes() -> None:
    when = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
    job = Job(id="j", name="n", payload={"x": 1}, attempts=2, enqueued_at=1.5)
    fj = FailedJob(id="j", queue="q", job=job, error="E", failed_at=when, traceback="tb")
    wire = FailedRecord.from_failed_job(fj)
    assert wire.failed_at == when.timestamp()
    back = unpack_failed(pack_failed(wire)).to_failed_job()
    assert back == fj
    assert back.failed_at.tzinfo is UTC


def test_a_stored_payload_goes_back_as_it_was_stored() -> None:
    raw = b"\x92\xce\x00\x00\x00\x01\xa1x"  # [1, "x"], 1 as uint32: packing again changes it
    job = Job(id="j", name="n", payload=[1, "x"])
    fj = FailedJob(id="j", queue="q", job=job, error="E", failed_at=datetime.now(UTC))
    wire = FailedRecord.from_failed_job(fj, payload_raw=raw)
    assert wire.payload_raw == raw
    (msg,) = FrameDecoder().feed(encode(Requeue(request_id=1, queue="q", failed=wire)))
    assert isinstance(msg, Requeue)
    assert msg.failed.payload_raw == raw
    assert msg.failed.job() == job
    assert FailedRecord.from_failed_job(fj).payload_raw == b"\x92\x01\xa1x"


def test_failed_at_from_other_timezones_and_naive_utc() -> None:
    aware = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2024, 1, 1, 10, 0)
    job = Job("j", "n")
    a = FailedRecord.from_job(job, "q", "e", failed_at=aware)
    b = FailedRecord.from_job(job, "q", "e", failed_at=naive)
    assert a.failed_at == b.failed_at
    assert a.failed_at_datetime() == datetime(2024, 1, 1, 10, 0, tzinfo=UTC)


def test_failed_at_defaults_to_now() -> None:
    before = time.time()
    wire = FailedRecord.from_job(Job("j", "n"), "q", "e")
    assert before <= wire.failed_at <= time.time()


@settings(max_examples=200, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(2200, 1, 1),
        timezones=st.just(UTC),
    )
)
def test_failed_at_microseconds_survive(when: datetime) -> None:
    wire = FailedRecord.from_job(Job("j", "n"), "q", "e", failed_at=when)
    assert unpack_failed(pack_failed(wire)).failed_at_datetime() == when


def test_encode_refuses_unencodable_payloads() -> None:
    def with_payload(payload: Any) -> FailedRecord:
        return FailedRecord.from_job(Job("j", "n", payload), "q", "e")

    with pytest.raises(ProtocolError, match="holds a datetime"):
        with_payload({"when": datetime.now(UTC)})
    with pytest.raises(ProtocolError, match="holds a ExtType"):
        with_payload([msgpack.ExtType(1, b"x")])
    with pytest.raises(ProtocolError, match="map key of type tuple"):
        with_payload({(1, 2): "x"})
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        with_payload(2**64)
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        with_payload("lone \udcff surrogate")
    with pytest.raises(ProtocolError, match="nests deeper"):
        pack_payload([[[[]]]], max_depth=3)
    assert pack_payload([[[]]], max_depth=3) == b"\x91\x91\x90"


def test_check_failed_names_the_field_and_takes_tuples() -> None:
    arr = failed_array()
    assert check_failed(arr) == ""
    assert check_failed(tuple(arr)) == ""
    assert check_failed(failed_array(failed_at=float("inf")), "X").startswith("X.failed_at")
    assert check_failed(arr[:8]) == "FAILED must have 9 elements, not 8"
    assert check_failed(failed_array(payload_raw=b"\x91" * 40 + b"\xc0"), max_depth=40) == ""
    assert "deeper than 39" in check_failed(
        failed_array(payload_raw=b"\x91" * 40 + b"\xc0"), max_depth=39
    )


payload_bytes = (
    st.binary(max_size=40)
    | json_like.map(pack_payload)
    | st.tuples(json_like.map(pack_payload), st.binary(max_size=3)).map(lambda t: t[0] + t[1])
    | st.tuples(json_like.map(pack_payload), st.integers(0, 50)).map(lambda t: t[0][: t[1]])
    | st.integers(0, 40).map(lambda n: b"\x91" * n + b"\xc0")
    | st.sampled_from(
        [
            b"\xd4\x05\x00",  # fixext1
            b"\xc7\x00\x05",  # zero-length ext
            b"\x91\xd6\xff\x00\x00\x00\x00",  # a timestamp in an array
            b"\x81\xa1k\xd4\x01\x02",  # an ext as a map value
            b"\x81\x90\x01",  # an array as a map key
            b"\xa2\xff\xfe",  # bad UTF-8
        ]
    )
)


@settings(max_examples=400, deadline=None)
@given(payload_bytes)
def test_check_failed_accepts_a_payload_exactly_when_it_decodes(raw: bytes) -> None:
    # check_failed's fast path (batches) and its field-by-field path (the reason, and
    # FailedRecord.payload) must agree on every payload.
    verdict = check_failed(failed_array(payload_raw=raw))
    wire = FailedRecord("j", "n", raw, 0, None, "q", "e", "", 1.0)
    if verdict:
        with pytest.raises(ProtocolError) as info:
            wire.payload  # noqa: B018
        assert str(info.value) == verdict
    else:
        assert wire.payload == msgpack.unpackb(raw, strict_map_key=False)
