"""The failed-job and command blobs the hub keeps in Redis: encoders and strict decoders.
Pure, no I/O. The conventions (one msgpack object, exact keys and types, ``HubCorrupt``) and
the per-host state blobs are in ``qdash_mp.hub.format``; examples are checked by
``tests/hub/test_hub_format.py``.

Failed entry (value of ``fj:{host}``, field = job id): the FAILED record bytes exactly as
the host's journal keeps them (``qdash_mp.records``, 9-field array, payload as a bin), so
the hub shows and re-sends the very bytes the failing worker sent. Checked by
``records.unpack_failed``. Its score in ``fi:{host}`` and ``fall`` is its ``failed_at``.
``fall`` members are ``{host}\\x00{id}`` (UTF-8).

Command (an entry of the stream ``cmd:{host}``; stream fields, UTF-8 strings)::

    field  content
    op     "retry" or "forget"
    id     failed job id (1..1024 characters)
    req    request id chosen by the hub (1..64 characters; the result key is res:{req})
    by     who asked (free text, at most 255 characters; may be empty)
    at     when (unix s, decimal float text)

Result (value of ``res:{req}``, TTL 1 h)::

    key          msgpack type
    ok           bool        the command did what was asked (or it had been done before)
    already      bool        the id was no longer on the host: done before (a retry that
                             ran before a crash) or forgotten; nothing was done now
    error        str or nil  why not, when ok is false (the job stays)
    op           str         the command's op
    id           str         the command's job id
    at           float       when the host finished it (unix s)

Example result: ok, not already, no error, op "retry", id "j1", at 1700000001.5::

    86 a2 6f 6b c3 a7 61 6c 72 65 61 64 79 c2 a5 65
    72 72 6f 72 c0 a2 6f 70 a5 72 65 74 72 79 a2 69
    64 a2 6a 31 a2 61 74 cb 41 d9 54 fc 40 60 00 00
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from qdash_mp.errors import ProtocolError
from qdash_mp.hub.format_checks import (
    MAX_BLOB,
    check_bool,
    check_float,
    check_map,
    check_str,
    corrupt,
    load,
)
from qdash_mp.records import MAX_ID, MAX_NAME, FailedRecord, unpack_failed
from qdash_mp.strict_msgpack import packb

__all__ = [
    "COMMAND_OPS",
    "MAX_REQ",
    "Command",
    "Result",
    "decode_command",
    "decode_failed",
    "decode_result",
    "encode_command",
    "encode_result",
    "fall_member",
    "split_fall_member",
]

MAX_REQ: Final = 64
COMMAND_OPS: Final = ("retry", "forget")


# --------------------------------------------------------------------------- failed entry


def decode_failed(data: bytes) -> FailedRecord:
    """The FAILED record of an ``fj:{host}`` value (``records.unpack_failed``'s checks)."""
    if not isinstance(data, bytes | bytearray):
        raise corrupt("failed entry", f"expected bytes, not {type(data).__name__}")
    try:
        return unpack_failed(bytes(data), max_size=MAX_BLOB)
    except ProtocolError as exc:
        raise corrupt("failed entry", str(exc)) from None


def fall_member(host: str, id: str) -> bytes:
    """The ``fall`` member of job ``id`` of ``host``."""
    return f"{host}\x00{id}".encode()


def split_fall_member(member: bytes) -> tuple[str, str]:
    """``(host, id)`` of a ``fall`` member."""
    try:
        host, sep, id = member.decode().partition("\x00")
    except (UnicodeDecodeError, AttributeError):
        raise corrupt("fall member", f"{member!r:.80} is not UTF-8 bytes") from None
    if not sep or not host or not id:
        raise corrupt("fall member", f"{member!r:.80} is not host NUL id")
    return host, id


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Command:
    """A hub -> host command (an entry of ``cmd:{host}``)."""

    op: str
    id: str
    req: str
    by: str = ""
    at: float = 0.0


def encode_command(c: Command) -> dict[str, str]:
    """The stream fields for ``XADD cmd:{host} * ...`` (checked by decoding them again)."""
    fields = {"op": c.op, "id": c.id, "req": c.req, "by": c.by, "at": repr(float(c.at))}
    decode_command({k.encode(): v.encode() for k, v in fields.items()})
    return fields


def decode_command(fields: Mapping[bytes, bytes]) -> Command:
    """The command in a stream entry's fields (as redis-py returns them: bytes)."""
    what = "command"
    if type(fields) is not dict:
        raise corrupt(what, f"must be a map of fields, not {type(fields).__name__}")
    try:
        m = {k.decode(): v.decode() for k, v in fields.items()}
    except (UnicodeDecodeError, AttributeError):
        raise corrupt(what, "fields must be UTF-8 bytes") from None
    if sorted(m) != ["at", "by", "id", "op", "req"]:
        raise corrupt(what, f"fields must be op, id, req, by, at, not {sorted(m)}")
    if m["op"] not in COMMAND_OPS:
        raise corrupt(f"{what} op", f"must be one of {COMMAND_OPS}, not {m['op']!r:.80}")
    try:
        at = float(m["at"])
    except ValueError:
        raise corrupt(f"{what} at", f"{m['at']!r:.80} is not a number") from None
    if not math.isfinite(at):
        raise corrupt(f"{what} at", f"{m['at']!r:.80} is not finite")
    return Command(
        op=m["op"],
        id=check_str(m["id"], f"{what} id", 1, MAX_ID),
        req=check_str(m["req"], f"{what} req", 1, MAX_REQ),
        by=check_str(m["by"], f"{what} by", 0, MAX_NAME),
        at=at,
    )


@dataclass(frozen=True, slots=True)
class Result:
    """A host's answer to a command (``res:{req}``)."""

    ok: bool
    already: bool
    error: str | None
    op: str
    id: str
    at: float


_RESULT_KEYS: Final = ("ok", "already", "error", "op", "id", "at")


def encode_result(r: Result) -> bytes:
    return packb(
        {
            "ok": r.ok,
            "already": r.already,
            "error": r.error,
            "op": r.op,
            "id": r.id,
            "at": float(r.at),
        },
        "result",
    )


def decode_result(data: bytes) -> Result:
    what = "result"
    m = check_map(load(data, what), _RESULT_KEYS, what)
    error = m["error"]
    if error is not None:
        check_str(error, f"{what} error")
    if m["op"] not in COMMAND_OPS:
        raise corrupt(f"{what} op", f"must be one of {COMMAND_OPS}, not {m['op']!r:.80}")
    return Result(
        ok=check_bool(m["ok"], f"{what} ok"),
        already=check_bool(m["already"], f"{what} already"),
        error=error,
        op=m["op"],
        id=check_str(m["id"], f"{what} id", 1, MAX_ID),
        at=check_float(m["at"], f"{what} at"),
    )
