"""The job payload: plain msgpack data, checked before it is packed and after it is unpacked.

A FAILED record (``qdash_mp.records``) carries its job's payload as ``payload_raw``, a bin
holding exactly one msgpack object: nil, bool, int, float, str, bin, arrays and maps of those
(map keys scalars), nested at most ``MAX_DEPTH`` levels, no ext types, no array or map longer
than ``MAX_ITEMS``. ``pack_payload`` makes those bytes (checking the value first, since a
packer takes more than a decoder gives back); ``decode_payload`` reads them back under the
same limits. Pure: like ``records``, it imports nothing of the wire or the journal.
"""

from __future__ import annotations

from typing import Any

import msgpack

from qdash_mp.errors import ProtocolError
from qdash_mp.strict_msgpack import (
    DECODE_ERRORS,
    msgpack_error,
    packb,
    packb_plain,
    refuse_ext,
    type_name,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_ITEMS",
    "check_payload",
    "decode_payload",
    "pack_payload",
    "unpack_payload",
    "within_depth",
]

MAX_ITEMS = 1_000_000
"""Default upper bound of any msgpack array or map length (in a frame or a payload)."""

MAX_DEPTH = 32
"""Default upper bound of array/map nesting inside a job payload."""

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
                    raise ProtocolError(f"{what} has a map key of type {type_name(k)}")
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
            raise ProtocolError(f"{what} holds a {type_name(v)}, which is not plain msgpack data")


def within_depth(value: list[Any] | dict[Any, Any], max_depth: int) -> bool:
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


def unpack_payload(raw: bytes, max_items: int) -> Any:
    """``raw`` decoded under a decoder's limits; raises what msgpack raises.

    ``unpackb`` bounds every str, bin, array and map length by the input's size by itself;
    only a payload of more than ``max_items`` bytes needs the item limit given (fewer
    keywords: a third off the cost of the call).
    """
    if len(raw) <= max_items:
        return msgpack.unpackb(raw, strict_map_key=False, max_ext_len=0, ext_hook=refuse_ext)
    return msgpack.unpackb(
        raw,
        strict_map_key=False,
        max_ext_len=0,
        ext_hook=refuse_ext,
        max_array_len=max_items,
        max_map_len=max_items,
    )


def decode_payload(raw: bytes, what: str, max_items: int, max_depth: int) -> Any:
    """The job payload in ``raw`` if it is one msgpack object a decoder takes as one."""
    try:
        value = unpack_payload(raw, max_items)
    except DECODE_ERRORS as exc:
        raise ProtocolError(
            f"{what}.payload_raw is not a valid payload: {msgpack_error(exc)}"
        ) from None
    t = type(value)
    if (t is list or t is dict) and not within_depth(value, max_depth):
        raise ProtocolError(f"{what}.payload nests deeper than {max_depth} levels")
    return value


def pack_payload(value: Any, *, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH) -> bytes:
    """The msgpack bytes of a job payload (a FAILED's ``payload_raw``), checked.

    ``ProtocolError`` unless ``value`` is plain data (``check_payload``) that a decoder with
    these limits takes back; a tuple becomes an array. Packing at the moment of failure
    snapshots the payload: later changes to the worker's objects do not leak in.
    """
    if type(value) in _SCALARS:
        return packb_plain(value, "payload")
    check_payload(value, max_depth, max_items=max_items)
    return packb(value, "payload")
