"""The wire protocol (``qdash_mp.wire``): framing, every message type, strict refusal of
hostile input. The FAILED record inside BATCH and REQUEUE has its own tests (test_records).
"""

from __future__ import annotations

import contextlib
import gc
import re
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qdash_testing.records import FAILED, PACKED, failed_array, json_like

from qdash_mp.errors import ProtocolError
from qdash_mp.models import Job
from qdash_mp.strict_msgpack import DECODE_ERRORS
from qdash_mp.wire import (
    MAX_CLIENT_ID,
    MAX_DELTA,
    MAX_DEPTH,
    MAX_FRAME,
    MAX_ITEMS,
    PROTOCOL_VERSION,
    Ack,
    Batch,
    ErrorCode,
    ErrorMsg,
    FailedRecord,
    FrameDecoder,
    Hello,
    Message,
    Requeue,
    RequeueResult,
    UnsupportedVersion,
    Welcome,
    codec,
    decode_body,
    encode,
    encode_batch,
    messages,
    pack_failed,
    pack_failed_fields,
    pack_failed_record,
    pack_payload,
    unpack_failed,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

MESSAGES: list[Message] = [
    Hello(client_id="c" * 32, pid=1234, host="worker-1", requeue=None),
    Hello(client_id="x", pid=0, host="", requeue=("*",)),
    Hello(client_id="y" * MAX_CLIENT_ID, pid=2**31, host="h", requeue=("mail", "default")),
    Welcome(last_seq=0),
    Welcome(last_seq=2**63 - 1),
    Batch(seq=1),
    Batch(seq=7, counters={"mail": (3, 2, 1, 0), "déjà vu ☃": (0, 0, 0, MAX_DELTA)}),
    Batch(seq=2**63 - 1, counters={"q": (1, 1, 0, 0)}, failed=(PACKED, PACKED)),
    Ack(seq=0),
    Ack(seq=99),
    ErrorMsg(code="version", reason="protocol version 2 is not supported"),
    Requeue(request_id=5, queue="mail", failed=FAILED),
    RequeueResult(request_id=5, ok=True, error=""),
    RequeueResult(request_id=6, ok=False, error="ConnectionError: broker down"),
]


def frame(obj: Any) -> bytes:
    """A frame around any msgpack object, bypassing ``encode``'s checks."""
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def decode_one(data: bytes) -> Message:
    messages = FrameDecoder().feed(data)
    assert len(messages) == 1
    return messages[0]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Message) -> None:
    assert decode_one(encode(msg)) == msg


def test_frame_header_is_big_endian_body_length() -> None:
    data = encode(Ack(seq=1))
    assert data == b"\x00\x00\x00\x03\x92\x04\x01"
    assert decode_body(data[4:]) == Ack(seq=1)


def test_hello_bytes_match_the_documented_dump() -> None:
    hello = Hello(client_id="abc", pid=42, host="h", requeue=("*",), version=1)
    assert encode(hello).hex(" ") == "00 00 00 0d 96 01 01 a3 61 62 63 2a a1 68 91 a1 2a"


def test_batch_bytes_match_the_documented_dump() -> None:
    job = Job("j1", "send_email", {"to": "a@b"}, 1, 1_700_000_000.0)
    wire = FailedRecord.from_job(job, "mail", "ValueError: boom", "", 1_700_000_001.5)
    batch = Batch(seq=1, counters={"mail": (3, 2, 1, 0)}, failed=(pack_failed_record(wire),))
    assert encode(batch).hex(" ") == (
        "00 00 00 52 94 03 01 81 a4 6d 61 69 6c 94 03 02 01 00 91 "
        "99 a2 6a 31 aa 73 65 6e 64 5f 65 6d 61 69 6c c4 08 81 a2 74 6f a3 61 40 62 01 "
        "cb 41 d9 54 fc 40 00 00 00 a4 6d 61 69 6c "
        "b0 56 61 6c 75 65 45 72 72 6f 72 3a 20 62 6f 6f 6d a0 cb 41 d9 54 fc 40 60 00 00"
    )


def _doc_dump(title: str) -> bytes:
    """The bytes of the hex dump that follows ``title`` in docs/protocol.md."""
    text = DOCS.read_text().split(title, 1)[1].split("```", 2)[1]
    rows = re.findall(r"^ *((?:[0-9a-f]{2} )*[0-9a-f]{2})(?: {2,}|$)", text, re.MULTILINE)
    return bytes.fromhex("".join(rows))


def test_the_documented_dumps_are_what_encode_makes() -> None:
    job = Job("j1", "send_email", {"to": "a@b"}, 1, 1_700_000_000.0)
    record = FailedRecord.from_job(job, "mail", "ValueError: boom", "", 1_700_000_001.5)
    batch = Batch(seq=1, counters={"mail": (3, 2, 1, 0)}, failed=(pack_failed_record(record),))
    assert _doc_dump("### Example: a BATCH, byte by byte") == encode(batch)
    hello = Hello(client_id="abc", pid=42, host="h", requeue=("*",), version=1)
    assert _doc_dump("### Example: a HELLO, byte by byte") == encode(hello)
    small = {
        "WELCOME `last_seq=0`": Welcome(last_seq=0),
        "ACK `seq=1`": Ack(seq=1),
        'REQUEUE_RESULT `(7, false, "boom")`': RequeueResult(7, ok=False, error="boom"),
    }
    text = " ".join(DOCS.read_text().split())
    for name, msg in small.items():
        assert f"{name} is `{encode(msg).hex(' ')}`" in text


def test_payload_is_kept_exactly() -> None:
    payload = {
        "bytes": b"\x00\x01\xfe\xff",
        "text": "naïve ☃ 日本語 \U0001f600",
        "nested": {"a": {"b": {"c": [1, [2, [3, {"d": None}]]]}}},
        "ints": [0, -1, 2**63 - 1, 2**64 - 1, -(2**63)],
        "floats": [0.1, -2.5e300, float("inf")],
        "bools": [True, False],
        1: "int key",
        b"k": "bytes key",
    }
    failed = FailedRecord.from_job(Job("id", "name", payload), "q", "err", failed_at=1.0)
    out = decode_one(encode(Batch(seq=1, failed=(pack_failed_record(failed),))))
    assert isinstance(out, Batch)
    (packed,) = out.failed
    assert packed == (pack_failed(failed), "id", 1.0)
    got = unpack_failed(packed[0])
    assert got.payload_raw == failed.payload_raw
    assert got.payload == payload
    assert type(got.payload["bytes"]) is bytes
    assert type(got.payload["text"]) is str
    assert type(got.payload["bools"][0]) is bool


def test_failed_arrays_are_carried_as_sent() -> None:
    # A FAILED array packed the long way (attempts as uint64, job_id as str8): the decoder
    # checks it and hands on its bytes, never re-encoding them.
    fields = [b"\xd9\x01j", b"\xa1n", b"\xc4\x01\xc0", b"\xcf" + (7).to_bytes(8, "big")]
    fields += [msgpack.packb(v) for v in (None, "q", "e", "", 2.5)]
    data = b"\x99" + b"".join(fields)
    (batch,) = FrameDecoder().feed(encode_batch(1, {}, [data]))
    assert isinstance(batch, Batch)
    assert batch.failed == ((data, "j", 2.5),)
    # Plain tuples, which the cyclic GC stops tracking (a class instance it would not).
    gc.collect()
    assert type(batch.failed[0]) is tuple
    assert not gc.is_tracked(batch.failed[0])
    assert unpack_failed(data) == FailedRecord("j", "n", b"\xc0", 7, None, "q", "e", "", 2.5)


def test_a_long_batch_header_takes_the_general_path_to_the_same_batch() -> None:
    body = encode(MESSAGES[7])[4:]
    assert body[0] == 0x94
    long_form = b"\xdc\x00\x04" + body[1:]  # array16 of 4: valid, just not the shortest
    assert decode_body(long_form) == decode_body(body) == MESSAGES[7]


def test_encode_batch_is_byte_identical_to_encode() -> None:
    counters = {"a": (1, 2, 3, 4), "b": (0, 0, 0, 1)}
    expected = encode(Batch(seq=3, counters=counters, failed=(PACKED, PACKED)))
    assert encode_batch(3, counters, [pack_failed(FAILED)] * 2) == expected
    assert encode_batch(1, {}) == encode(Batch(seq=1))


def test_error_code_enum_encodes_as_its_text() -> None:
    out = decode_one(encode(ErrorMsg(code=ErrorCode.VERSION, reason="r")))
    assert out == ErrorMsg(code="version", reason="r")
    assert type(out.code) is str


# --------------------------------------------------------------------------- stream handling


def test_byte_by_byte_feed() -> None:
    data = b"".join(encode(m) for m in MESSAGES)
    dec = FrameDecoder()
    got: list[Message] = []
    for i in range(len(data)):
        got.extend(dec.feed(data[i : i + 1]))
    assert got == MESSAGES
    assert dec.buffered == 0


def test_many_frames_in_one_feed_and_a_partial_tail() -> None:
    data = b"".join(encode(m) for m in MESSAGES)
    tail = encode(Ack(seq=5))
    dec = FrameDecoder()
    assert dec.feed(data + tail[:5]) == MESSAGES
    assert dec.buffered == 1
    assert dec.feed(memoryview(tail[5:])) == [Ack(seq=5)]


def test_empty_feed_returns_nothing() -> None:
    assert FrameDecoder().feed(b"") == []


# --------------------------------------------------------------------------- limits


def test_oversize_header_is_refused_before_the_body() -> None:
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError, match="announces 1025 bytes, over the 1024 byte limit"):
        dec.feed(struct.pack(">I", 1025))
    assert dec.buffered == 0


def test_max_header_is_refused_by_default() -> None:
    with pytest.raises(ProtocolError, match="over the 16777216 byte limit"):
        FrameDecoder().feed(b"\xff\xff\xff\xff")


def test_frame_at_the_limit_is_accepted() -> None:
    data = encode(ErrorMsg(code="c", reason="r" * 100))
    assert FrameDecoder(max_frame=len(data) - 4).feed(data)
    with pytest.raises(ProtocolError, match="over the"):
        FrameDecoder(max_frame=len(data) - 5).feed(data)


def test_str32_claiming_4_gib_fails_fast() -> None:
    body = b"\x92\x05\xdb\xff\xff\xff\xff" + b"x" * 16
    start = time.perf_counter()
    with pytest.raises(ProtocolError, match="truncated msgpack data"):
        FrameDecoder().feed(raw_frame(body))
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"\xc6\xff\xff\xff\xff", "truncated msgpack data"),  # bin32, 4 GiB
        (b"\xdd\xff\xff\xff\xff", "exceeds max_array_len"),  # array32, 4 G items
        (b"\xdf\xff\xff\xff\xff", "exceeds max_map_len"),  # map32, 4 G pairs
    ],
)
def test_huge_lengths_inside_a_frame_fail_fast(header: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        FrameDecoder().feed(raw_frame(b"\x92\x05" + header + b"\x00" * 8))


def test_item_limit_is_configurable() -> None:
    data = encode(Batch(seq=1, counters={f"q{i}": (1, 0, 0, 0) for i in range(11)}))
    assert FrameDecoder(max_items=11).feed(data)
    with pytest.raises(ProtocolError, match="exceeds max_map_len"):
        FrameDecoder(max_items=10).feed(data)


def test_item_limit_holds_inside_payloads() -> None:
    data = payload_frame(msgpack.packb(list(range(11))))
    assert FrameDecoder(max_items=11).feed(data)
    with pytest.raises(ProtocolError, match=r"payload_raw .*exceeds max_array_len"):
        FrameDecoder(max_items=10).feed(data)
    with pytest.raises(ProtocolError, match="an array of more than 10 items"):
        pack_payload([[0] * 11], max_items=10)


def test_str32_claiming_4_gib_inside_a_payload_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(ProtocolError, match=r"payload_raw .*truncated msgpack data"):
        FrameDecoder().feed(payload_frame(b"\xdb\xff\xff\xff\xff" + b"x" * 16))
    assert time.perf_counter() - start < 0.5


def payload_frame(payload_raw: bytes) -> bytes:
    """A BATCH frame whose one failed job has these payload bytes (not checked)."""
    fields = ("j", "n", payload_raw, 0, None, "q", "e", "", 1.0)
    return encode_batch(1, {}, [pack_failed_fields(*fields)])


def deep_payload_frame(depth: int) -> bytes:
    """A BATCH whose one failed job's payload is ``depth`` nested arrays around nil."""
    return payload_frame(b"\x91" * depth + b"\xc0")


def test_deep_nesting_bomb_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="nests too deeply"):
        FrameDecoder().feed(deep_payload_frame(100_000))


@pytest.mark.parametrize("depth", [33, 500, 1000])
def test_payload_deeper_than_the_limit_is_refused(depth: int) -> None:
    with pytest.raises(ProtocolError, match="nests deeper than 32 levels"):
        FrameDecoder().feed(deep_payload_frame(depth))


def test_payload_at_the_depth_limit_is_accepted() -> None:
    (msg,) = FrameDecoder().feed(deep_payload_frame(32))
    assert isinstance(msg, Batch)
    with pytest.raises(ProtocolError, match="nests deeper than 5 levels"):
        FrameDecoder(max_depth=5).feed(deep_payload_frame(6))


def test_deep_maps_are_refused_too() -> None:
    payload: Any = None
    for _ in range(40):
        payload = {"k": payload}
    with pytest.raises(ProtocolError, match="nests deeper than 32 levels"):
        FrameDecoder().feed(frame([3, 1, {}, [failed_array(payload_raw=msgpack.packb(payload))]]))


# --------------------------------------------------------------------------- hostile bodies


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (5, "a body must be an array, not int"),
        ({"type": 1}, "a body must be an array, not dict"),
        ([], "must not be an empty array"),
        ([0], "unknown message type 0"),
        ([8, 1], "unknown message type 8"),
        ([True, 1], "unknown message type True"),
        (["1"], "unknown message type '1'"),
        ([4], "ACK must have 2 elements, not 1"),
        ([4, 1, 2], "ACK must have 2 elements, not 3"),
        ([4, True], "ACK seq must be an int, not bool"),
        ([4, -1], "ACK seq must be in 0"),
        ([4, 1.0], "ACK seq must be an int, not float"),
        ([4, 2**63], "ACK seq must be in 0"),
        ([1], "HELLO must have 6 elements, not 1"),
        ([1, 1, "c", 1, "h"], "HELLO must have 6 elements, not 5"),
        ([1, True, "c", 1, "h", None], "HELLO version must be an int, not bool"),
        ([1, 1, "", 1, "h", None], "HELLO client_id must not be empty"),
        ([1, 1, "c" * 129, 1, "h", None], "HELLO client_id is longer than 128"),
        ([1, 1, b"c", 1, "h", None], "HELLO client_id must be a str, not bytes"),
        ([1, 1, "c", -5, "h", None], "HELLO pid must be in 0"),
        ([1, 1, "c", False, "h", None], "HELLO pid must be an int, not bool"),
        ([1, 1, "c", 1, None, None], "HELLO host must be a str, not NoneType"),
        ([1, 1, "c", 1, "h", []], "requeue must be nil"),
        ([1, 1, "c", 1, "h", "*"], "HELLO requeue must be an array, not str"),
        ([1, 1, "c", 1, "h", [""]], "HELLO requeue entry must not be empty"),
        ([1, 1, "c", 1, "h", [1]], "HELLO requeue entry must be a str, not int"),
        ([2, 1], "WELCOME must have 3 elements, not 2"),
        ([2, 1, -1], "WELCOME last_seq must be in 0"),
        ([3, 1, {}], "BATCH must have 4 elements, not 3"),
        ([3, 0, {}, []], "BATCH seq must be in 1"),
        ([3, 1, [], []], "BATCH counters must be a map, not list"),
        ([3, 1, {"q": [1, 2, 3]}, []], r"BATCH counters\['q'\] must have 4 elements, not 3"),
        ([3, 1, {"q": [1, 2, 3, -4]}, []], r"BATCH counters\['q'\]\[3\] must be in 0"),
        ([3, 1, {"q": [1, True, 0, 0]}, []], r"counters\['q'\]\[1\] must be an int, not bool"),
        ([3, 1, {"q": 5}, []], r"BATCH counters\['q'\] must be an array, not int"),
        ([3, 1, {1: [0, 0, 0, 0]}, []], "BATCH counters key must be a str, not int"),
        ([3, 1, {"": [0, 0, 0, 0]}, []], "BATCH counters key must not be empty"),
        ([3, 1, {"q" * 256: [0, 0, 0, 0]}, []], "BATCH counters key is longer than 255"),
        ([3, 1, {}, {}], "BATCH failed must be an array, not dict"),
        ([3, 1, {}, [[1]]], r"BATCH failed\[0\] must have 9 elements, not 1"),
        ([3, 1, {}, ["x"]], r"BATCH failed\[0\] must be an array, not str"),
        ([3, 1, {}, [failed_array(job_id="")]], r"failed\[0\].job_id must not be empty"),
        ([3, 1, {}, [failed_array(attempts=True)]], r"\.attempts must be an int, not bool"),
        ([3, 1, {}, [failed_array(attempts=1.5)]], r"\.attempts must be an int, not float"),
        ([3, 1, {}, [failed_array(enqueued_at=5)]], r"\.enqueued_at must be a float, not int"),
        ([3, 1, {}, [failed_array(failed_at=float("nan"))]], r"\.failed_at must be a finite"),
        ([3, 1, {}, [failed_array(failed_at=-1.0)]], r"\.failed_at must be a finite"),
        ([3, 1, {}, [failed_array(failed_at=1e300)]], r"\.failed_at must be a finite"),
        ([3, 1, {}, [failed_array(queue=None)]], r"\.queue must be a str, not NoneType"),
        ([3, 1, {}, [failed_array(error=b"e")]], r"\.error must be a str, not bytes"),
        ([3, 1, {}, [failed_array(name="n" * 1025)]], r"\.name is longer than 1024"),
        ([3, 1, {}, [failed_array(queue="q" * 256)]], r"\.queue is longer than 255"),
        ([3, 1, {}, [failed_array(attempts=2**63)]], r"\.attempts must be in"),
        ([3, 1, {}, [failed_array(enqueued_at=-1e300)]], r"\.enqueued_at must be a finite"),
        ([3, 1, {}, [failed_array(payload_raw=None)]], r"payload_raw must be a bin, not NoneType"),
        ([3, 1, {}, [failed_array(payload_raw="x")]], r"payload_raw must be a bin, not str"),
        ([3, 1, {}, [failed_array(payload_raw=b"")]], r"payload_raw .*truncated msgpack data"),
        ([3, 1, {}, [failed_array(payload_raw=b"\xc0\xc0")]], r"payload_raw .*trailing bytes"),
        ([3, 1, {}, [failed_array(payload_raw=b"\xc1")]], r"payload_raw is not a valid payload"),
        ([3, 1, {}, [failed_array(payload_raw=b"\xa2\xff\xfe")]], "not valid UTF-8"),
        ([3, 1, {}, [failed_array(payload_raw=b"\xd6\xff\0\0\0\0")]], "ext types are not"),
        ([3, 1, {}, [failed_array(payload_raw=b"\xc7\x00\x05")]], "ext type 5 is not allowed"),
        ([3, 1, {}, [failed_array(payload_raw=b"\x81\x90\x01")]], "payload_raw .*unhashable"),
        ([3, 1, {}, [failed_array(), failed_array(job_id=1)]], r"failed\[1\]\.job_id must be a"),
        ([6, 1, "q", failed_array(payload_raw=b"\xc1")], r"REQUEUE job\.payload_raw is not"),
        ([5, "", "r"], "ERROR code must not be empty"),
        ([5, 1, "r"], "ERROR code must be a str, not int"),
        ([5, "c", "r" * 5000], "ERROR reason is longer than 4096"),
        ([6, 1, "q", failed_array()[:8]], "REQUEUE job must have 9 elements, not 8"),
        ([6, -1, "q", failed_array()], "REQUEUE request_id must be in 0"),
        ([7, 1, 1, ""], "REQUEUE_RESULT ok must be a bool, not int"),
        ([7, 1, True, None], "REQUEUE_RESULT error must be a str, not NoneType"),
    ],
)
def test_invalid_bodies_are_refused_with_a_reason(obj: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        FrameDecoder().feed(frame(obj))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xc1", "undecodable body"),  # never-used msgpack byte
        (b"\x92\x04", "truncated msgpack data"),
        (b"\x92\x04\x01\x02", "trailing bytes"),
        (b"\x93\x05\xa2\xff\xfe\xa0", "not valid UTF-8"),
        (b"\x92\x04\xd6\xff\x00\x00\x00\x00", "ext types are not allowed"),  # timestamp
        (b"\x92\x04\xd4\x05\x00", "ext types are not allowed"),  # fixext1
        (b"\x92\x04\xc7\x00\x05", "ext type 5 is not allowed"),  # zero-length ext
        (b"\x92\x04\x81\x90\x01", "undecodable body: unhashable"),  # array as map key
    ],
)
def test_undecodable_bodies_are_refused(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        FrameDecoder().feed(raw_frame(body))


def test_empty_frame_is_refused() -> None:
    with pytest.raises(ProtocolError, match="empty frame"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_other_versions_raise_unsupported_version() -> None:
    with pytest.raises(UnsupportedVersion, match="version 3 is not supported") as info:
        FrameDecoder().feed(frame([1, 3, "any", "future", "layout"]))
    assert info.value.version == 3
    with pytest.raises(UnsupportedVersion):
        FrameDecoder().feed(frame([2, 0, 5]))
    with pytest.raises(UnsupportedVersion):
        FrameDecoder().feed(frame([2, 3, 5]))
    assert issubclass(UnsupportedVersion, ProtocolError)


def test_a_failed_decoder_stays_failed_and_drops_the_feed() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="unknown message type 9") as first:
        dec.feed(encode(Ack(seq=1)) + frame([9]))
    with pytest.raises(ProtocolError) as again:
        dec.feed(encode(Ack(seq=2)))
    assert again.value is first.value
    assert dec.buffered == 0


def test_garbage_bytes_are_refused() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        FrameDecoder(max_frame=4096).feed(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_random_bodies_only_ever_raise_protocol_error(body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_body(body)


# --------------------------------------------------------------------------- counter deltas


def batch_frame(deltas: list[Any]) -> bytes:
    """A BATCH frame (seq 1) whose one queue carries these four deltas, not checked."""
    return frame([3, 1, {"q": deltas}, []])


@pytest.mark.parametrize(
    ("delta", "match"),
    [
        (2**63 - 1, r"\[0\] must be in 0\.\.1099511627776, not 9223372036854775807: a counter"),
        (2**40 + 1, r"must be in 0\.\.1099511627776, not 1099511627777: .*at most 2\*\*40"),
        (2**64 - 1, "must be in 0"),
        (-1, r"must be in 0\.\.1099511627776, not -1"),
        (True, r"counters\['q'\]\[0\] must be an int, not bool"),
        (1.0, r"counters\['q'\]\[0\] must be an int, not float"),
    ],
)
def test_counter_deltas_out_of_bounds_are_refused_at_decode(delta: Any, match: str) -> None:
    # Hole 2: a delta no real batch carries (2**63-1 overflowed the stats slot and then made
    # every later batch of that queue raise in the apply loop) is a protocol error: ERROR
    # for that connection only, nothing applied. Both decoding paths refuse it.
    data = batch_frame([delta, 0, 0, 0])
    with pytest.raises(ProtocolError, match=match):
        FrameDecoder().feed(data)
    with pytest.raises(ProtocolError, match=match):
        decode_body(b"\xdc\x00\x04" + data[5:])  # array16 header: the general path
    with pytest.raises(ProtocolError, match=match):
        encode_batch(1, {"q": (delta, 0, 0, 0)})  # and nobody sends one


def test_the_delta_bound_itself_is_accepted() -> None:
    assert MAX_DELTA == 2**40
    (batch,) = FrameDecoder().feed(batch_frame([MAX_DELTA, 0, MAX_DELTA, 0]))
    assert batch == Batch(seq=1, counters={"q": (MAX_DELTA, 0, MAX_DELTA, 0)})
    counters = {"q": (MAX_DELTA, MAX_DELTA, MAX_DELTA, MAX_DELTA)}
    assert decode_body(encode_batch(1, counters)[4:]) == Batch(seq=1, counters=counters)


# --------------------------------------------------------------------------- encode side


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Ack(seq=True), "ACK seq must be an int, not bool"),
        (Ack(seq=-1), "ACK seq must be in 0"),
        (Batch(seq=0), "BATCH seq must be in 1"),
        (Hello(client_id="c" * 129, pid=1, host="h"), "client_id is longer than 128"),
        (Hello(client_id="c", pid=1, host="h", requeue=()), "requeue must be nil"),
        (Hello(client_id="c", pid=1, host="h", version=3), "version 3 is not supported"),
        (Batch(seq=1, counters={"q": (1, 2, 3)}), "must have 4 elements"),  # type: ignore[dict-item]
        (RequeueResult(request_id=1, ok=1), "ok must be a bool, not int"),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_what_a_decoder_would(msg: Message, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode(msg)


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(ProtocolError, match="not a protocol message"):
        encode("hello")  # type: ignore[arg-type]


def test_encode_checks_packed_failed_jobs_as_a_decoder_would() -> None:
    bad_raw = FailedRecord("j", "n", b"\xc0\xc0", 0, None, "q", "e", "", 1.0)
    with pytest.raises(ProtocolError, match=r"FAILED\.payload_raw .*trailing bytes"):
        pack_failed(bad_raw)
    with pytest.raises(ProtocolError, match=r"FAILED\.queue must not be empty"):
        pack_failed(FailedRecord("j", "n", b"\xc0", 0, None, "", "e", "", 1.0))
    unchecked = pack_failed_fields("j", "n", b"\xc0\xc0", 0, None, "q", "e", "", 1.0)
    cases: list[tuple[Any, str]] = [
        (FAILED, r"failed\[0\] must be a \(data, job_id, failed_at\) tuple, not FailedRecord"),
        ((unchecked, "j", 1.0), r"failed\[0\]\.payload_raw .*trailing bytes"),
        ((PACKED[0], "other", PACKED[2]), "differ from the packed record"),
        ((PACKED[0], PACKED[1], 2.0), "differ from the packed record"),
    ]
    for f, match in cases:
        with pytest.raises(ProtocolError, match=match):
            encode(Batch(seq=1, failed=(f,)))
    with pytest.raises(ProtocolError, match=r"REQUEUE job\.payload_raw"):
        encode(Requeue(request_id=1, queue="q", failed=bad_raw))


def test_encode_refuses_oversize_bodies() -> None:
    msg = ErrorMsg(code="c", reason="r" * 200)
    with pytest.raises(ProtocolError, match="exceeds the 100 byte limit"):
        encode(msg, max_frame=100)
    big = pack_failed(FailedRecord.from_job(Job("j", "n", b"x" * 1000), "q", "e"))
    with pytest.raises(ProtocolError, match="exceeds the 500 byte limit"):
        encode_batch(1, {}, [big], max_frame=500)
    assert len(encode_batch(1, {}, [big])) < MAX_FRAME


def test_encode_batch_checks_its_fields() -> None:
    with pytest.raises(ProtocolError, match="BATCH seq must be an int, not bool"):
        encode_batch(True, {})
    with pytest.raises(ProtocolError, match=r"counters\['q'\]\[0\] must be in 0"):
        encode_batch(1, {"q": (-1, 0, 0, 0)})


def test_decoder_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        FrameDecoder(max_frame=0)
    with pytest.raises(ValueError, match="max_frame"):
        FrameDecoder(max_frame=2**32)


def test_protocol_version_is_two() -> None:
    assert PROTOCOL_VERSION == 2


# --------------------------------------------------------------------------- property


names = st.text(min_size=1, max_size=20)
names = st.text(min_size=1, max_size=20)
counts = st.integers(min_value=0, max_value=MAX_DELTA)
failed_records = st.builds(
    FailedRecord,
    job_id=names,
    name=st.text(max_size=20),
    payload_raw=json_like.map(pack_payload),
    attempts=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    enqueued_at=st.none() | st.floats(min_value=0, max_value=4e9),
    queue=names,
    error=st.text(),
    traceback=st.text(),
    failed_at=st.floats(min_value=0, max_value=4e9),
)
batches = st.builds(
    Batch,
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    counters=st.dictionaries(names, st.tuples(counts, counts, counts, counts), max_size=5),
    failed=st.lists(failed_records.map(pack_failed_record), max_size=3).map(tuple),
)


@settings(max_examples=150, deadline=None)
@given(batches, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20))
def test_batches_round_trip_through_any_chunking(batch: Batch, cuts: list[int]) -> None:
    data = encode(batch) + encode(Ack(seq=1))
    dec = FrameDecoder()
    got: list[Message] = []
    pos = 0
    for cut in cuts:
        got.extend(dec.feed(data[pos : pos + cut]))
        pos += cut
    got.extend(dec.feed(data[pos:]))
    assert got == [batch, Ack(seq=1)]
    packed = [f[0] for f in batch.failed]
    assert encode_batch(batch.seq, batch.counters, packed) == encode(batch)
    # The general decoding path (taken for a longer array header) gives the same batch.
    assert decode_body(b"\xdd\x00\x00\x00\x04" + data[5 : len(data) - 7]) == batch


def _decoded_by_each_path(body: bytes) -> tuple[object, object]:
    """What the one-pass BATCH decoder and the general decoder each make of ``body``: the
    ``Batch``, or ``ProtocolError`` for a refusal. The one-pass decoder refuses with the raw
    msgpack/ProtocolError exceptions that ``decode_body`` takes as its cue to go the general
    way (where the reason is named)."""
    out: list[object] = []
    for decode in (
        lambda: codec._decode_batch(body, MAX_ITEMS, MAX_DEPTH),
        lambda: decode_body(b"\xdd\x00\x00\x00\x04" + body[1:]),  # array32: general path
    ):
        try:
            out.append(decode())
        except DECODE_ERRORS:
            out.append(ProtocolError)
    return out[0], out[1]


spoiled_batches = st.builds(
    lambda seq, counters, failed: [3, seq, counters, failed],
    seq=st.integers(min_value=-2, max_value=2**64 - 1) | st.just(True) | st.just(1.0),
    counters=st.dictionaries(
        st.text(max_size=3) | st.integers(0, 2),
        st.lists(
            st.integers(min_value=-1, max_value=2**63 - 1) | st.sampled_from([MAX_DELTA, True]),
            min_size=3,
            max_size=5,
        ),
        max_size=3,
    ),
    failed=st.lists(
        st.sampled_from(
            [
                failed_array(),
                failed_array(job_id=""),
                failed_array(attempts=True),
                failed_array(payload_raw=b"\xc0\xc0"),
                failed_array(payload_raw=b"\x91" * 40 + b"\xc0"),
                failed_array(failed_at=float("nan")),
                failed_array()[:8],
                "x",
            ]
        ),
        max_size=3,
    ),
)


@settings(max_examples=300, deadline=None)
@given(batches.map(lambda b: encode(b)[4:]) | spoiled_batches.map(msgpack.packb))
def test_batch_fast_path_and_general_path_agree(body: bytes) -> None:
    # The one-pass BATCH decoder (a benchmark pays for it: ingest) and the general decoder
    # take and refuse the same bodies, and make the same Batch of what they take.
    fast, general = _decoded_by_each_path(body)
    assert fast == general


counter_rows = st.lists(
    st.integers(min_value=-2, max_value=2**64 - 1)
    | st.sampled_from([0, MAX_DELTA, MAX_DELTA + 1, 2**63 - 1, True, False, 1.0, None, "1"]),
    min_size=0,
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["q", "", "q" * 255, "q" * 256, 1, None, b"q"]),
    counter_rows | counter_rows.map(tuple) | st.sampled_from([5, None, "abcd", {}]),
)
def test_counter_rows_fast_check_and_item_by_item_check_agree(queue: Any, row: Any) -> None:
    # counters_map passes a good row in one expression (ingest pays for every row) and
    # goes through any other item by item (counter_row), which names what is wrong.
    try:
        expected: object = {queue: messages.counter_row(queue, row)}
    except ProtocolError as exc:
        expected = str(exc)
    try:
        got: object = messages.counters_map({queue: row}, MAX_ITEMS)
    except ProtocolError as exc:
        got = str(exc)
    assert got == expected


# --------------------------------------------------------------------------- version 2


def _v2_batch() -> Batch:
    return Batch(
        seq=1,
        counters={"mail": (1, 1, 0, 0)},
        hist={"mail": ({155: 1}, {229: 1})},
        started={"mail": 1},
        active={"mail": 1},
        jobs=(("mail", "j2", "send", 1700000000.5),),
        events=(("d", "mail", "j1", "send", 1700000001.0, 0.05),),
    )


def test_v2_dumps_in_the_docs_are_what_encode_makes_and_decode_back() -> None:
    hello = Hello(client_id="abc", pid=42, host="h", requeue=("*",), name="w1", track=("mail",))
    data = _doc_dump("### Example: a HELLO v2, byte by byte")
    assert data == encode(hello)
    assert decode_body(data[4:]) == hello
    batch = _v2_batch()
    data = _doc_dump("### Example: a BATCH v2, byte by byte")
    assert data == encode(batch)
    assert data[4:6] == b"\x95\x03"
    assert decode_body(data[4:]) == batch
    # the general path (any other array header) decodes the same
    assert parse_body(msgpack.unpackb(data[4:], strict_map_key=False)) == batch


def parse_body(obj: object) -> object:
    from qdash_mp.wire.messages import parse

    return parse(obj, MAX_ITEMS, 32)


def test_hello_v1_still_decodes_and_v2_needs_info() -> None:
    v1 = decode_one(frame([1, 1, "c", 1, "h", None]))
    assert v1 == Hello(client_id="c", pid=1, host="h", version=1)
    assert v1.name == ""
    assert v1.track is None
    with pytest.raises(ProtocolError, match="HELLO must have 7 elements"):
        decode_one(frame([1, 2, "c", 1, "h", None]))
    out = decode_one(frame([1, 2, "c", 1, "h", None, {"x": 1, "track": ["*"]}]))
    assert out == Hello(client_id="c", pid=1, host="h", version=2, track=("*",))
    with pytest.raises(ProtocolError, match="HELLO info track must be nil"):
        decode_one(frame([1, 2, "c", 1, "h", None, {"track": []}]))
    with pytest.raises(ProtocolError, match="HELLO info name"):
        decode_one(frame([1, 2, "c", 1, "h", None, {"name": "n" * 256}]))


def test_welcome_of_version_1_and_2_decode() -> None:
    assert decode_one(frame([2, 1, 5])) == Welcome(last_seq=5, version=1)
    assert decode_one(frame([2, 2, 5])) == Welcome(last_seq=5, version=2)


def test_batch_without_ext_stays_v1_bytes() -> None:
    data = encode(Batch(seq=1, counters={"q": (1, 0, 0, 0)}))
    assert data[4:6] == b"\x94\x03"
    with_gauge = encode(Batch(seq=1, counters={"q": (1, 0, 0, 0)}, active={}))
    assert with_gauge[4:6] == b"\x95\x03"
    assert with_gauge.endswith(b"\x81\xa1a\x80")  # ext {"a": {}}: no active job now


def test_empty_ext_and_unknown_keys_are_accepted() -> None:
    out = decode_one(frame([3, 1, {}, [], {}]))
    assert out == Batch(seq=1)
    out = decode_one(frame([3, 1, {}, [], {"zz": [1, 2], "s": {"q": 3}}]))
    assert isinstance(out, Batch)
    assert out.started == {"q": 3}


@pytest.mark.parametrize(
    ("ext", "reason"),
    [
        ([], "BATCH ext must be a map"),
        ({"h": {"q": [{}, {}, {}]}}, r"h\['q'\] must have 2 elements"),
        ({"h": {"q": [{418: 1}, {}]}}, "bucket must be in 0..417"),
        ({"h": {"q": [{-1: 1}, {}]}}, "bucket must be in 0..417"),
        ({"h": {"q": [{1: 0}, {}]}}, r"runtime\[1\] must be in 1..1099511627776"),
        ({"h": {"q": [{}, {1: 2**40 + 1}]}}, r"wait\[1\] must be in 1"),
        ({"h": {"q": [{1: 1.0}, {}]}}, "must be an int, not float"),
        ({"h": {"": [{}, {}]}}, "h key"),
        ({"s": {"q": -1}}, r"s\['q'\] must be in 0"),
        ({"s": {"q": 2**40 + 1}}, r"s\['q'\] must be in 0"),
        ({"a": {"q": 2**31 + 1}}, r"a\['q'\] must be in 0..2147483648"),
        ({"a": {"q": True}}, "must be an int, not bool"),
        ({"j": [["q", "id", "n", 1.0]] * 101}, "more than 100 jobs"),
        ({"j": [["q", "id", "n"]]}, r"j\[0\] must have 4 elements"),
        ({"j": [["q", "", "n", 1.0]]}, "job_id"),
        ({"j": [["q", "id", "n", float("nan")]]}, "started_at must be a finite number"),
        ({"j": [["q", "id", "n", -1.0]]}, "started_at must be a finite number"),
        ({"t": [["x", "q", "id", "n", 1.0, None]]}, "kind must be one of"),
        ({"t": [["d", "q", "id", "n", 1.0, "fast"]]}, "runtime must be a float"),
        ({"t": [["d", "q", "id", "n", 1.0]]}, r"t\[0\] must have 6 elements"),
        ({"t": [["p", "q", "id", "n", 1.0, None]] * 10_001}, "more than 10000 events"),
    ],
)
def test_bad_ext_is_refused_with_a_reason(ext: object, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_one(frame([3, 1, {}, [], ext]))


def test_encode_refuses_a_bad_ext() -> None:
    with pytest.raises(ProtocolError, match=r"bucket must be in 0\.\.417"):
        encode(Batch(seq=1, hist={"q": ({500: 1}, {})}))
    with pytest.raises(ProtocolError, match="kind must be one of"):
        encode(Batch(seq=1, events=(("z", "q", "i", "n", 1.0, None),)))
