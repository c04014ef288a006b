"""The checks every hub blob decoder is made of (``qdash_mp.hub.format``,
``qdash_mp.hub.format_failed``). Pure.

Each takes a decoded value and the name of what it is (for the message), returns the value
with its exact type (a bool is not an int, a map has exactly the keys in order) or raises
``HubCorrupt`` naming the blob and what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

from qdash_mp.errors import HubCorrupt, ProtocolError
from qdash_mp.histogram import NBUCKETS
from qdash_mp.strict_msgpack import unpackb

__all__ = [
    "MAX_BLOB",
    "MAX_ITEMS",
    "check_bool",
    "check_buckets",
    "check_float",
    "check_int",
    "check_list",
    "check_map",
    "check_str",
    "corrupt",
    "load",
]

MAX_BLOB: Final = 64 * 1024 * 1024
"""Largest blob a decoder accepts (bytes of any str/bin inside it, too)."""
MAX_ITEMS: Final = 1_000_000
"""Most items (map entries, array elements) in one blob."""


def corrupt(what: str, why: str) -> HubCorrupt:
    """The error for blob ``what``, saying ``why``."""
    return HubCorrupt(f"hub {what}: {why}")


def load(data: bytes, what: str) -> object:
    """The msgpack object in ``data`` (bounded by ``MAX_BLOB`` and ``MAX_ITEMS``)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise corrupt(what, f"expected bytes, not {type(data).__name__}")
    try:
        return unpackb(bytes(data), MAX_BLOB, MAX_ITEMS)
    except ProtocolError as exc:
        raise corrupt(what, str(exc)) from None


def check_map(value: object, keys: Sequence[str], what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise corrupt(what, f"must be a map, not {type(value).__name__}")
    if list(value) != list(keys):
        raise corrupt(what, f"keys must be {list(keys)}, not {list(value)}")
    return value


def check_int(value: object, what: str, lo: int = 0) -> int:
    if type(value) is not int or value < lo:
        raise corrupt(what, f"must be an int >= {lo}, not {value!r}")
    return value


def check_float(value: object, what: str, lo: float = -math.inf) -> float:
    if type(value) is not float or not math.isfinite(value) or value < lo:
        raise corrupt(what, f"must be a finite float >= {lo}, not {value!r}")
    return value


def check_str(value: object, what: str, lo: int = 0, hi: int = MAX_BLOB) -> str:
    if type(value) is not str or not lo <= len(value) <= hi:
        raise corrupt(what, f"must be a str of {lo}..{hi} characters, not {value!r:.80}")
    return value


def check_bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise corrupt(what, f"must be a bool, not {value!r}")
    return value


def check_list(value: object, what: str) -> list[Any]:
    if type(value) is not list:
        raise corrupt(what, f"must be an array, not {type(value).__name__}")
    return value


def check_buckets(value: object, what: str) -> dict[int, int]:
    if type(value) is not dict:
        raise corrupt(what, f"must be a map, not {type(value).__name__}")
    last = -1
    for k, v in value.items():
        if type(k) is not int or not last < k < NBUCKETS:
            raise corrupt(what, f"bucket {k!r} is not an ascending index below {NBUCKETS}")
        if type(v) is not int or v <= 0:
            raise corrupt(what, f"bucket {k} count must be an int > 0, not {v!r}")
        last = k
    return value
