"""Protocol v2 additions: HELLO ``info`` and the BATCH lifecycle extension. Pure, no I/O.

HELLO v2 is ``[1, 2, client_id, pid, host, requeue, info]`` and BATCH v2 may carry a 5th
element ``ext``; both are maps whose unknown keys are ignored (room to grow without a new
version). Every key is optional::

    info = {"name": str (0..255 chars),
            "track": nil | ["*"] | [queue, ...]}        job tracking asked for these queues

    ext  = {"h": {queue: [runtime, wait]}   each a map {bucket: n}, bucket 0..417,
                                            n 1..MAX_DELTA: bucket count DELTAS (counters)
            "s": {queue: n}                 jobs started, delta 0..MAX_DELTA (a counter)
            "a": {queue: n}                 active jobs of this client NOW, 0..2**31 (a gauge)
            "j": [[queue, job_id, name, started_at], ...]   at most 100, with "a"
            "t": [[kind, queue, job_id, name, at, runtime], ...]   at most 10,000;
                 kind "p" pushed | "s" started | "d" done | "f" failed; runtime float | nil}

Counters (``h``, ``s``) are deduplicated by the batch ``seq`` exactly like BATCH counters;
gauges (``a``, ``j``) are full snapshots (absent: unchanged); tracking events (``t``) are best
effort. Bounds are checked at decode with a ``ProtocolError`` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeAlias

from qdash_mp.errors import ProtocolError
from qdash_mp.histogram import NBUCKETS
from qdash_mp.records import MAX_ID, MAX_NAME, MAX_TIMESTAMP
from qdash_mp.strict_msgpack import expect_array, expect_str, type_name

__all__ = [
    "EVENT_KINDS",
    "MAX_ACTIVE",
    "MAX_EVENTS",
    "MAX_JOBS",
    "ActiveRow",
    "EventRow",
    "Ext",
    "Sparse",
    "check_ext",
    "info_map",
    "parse_ext",
    "parse_info",
]

MAX_JOBS = 100
"""Active jobs one BATCH lists (``"j"``): the first 100 by start time."""

MAX_EVENTS = 10_000
"""Tracking events one BATCH carries (``"t"``); a client drops (and counts) any excess."""

MAX_ACTIVE = 2**31
"""Largest active-jobs gauge (``"a"``)."""

EVENT_KINDS = frozenset(("p", "s", "d", "f"))
"""``"t"`` kinds: pushed, started, done (processed), failed."""

Sparse: TypeAlias = Mapping[int, int]
ActiveRow: TypeAlias = tuple[str, str, str, float]
EventRow: TypeAlias = tuple[str, str, str, str, float, float | None]


class Ext:
    """The decoded BATCH extension (what ``Batch`` gets as keyword fields)."""

    __slots__ = ("active", "events", "hist", "jobs", "started")

    def __init__(self) -> None:
        self.hist: dict[str, tuple[Sparse, Sparse]] = {}
        self.started: dict[str, int] = {}
        self.active: dict[str, int] | None = None
        self.jobs: tuple[ActiveRow, ...] | None = None
        self.events: tuple[EventRow, ...] = ()


def _queue(value: object, what: str) -> str:
    if type(value) is str and 0 < len(value) <= MAX_NAME:
        return value
    return expect_str(value, what, 1, MAX_NAME)


def _count(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an int, not {type_name(value)}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{what} must be in {lo}..{hi}, not {value}")
    return value


def _time(value: object, what: str) -> float:
    # A float64 as every packer writes Python floats; an int is accepted (a whole second).
    if type(value) is int and 0 <= value <= MAX_TIMESTAMP:
        return float(value)
    if type(value) is not float:
        raise ProtocolError(f"{what} must be a float, not {type_name(value)}")
    if not (math.isfinite(value) and 0.0 <= value <= MAX_TIMESTAMP):
        raise ProtocolError(f"{what} must be a finite number in 0..{MAX_TIMESTAMP}, not {value}")
    return value


def _map(value: object, what: str, max_items: int) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{what} must be a map, not {type_name(value)}")
    if len(value) > max_items:
        raise ProtocolError(f"{what} has more than {max_items} entries")
    return value


def _sparse(value: object, what: str, max_delta: int) -> dict[int, int]:
    m = _map(value, what, NBUCKETS)
    out: dict[int, int] = {}
    for bucket, n in m.items():
        b = _count(bucket, f"{what} bucket", 0, NBUCKETS - 1)
        out[b] = _count(n, f"{what}[{b}]", 1, max_delta)
    return out


def _queue_ints(value: object, what: str, max_items: int, hi: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for q, n in _map(value, what, max_items).items():
        queue = _queue(q, f"{what} key")
        out[queue] = _count(n, f"{what}[{queue!r}]", 0, hi)
    return out


def parse_ext(value: object, max_items: int, max_delta: int) -> Ext:
    """BATCH's 5th element checked; ``ProtocolError`` says what is wrong."""
    ext = Ext()
    m = _map(value, "BATCH ext", max_items)
    h = m.get("h")
    if h is not None:
        for q, pair in _map(h, "BATCH ext h", max_items).items():
            queue = _queue(q, "BATCH ext h key")
            what = f"BATCH ext h[{queue!r}]"
            items = expect_array(pair, what)
            if len(items) != 2:
                raise ProtocolError(
                    f"{what} must have 2 elements (runtime, wait), not {len(items)}"
                )
            ext.hist[queue] = (
                _sparse(items[0], f"{what} runtime", max_delta),
                _sparse(items[1], f"{what} wait", max_delta),
            )
    s = m.get("s")
    if s is not None:
        ext.started = _queue_ints(s, "BATCH ext s", max_items, max_delta)
    a = m.get("a")
    if a is not None:
        ext.active = _queue_ints(a, "BATCH ext a", max_items, MAX_ACTIVE)
    j = m.get("j")
    if j is not None:
        rows = expect_array(j, "BATCH ext j")
        if len(rows) > MAX_JOBS:
            raise ProtocolError(f"BATCH ext j has more than {MAX_JOBS} jobs")
        jobs: list[ActiveRow] = []
        for i, row in enumerate(rows):
            what = f"BATCH ext j[{i}]"
            r = expect_array(row, what)
            if len(r) != 4:
                raise ProtocolError(f"{what} must have 4 elements, not {len(r)}")
            jobs.append(
                (
                    _queue(r[0], f"{what} queue"),
                    expect_str(r[1], f"{what} job_id", 1, MAX_ID),
                    expect_str(r[2], f"{what} name", 0, MAX_ID),
                    _time(r[3], f"{what} started_at"),
                )
            )
        ext.jobs = tuple(jobs)
    t = m.get("t")
    if t is not None:
        rows = expect_array(t, "BATCH ext t")
        if len(rows) > MAX_EVENTS:
            raise ProtocolError(f"BATCH ext t has more than {MAX_EVENTS} events")
        events: list[EventRow] = []
        for i, row in enumerate(rows):
            what = f"BATCH ext t[{i}]"
            r = expect_array(row, what)
            if len(r) != 6:
                raise ProtocolError(f"{what} must have 6 elements, not {len(r)}")
            kind = r[0]
            if type(kind) is not str or kind not in EVENT_KINDS:
                raise ProtocolError(f"{what} kind must be one of 'p', 's', 'd', 'f', not {kind!r}")
            runtime = r[5]
            if runtime is not None:
                runtime = _time(runtime, f"{what} runtime")
            events.append(
                (
                    kind,
                    _queue(r[1], f"{what} queue"),
                    expect_str(r[2], f"{what} job_id", 1, MAX_ID),
                    expect_str(r[3], f"{what} name", 0, MAX_ID),
                    _time(r[4], f"{what} at"),
                    runtime,
                )
            )
        ext.events = tuple(events)
    return ext


def check_ext(
    hist: Mapping[str, tuple[Sparse, Sparse]],
    started: Mapping[str, int],
    active: Mapping[str, int] | None,
    jobs: Any,
    events: Any,
    max_delta: int,
) -> dict[str, Any] | None:
    """The ``ext`` map to pack for these fields (checked by the decoder's rules), or
    ``None`` when there is nothing to say (a v1-shaped BATCH)."""
    ext: dict[str, Any] = {}
    if hist:
        ext["h"] = {q: [dict(r), dict(w)] for q, (r, w) in hist.items()}
    if started:
        ext["s"] = dict(started)
    if active is not None:
        ext["a"] = dict(active)
    if jobs is not None:
        ext["j"] = [list(row) for row in jobs]
    if events:
        ext["t"] = [list(row) for row in events]
    if not ext:
        return None
    parse_ext(ext, 1_000_000, max_delta)
    return ext


def parse_info(value: object) -> tuple[str, tuple[str, ...] | None]:
    """HELLO v2 ``info`` checked: ``(name, track)``; ``track`` ``("*",)`` means all queues."""
    m = _map(value, "HELLO info", 64)
    name = m.get("name", "")
    name = expect_str(name, "HELLO info name", 0, MAX_NAME)
    track = m.get("track")
    if track is None:
        return name, None
    arr = expect_array(track, "HELLO info track")
    if not arr:
        raise ProtocolError("HELLO info track must be nil, ['*'] or a non-empty list of queues")
    return name, tuple(_queue(q, "HELLO info track entry") for q in arr)


def info_map(name: str, track: tuple[str, ...] | None) -> dict[str, Any]:
    """The HELLO v2 ``info`` map of ``name`` and ``track``."""
    return {"name": name, "track": None if track is None else list(track)}
