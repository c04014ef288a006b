"""The FAILED record: one failed job, as the wire carries it and the journal stores it. Pure.

A FAILED record is a msgpack array of 9 fields (``FIELDS``), the same bytes in a BATCH frame
(``qdash_mp.wire``), in a REQUEUE frame and as the payload of the journal's FAILED record
(``qdash_mp.journal_format``). This module is its one definition: the row type
``FailedRecord``, the one check ``check_failed`` (exact types and ranges, then the payload),
and the packers. It imports nothing of the wire or the journal.

Fields, in order (``FIELDS``)::

    #  field        msgpack type and range
    0  job_id       str, 1..1024 characters (MAX_ID)
    1  name         str, 0..1024 characters
    2  payload_raw  bin: exactly one msgpack object, the job payload (below)
    3  attempts     int, -2**63..2**63-1
    4  enqueued_at  nil, or float64 in -MAX_TIMESTAMP..MAX_TIMESTAMP (Unix seconds)
    5  queue        str, 1..255 characters (MAX_NAME)
    6  error        str
    7  traceback    str, possibly empty
    8  failed_at    float64 in 0..MAX_TIMESTAMP (Unix seconds UTC; 253402300799 = year 9999)

The payload (the msgpack inside ``payload_raw``): nil, bool, int, float, str, bin, arrays
and maps of those (map keys scalars), nested at most ``MAX_DEPTH`` levels, no ext types,
nothing after the one object (``qdash_mp.payload`` checks, packs and decodes it).

One record, byte for byte: ``job_id="j1"``, ``name="send_email"``, payload ``{"to": "a@b"}``,
``attempts=1``, ``enqueued_at=1700000000.0``, ``queue="mail"``,
``error="ValueError: boom"``, ``traceback=""``, ``failed_at=1700000001.5`` (67 bytes)::

    99                                   fixarray, 9 elements
    a2 6a 31                             0 job_id       fixstr(2) "j1"
    aa 73 65 6e 64 5f 65 6d 61 69 6c     1 name         fixstr(10) "send_email"
    c4 08 81 a2 74 6f a3 61 40 62        2 payload_raw  bin8(8): {"to": "a@b"}
    01                                   3 attempts     1
    cb 41 d9 54 fc 40 00 00 00           4 enqueued_at  float64 1700000000.0
    a4 6d 61 69 6c                       5 queue        fixstr(4) "mail"
    b0 56 61 6c 75 65 45 72 72 6f 72 3a 20 62 6f 6f 6d
                                         6 error        fixstr(16) "ValueError: boom"
    a0                                   7 traceback    fixstr(0) ""
    cb 41 d9 54 fc 40 60 00 00           8 failed_at    float64 1700000001.5

The wire and the journal keep these bytes as they came (``PackedFailed``); only a check
decodes them. ``docs/protocol.md`` says why the payload is a bin and not inline.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

import msgpack

from qdash_mp.errors import ProtocolError
from qdash_mp.models import FailedJob, Job
from qdash_mp.payload import (
    MAX_DEPTH,
    MAX_ITEMS,
    check_payload,
    decode_payload,
    pack_payload,
    unpack_payload,
    within_depth,
)
from qdash_mp.strict_msgpack import (
    DECODE_ERRORS,
    MAX_INT,
    MIN_INT,
    expect_arity,
    expect_array,
    expect_float,
    expect_int,
    expect_str,
    packb,
    packb_plain,
    refuse_ext,
    type_name,
    unpackb,
)

__all__ = [
    "FIELDS",
    "MAX_DEPTH",
    "MAX_FRAME",
    "MAX_ID",
    "MAX_INT",
    "MAX_ITEMS",
    "MAX_NAME",
    "MAX_TIMESTAMP",
    "MIN_INT",
    "FailedMeta",
    "FailedRecord",
    "PackedFailed",
    "check_failed",
    "check_payload",
    "pack_failed",
    "pack_failed_fields",
    "pack_failed_record",
    "pack_payload",
    "unpack_failed",
]

FIELDS = (
    "job_id",
    "name",
    "payload_raw",
    "attempts",
    "enqueued_at",
    "queue",
    "error",
    "traceback",
    "failed_at",
)
"""The 9 fields of a FAILED array, in order: written once, here."""

MAX_FRAME = 16 * 1024 * 1024
"""Default upper bound of a frame body, and so of one packed record, in bytes."""

MAX_NAME = 255
"""Longest queue name (and, on the wire, host name or error code), in characters."""

MAX_ID = 1024
"""Longest job id or job name, in characters."""

MAX_TIMESTAMP = 253402300799.0
"""``9999-12-31T23:59:59Z``: the last second a ``datetime`` can hold."""

# --------------------------------------------------------------------------- the row


@dataclass(frozen=True, slots=True)
class FailedRecord:
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
    ) -> FailedRecord:
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
    def from_failed_job(
        cls, failed: FailedJob, *, payload_raw: bytes | None = None
    ) -> FailedRecord:
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
        return decode_payload(self.payload_raw, "FAILED", MAX_ITEMS, MAX_DEPTH)

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

What a decoded ``Batch`` carries and the journal stores as it came. A plain tuple on purpose:
the cyclic GC stops tracking it at its first look (why that matters: docs/protocol.md).
"""


FailedMeta: TypeAlias = tuple[str, str, str]
"""``(queue, name, error)`` of a FAILED array (fields 5, 1, 6): what the journal's filter
columns index. A decoder that checked the array hands them on (``Batch.metas``) so that the
journal does not decode the bytes again for them."""


def pack_failed_record(failed: FailedRecord) -> PackedFailed:
    """``failed`` as a ``Batch`` carries it: ``(pack_failed(failed), job_id, failed_at)``."""
    return pack_failed(failed), failed.job_id, failed.failed_at


# --------------------------------------------------------------------------- checks


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
    (``first_bad_failed``); only a bad one is gone through field by field for the reason.
    """
    if first_bad_failed((obj,), max_items, max_depth) < 0:
        return ""
    try:
        arr = expect_array(obj, what)
        expect_arity(arr, 9, what)
        job_id, name, raw, attempts, enqueued_at, queue, error, trace, failed_at = arr
        expect_str(job_id, f"{what}.job_id", 1, MAX_ID)
        expect_str(name, f"{what}.name", 0, MAX_ID)
        if type(raw) is not bytes:
            raise ProtocolError(f"{what}.payload_raw must be a bin, not {type_name(raw)}")
        expect_int(attempts, f"{what}.attempts")
        if enqueued_at is not None:
            expect_float(enqueued_at, f"{what}.enqueued_at", -MAX_TIMESTAMP, MAX_TIMESTAMP)
        expect_str(queue, f"{what}.queue", 1, MAX_NAME)
        expect_str(error, f"{what}.error")
        expect_str(trace, f"{what}.traceback")
        expect_float(failed_at, f"{what}.failed_at", 0.0, MAX_TIMESTAMP)
        decode_payload(raw, what, max_items, max_depth)
    except ProtocolError as exc:
        return str(exc)
    return ""  # not reached: a valid array takes the fast path


def first_bad_failed(arrays: Iterable[object], max_items: int, max_depth: int) -> int:
    """Index of the first of ``arrays`` that is not a valid FAILED array, or -1 if all are.

    The fast path of ``check_failed`` (which says what is wrong), for many arrays in one
    call: per array one expression of exact type checks and one ``unpackb`` of the payload,
    inline, since a Python call per array would cost as much as the checks.
    """
    unpackb = msgpack.unpackb
    unpack_big = unpack_payload
    refuse = refuse_ext
    within = within_depth
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
        try:  # unpack_payload, inline
            if len(raw) <= max_items:
                value = unpackb(raw, strict_map_key=False, max_ext_len=0, ext_hook=refuse)
            else:
                value = unpack_big(raw, max_items)
        except DECODE_ERRORS:
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


def failed_record(value: object, what: str, max_items: int, max_depth: int) -> FailedRecord:
    why = check_failed(value, what, max_items=max_items, max_depth=max_depth)
    if why:
        raise ProtocolError(why)
    return FailedRecord(*value)  # type: ignore[misc]


def failed_array(f: FailedRecord) -> list[Any]:
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


# --------------------------------------------------------------------------- packing
def pack_failed(
    failed: FailedRecord, *, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH
) -> bytes:
    """The msgpack bytes of one FAILED array, checked (``check_failed``), for ``encode_batch``."""
    arr = failed_array(failed)
    why = check_failed(arr, max_items=max_items, max_depth=max_depth)
    if why:
        raise ProtocolError(why)
    return packb(arr, "FAILED")


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
    return packb_plain(
        [job_id, name, payload_raw, attempts, enqueued_at, queue, error, traceback, failed_at],
        "FAILED",
    )


def unpack_failed(
    data: bytes,
    *,
    max_size: int = MAX_FRAME,
    max_items: int = MAX_ITEMS,
    max_depth: int = MAX_DEPTH,
) -> FailedRecord:
    """The ``FailedRecord`` in ``data`` as made by ``pack_failed`` (checked strictly)."""
    return failed_record(unpackb(data, max_size, max_items), "FAILED", max_items, max_depth)
