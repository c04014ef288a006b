"""A failed job -> its packed FAILED record, every field made valid by construction.

Called by ``Client.on_failed`` (in the worker's thread, not the hot path): the job is
snapshotted and packed right away, so later changes to the worker's objects cannot leak in.
Fields of the wrong type or out of range are sanitised (an id is invented, a text cut, a bad
timestamp dropped), a payload that is not plain msgpack data or too big is replaced by a
short text saying so, and a str that UTF-8 cannot encode is escaped.
"""

from __future__ import annotations

import logging
import math
import time
import uuid

from qdash_mp.errors import ProtocolError
from qdash_mp.failed import describe_error
from qdash_mp.models import Job
from qdash_mp.throttle import LogThrottle
from qdash_mp.wire import (
    MAX_ID,
    MAX_INT,
    MAX_TIMESTAMP,
    pack_failed_fields,
    pack_payload,
)

__all__ = ["pack_failed_job", "utf8_ok"]

MAX_RECORD = 8 * 1024 * 1024
"""A packed failed job bigger than this loses its payload (and long texts are cut)."""

MAX_TEXT = 64 * 1024
"""Error and traceback texts are cut to this many characters if a record is too big."""


def pack_failed_job(
    queue: str, job: Job, error: BaseException | str, throttle: LogThrottle
) -> bytes:
    """The FAILED record of ``job`` failing on ``queue`` (a checked name) now, packed."""
    if type(error) is str:
        text, trace = error, ""
    else:
        if not isinstance(error, BaseException | str):
            error = repr(error)
        text, trace = describe_error(error)
    # Every field is made valid here, by construction (exact types, in range; what is
    # not is sanitised), and the FAILED array is packed once, as the collector will
    # journal it: only the payload needs a check.
    job_id = getattr(job, "id", None)
    if type(job_id) is not str or not 0 < len(job_id) <= MAX_ID:
        job_id = _job_id(job_id)
    try:
        payload_raw = pack_payload(getattr(job, "payload", None))
    except ProtocolError as exc:
        throttle.log(
            "bad-payload",
            logging.WARNING,
            "qdash_mp client: payload of failed job %r replaced: %s",
            job_id,
            exc,
        )
        payload_raw = pack_payload(_utf8(f"<payload not sent: {exc}>"))
    name = getattr(job, "name", "")
    if type(name) is not str or len(name) > MAX_ID:
        name = _text(name, MAX_ID)
    attempts = getattr(job, "attempts", 0)
    if type(attempts) is not int or not -MAX_INT <= attempts <= MAX_INT:
        attempts = _attempts(attempts)
    enqueued_at = getattr(job, "enqueued_at", None)
    if enqueued_at is not None and not (
        type(enqueued_at) is float and -MAX_TIMESTAMP <= enqueued_at <= MAX_TIMESTAMP
    ):
        enqueued_at = _timestamp(enqueued_at)
    queue = str.__str__(queue)  # checked when first counted
    failed_at = time.time()
    try:
        packed = pack_failed_fields(
            job_id, name, payload_raw, attempts, enqueued_at, queue, text, trace, failed_at
        )
    except ProtocolError:  # a str UTF-8 cannot encode (a lone surrogate)
        job_id, name, text, trace = _utf8(job_id), _utf8(name), _utf8(text), _utf8(trace)
        packed = pack_failed_fields(
            job_id, name, payload_raw, attempts, enqueued_at, queue, text, trace, failed_at
        )
    if len(packed) > MAX_RECORD:
        payload_raw = pack_payload(f"<payload not sent: record of {len(packed)} bytes is too big>")
        text, trace = text[:MAX_TEXT], trace[-MAX_TEXT:]
        packed = pack_failed_fields(
            job_id, name, payload_raw, attempts, enqueued_at, queue, text, trace, failed_at
        )
    return packed


def _text(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return str.__str__(text)[:limit]


def _job_id(value: object) -> str:
    return _text(value, MAX_ID) or uuid.uuid4().hex


def _attempts(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT:
        return int(value)
    return 0


def _timestamp(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        ts = float(value)
        if math.isfinite(ts) and abs(ts) <= MAX_TIMESTAMP:  # a datetime-able second
            return ts
    return None


def utf8_ok(text: str) -> bool:
    """Can ``text`` travel as a msgpack str (no lone surrogates)?"""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
