"""The hub's blobs (``qdash_mp.hub.format``) and key names (``qdash_mp.hub.keys``): pure bytes.

The docstring's field tables and hex dumps are checked against the encoders; every decoder
takes back what its encoder wrote and refuses anything else with ``HubCorrupt`` (every
truncation and every byte flip of each example either decodes to a valid value or raises
``HubCorrupt``, never another exception).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import pytest

from qdash_mp.errors import ConfigError, HubCorrupt, QdashError
from qdash_mp.hub import format as fmt
from qdash_mp.hub import format_failed as fmt_failed
from qdash_mp.hub import keys as keys_mod
from qdash_mp.hub.format import (
    HostInfo,
    QueueRecord,
    decode_host,
    decode_point,
    decode_queue,
    decode_workers,
    encode_host,
    encode_point,
    encode_queue,
    encode_workers,
    sparse,
)
from qdash_mp.hub.format_failed import (
    Command,
    Result,
    decode_command,
    decode_failed,
    decode_result,
    encode_command,
    encode_result,
    fall_member,
    split_fall_member,
)
from qdash_mp.hub.keys import Keys, check_host
from qdash_mp.records import FailedRecord, pack_failed

DOC = (fmt.__doc__ or "") + (fmt_failed.__doc__ or "")

QUEUE = QueueRecord(3, 2, 1, 0, 1, 0.5, {10: 2}, {})
POINT: dict[str, Any] = {
    "t": 1764633600,
    "pushed": 2,
    "processed": 1,
    "failed": 0,
    "runtime": dict.fromkeys(("p50", "p90", "p95", "p99", "max")) | {"count": 0},
}
POINT_B: dict[str, Any] = POINT | {
    "processed": 2,
    "runtime": dict.fromkeys(("p50", "p90", "p95", "p99", "max"), 0.25) | {"count": 2},
    "buckets": {200: 2},
}
HOST = HostInfo(7, 1700000001.5, 1700000000.0, "0.1.0", 42, ("mail",))
RESULT = Result(True, False, None, "retry", "j1", 1700000001.5)
WORKER: dict[str, Any] = {
    "id": "c1",
    "pid": 9,
    "host": "web1",
    "name": "worker",
    "queues": ["mail"],
    "connected_at": 1.0,
    "last_seen": 2.0,
    "active": [{"queue": "mail", "id": "j1", "name": "send", "started_at": 1.5}],
    "state": "connected",
    "can_requeue": True,
}
FAILED = FailedRecord(
    job_id="j1",
    name="send_email",
    payload_raw=bytes.fromhex("81a2746fa3614062"),
    attempts=1,
    enqueued_at=1700000000.0,
    queue="mail",
    error="ValueError: boom",
    traceback="",
    failed_at=1700000001.5,
)


def example(title: str) -> bytes:
    """The hex dump following ``title`` in the module docstring."""
    rest = DOC[DOC.index(title) :]
    block = rest.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    hexes = re.findall(r"^    ((?:[0-9a-f]{2} ?)+)$", block, re.M)
    assert hexes, f"no hex dump after {title!r}"
    return bytes.fromhex(" ".join(hexes))


def table_keys(title: str) -> list[str]:
    """The first words of the rows of the table following ``title``."""
    rest = DOC[DOC.index(title) :]
    block = rest.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^    (\w+)\s", block, re.M)
    return [r for r in rows if r not in ("key", "field")]


@pytest.mark.parametrize(
    ("title", "data"),
    [
        ("Example queue record", encode_queue(QUEUE)),
        ("Example point:", encode_point(POINT)),
        ("Example point with buckets", encode_point(POINT_B)),
        ("Example host info", encode_host(HOST)),
        ("Example result", encode_result(RESULT)),
    ],
)
def test_docstring_hex_dumps_are_what_the_encoders_write(title: str, data: bytes) -> None:
    assert example(title) == data


def test_docstring_tables_name_the_encoded_keys_in_order() -> None:
    assert table_keys("Queue record (") == list(fmt._QUEUE_KEYS)
    assert table_keys("History point (") == [*fmt._POINT_KEYS, *fmt._POINT_OPTIONAL]
    assert table_keys("Host info (") == list(fmt._HOST_KEYS)
    assert table_keys("Result (") == list(fmt_failed._RESULT_KEYS)
    assert table_keys("Command (") == ["op", "id", "req", "by", "at"]
    assert encode_workers([]) == bytes.fromhex("90")


def test_round_trips() -> None:
    assert decode_queue(encode_queue(QUEUE)) == QUEUE
    assert decode_point(encode_point(POINT)) == POINT
    assert decode_point(encode_point(POINT_B)) == POINT_B
    # the optional field is optional: a point without it is the same bytes as before
    assert encode_point(POINT_B | {"buckets": None}) == encode_point(
        {k: v for k, v in POINT_B.items() if k != "buckets"}
    )
    assert encode_point(POINT, {}) == encode_point(POINT)  # no runtimes: nothing to merge
    assert decode_host(encode_host(HOST)) == HOST
    assert decode_result(encode_result(RESULT)) == RESULT
    assert decode_workers(encode_workers([WORKER])) == [WORKER]
    # an injected clock's int times are written as floats
    ints = WORKER | {"connected_at": 1, "last_seen": 2}
    ints["active"] = [WORKER["active"][0] | {"started_at": 3}]
    (row,) = decode_workers(encode_workers([ints]))
    assert (row["connected_at"], row["last_seen"], row["active"][0]["started_at"]) == (
        1.0,
        2.0,
        3.0,
    )
    c = Command("retry", "j1", "r-1", "alice", 1700000001.5)
    fields = encode_command(c)
    assert decode_command({k.encode(): v.encode() for k, v in fields.items()}) == c
    raw = pack_failed(FAILED)
    assert decode_failed(raw) == FAILED
    assert split_fall_member(fall_member("web1", "j:1")) == ("web1", "j:1")
    assert sparse([0, 3, 0, 1]) == {1: 3, 3: 1}
    full = dict.fromkeys(("count", "p50", "p90", "p95", "p99", "max"), 0.25) | {"count": 4}
    assert decode_point(encode_point(POINT | {"runtime": full}))["runtime"] == full


DECODERS: list[tuple[Callable[[bytes], object], bytes]] = [
    (decode_queue, encode_queue(QueueRecord(5, 4, 1, 1, 0, 2.0, {0: 1, 417: 3}, {3: 4}))),
    (decode_point, encode_point(POINT)),
    (decode_point, encode_point(POINT_B)),
    (decode_host, encode_host(HOST)),
    (decode_result, encode_result(RESULT)),
    (decode_workers, encode_workers([WORKER])),
    (decode_failed, pack_failed(FAILED)),
]


@pytest.mark.parametrize(("decode", "data"), DECODERS)
def test_every_truncation_and_byte_flip_is_refused_or_valid(
    decode: Callable[[bytes], object], data: bytes
) -> None:
    for n in range(len(data)):
        with pytest.raises(HubCorrupt):
            decode(data[:n])
    with pytest.raises(HubCorrupt):
        decode(data + b"\x00")
    for i in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= flip
            with contextlib.suppress(HubCorrupt):
                decode(bytes(bad))


@pytest.mark.parametrize(
    ("decode", "obj"),
    [
        (decode_queue, {"pushed": 1}),
        (decode_queue, [1, 2]),
        (decode_point, POINT | {"pushed": -1}),
        (decode_point, POINT | {"pushed": True}),
        (decode_point, POINT | {"runtime": POINT["runtime"] | {"p50": 0.1}}),
        (decode_point, POINT_B | {"buckets": {200: 1}}),  # not runtime.count
        (decode_point, POINT_B | {"buckets": {}}),
        (decode_point, POINT_B | {"buckets": {200: 1, 100: 1}}),  # not ascending
        (decode_point, POINT | {"buckets": {200: 2}}),  # count 0
        (decode_point, {k: v for k, v in POINT_B.items() if k != "runtime"} | {"x": 1}),
        (decode_host, {"seq": 0}),
        (decode_workers, [WORKER | {"state": "odd"}]),
        (decode_workers, [WORKER | {"pid": "9"}]),
        (decode_workers, {"a": 1}),
        (decode_result, {"ok": 1}),
    ],
)
def test_wrong_shapes_are_hub_corrupt(decode: Callable[[bytes], object], obj: object) -> None:
    import msgpack

    with pytest.raises(HubCorrupt) as info:
        decode(msgpack.packb(obj, use_bin_type=True))
    assert isinstance(info.value, QdashError)
    assert str(info.value).startswith("hub ")


def test_bucket_maps_are_strict() -> None:
    import msgpack

    good = msgpack.unpackb(encode_queue(QUEUE), strict_map_key=False)
    for runtime in ({418: 1}, {5: 0}, {5: 1, 3: 1}, {"5": 1}, {-1: 2}, {1: 1.0}):
        bad = msgpack.packb(good | {"runtime": runtime}, use_bin_type=True)
        with pytest.raises(HubCorrupt):
            decode_queue(bad)
    bad = msgpack.packb(good | {"throughput": float("nan")}, use_bin_type=True)
    with pytest.raises(HubCorrupt):
        decode_queue(bad)


def test_commands_are_strict() -> None:
    good = {b"op": b"retry", b"id": b"j1", b"req": b"r", b"by": b"", b"at": b"1.0"}
    assert decode_command(good).op == "retry"
    for change in (
        {b"op": b"flush"},
        {b"id": b""},
        {b"req": b"r" * 65},
        {b"at": b"soon"},
        {b"at": b"nan"},
        {b"id": b"\xff"},
        {b"extra": b"1"},
    ):
        with pytest.raises(HubCorrupt):
            decode_command(good | change)
    with pytest.raises(HubCorrupt):
        decode_command({k: v for k, v in good.items() if k != b"by"})
    with pytest.raises(HubCorrupt):
        encode_command(Command("drop", "j1", "r"))
    for member in (b"web1", b"\x00j1", b"web1\x00", b"\xff\x00j"):
        with pytest.raises(HubCorrupt):
            split_fall_member(member)


def test_key_names() -> None:
    k = Keys()
    assert keys_mod.DEFAULT_PREFIX == "qdash:"
    assert (k.seq, k.hosts, k.fall) == ("qdash:seq", "qdash:hosts", "qdash:fall")
    assert k.q("web1") == "qdash:q:web1"
    assert k.w("web1") == "qdash:w:web1"
    assert k.hm("web1", "mail") == "qdash:hm:web1:mail"
    assert k.hh("web1", "mail") == "qdash:hh:web1:mail"
    assert k.hq("web1") == "qdash:hq:web1"
    assert k.fi("web1") == "qdash:fi:web1"
    assert k.fj("web1") == "qdash:fj:web1"
    assert k.cmd("web1") == "qdash:cmd:web1"
    assert k.res("r1") == "qdash:res:r1"
    assert Keys("x:").q("h") == "x:q:h"
    doc = keys_mod.__doc__ or ""
    for name in ("seq", "hosts", "q:{host}", "w:{host}", "hm:{host}:{queue}", "fi:{host}"):
        assert f"qdash:{name}" in doc
    assert check_host("web-1.example") == "web-1.example"
    for bad in ("", "a:b", "a\x00b", "x" * 256):
        with pytest.raises(ConfigError):
            check_host(bad)
