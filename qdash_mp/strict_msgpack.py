"""Strict msgpack: exact-type field checks and bounded packing/unpacking. Pure, no I/O.

Shared by the FAILED record (``qdash_mp.records``) and the wire messages (``qdash_mp.wire``):
every ``expect_*`` returns its value or raises ``ProtocolError`` naming the field (``what``)
and what was wrong. An int field takes a msgpack int and nothing else (a bool is *not* an
int here), a str field a msgpack str. ``unpackb`` bounds every length before allocating and
refuses ext types; every msgpack error comes out as ``ProtocolError`` with a reason in words.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import msgpack

from qdash_mp.errors import ProtocolError

MAX_INT = 2**63 - 1
"""Largest int of a field (signed 64-bit)."""

MIN_INT = -(2**63)
"""Smallest int of a field (signed 64-bit)."""


# --------------------------------------------------------------------------- field checks


def type_name(value: object) -> str:
    return type(value).__name__


def expect_int(value: object, what: str, lo: int = MIN_INT, hi: int = MAX_INT) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an int, not {type_name(value)}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{what} must be in {lo}..{hi}, not {value}")
    return value


def expect_str(value: object, what: str, min_len: int = 0, max_len: int | None = None) -> str:
    if type(value) is not str:
        raise ProtocolError(f"{what} must be a str, not {type_name(value)}")
    if len(value) < min_len:
        raise ProtocolError(f"{what} must not be empty")
    if max_len is not None and len(value) > max_len:
        raise ProtocolError(f"{what} is longer than {max_len} characters ({len(value)})")
    return value


def expect_bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{what} must be a bool, not {type_name(value)}")
    return value


def expect_float(value: object, what: str, lo: float, hi: float) -> float:
    if type(value) is not float:
        raise ProtocolError(f"{what} must be a float, not {type_name(value)}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ProtocolError(f"{what} must be a finite number in {lo}..{hi}, not {value}")
    return value


def expect_array(value: object, what: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple) or isinstance(value, msgpack.ExtType):
        raise ProtocolError(f"{what} must be an array, not {type_name(value)}")
    return value


def expect_arity(arr: Sequence[Any], n: int, what: str) -> None:
    if len(arr) != n:
        raise ProtocolError(f"{what} must have {n} elements, not {len(arr)}")


# --------------------------------------------------------------------------- encoding

_local = threading.local()


def packb(obj: Any, what: str) -> bytes:
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


def packb_plain(obj: Any, what: str) -> bytes:
    """``packb`` for an object made only of exact plain types (str, bytes, int, float,
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


# --------------------------------------------------------------------------- decoding


def refuse_ext(code: int, data: bytes) -> object:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


DECODE_ERRORS = (
    ProtocolError,  # from refuse_ext
    ValueError,  # msgpack's own errors (ExtraData, StackError, FormatError...) and bad UTF-8
    TypeError,  # an array or a map as a map key (unhashable)
    OverflowError,
    RecursionError,
    msgpack.UnpackException,  # OutOfData, BufferFull
)


def msgpack_error(exc: BaseException) -> str:
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
    return text or f"invalid msgpack data ({type_name(exc)})"


def unpackb(body: bytes, max_size: int, max_items: int) -> object:
    """The one msgpack object in ``body``: str/bin lengths bounded by ``max_size``,
    array/map lengths by ``max_items``, ext types refused; ``ProtocolError`` otherwise."""
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
            ext_hook=refuse_ext,
        )
    except DECODE_ERRORS as exc:
        raise ProtocolError(f"undecodable body: {msgpack_error(exc)}") from None
