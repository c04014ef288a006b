"""The collector wire protocol: frame layout, message types and strict decoding. Pure, no I/O.

Workers' ``Client`` objects and the collector daemon talk over a Unix stream socket in
*frames*. This module turns messages into frame bytes and frame bytes back into messages,
and refuses anything malformed with a ``ProtocolError`` whose text says what was wrong. It
never touches a socket, so every rule here is testable with plain bytes (``docs/protocol.md``
is the long-form description, with hex dumps).

Frame layout, byte by byte::

    offset  size  field
    0       4     N, the body length: unsigned 32-bit big-endian integer, 1 <= N <= max_frame
    4       N     body: exactly one msgpack object (bin type on: str is UTF-8 text,
                  bytes stay bytes), always an ARRAY whose first element is the message type

Bodies (``[type, field, ...]``, msgpack arrays of exactly this many elements)::

    1 HELLO           [1, version, client_id, pid, host, requeue]        client -> collector
    2 WELCOME         [2, version, last_seq]                             collector -> client
    3 BATCH           [3, seq, counters, failed]                         client -> collector
    4 ACK             [4, seq]                                           collector -> client
    5 ERROR           [5, code, reason]                                  collector -> client
    6 REQUEUE         [6, request_id, queue, FAILED]                     collector -> client
    7 REQUEUE_RESULT  [7, request_id, ok, error]                         client -> collector

    counters = map {queue: [pushed, processed, failed, retried]}   deltas, each 0 <= n < 2**63
    failed   = array of FAILED
    FAILED   = [job_id, name, payload_raw, attempts, enqueued_at, queue, error, traceback,
                failed_at]
    requeue  = nil (cannot requeue) | ["*"] (every queue) | [queue, ...] (non-empty)

``payload_raw`` is a msgpack *bin* holding the msgpack encoding of the job payload, exactly
as the worker packed it. A FAILED array is byte for byte the payload of the journal's
FAILED record (``qdash_mp.journal_format``): the collector checks the FAILED arrays of a
BATCH (``check_failed``, shared with the journal) and stores their bytes as they came,
without turning the job into Python objects and back, and a retry sends those same bytes.

Field types are checked exactly: an int field takes a msgpack int and nothing else (a
boolean is *not* an int here), a text field takes a msgpack str. Every int is bounded to
the signed 64-bit range (counters, sequence numbers and ids to ``0 .. 2**63-1``). Decoding
limits, all enforced before the data they guard is buffered or allocated:

* a length header above ``max_frame`` (default ``MAX_FRAME``, 16 MiB) is refused as soon as
  its four bytes arrive, before any of the body is buffered;
* inside a body, msgpack str/bin lengths are bounded by ``max_frame`` and array/map lengths
  by ``max_items`` (default 1,000,000), so a header claiming 4 GiB fails at once;
* ext types (including msgpack timestamps) are refused: they have no meaning here;
* a job payload (the msgpack inside ``payload_raw``) must be exactly one object, decoded
  under the same limits (its str/bin lengths bounded by its own size), and may nest
  arrays/maps at most ``max_depth`` (default 32) levels deep. msgpack's C unpacker stops a
  deeper nesting bomb itself (``StackError`` past 1024 levels); both end as
  ``ProtocolError``, never as ``RecursionError``.

A ``FrameDecoder`` that raised stays failed: the connection it reads is to be closed.
Sequencing, acknowledgement and dedup rules live with the peers (``client``, ``collector``);
they are summarised in ``docs/protocol.md``.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from operator import itemgetter
from typing import Any, TypeAlias

import msgpack

from qdash_mp.errors import ProtocolError
from qdash_mp.models import FailedJob, Job

__all__ = [
    "ALL_QUEUES",
    "HEADER",
    "MAX_CLIENT_ID",
    "MAX_DEPTH",
    "MAX_FRAME",
    "MAX_ID",
    "MAX_INT",
    "MAX_ITEMS",
    "MAX_NAME",
    "MAX_REASON",
    "PROTOCOL_VERSION",
    "Ack",
    "Batch",
    "Counts",
    "ErrorCode",
    "ErrorMsg",
    "FrameDecoder",
    "Hello",
    "Message",
    "MsgType",
    "PackedFailed",
    "Requeue",
    "RequeueResult",
    "UnsupportedVersion",
    "Welcome",
    "WireFailed",
    "check_failed",
    "check_payload",
    "decode_body",
    "encode",
    "encode_batch",
    "pack_failed",
    "pack_failed_fields",
    "pack_failed_record",
    "pack_payload",
    "unpack_failed",
]

PROTOCOL_VERSION = 1
"""The version carried by HELLO and WELCOME; a peer speaking another one is refused."""

HEADER = struct.Struct(">I")
"""The 4-byte frame header: body length, unsigned 32-bit big-endian."""

MAX_FRAME = 16 * 1024 * 1024
"""Default upper bound of a frame body, in bytes (the header is not counted)."""

MAX_ITEMS = 1_000_000
"""Default upper bound of any msgpack array or map length inside a body."""

MAX_DEPTH = 32
"""Default upper bound of array/map nesting inside a job payload."""

MAX_INT = 2**63 - 1
"""Largest counter, sequence number, request id or pid (signed 64-bit)."""

MIN_INT = -(2**63)

MAX_CLIENT_ID = 128
"""Longest client id, in characters."""

MAX_NAME = 255
"""Longest queue name, host name, job name or error code, in characters."""

MAX_ID = 1024
"""Longest job id, in characters."""

MAX_REASON = 4096
"""Longest ERROR reason, in characters."""

MAX_TIMESTAMP = 253402300799.0
"""``9999-12-31T23:59:59Z``: the last second a ``datetime`` can hold."""

ALL_QUEUES = "*"
"""In HELLO's requeue list: this client can requeue jobs of every queue."""

Counts: TypeAlias = tuple[int, int, int, int]
"""Counter deltas of one queue, in ``qdash_mp.stats.COUNTERS`` order."""


class MsgType(IntEnum):
    """The first element of every body."""

    HELLO = 1
    WELCOME = 2
    BATCH = 3
    ACK = 4
    ERROR = 5
    REQUEUE = 6
    REQUEUE_RESULT = 7


class ErrorCode(StrEnum):
    """Codes the collector puts in ERROR before it closes a connection.

    A peer must accept codes it does not know (newer collectors may add some) and treat them
    like ``PROTOCOL``.
    """

    PROTOCOL = "protocol"  # malformed, oversized or ill-typed frame
    VERSION = "version"  # HELLO with a version this collector does not speak
    HANDSHAKE = "handshake"  # first frame not HELLO, HELLO twice, or a collector-only message
    SEQUENCE = "sequence"  # BATCH seq skips ahead (gap after last_seq + 1)
    REFUSED = "refused"  # peer credentials not allowed on this socket
    SHUTDOWN = "shutdown"  # collector is stopping; reconnect later
    INTERNAL = "internal"  # collector-side failure (e.g. the journal could not be written)


class UnsupportedVersion(ProtocolError):
    """A HELLO or WELCOME carried a protocol version other than ``PROTOCOL_VERSION``."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
        self.version = version


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class WireFailed:
    """One failed job as it travels (the FAILED array), decoded; ``failed_at`` is Unix seconds.

    ``payload_raw`` is the msgpack encoding of the job payload, the bytes the worker packed;
    ``payload`` decodes them. Build one with ``from_job`` (which packs the payload).
    """

    job_id: str
    name: str
    payload_raw: bytes
    attempts: int
    enqueued_at: float | None
    queue: str
    error: str
    traceback: str
    failed_at: float

    @classmethod
    def from_job(
        cls,
        job: Job,
        queue: str,
        error: str,
        traceback: str = "",
        failed_at: float | datetime | None = None,
        *,
        payload_raw: bytes | None = None,
    ) -> WireFailed:
        """The record of ``job`` failing on ``queue``; ``failed_at`` defaults to now.

        The payload is packed now (``pack_payload``): ``ProtocolError`` if it is not plain
        msgpack data, and later changes to ``job.payload`` do not show in the record. Given
        ``payload_raw`` (the bytes a store kept, e.g. ``Journal.get_raw``), those are sent
        instead, as they are: a retry hands the worker back exactly what it sent.
        """
        if failed_at is None:
            ts = datetime.now(UTC).timestamp()
        elif isinstance(failed_at, datetime):
            ts = _to_timestamp(failed_at)
        else:
            ts = float(failed_at)
        return cls(
            job_id=job.id,
            name=job.name,
            payload_raw=pack_payload(job.payload) if payload_raw is None else payload_raw,
            attempts=job.attempts,
            enqueued_at=job.enqueued_at,
            queue=queue,
            error=error,
            traceback=traceback,
            failed_at=ts,
        )

    @classmethod
    def from_failed_job(cls, failed: FailedJob, *, payload_raw: bytes | None = None) -> WireFailed:
        """The wire form of a ``FailedJob`` (a naive ``failed_at`` is taken as UTC).

        The record's ``id`` is its job's id (stores key failed jobs by job id), so only
        ``failed.job.id`` travels. ``payload_raw``: as for ``from_job``.
        """
        return cls.from_job(
            failed.job,
            failed.queue,
            failed.error,
            failed.traceback,
            failed.failed_at,
            payload_raw=payload_raw,
        )

    @property
    def payload(self) -> Any:
        """The job payload, decoded from ``payload_raw`` (``ProtocolError`` if it does not)."""
        return _decode_payload(self.payload_raw, "FAILED", MAX_ITEMS, MAX_DEPTH)

    def job(self) -> Job:
        """The ``Job`` this record carries."""
        return Job(
            id=self.job_id,
            name=self.name,
            payload=self.payload,
            attempts=self.attempts,
            enqueued_at=self.enqueued_at,
        )

    def failed_at_datetime(self) -> datetime:
        """``failed_at`` as an aware UTC ``datetime``."""
        return datetime.fromtimestamp(self.failed_at, UTC)

    def to_failed_job(self) -> FailedJob:
        """The ``FailedJob`` this record describes (its ``id`` is the job id)."""
        return FailedJob(
            id=self.job_id,
            queue=self.queue,
            job=self.job(),
            error=self.error,
            failed_at=self.failed_at_datetime(),
            traceback=self.traceback,
        )


PackedFailed: TypeAlias = tuple[bytes, str, float]
"""One FAILED array as its msgpack bytes (checked), plus the fields a store keys on:
``(data, job_id, failed_at)``, ``job_id`` and ``failed_at`` being fields 0 and 8 of ``data``.

What a decoded ``Batch`` carries: the collector journals ``data`` as it came, without
decoding the job into Python objects. ``pack_failed_record`` makes one, ``unpack_failed``
decodes ``data``. A plain tuple on purpose: the cyclic GC stops tracking a tuple of plain
values at its first look, not an instance of a class (a NamedTuple included), and a
collector holding a batch of those through a collection gets them promoted, enough of
which trigger full collections (measured: ~0.3 us a record).
"""


def pack_failed_record(failed: WireFailed) -> PackedFailed:
    """``failed`` as a ``Batch`` carries it: ``(pack_failed(failed), job_id, failed_at)``."""
    return pack_failed(failed), failed.job_id, failed.failed_at


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of a client: who it is and which queues it can requeue (``None``: none)."""

    client_id: str
    pid: int
    host: str
    requeue: tuple[str, ...] | None = None
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    """Collector's answer to HELLO: the highest batch seq of this client already applied."""

    last_seq: int
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Batch:
    """Counter deltas per queue plus failed jobs, numbered ``seq`` = 1, 2, 3... per client."""

    seq: int
    counters: Mapping[str, Counts] = field(default_factory=dict)
    failed: tuple[PackedFailed, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    """Cumulative: every batch with a seq up to ``seq`` is applied (and durable)."""

    seq: int


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    """Sent by the collector just before it closes the connection."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Requeue:
    """Collector asks the client to re-enqueue ``failed.job()`` on ``queue``."""

    request_id: int
    queue: str
    failed: WireFailed


@dataclass(frozen=True, slots=True)
class RequeueResult:
    """Client's answer to REQUEUE: ``ok``, or not with ``error`` saying why."""

    request_id: int
    ok: bool
    error: str = ""


Message: TypeAlias = Hello | Welcome | Batch | Ack | ErrorMsg | Requeue | RequeueResult


# --------------------------------------------------------------------------- field checks


def _type_name(value: object) -> str:
    return type(value).__name__


def _int(value: object, what: str, lo: int = MIN_INT, hi: int = MAX_INT) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an int, not {_type_name(value)}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{what} must be in {lo}..{hi}, not {value}")
    return value


def _str(value: object, what: str, min_len: int = 0, max_len: int | None = None) -> str:
    if type(value) is not str:
        raise ProtocolError(f"{what} must be a str, not {_type_name(value)}")
    if len(value) < min_len:
        raise ProtocolError(f"{what} must not be empty")
    if max_len is not None and len(value) > max_len:
        raise ProtocolError(f"{what} is longer than {max_len} characters ({len(value)})")
    return value


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{what} must be a bool, not {_type_name(value)}")
    return value


def _float(value: object, what: str, lo: float, hi: float) -> float:
    if type(value) is not float:
        raise ProtocolError(f"{what} must be a float, not {_type_name(value)}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ProtocolError(f"{what} must be a finite number in {lo}..{hi}, not {value}")
    return value


def _seq(value: object, what: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple) or isinstance(value, msgpack.ExtType):
        raise ProtocolError(f"{what} must be an array, not {_type_name(value)}")
    return value


def _arity(arr: Sequence[Any], n: int, what: str) -> None:
    if len(arr) != n:
        raise ProtocolError(f"{what} must have {n} elements, not {len(arr)}")


_SCALARS = (type(None), bool, int, float, str, bytes)
_LEAVES = (str, bytes, bytearray, memoryview, bool, int, float)


def check_payload(
    value: Any,
    max_depth: int = MAX_DEPTH,
    what: str = "payload",
    *,
    max_items: int = MAX_ITEMS,
) -> None:
    """Raise ``ProtocolError`` unless ``value`` is plain data a decoder would take back.

    Plain data: nil, bool, int, float, str, bytes, arrays (list/tuple) and maps whose keys
    are scalars, nested ``<= max_depth`` levels, no array or map longer than ``max_items``.
    Ext types and any other object are refused. Iterative: a deep value gives
    ``ProtocolError``, never ``RecursionError``. Int ranges are left to the packer.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if v is None or isinstance(v, _LEAVES):
            continue
        if isinstance(v, dict):
            if depth >= max_depth:
                raise ProtocolError(f"{what} nests deeper than {max_depth} levels")
            if len(v) > max_items:
                raise ProtocolError(f"{what} has a map of more than {max_items} items")
            for k, item in v.items():
                if not (k is None or isinstance(k, _LEAVES)):
                    raise ProtocolError(f"{what} has a map key of type {_type_name(k)}")
                if type(item) not in _SCALARS:
                    stack.append((item, depth + 1))
        elif isinstance(v, list | tuple) and not isinstance(v, msgpack.ExtType):
            if depth >= max_depth:
                raise ProtocolError(f"{what} nests deeper than {max_depth} levels")
            if len(v) > max_items:
                raise ProtocolError(f"{what} has an array of more than {max_items} items")
            for item in v:
                if type(item) not in _SCALARS:
                    stack.append((item, depth + 1))
        else:
            raise ProtocolError(f"{what} holds a {_type_name(v)}, which is not plain msgpack data")


def _within_depth(value: list[Any] | dict[Any, Any], max_depth: int) -> bool:
    """Does decoded msgpack data (only lists and dicts nest) nest ``<= max_depth`` levels?"""
    level: list[Any] = [value]
    for _ in range(max_depth):
        deeper: list[Any] = []
        for container in level:
            for item in container.values() if type(container) is dict else container:
                t = type(item)
                if t is list or t is dict:
                    deeper.append(item)
        if not deeper:
            return True
        level = deeper
    return False


def _unpack_payload(raw: bytes, max_items: int) -> Any:
    """``raw`` decoded under a decoder's limits; raises what msgpack raises.

    ``unpackb`` bounds every str, bin, array and map length by the input's size by itself;
    only a payload of more than ``max_items`` bytes needs the item limit given (fewer
    keywords: a third off the cost of the call).
    """
    if len(raw) <= max_items:
        return msgpack.unpackb(raw, strict_map_key=False, max_ext_len=0, ext_hook=_refuse_ext)
    return msgpack.unpackb(
        raw,
        strict_map_key=False,
        max_ext_len=0,
        ext_hook=_refuse_ext,
        max_array_len=max_items,
        max_map_len=max_items,
    )


def _decode_payload(raw: bytes, what: str, max_items: int, max_depth: int) -> Any:
    """The job payload in ``raw`` if it is one msgpack object a decoder takes as one."""
    try:
        value = _unpack_payload(raw, max_items)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(
            f"{what}.payload_raw is not a valid payload: {_msgpack_error(exc)}"
        ) from None
    t = type(value)
    if (t is list or t is dict) and not _within_depth(value, max_depth):
        raise ProtocolError(f"{what}.payload nests deeper than {max_depth} levels")
    return value


def check_failed(
    obj: object,
    what: str = "FAILED",
    *,
    max_items: int = MAX_ITEMS,
    max_depth: int = MAX_DEPTH,
) -> str:
    """``""`` if ``obj`` is a valid decoded FAILED array, else what is wrong (names ``what``).

    The one check of a FAILED array, shared by the wire (a decoder raises ``ProtocolError``
    with this text) and the journal (which stores FAILED arrays as its FAILED records and
    checks them on write and on recovery): exact field types and ranges, then
    ``payload_raw``, which must be exactly one msgpack object within the decoder's limits,
    without ext types, nested at most ``max_depth`` levels. Good input takes the fast path
    (``_first_bad_failed``); only a bad one is gone through field by field for the reason.
    """
    if _first_bad_failed((obj,), max_items, max_depth) < 0:
        return ""
    try:
        arr = _seq(obj, what)
        _arity(arr, 9, what)
        job_id, name, raw, attempts, enqueued_at, queue, error, trace, failed_at = arr
        _str(job_id, f"{what}.job_id", 1, MAX_ID)
        _str(name, f"{what}.name", 0, MAX_ID)
        if type(raw) is not bytes:
            raise ProtocolError(f"{what}.payload_raw must be a bin, not {_type_name(raw)}")
        _int(attempts, f"{what}.attempts")
        if enqueued_at is not None:
            _float(enqueued_at, f"{what}.enqueued_at", -MAX_TIMESTAMP, MAX_TIMESTAMP)
        _str(queue, f"{what}.queue", 1, MAX_NAME)
        _str(error, f"{what}.error")
        _str(trace, f"{what}.traceback")
        _float(failed_at, f"{what}.failed_at", 0.0, MAX_TIMESTAMP)
        _decode_payload(raw, what, max_items, max_depth)
    except ProtocolError as exc:
        return str(exc)
    return ""  # not reached: a valid array takes the fast path


def _first_bad_failed(arrays: Iterable[object], max_items: int, max_depth: int) -> int:
    """Index of the first of ``arrays`` that is not a valid FAILED array, or -1 if all are.

    The fast path of ``check_failed`` (which says what is wrong), for many arrays in one
    call: per array one expression of exact type checks and one ``unpackb`` of the payload,
    inline, since a Python call per array would cost as much as the checks.
    """
    unpackb = msgpack.unpackb
    unpack_big = _unpack_payload
    refuse = _refuse_ext
    within = _within_depth
    for i, obj in enumerate(arrays):
        if (type(obj) is not tuple and type(obj) is not list) or len(obj) != 9:
            return i
        job_id, name, raw, attempts, enqueued_at, queue, error, trace, failed_at = obj
        if not (
            type(job_id) is str
            and 0 < len(job_id) <= MAX_ID
            and type(name) is str
            and len(name) <= MAX_ID
            and type(raw) is bytes
            and type(attempts) is int
            and MIN_INT <= attempts <= MAX_INT
            and (
                enqueued_at is None
                or (type(enqueued_at) is float and -MAX_TIMESTAMP <= enqueued_at <= MAX_TIMESTAMP)
            )
            and type(queue) is str
            and 0 < len(queue) <= MAX_NAME
            and type(error) is str
            and type(trace) is str
            and type(failed_at) is float
            and 0.0 <= failed_at <= MAX_TIMESTAMP  # NaN fails every comparison
        ):
            return i
        try:  # _unpack_payload, inline
            if len(raw) <= max_items:
                value = unpackb(raw, strict_map_key=False, max_ext_len=0, ext_hook=refuse)
            else:
                value = unpack_big(raw, max_items)
        except _DECODE_ERRORS:
            return i
        t = type(value)
        if (t is list or t is dict) and not within(value, max_depth):
            return i
    return -1


def _to_timestamp(dt: datetime) -> float:
    """Unix seconds of ``dt``; a naive ``dt`` is taken as UTC."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _wire_failed(value: object, what: str, max_items: int, max_depth: int) -> WireFailed:
    why = check_failed(value, what, max_items=max_items, max_depth=max_depth)
    if why:
        raise ProtocolError(why)
    return WireFailed(*value)  # type: ignore[misc]


def _failed_array(f: WireFailed) -> list[Any]:
    return [
        f.job_id,
        f.name,
        f.payload_raw,
        f.attempts,
        f.enqueued_at,
        f.queue,
        f.error,
        f.traceback,
        f.failed_at,
    ]


def _counters(value: object, max_items: int) -> dict[str, Counts]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"BATCH counters must be a map, not {_type_name(value)}")
    if len(value) > max_items:
        raise ProtocolError(f"BATCH counters has more than {max_items} queues")
    out: dict[str, Counts] = {}
    for queue, value_row in value.items():
        _str(queue, "BATCH counters key", 1, MAX_NAME)
        what = f"BATCH counters[{queue!r}]"
        row = _seq(value_row, what)
        _arity(row, 4, what)
        pushed, processed, failed, retried = (
            _int(n, f"{what}[{i}]", 0, MAX_INT) for i, n in enumerate(row)
        )
        out[queue] = (pushed, processed, failed, retried)
    return out


def _requeue_list(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    arr = _seq(value, "HELLO requeue")
    if not arr:
        raise ProtocolError("HELLO requeue must be nil, ['*'] or a non-empty list of queues")
    return tuple(_str(q, "HELLO requeue entry", 1, MAX_NAME) for q in arr)


def _version(value: object, what: str) -> int:
    version = _int(value, f"{what} version", 0, MAX_INT)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(version)
    return version


def _parse(obj: object, max_items: int, max_depth: int) -> Message:
    """Validate a decoded body and build its message; ``ProtocolError`` otherwise."""
    if not isinstance(obj, list | tuple) or isinstance(obj, msgpack.ExtType):
        raise ProtocolError(f"a body must be an array, not {_type_name(obj)}")
    if not obj:
        raise ProtocolError("a body must not be an empty array")
    kind = obj[0]
    if type(kind) is not int or kind not in MsgType._value2member_map_:
        raise ProtocolError(f"unknown message type {kind!r}")
    t = MsgType(kind)
    what = t.name
    if t is MsgType.HELLO:
        # The version goes first so a peer of another version gets "version", not "arity".
        if len(obj) < 2:
            raise ProtocolError("HELLO must have 6 elements, not 1")
        version = _version(obj[1], what)
        _arity(obj, 6, what)
        return Hello(
            client_id=_str(obj[2], "HELLO client_id", 1, MAX_CLIENT_ID),
            pid=_int(obj[3], "HELLO pid", 0, MAX_INT),
            host=_str(obj[4], "HELLO host", 0, MAX_NAME),
            requeue=_requeue_list(obj[5]),
            version=version,
        )
    if t is MsgType.WELCOME:
        if len(obj) < 2:
            raise ProtocolError("WELCOME must have 3 elements, not 1")
        version = _version(obj[1], what)
        _arity(obj, 3, what)
        return Welcome(last_seq=_int(obj[2], "WELCOME last_seq", 0, MAX_INT), version=version)
    if t is MsgType.BATCH:
        _arity(obj, 4, what)
        seq = _int(obj[1], "BATCH seq", 1, MAX_INT)
        counters = _counters(obj[2], max_items)
        packed = []
        for i, f in enumerate(_seq(obj[3], "BATCH failed")):
            why = check_failed(f, f"BATCH failed[{i}]", max_items=max_items, max_depth=max_depth)
            if why:
                raise ProtocolError(why)
            packed.append((_packb(f, "FAILED"), f[0], f[8]))
        return Batch(seq=seq, counters=counters, failed=tuple(packed))
    if t is MsgType.ACK:
        _arity(obj, 2, what)
        return Ack(seq=_int(obj[1], "ACK seq", 0, MAX_INT))
    if t is MsgType.ERROR:
        _arity(obj, 3, what)
        return ErrorMsg(
            code=_str(obj[1], "ERROR code", 1, MAX_NAME),
            reason=_str(obj[2], "ERROR reason", 0, MAX_REASON),
        )
    if t is MsgType.REQUEUE:
        _arity(obj, 4, what)
        return Requeue(
            request_id=_int(obj[1], "REQUEUE request_id", 0, MAX_INT),
            queue=_str(obj[2], "REQUEUE queue", 1, MAX_NAME),
            failed=_wire_failed(obj[3], "REQUEUE job", max_items, max_depth),
        )
    _arity(obj, 4, what)
    return RequeueResult(
        request_id=_int(obj[1], "REQUEUE_RESULT request_id", 0, MAX_INT),
        ok=_bool(obj[2], "REQUEUE_RESULT ok"),
        error=_str(obj[3], "REQUEUE_RESULT error", 0, MAX_REASON),
    )


def _array(msg: Message) -> list[Any]:
    if isinstance(msg, Hello):
        requeue = None if msg.requeue is None else list(msg.requeue)
        return [MsgType.HELLO, msg.version, msg.client_id, msg.pid, msg.host, requeue]
    if isinstance(msg, Welcome):
        return [MsgType.WELCOME, msg.version, msg.last_seq]
    if isinstance(msg, Ack):
        return [MsgType.ACK, msg.seq]
    if isinstance(msg, ErrorMsg):
        code = str.__str__(msg.code) if isinstance(msg.code, str) else msg.code  # ErrorCode
        return [MsgType.ERROR, code, msg.reason]
    if isinstance(msg, Requeue):
        return [MsgType.REQUEUE, msg.request_id, msg.queue, _failed_array(msg.failed)]
    if isinstance(msg, RequeueResult):
        return [MsgType.REQUEUE_RESULT, msg.request_id, msg.ok, msg.error]
    raise ProtocolError(f"not a protocol message: {_type_name(msg)}")


# --------------------------------------------------------------------------- encoding

_local = threading.local()


def _packb(obj: Any, what: str) -> bytes:
    """msgpack (bin type on) through a per-thread ``Packer``: a third of ``packb``'s cost.

    The packer is taken out while it packs, so a call made from inside packing (user code
    run for a payload's dict subclass) gets a fresh one instead of corrupting the buffer.
    """
    packer = _local.__dict__.pop("packer", None)
    if packer is None:
        packer = msgpack.Packer(use_bin_type=True)
    try:
        data: bytes = packer.pack(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"{what} cannot be encoded: {exc}") from None
    finally:
        _local.packer = packer
    return data


def _packb_plain(obj: Any, what: str) -> bytes:
    """``_packb`` for an object made only of exact plain types (str, bytes, int, float,
    bool, None, lists of those): packing it runs no Python code, so the per-thread packer
    needs no taking out.
    """
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    try:
        data: bytes = packer.pack(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"{what} cannot be encoded: {exc}") from None
    return data


def _frame(body: bytes, max_frame: int) -> bytes:
    if len(body) > max_frame:
        raise ProtocolError(f"frame body of {len(body)} bytes exceeds the {max_frame} byte limit")
    return HEADER.pack(len(body)) + body


def _check_packed(f: object, what: str) -> None:
    if not (type(f) is tuple and len(f) == 3 and type(f[0]) is bytes):
        raise ProtocolError(f"{what} must be a (data, job_id, failed_at) tuple, not {f!r:.60}")
    data, job_id, failed_at = f
    arr = _unpackb(data, len(data), MAX_ITEMS)
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
        return encode_batch(msg.seq, msg.counters, packed, max_frame=max_frame)
    arr = _array(msg)
    arr[0] = int(arr[0])
    _parse(arr, MAX_ITEMS, MAX_DEPTH)
    return _frame(_packb(arr, MsgType(arr[0]).name), max_frame)


def pack_payload(value: Any, *, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH) -> bytes:
    """The msgpack bytes of a job payload (a FAILED's ``payload_raw``), checked.

    ``ProtocolError`` unless ``value`` is plain data (``check_payload``) that a decoder with
    these limits takes back; a tuple becomes an array. Packing at the moment of failure
    snapshots the payload: later changes to the worker's objects do not leak in.
    """
    if type(value) in _SCALARS:
        return _packb_plain(value, "payload")
    check_payload(value, max_depth, max_items=max_items)
    return _packb(value, "payload")


def pack_failed(
    failed: WireFailed, *, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH
) -> bytes:
    """The msgpack bytes of one FAILED array, checked (``check_failed``), for ``encode_batch``."""
    arr = _failed_array(failed)
    why = check_failed(arr, max_items=max_items, max_depth=max_depth)
    if why:
        raise ProtocolError(why)
    return _packb(arr, "FAILED")


def pack_failed_fields(
    job_id: str,
    name: str,
    payload_raw: bytes,
    attempts: int,
    enqueued_at: float | None,
    queue: str,
    error: str,
    traceback: str,
    failed_at: float,
) -> bytes:
    """The msgpack bytes of the FAILED array of these fields, **not** checked.

    For a caller that makes every field valid by construction -- ``Client.on_failed`` does,
    ``payload_raw`` from ``pack_payload`` -- and would double its cost by checking again
    (``tests/test_client.py`` checks that what it sends decodes). Every field must be of
    its exact type (no subclasses). ``ProtocolError`` only if a field cannot be packed at
    all (e.g. a str with a lone surrogate).
    """
    return _packb_plain(
        [job_id, name, payload_raw, attempts, enqueued_at, queue, error, traceback, failed_at],
        "FAILED",
    )


def unpack_failed(
    data: bytes,
    *,
    max_size: int = MAX_FRAME,
    max_items: int = MAX_ITEMS,
    max_depth: int = MAX_DEPTH,
) -> WireFailed:
    """The ``WireFailed`` in ``data`` as made by ``pack_failed`` (checked strictly)."""
    return _wire_failed(_unpackb(data, max_size, max_items), "FAILED", max_items, max_depth)


def encode_batch(
    seq: int,
    counters: Mapping[str, Counts],
    packed_failed: Sequence[bytes] = (),
    *,
    max_frame: int = MAX_FRAME,
) -> bytes:
    """The BATCH frame of ``seq``, ``counters`` and FAILED arrays already packed.

    The FAILED arrays (from ``pack_failed``, ``pack_failed_fields`` or a ``PackedFailed``)
    are spliced in as they are, not checked again; ``encode(Batch(...))`` checks them and
    gives the same bytes.
    """
    _int(seq, "BATCH seq", 1, MAX_INT)
    checked = _counters(counters, MAX_ITEMS)
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack_array_header(4)
    packer.pack(int(MsgType.BATCH))
    packer.pack(seq)
    packer.pack({q: list(row) for q, row in checked.items()})
    packer.pack_array_header(len(packed_failed))
    head: bytes = packer.bytes()
    return _frame(head + b"".join(packed_failed), max_frame)


# --------------------------------------------------------------------------- decoding


def _refuse_ext(code: int, data: bytes) -> object:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


_DECODE_ERRORS = (
    ProtocolError,  # from _refuse_ext
    ValueError,  # msgpack's own errors (ExtraData, StackError, FormatError...) and bad UTF-8
    TypeError,  # an array or a map as a map key (unhashable)
    OverflowError,
    RecursionError,
    msgpack.UnpackException,  # OutOfData, BufferFull
)


def _msgpack_error(exc: BaseException) -> str:
    """What a msgpack decoding error means, in words."""
    if isinstance(exc, ProtocolError):
        return str(exc)
    if isinstance(exc, msgpack.ExtraData):
        return "trailing bytes after the msgpack object"
    if isinstance(exc, msgpack.StackError | RecursionError):
        return "msgpack data nests too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"a msgpack str is not valid UTF-8: {exc.reason}"
    text = str(exc)
    if "incomplete input" in text:
        return "truncated msgpack data (a length inside claims more bytes than there are)"
    if "max_ext_len" in text:
        return "msgpack ext types are not allowed"
    return text or f"invalid msgpack data ({_type_name(exc)})"


def _unpackb(body: bytes, max_size: int, max_items: int) -> object:
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=False,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_items,
            max_map_len=max_items,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"undecodable body: {_msgpack_error(exc)}") from None


_BATCH_HEAD = bytes((0x94, MsgType.BATCH))
"""How a BATCH body starts when packed the usual way: fixarray of 4, then the type 3."""


def _decode_batch(body: bytes, max_items: int, max_depth: int) -> Batch:
    """A BATCH body (starting with ``_BATCH_HEAD``) read in one pass, each FAILED array
    checked and kept as its own bytes: a slice of the body, not decoded and packed again.

    Raises on anything invalid without saying much: ``_decode`` then decodes the body the
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
        ext_hook=_refuse_ext,
    )
    unpacker.feed(body)
    unpacker.read_array_header()  # 4
    unpacker.skip()  # the type, 3
    seq = _int(unpacker.unpack(), "BATCH seq", 1, MAX_INT)
    counters = _counters(unpacker.unpack(), max_items)
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
    if start != n:
        raise ProtocolError("trailing bytes")
    if _first_bad_failed(arrays, max_items, max_depth) >= 0:
        raise ProtocolError("invalid FAILED")
    ids = map(itemgetter(0), arrays)
    failed_ats = map(itemgetter(8), arrays)
    return Batch(seq, counters, tuple(zip(datas, ids, failed_ats, strict=True)))


def _decode(body: bytes, max_items: int, max_depth: int) -> Message:
    if body[:2] == _BATCH_HEAD:
        try:
            return _decode_batch(body, max_items, max_depth)
        except _DECODE_ERRORS:
            pass  # invalid: the general path below finds the problem and names it
    # A BATCH that gets here (invalid, or an array header longer than it needs) has its
    # FAILED arrays packed again: the same values, payload_raw byte for byte.
    return _parse(_unpackb(body, len(body), max_items), max_items, max_depth)


def decode_body(body: bytes, *, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH) -> Message:
    """The message in one frame body (without its header); ``ProtocolError`` if invalid."""
    return _decode(body, max_items, max_depth)


class FrameDecoder:
    """Splits a byte stream into frames and decodes each into a message.

    ``feed`` may get any slice of the stream (one byte, many frames); it buffers a partial
    frame until the rest arrives. A header announcing more than ``max_frame`` bytes is
    refused before any of that body is buffered. After a ``ProtocolError`` the decoder stays
    failed (every later ``feed`` raises the same error) and messages decoded earlier in the
    failing ``feed`` are dropped: the connection is to be closed, and nothing in it counts
    as received.
    """

    def __init__(
        self,
        max_frame: int = MAX_FRAME,
        *,
        max_items: int = MAX_ITEMS,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        if not 1 <= max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be in 1..{0xFFFFFFFF}, not {max_frame}")
        self.max_frame = max_frame
        self.max_items = max_items
        self.max_depth = max_depth
        self._buf = bytearray()
        self._need = -1  # body length of the frame being read; -1 while reading a header
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (a partial frame)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Every message completed by ``data``, in order; ``ProtocolError`` on bad input."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        # Frames are cut straight out of ``data`` (one copy each); only a partial frame at
        # its end waits in the buffer for the rest.
        buf = self._buf
        if buf:
            buf += data
            data = buf
        out: list[Message] = []
        pos = 0
        end = len(data)
        need = self._need
        while True:
            if need < 0:
                if end - pos < HEADER.size:
                    break
                (n,) = HEADER.unpack_from(data, pos)
                if n > self.max_frame:
                    raise ProtocolError(
                        f"frame header announces {n} bytes, over the {self.max_frame} byte limit"
                    )
                if n == 0:
                    raise ProtocolError("empty frame (length 0)")
                pos += HEADER.size
                need = n
            if end - pos < need:
                break
            body = bytes(data[pos : pos + need])
            pos += need
            need = -1
            out.append(_decode(body, self.max_items, self.max_depth))
        self._need = need
        if data is buf:
            del buf[:pos]
        else:
            buf += data[pos:]
        return out
