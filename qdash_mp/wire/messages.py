"""Wire messages: the seven bodies, their types, and strict parsing of each. Pure, no I/O.

Bodies (``[type, field, ...]``, msgpack arrays of exactly this many elements)::

    1 HELLO           [1, version, client_id, pid, host, requeue(, info)] client -> collector
    2 WELCOME         [2, version, last_seq]                             collector -> client
    3 BATCH           [3, seq, counters, failed(, ext)]                  client -> collector
    4 ACK             [4, seq]                                           collector -> client
    5 ERROR           [5, code, reason]                                  collector -> client
    6 REQUEUE         [6, request_id, queue, FAILED]                     collector -> client
    7 REQUEUE_RESULT  [7, request_id, ok, error]                         client -> collector

    counters = map {queue: [pushed, processed, failed, retried]}   deltas, each 0 <= n <= 2**40
    failed   = array of FAILED (``qdash_mp.records``)
    requeue  = nil (cannot requeue) | ["*"] (every queue) | [queue, ...] (non-empty)

Version 2 adds HELLO's ``info`` and BATCH's ``ext`` (``qdash_mp.wire.extension``): a HELLO
of version 2 has 7 elements, one of version 1 has 6; the collector answers WELCOME with the
lower of both versions, and a client sends ``ext`` only after a WELCOME of version 2.

Field types are exact (``qdash_mp.strict_msgpack``); sequence numbers, ids and pids are
``0 .. 2**63-1``, a counter delta ``0 .. MAX_DELTA``. ``docs/protocol.md`` has every rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, TypeAlias

import msgpack

from qdash_mp.errors import ProtocolError
from qdash_mp.records import (
    MAX_NAME,
    FailedMeta,
    FailedRecord,
    PackedFailed,
    check_failed,
    failed_array,
    failed_record,
)
from qdash_mp.strict_msgpack import (
    MAX_INT,
    expect_arity,
    expect_array,
    expect_bool,
    expect_int,
    expect_str,
    packb,
    type_name,
)
from qdash_mp.wire.extension import (
    ActiveRow,
    EventRow,
    Ext,
    Sparse,
    info_map,
    parse_ext,
    parse_info,
)

PROTOCOL_VERSION = 2
"""The highest version this side speaks (HELLO v2 has ``info``, BATCH v2 may have ``ext``)."""

MIN_PROTOCOL_VERSION = 1
"""The lowest version still accepted; a peer speaking one outside 1..2 is refused."""

MAX_CLIENT_ID = 128
"""Longest client id, in characters."""

MAX_REASON = 4096
"""Longest ERROR reason, in characters."""

MAX_DELTA = 2**40
"""Largest counter delta one BATCH may carry (about 1.1e12).

A client sends a batch every 100 ms, and one hook call adds 1: a real batch holds fewer
than 2**27 counts even at a billion hook calls a second. A delta above this is no count but
an attack or a bug, refused at decode (ERROR, that connection only). And since a slot of
the stats block is a signed 64-bit int, it takes 2**23 batches at this bound to overflow
one: honest traffic, even at 2**30 (about a billion) events a second, needs 2**33 s, about
272 years. (The apply path still saturates rather than trusting this: docs/protocol.md.)
"""

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
    """A HELLO or WELCOME carried a protocol version outside 1..``PROTOCOL_VERSION``."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"protocol version {version} is not supported "
            f"(this side speaks {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION})"
        )
        self.version = version


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of a client: who it is and which queues it can requeue (``None``: none).

    Version 2 adds ``name`` (a worker name) and ``track`` (queues whose jobs the client
    reports one by one; ``("*",)``: all); a version-1 HELLO decodes with their defaults.
    """

    client_id: str
    pid: int
    host: str
    requeue: tuple[str, ...] | None = None
    version: int = PROTOCOL_VERSION
    name: str = ""
    track: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Welcome:
    """Collector's answer to HELLO: the highest batch seq of this client already applied."""

    last_seq: int
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Batch:
    """Counter deltas per queue plus failed jobs, numbered ``seq`` = 1, 2, 3... per client.

    The rest is BATCH v2's ``ext`` (``qdash_mp.wire.extension``): ``hist`` runtime and wait
    bucket deltas and ``started`` deltas (counters, deduplicated by ``seq``); ``active`` and
    ``jobs`` this client's gauges now (``None``: unchanged); ``events`` tracking events.
    """

    seq: int
    counters: Mapping[str, Counts] = field(default_factory=dict)
    failed: tuple[PackedFailed, ...] = ()
    hist: Mapping[str, tuple[Sparse, Sparse]] = field(default_factory=dict)
    started: Mapping[str, int] = field(default_factory=dict)
    active: Mapping[str, int] | None = None
    jobs: tuple[ActiveRow, ...] | None = None
    events: tuple[EventRow, ...] = ()
    metas: tuple[FailedMeta, ...] | None = field(default=None, compare=False, repr=False)
    """``(queue, name, error)`` of each of ``failed``, as the decoder read them (``None``: a
    ``Batch`` made by hand); for ``Journal.stage_failed_packed``. Not part of equality."""

    @property
    def has_ext(self) -> bool:
        """Does this batch need BATCH v2 (a 5th element)?"""
        return bool(
            self.hist
            or self.started
            or self.active is not None
            or self.jobs is not None
            or self.events
        )


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
    failed: FailedRecord


@dataclass(frozen=True, slots=True)
class RequeueResult:
    """Client's answer to REQUEUE: ``ok``, or not with ``error`` saying why."""

    request_id: int
    ok: bool
    error: str = ""


Message: TypeAlias = Hello | Welcome | Batch | Ack | ErrorMsg | Requeue | RequeueResult


# --------------------------------------------------------------------------- parsing


def _delta(value: object, what: str) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an int, not {type_name(value)}")
    if not 0 <= value <= MAX_DELTA:
        raise ProtocolError(
            f"{what} must be in 0..{MAX_DELTA}, not {value}: "
            f"a counter delta is at most 2**40 (MAX_DELTA) per batch"
        )
    return value


def counters_map(value: object, max_items: int) -> dict[str, Counts]:
    """BATCH ``counters`` checked: queue names, 4 deltas each, every delta ``0..MAX_DELTA``."""
    if not isinstance(value, Mapping):
        raise ProtocolError(f"BATCH counters must be a map, not {type_name(value)}")
    if len(value) > max_items:
        raise ProtocolError(f"BATCH counters has more than {max_items} queues")
    out: dict[str, Counts] = {}
    for queue, row in value.items():
        # A good row (every row, but for a broken or hostile peer) passes one expression of
        # exact checks; any other is gone through item by item, which names what is wrong.
        if (
            type(queue) is str
            and 0 < len(queue) <= MAX_NAME
            and (type(row) is tuple or type(row) is list)
            and len(row) == 4
        ):
            a, b, c, d = row
            if (
                type(a) is int
                and type(b) is int
                and type(c) is int
                and type(d) is int
                and 0 <= a <= MAX_DELTA
                and 0 <= b <= MAX_DELTA
                and 0 <= c <= MAX_DELTA
                and 0 <= d <= MAX_DELTA
            ):
                out[queue] = (a, b, c, d)
                continue
        out[queue] = counter_row(queue, row)
    return out


def counter_row(queue: object, row: object) -> Counts:
    """One entry of BATCH ``counters`` checked item by item; ``ProtocolError`` says why not."""
    expect_str(queue, "BATCH counters key", 1, MAX_NAME)
    what = f"BATCH counters[{queue!r}]"
    items = expect_array(row, what)
    expect_arity(items, 4, what)
    pushed, processed, failed, retried = (_delta(n, f"{what}[{i}]") for i, n in enumerate(items))
    return (pushed, processed, failed, retried)


def _requeue_list(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    arr = expect_array(value, "HELLO requeue")
    if not arr:
        raise ProtocolError("HELLO requeue must be nil, ['*'] or a non-empty list of queues")
    return tuple(expect_str(q, "HELLO requeue entry", 1, MAX_NAME) for q in arr)


def _version(value: object, what: str) -> int:
    version = expect_int(value, f"{what} version", 0, MAX_INT)
    if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise UnsupportedVersion(version)
    return version


def parse(obj: object, max_items: int, max_depth: int) -> Message:
    """Validate a decoded body and build its message; ``ProtocolError`` otherwise."""
    if not isinstance(obj, list | tuple) or isinstance(obj, msgpack.ExtType):
        raise ProtocolError(f"a body must be an array, not {type_name(obj)}")
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
        expect_arity(obj, 6 if version == 1 else 7, what)
        name, track = ("", None) if version == 1 else parse_info(obj[6])
        return Hello(
            client_id=expect_str(obj[2], "HELLO client_id", 1, MAX_CLIENT_ID),
            pid=expect_int(obj[3], "HELLO pid", 0, MAX_INT),
            host=expect_str(obj[4], "HELLO host", 0, MAX_NAME),
            requeue=_requeue_list(obj[5]),
            version=version,
            name=name,
            track=track,
        )
    if t is MsgType.WELCOME:
        if len(obj) < 2:
            raise ProtocolError("WELCOME must have 3 elements, not 1")
        version = _version(obj[1], what)
        expect_arity(obj, 3, what)
        return Welcome(last_seq=expect_int(obj[2], "WELCOME last_seq", 0, MAX_INT), version=version)
    if t is MsgType.BATCH:
        if len(obj) != 5:
            expect_arity(obj, 4, what)
        seq = expect_int(obj[1], "BATCH seq", 1, MAX_INT)
        counters = counters_map(obj[2], max_items)
        packed = []
        metas: list[FailedMeta] = []
        for i, f in enumerate(expect_array(obj[3], "BATCH failed")):
            why = check_failed(f, f"BATCH failed[{i}]", max_items=max_items, max_depth=max_depth)
            if why:
                raise ProtocolError(why)
            packed.append((packb(f, "FAILED"), f[0], f[8]))
            metas.append((f[5], f[1], f[6]))
        if len(obj) == 4:
            return Batch(seq=seq, counters=counters, failed=tuple(packed), metas=tuple(metas))
        ext = parse_ext(obj[4], max_items, MAX_DELTA)
        return with_ext(seq, counters, tuple(packed), ext, tuple(metas))
    if t is MsgType.ACK:
        expect_arity(obj, 2, what)
        return Ack(seq=expect_int(obj[1], "ACK seq", 0, MAX_INT))
    if t is MsgType.ERROR:
        expect_arity(obj, 3, what)
        return ErrorMsg(
            code=expect_str(obj[1], "ERROR code", 1, MAX_NAME),
            reason=expect_str(obj[2], "ERROR reason", 0, MAX_REASON),
        )
    if t is MsgType.REQUEUE:
        expect_arity(obj, 4, what)
        return Requeue(
            request_id=expect_int(obj[1], "REQUEUE request_id", 0, MAX_INT),
            queue=expect_str(obj[2], "REQUEUE queue", 1, MAX_NAME),
            failed=failed_record(obj[3], "REQUEUE job", max_items, max_depth),
        )
    expect_arity(obj, 4, what)
    return RequeueResult(
        request_id=expect_int(obj[1], "REQUEUE_RESULT request_id", 0, MAX_INT),
        ok=expect_bool(obj[2], "REQUEUE_RESULT ok"),
        error=expect_str(obj[3], "REQUEUE_RESULT error", 0, MAX_REASON),
    )


def with_ext(
    seq: int,
    counters: Mapping[str, Counts],
    failed: tuple[PackedFailed, ...],
    ext: Ext,
    metas: tuple[FailedMeta, ...] | None = None,
) -> Batch:
    """A ``Batch`` with the fields of a decoded ``ext``."""
    return Batch(
        seq, counters, failed, ext.hist, ext.started, ext.active, ext.jobs, ext.events, metas
    )


def to_array(msg: Message) -> list[Any]:
    if isinstance(msg, Hello):
        requeue = None if msg.requeue is None else list(msg.requeue)
        arr = [MsgType.HELLO, msg.version, msg.client_id, msg.pid, msg.host, requeue]
        if msg.version != 1:
            arr.append(info_map(msg.name, msg.track))
        return arr
    if isinstance(msg, Welcome):
        return [MsgType.WELCOME, msg.version, msg.last_seq]
    if isinstance(msg, Ack):
        return [MsgType.ACK, msg.seq]
    if isinstance(msg, ErrorMsg):
        code = str.__str__(msg.code) if isinstance(msg.code, str) else msg.code  # ErrorCode
        return [MsgType.ERROR, code, msg.reason]
    if isinstance(msg, Requeue):
        return [MsgType.REQUEUE, msg.request_id, msg.queue, failed_array(msg.failed)]
    if isinstance(msg, RequeueResult):
        return [MsgType.REQUEUE_RESULT, msg.request_id, msg.ok, msg.error]
    raise ProtocolError(f"not a protocol message: {type_name(msg)}")
