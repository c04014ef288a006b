"""The blobs the hub keeps in Redis: encoders and strict decoders. Pure, no I/O.

Every blob is one msgpack object (bin type on). A decoder takes exactly what its encoder
writes -- the same keys, exact types (a bool is not an int), bounded lengths -- and raises
``HubCorrupt`` naming the blob and what is wrong otherwise. Maps are written with their keys
in the order of the tables below, so the bytes are stable (the examples are checked by
``tests/hub/test_hub_format.py``).

Queue record (value of ``q:{host}``, field = queue name), the host's shared-memory values::

    key          msgpack type
    pushed       int >= 0    cumulative
    processed    int >= 0    cumulative
    failed       int >= 0    cumulative
    retried      int >= 0    cumulative
    active       int >= 0    gauge: jobs running now (connected workers' gauges)
    throughput   float >= 0  processed jobs/s over the host's rolling window (a gauge)
    runtime      map int -> int   sparse lifetime runtime histogram: bucket index
    wait         map int -> int   (0..histogram.NBUCKETS-1, ascending) -> count > 0

Example queue record: pushed 3, processed 2, failed 1, retried 0, active 1, throughput 0.5,
runtime buckets {10: 2}, wait {}::

    88 a6 70 75 73 68 65 64 03 a9 70 72 6f 63 65 73
    73 65 64 02 a6 66 61 69 6c 65 64 01 a7 72 65 74
    72 69 65 64 00 a6 61 63 74 69 76 65 01 aa 74 68
    72 6f 75 67 68 70 75 74 cb 3f e0 00 00 00 00 00
    00 a7 72 75 6e 74 69 6d 65 81 0a 02 a4 77 61 69
    74 80

History point (value of ``hm:``/``hh:{host}:{queue}``, field = the period's start), the
host's point (``History.points``: the host's files keep per-period runtime *summaries*) and,
when the publisher knows them, the period's runtime bucket counts, so that percentiles of a
period several hosts contributed to merge exactly (``docs/hub.md``, "Merging")::

    key          msgpack type
    t            int         start of the minute / hour, unix s
    pushed       int >= 0    \\
    processed    int >= 0     | jobs in that period
    failed       int >= 0    /
    runtime      map: count int >= 0, p50 p90 p95 p99 max (float, or nil when count is 0)
    buckets      OPTIONAL map int -> int: the period's sparse runtime bucket counts
                 (ascending index -> count > 0) whose sum is runtime.count; written only
                 when runtime.count > 0 and the publisher knows them

Compatibility: ``buckets`` was added after the first release; a point without it is the
same point as before (the same bytes), and this decoder takes both. A hub older than the
field refuses points that carry it (logged, that point skipped): upgrade the hub first.

Example point: t 1764633600, pushed 2, processed 1, failed 0, runtime count 0::

    85 a1 74 ce 69 2e 2c 00 a6 70 75 73 68 65 64 02
    a9 70 72 6f 63 65 73 73 65 64 01 a6 66 61 69 6c
    65 64 00 a7 72 75 6e 74 69 6d 65 86 a5 63 6f 75
    6e 74 00 a3 70 35 30 c0 a3 70 39 30 c0 a3 70 39
    35 c0 a3 70 39 39 c0 a3 6d 61 78 c0

Example point with buckets: t 1764633600, pushed 2, processed 2, failed 0, runtime count 2,
p50 p90 p95 p99 max 0.25, buckets {200: 2}::

    86 a1 74 ce 69 2e 2c 00 a6 70 75 73 68 65 64 02
    a9 70 72 6f 63 65 73 73 65 64 02 a6 66 61 69 6c
    65 64 00 a7 72 75 6e 74 69 6d 65 86 a5 63 6f 75
    6e 74 02 a3 70 35 30 cb 3f d0 00 00 00 00 00 00
    a3 70 39 30 cb 3f d0 00 00 00 00 00 00 a3 70 39
    35 cb 3f d0 00 00 00 00 00 00 a3 70 39 39 cb 3f
    d0 00 00 00 00 00 00 a3 6d 61 78 cb 3f d0 00 00
    00 00 00 00 a7 62 75 63 6b 65 74 73 81 cc c8 02

Host info (value of ``hosts``, field = host name), written by every publish::

    key          msgpack type
    seq          int >= 1    the publish that wrote it
    last_seen    float       the host's clock (unix s) when it built that publish
    started_at   float       when this collector process started
    version      str         qdash_mp version of the host
    pid          int         collector pid
    requeue      array of str    queues a retry can be routed to now ("*" = every queue,
                                 the collector has --requeue)

Example host info: seq 7, last_seen 1700000001.5, started_at 1700000000.0, version "0.1.0",
pid 42, requeue ["mail"]::

    86 a3 73 65 71 07 a9 6c 61 73 74 5f 73 65 65 6e
    cb 41 d9 54 fc 40 60 00 00 aa 73 74 61 72 74 65
    64 5f 61 74 cb 41 d9 54 fc 40 00 00 00 a7 76 65
    72 73 69 6f 6e a5 30 2e 31 2e 30 a3 70 69 64 2a
    a7 72 65 71 75 65 75 65 91 a4 6d 61 69 6c

Workers (value of ``w:{host}``): an array of maps, each exactly a ``/queues/api/workers``
row (``WorkerView.to_dict``: id, pid, host, name, queues, connected_at, last_seen, active
[maps of queue, id, name, started_at], state, can_requeue). Example: ``[]`` is ``90``.

Failed entries, commands and results (what the failed list and the hub's commands exchange)
are in ``qdash_mp.hub.format_failed``; the checks both modules decode with in
``qdash_mp.hub.format_checks``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from qdash_mp.hub.format_checks import (
    MAX_BLOB,
    check_bool,
    check_buckets,
    check_float,
    check_int,
    check_list,
    check_map,
    check_str,
    corrupt,
    load,
)
from qdash_mp.records import MAX_ID, MAX_NAME
from qdash_mp.strict_msgpack import packb

__all__ = [
    "MAX_BLOB",
    "HostInfo",
    "QueueRecord",
    "decode_host",
    "decode_point",
    "decode_queue",
    "decode_workers",
    "encode_host",
    "encode_point",
    "encode_queue",
    "encode_workers",
    "sparse",
]

_SUMMARY_KEYS: Final = ("count", "p50", "p90", "p95", "p99", "max")
_WORKER_KEYS: Final = (
    "id",
    "pid",
    "host",
    "name",
    "queues",
    "connected_at",
    "last_seen",
    "active",
    "state",
    "can_requeue",
)
_ACTIVE_KEYS: Final = ("queue", "id", "name", "started_at")


def sparse(dense: Sequence[int]) -> dict[int, int]:
    """``{bucket: count}`` of the non-zero buckets of a dense histogram, ascending."""
    return {i: n for i, n in enumerate(dense) if n}


# --------------------------------------------------------------------------- queue record


@dataclass(frozen=True, slots=True)
class QueueRecord:
    """One queue of one host, as the hub keeps it (see the module docstring)."""

    pushed: int = 0
    processed: int = 0
    failed: int = 0
    retried: int = 0
    active: int = 0
    throughput: float = 0.0
    runtime: dict[int, int] = field(default_factory=dict)
    wait: dict[int, int] = field(default_factory=dict)


_QUEUE_KEYS: Final = (
    "pushed",
    "processed",
    "failed",
    "retried",
    "active",
    "throughput",
    "runtime",
    "wait",
)


def encode_queue(r: QueueRecord) -> bytes:
    return packb(
        {
            "pushed": r.pushed,
            "processed": r.processed,
            "failed": r.failed,
            "retried": r.retried,
            "active": r.active,
            "throughput": float(r.throughput),
            "runtime": dict(sorted(r.runtime.items())),
            "wait": dict(sorted(r.wait.items())),
        },
        "queue record",
    )


def decode_queue(data: bytes) -> QueueRecord:
    what = "queue record"
    m = check_map(load(data, what), _QUEUE_KEYS, what)
    return QueueRecord(
        pushed=check_int(m["pushed"], f"{what} pushed"),
        processed=check_int(m["processed"], f"{what} processed"),
        failed=check_int(m["failed"], f"{what} failed"),
        retried=check_int(m["retried"], f"{what} retried"),
        active=check_int(m["active"], f"{what} active"),
        throughput=check_float(m["throughput"], f"{what} throughput", 0.0),
        runtime=check_buckets(m["runtime"], f"{what} runtime"),
        wait=check_buckets(m["wait"], f"{what} wait"),
    )


# --------------------------------------------------------------------------- history point

_POINT_KEYS: Final = ("t", "pushed", "processed", "failed", "runtime")
_POINT_OPTIONAL: Final = ("buckets",)


def encode_point(point: Mapping[str, Any], buckets: Mapping[int, int] | None = None) -> bytes:
    """A history point as ``History.points`` returns it, with the period's runtime
    ``buckets`` when known (``point["buckets"]`` is used when ``buckets`` is not given);
    checked by decoding it again. Empty buckets (a period without runtimes) are not written."""
    rt = point["runtime"]
    if buckets is None:
        buckets = point.get("buckets")
    out: dict[str, Any] = {
        "t": point["t"],
        "pushed": point["pushed"],
        "processed": point["processed"],
        "failed": point["failed"],
        "runtime": {k: rt[k] for k in _SUMMARY_KEYS},
    }
    if buckets:
        out["buckets"] = dict(sorted(buckets.items()))
    data = packb(out, "history point")
    decode_point(data)
    return data


def decode_point(data: bytes) -> dict[str, Any]:
    """The point's map; ``"buckets"`` (``{index: count}``) is there only when written."""
    what = "history point"
    value = load(data, what)
    keys = _POINT_KEYS + _POINT_OPTIONAL if type(value) is dict and len(value) == 6 else _POINT_KEYS
    m = check_map(value, keys, what)
    check_int(m["t"], f"{what} t", -(2**63))
    for k in ("pushed", "processed", "failed"):
        check_int(m[k], f"{what} {k}")
    rt = check_map(m["runtime"], _SUMMARY_KEYS, f"{what} runtime")
    count = check_int(rt["count"], f"{what} runtime count")
    for k in _SUMMARY_KEYS[1:]:
        v = rt[k]
        if count == 0:
            if v is not None:
                raise corrupt(f"{what} runtime {k}", f"must be nil when count is 0, not {v!r}")
        else:
            check_float(v, f"{what} runtime {k}", 0.0)
    if "buckets" in m:
        b = check_buckets(m["buckets"], f"{what} buckets")
        if not b or sum(b.values()) != count:
            raise corrupt(
                f"{what} buckets", f"must count runtime.count ({count}), not {sum(b.values())}"
            )
    return m


# --------------------------------------------------------------------------- host info


@dataclass(frozen=True, slots=True)
class HostInfo:
    """What the hub knows of a host besides its queues (see the module docstring)."""

    seq: int
    last_seen: float
    started_at: float
    version: str
    pid: int
    requeue: tuple[str, ...] = ()


_HOST_KEYS: Final = ("seq", "last_seen", "started_at", "version", "pid", "requeue")


def encode_host(h: HostInfo) -> bytes:
    return packb(
        {
            "seq": h.seq,
            "last_seen": float(h.last_seen),
            "started_at": float(h.started_at),
            "version": h.version,
            "pid": h.pid,
            "requeue": list(h.requeue),
        },
        "host info",
    )


def decode_host(data: bytes) -> HostInfo:
    what = "host info"
    m = check_map(load(data, what), _HOST_KEYS, what)
    requeue = check_list(m["requeue"], f"{what} requeue")
    return HostInfo(
        seq=check_int(m["seq"], f"{what} seq", 1),
        last_seen=check_float(m["last_seen"], f"{what} last_seen"),
        started_at=check_float(m["started_at"], f"{what} started_at"),
        version=check_str(m["version"], f"{what} version", 0, MAX_NAME),
        pid=check_int(m["pid"], f"{what} pid"),
        requeue=tuple(check_str(q, f"{what} requeue entry", 1, MAX_NAME) for q in requeue),
    )


# --------------------------------------------------------------------------- workers


def _worker_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in _WORKER_KEYS}
    # times as floats whatever clock made them (an injected clock may give ints)
    out["connected_at"] = float(out["connected_at"])
    out["last_seen"] = float(out["last_seen"])
    out["active"] = [
        {k: job[k] for k in _ACTIVE_KEYS} | {"started_at": float(job["started_at"])}
        for job in out["active"]
    ]
    return out


def encode_workers(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The ``/queues/api/workers`` rows (``WorkerView.to_dict()``), checked on the way;
    times are written as floats."""
    data = packb([_worker_row(row) for row in rows], "workers")
    decode_workers(data)
    return data


def decode_workers(data: bytes) -> list[dict[str, Any]]:
    what = "workers"
    rows = check_list(load(data, what), what)
    for i, row in enumerate(rows):
        w = f"{what}[{i}]"
        check_map(row, _WORKER_KEYS, w)
        check_str(row["id"], f"{w} id", 0, MAX_ID)
        check_int(row["pid"], f"{w} pid")
        check_str(row["host"], f"{w} host", 0, MAX_NAME)
        check_str(row["name"], f"{w} name", 0, MAX_ID)
        for q in check_list(row["queues"], f"{w} queues"):
            check_str(q, f"{w} queue", 0, MAX_NAME)
        check_float(row["connected_at"], f"{w} connected_at")
        check_float(row["last_seen"], f"{w} last_seen")
        for j, job in enumerate(check_list(row["active"], f"{w} active")):
            a = f"{w} active[{j}]"
            check_map(job, _ACTIVE_KEYS, a)
            check_str(job["queue"], f"{a} queue", 0, MAX_NAME)
            check_str(job["id"], f"{a} id", 0, MAX_ID)
            check_str(job["name"], f"{a} name", 0, MAX_ID)
            check_float(job["started_at"], f"{a} started_at")
        if row["state"] not in ("connected", "gone"):
            raise corrupt(f"{w} state", f"must be 'connected' or 'gone', not {row['state']!r}")
        check_bool(row["can_requeue"], f"{w} can_requeue")
    return rows
