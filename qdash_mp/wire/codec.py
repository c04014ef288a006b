"""Message <-> frame bytes: ``encode``, ``encode_batch`` and ``decode_body``. Pure, no I/O.

A frame is a 4-byte big-endian body length, then the body (``qdash_mp.wire.frames``)::

    offset  size  field
    0       4     N, the body length: unsigned 32-bit big-endian integer, 1 <= N <= max_frame
    4       N     body: exactly one msgpack object (bin type on: str is UTF-8 text,
                  bytes stay bytes), always an ARRAY whose first element is the message type

An encoder checks every field by the decoder's rules, so nothing a peer must refuse is sent.
A BATCH body starting ``94 03`` or ``95 03`` (v2, with ``ext``: as every packer writes
them) is decoded in one pass, each
FAILED array kept as the slice of the body it came in (``_decode_batch``); any other body,
or a BATCH that pass refuses, goes the general way (``parse``), which names the problem.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

import msgpack

from qdash_mp.errors import ProtocolError
from qdash_mp.records import (
    MAX_DEPTH,
    MAX_FRAME,
    MAX_ITEMS,
    check_failed,
    first_bad_failed,
)
from qdash_mp.strict_msgpack import (
    DECODE_ERRORS,
    MAX_INT,
    expect_int,
    packb,
    refuse_ext,
    unpackb,
)
from qdash_mp.wire.extension import ActiveRow, EventRow, Sparse, check_ext, parse_ext
from qdash_mp.wire.messages import (
    MAX_DELTA,
    Batch,
    Counts,
    Message,
    MsgType,
    counters_map,
    parse,
    to_array,
    with_ext,
)

HEADER = struct.Struct(">I")
"""The 4-byte frame header: body length, unsigned 32-bit big-endian."""


def frame(body: bytes, max_frame: int) -> bytes:
    if len(body) > max_frame:
        raise ProtocolError(f"frame body of {len(body)} bytes exceeds the {max_frame} byte limit")
    return HEADER.pack(len(body)) + body


def _check_packed(f: object, what: str) -> None:
    if not (type(f) is tuple and len(f) == 3 and type(f[0]) is bytes):
        raise ProtocolError(f"{what} must be a (data, job_id, failed_at) tuple, not {f!r:.60}")
    data, job_id, failed_at = f
    arr = unpackb(data, len(data), MAX_ITEMS)
    why = check_failed(arr, what)
    if why:
        raise ProtocolError(why)
    assert isinstance(arr, list)
    if arr[0] != job_id or arr[8] != failed_at:
        raise ProtocolError(f"{what}: job_id or failed_at differ from the packed record")


def encode(msg: Message, *, max_frame: int = MAX_FRAME) -> bytes:
    """The whole frame (header + body) of ``msg``, after checking it as a decoder would.

    Message types are written as plain ints; ``ProtocolError`` if a field breaks the
    protocol or the body would exceed ``max_frame``.
    """
    # Check through the decoder's own rules so we never send what a peer must refuse.
    if isinstance(msg, Batch):
        for i, f in enumerate(msg.failed):
            _check_packed(f, f"BATCH failed[{i}]")
        packed = [f[0] for f in msg.failed]
        return encode_batch(
            msg.seq,
            msg.counters,
            packed,
            max_frame=max_frame,
            hist=msg.hist,
            started=msg.started,
            active=msg.active,
            jobs=msg.jobs,
            events=msg.events,
        )
    arr = to_array(msg)
    arr[0] = int(arr[0])
    parse(arr, MAX_ITEMS, MAX_DEPTH)
    return frame(packb(arr, MsgType(arr[0]).name), max_frame)


def encode_batch(
    seq: int,
    counters: Mapping[str, Counts],
    packed_failed: Sequence[bytes] = (),
    *,
    max_frame: int = MAX_FRAME,
    hist: Mapping[str, tuple[Sparse, Sparse]] | None = None,
    started: Mapping[str, int] | None = None,
    active: Mapping[str, int] | None = None,
    jobs: Sequence[ActiveRow] | None = None,
    events: Sequence[EventRow] | None = None,
) -> bytes:
    """The BATCH frame of ``seq``, ``counters`` and FAILED arrays already packed.

    The FAILED arrays (from ``pack_failed``, ``pack_failed_fields`` or a ``PackedFailed``)
    are spliced in as they are, not checked again; ``encode(Batch(...))`` checks them and
    gives the same bytes. Any of the v2 fields (``hist`` .. ``events``) makes it a BATCH v2
    with a 5th element ``ext``; without them it is the v1 body.
    """
    expect_int(seq, "BATCH seq", 1, MAX_INT)
    checked = counters_map(counters, MAX_ITEMS)
    ext = check_ext(hist or {}, started or {}, active, jobs, events, MAX_DELTA)
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack_array_header(4 if ext is None else 5)
    packer.pack(int(MsgType.BATCH))
    packer.pack(seq)
    packer.pack({q: list(row) for q, row in checked.items()})
    packer.pack_array_header(len(packed_failed))
    head: bytes = packer.bytes()
    tail = b"" if ext is None else packb(ext, "BATCH ext")
    return frame(head + b"".join(packed_failed) + tail, max_frame)


_BATCH_HEAD = bytes((0x94, MsgType.BATCH))
"""How a BATCH body starts when packed the usual way: fixarray of 4, then the type 3."""

_BATCH_V2_HEAD = bytes((0x95, MsgType.BATCH))
"""The same for a BATCH v2 with its 5th element ``ext``."""


def _decode_batch(body: bytes, max_items: int, max_depth: int) -> Batch:
    """A BATCH body (starting with ``_BATCH_HEAD``) read in one pass, each FAILED array
    checked and kept as its own bytes: a slice of the body, not decoded and packed again.

    Raises on anything invalid without saying much: ``decode`` then decodes the body the
    general way, which names the problem.
    """
    n = len(body)
    unpacker = msgpack.Unpacker(
        None,
        max_buffer_size=n,
        raw=False,
        # Tuples, not lists: a tuple of plain values is dropped by the cyclic GC from its
        # lists at its first look, while a list still alive then (a batch is decoded
        # between collections) is promoted, and enough of those trigger full collections.
        use_list=False,
        strict_map_key=False,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=max_items,
        max_map_len=max_items,
        max_ext_len=0,
        ext_hook=refuse_ext,
    )
    unpacker.feed(body)
    arity = unpacker.read_array_header()  # 4, or 5 with ext
    unpacker.skip()  # the type, 3
    seq = expect_int(unpacker.unpack(), "BATCH seq", 1, MAX_INT)
    counters = counters_map(unpacker.unpack(), max_items)
    count = unpacker.read_array_header()  # ValueError if not an array
    unpack = unpacker.unpack
    tell = unpacker.tell
    arrays: list[tuple[Any, ...]] = []
    datas: list[bytes] = []
    add_array = arrays.append
    add_data = datas.append
    start = tell()
    for _ in range(count):
        add_array(unpack())
        end = tell()
        add_data(body[start:end])
        start = end
    ext = None
    if arity == 5:
        ext = parse_ext(unpack(), max_items, MAX_DELTA)
        start = tell()
    if start != n:
        raise ProtocolError("trailing bytes")
    if first_bad_failed(arrays, max_items, max_depth) >= 0:
        raise ProtocolError("invalid FAILED")
    ids = map(itemgetter(0), arrays)
    failed_ats = map(itemgetter(8), arrays)
    failed = tuple(zip(datas, ids, failed_ats, strict=True))
    # (queue, name, error) as read here, for the journal's filter columns: C-level passes,
    # and the journal need not decode each record a second time for them.
    metas = tuple(
        zip(
            map(itemgetter(5), arrays),
            map(itemgetter(1), arrays),
            map(itemgetter(6), arrays),
            strict=True,
        )
    )
    if ext is None:
        return Batch(seq, counters, failed, metas=metas)
    return with_ext(seq, counters, failed, ext, metas)


def decode(body: bytes, max_items: int, max_depth: int) -> Message:
    """``decode_body`` with its limits positional (the ``FrameDecoder`` loop calls this)."""
    head = body[:2]
    if head in (_BATCH_HEAD, _BATCH_V2_HEAD):
        try:
            return _decode_batch(body, max_items, max_depth)
        except DECODE_ERRORS:
            pass  # invalid: the general path below finds the problem and names it
    # A BATCH that gets here (invalid, or an array header longer than it needs) has its
    # FAILED arrays packed again: the same values, payload_raw byte for byte.
    return parse(unpackb(body, len(body), max_items), max_items, max_depth)


def decode_body(body: bytes, *, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH) -> Message:
    """The message in one frame body (without its header); ``ProtocolError`` if invalid."""
    return decode(body, max_items, max_depth)
