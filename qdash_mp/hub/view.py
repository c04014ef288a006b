"""The hub's read side: every host's published state, read from Redis per request, cached by seq.

The hub keeps no state of its own: what it shows is read from Redis on each request, and the
cache below is a pure function of what Redis holds (keyed by each host's seq), so a hub
restart loses nothing. A request costs::

    1 round trip   HGETALL qdash:hosts  +  XLEN qdash:cmd:{host} of each known host

and, when some host's seq moved, one load of the hosts that are behind (``HGETALL
qdash:q:{host}`` pipelined, then only the queue records whose bytes changed are decoded and
summarized, one host at a time so other requests get in between). The merged view is rebuilt
only when some host's ``(seq, queued, stale)`` changed; otherwise the same object is returned
(and the dashboard reuses its encoded JSON).

Stale-while-revalidate: a load is shared by every request (one in flight). While it runs, a
request is answered from the records already loaded if they were complete less than
``MAX_LAG`` (1 s) ago; otherwise it waits for the load. Hosts publish about once a second, so
the view is never more than ~2 s behind the hosts, and ``/queues/api/stats`` stays a Redis
round trip plus a cached JSON body however many hosts and queues there are (the load's cost,
~1000 records a second at 10 hosts x 100 busy queues, is paid once, not per request).

Throughput is each host's own (its rolling window, published as a gauge), summed over the
hosts that are not stale.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qdash_mp.errors import HubCorrupt
from qdash_mp.hub.format import HostInfo, QueueRecord, decode_host, decode_queue
from qdash_mp.hub.keys import Keys
from qdash_mp.hub.merge import STALE_AFTER, HostStats, Sum, is_stale, queue_stat, sum_records
from qdash_mp.models import QueueStat, StatsView

__all__ = ["MAX_LAG", "HostState", "HubReader", "HubStatsView"]

MAX_LAG = 1.0
_GIL_SLICE = 2
"""Seconds a view may be behind Redis while newer records are being read (see above)."""


log = logging.getLogger("qdash_mp.hub.view")


@dataclass(frozen=True, slots=True)
class HubStatsView(StatsView):
    """A ``StatsView`` over many hosts: ``queues``/``totals`` summed, plus ``hosts``.

    ``hosts`` maps a host name to ``{"last_seen", "stale", "seq", "queued", "queues": {queue:
    QueueStat dict}, "totals": QueueStat dict}``; ``to_dict`` adds it to the
    ``/queues/api/stats`` document (the dashboard serves whatever ``to_dict`` gives).
    """

    hosts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    body: bytes | None = field(default=None, repr=False, compare=False)
    """``to_dict()`` as JSON, encoded by the reader from cached parts (see ``to_json``)."""

    def to_dict(self) -> dict[str, Any]:
        doc = StatsView.to_dict(self)
        doc["hosts"] = self.hosts
        return doc

    def to_json(self) -> bytes:
        """The ``/queues/api/stats`` body: ``json.dumps(to_dict())`` without encoding the
        1,000 unchanged per-host rows again (the dashboard uses it when a view has it)."""
        if self.body is not None:
            return self.body
        return json.dumps(self.to_dict()).encode()


@dataclass(eq=False, slots=True)
class HostState:
    """One host as last read: its ``qdash:hosts`` entry and decoded queue records."""

    name: str
    raw_info: bytes = b""
    info: HostInfo | None = None
    loaded_seq: int = -1
    raw_records: dict[bytes, bytes] = field(default_factory=dict)
    records: dict[str, QueueRecord] = field(default_factory=dict)
    stats: HostStats | None = None
    queued: int = 0
    rows_json: tuple[tuple[int, bool], bytes] | None = None

    @property
    def seq(self) -> int:
        return self.info.seq if self.info is not None else 0

    @property
    def last_seen(self) -> float:
        return self.info.last_seen if self.info is not None else 0.0

    def _parts(self, stale: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        rows: dict[str, Any] = {}
        totals: dict[str, Any] = QueueStat("total").to_dict()
        if self.stats is not None:
            rows, totals = self.stats.rows, self.stats.totals_row
        if stale:  # a stale host's rates are not rates any more
            rows = {q: {**r, "throughput": 0.0} for q, r in rows.items()}
            totals = {**totals, "throughput": 0.0}
        return rows, totals

    def _head(self, stale: bool) -> dict[str, Any]:
        info = self.info
        return {
            "last_seen": self.last_seen,
            "stale": stale,
            "seq": self.loaded_seq,
            "queued": self.queued,
            "version": info.version if info is not None else None,
            "pid": info.pid if info is not None else None,
            "started_at": info.started_at if info is not None else None,
        }

    def row(self, stale: bool) -> dict[str, Any]:
        """The host's entry in ``"hosts"`` of ``/queues/api/stats``."""
        rows, totals = self._parts(stale)
        return {**self._head(stale), "queues": rows, "totals": totals}

    def row_json(self, stale: bool) -> bytes:
        """``row(stale)`` as JSON; the rows part is encoded once per loaded seq."""
        key = (self.loaded_seq, stale)
        if self.rows_json is None or self.rows_json[0] != key:
            rows, totals = self._parts(stale)
            part = json.dumps({"queues": rows, "totals": totals}).encode()
            self.rows_json = (key, part[1:-1])
        head = json.dumps(self._head(stale)).encode()
        return head[:-1] + b"," + self.rows_json[1] + b"}"


class HubReader:
    """Reads and caches the hosts' published state (see the module docstring)."""

    def __init__(
        self,
        redis: Any,
        keys: Keys | None = None,
        *,
        stale_after: float = STALE_AFTER,
        max_lag: float = MAX_LAG,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.stale_after = stale_after
        self.max_lag = max_lag
        self.clock = clock
        self._hosts: dict[str, HostState] = {}
        self._views: dict[tuple[Any, ...], HubStatsView] = {}
        self._loading: asyncio.Task[None] | None = None
        self._snap: _Snapshot | None = None

    # -- reading -----------------------------------------------------------------------------

    async def sync(self) -> list[HostState]:
        """Read every host's info (one round trip); the hosts whose records are behind."""
        k = self.keys
        known = sorted(self._hosts)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.hosts)
            for h in known:
                pipe.xlen(k.cmd(h))
            replies = await pipe.execute()
        infos: dict[bytes, bytes] = replies[0]
        queued = dict(zip(known, replies[1:], strict=True))
        seen: dict[str, HostState] = {}
        behind: list[HostState] = []
        for raw_name, raw in infos.items():
            name = raw_name.decode()
            st = self._hosts.get(name) or HostState(name)
            if raw != st.raw_info:
                try:
                    st.info = decode_host(raw)
                except HubCorrupt as exc:
                    log.warning("hub: host %r has an unreadable entry, skipped: %s", name, exc)
                    continue
                st.raw_info = raw
            st.queued = int(queued.get(name, 0))
            if st.seq != st.loaded_seq:
                behind.append(st)
            seen[name] = st
        self._hosts = seen
        return behind

    async def refresh(self) -> dict[str, HostState]:
        """Every host's current state, records included (waits for them)."""
        for _ in range(3):  # a host may publish again meanwhile; settle for a bounded while
            if not await self.sync():
                break
            await self._start_loading()
        return self._hosts

    def _start_loading(self) -> asyncio.Task[None]:
        """The one load in flight (started if none): the hosts whose records are behind,
        then a new snapshot of all hosts (merged in a thread)."""
        task = self._loading
        if task is None or task.done():
            task = self._loading = asyncio.ensure_future(self._load_behind())
        return task

    async def _load_behind(self) -> None:
        started = time.monotonic()  # the records read below are at least this new
        behind = [st for st in self._hosts.values() if st.seq != st.loaded_seq]
        if behind:
            await self._load(behind)
        hosts = [self._hosts[h] for h in sorted(self._hosts)]
        stale = self._stale(hosts)
        parts = [(st.records, not stale[st.name]) for st in hosts]
        queues, totals, part = await asyncio.to_thread(_merge_hosts, parts)
        self._snap = _Snapshot(
            started,
            tuple((st.name, st.loaded_seq, st.stats, st.rows_json) for st in hosts),
            frozenset(h for h, s in stale.items() if s),
            queues,
            totals,
            part,
        )

    async def _load(self, hosts: list[HostState]) -> None:
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for st in hosts:
                pipe.hgetall(k.q(st.name))
            replies = await pipe.execute()
        seqs = [st.seq for st in hosts]  # what the records read are at least as new as
        for st, seq, raw in zip(hosts, seqs, replies, strict=True):
            # Decoding, summarizing and encoding run in a thread, off the event loop
            # (requests keep being answered); the results are swapped in here, at once.
            old = (st.raw_records, st.records, st.stats)
            records, stats, rows = await asyncio.to_thread(_decode_host, st.name, raw, *old)
            st.raw_records, st.records, st.stats = raw, records, stats
            st.loaded_seq = seq
            st.rows_json = ((seq, False), rows)

    def _stale(self, hosts: list[HostState]) -> dict[str, bool]:
        now = self.clock()
        return {st.name: is_stale(st.last_seen, now, self.stale_after) for st in hosts}

    # -- views -------------------------------------------------------------------------------

    async def view(self, host: str | None = None) -> HubStatsView:
        """The merged stats (of one ``host`` only, when given); see the module docstring
        for how far behind Redis it may be (``max_lag``)."""
        behind = await self.sync()
        if host is not None:
            if behind:
                task = self._start_loading()
                snap = self._snap
                if snap is None or time.monotonic() - snap.at > self.max_lag:
                    await asyncio.shield(task)
            return self._one(host)
        snap = self._snap
        names = sorted(self._hosts)
        stale = self._stale([self._hosts[h] for h in names])
        stale_set = frozenset(h for h, s in stale.items() if s)
        if behind or snap is None or snap.stale != stale_set or [h[0] for h in snap.hosts] != names:
            task = self._start_loading()
            if snap is None or time.monotonic() - snap.at > self.max_lag:
                await asyncio.shield(task)
                snap = self._snap
        assert snap is not None
        now_hosts = [(name, self._hosts.get(name)) for name, *_ in snap.hosts]
        key = (
            None,
            id(snap),
            tuple((n, st.queued, st.last_seen) if st else (n,) for n, st in now_hosts),
        )
        cached = self._views.get(key)
        if cached is not None:
            return cached
        view = self._from_snapshot(snap)
        if len(self._views) > 64:  # old keys (seqs long gone) are never asked again
            self._views.clear()
        self._views[key] = view
        return view

    def _from_snapshot(self, snap: _Snapshot) -> HubStatsView:
        rows: dict[str, dict[str, Any]] = {}
        parts: list[bytes] = []
        for name, seq, stats, rows_json in snap.hosts:
            st = self._hosts.get(name) or HostState(name)
            stale = name in snap.stale
            shown = st  # the host as loaded now, if that is what the snapshot holds
            if st.loaded_seq != seq or st.stats is not stats:
                shown = HostState(
                    name,
                    info=st.info,
                    loaded_seq=seq,
                    stats=stats,
                    queued=st.queued,
                    rows_json=rows_json,
                )
            rows[name] = shown.row(stale)
            parts.append(json.dumps(name).encode() + b":" + shown.row_json(stale))
        body = b"{" + snap.part + b',"hosts":{' + b",".join(parts) + b"}}"
        return HubStatsView(snap.queues, snap.totals, rows, body)

    def _one(self, host: str) -> HubStatsView:
        st = self._hosts.get(host)
        if st is None or st.stats is None:
            return HubStatsView()
        stale = self._stale([st])[host]
        own = st.stats.view  # one host: its own view, nothing to merge
        queues, totals = own.queues, own.totals
        if stale:
            queues = [replace(q, throughput=0.0) for q in queues]
            totals = replace(totals, throughput=0.0)
        key = (host, st.loaded_seq, st.queued, st.last_seen, stale)
        cached = self._views.get(key)
        if cached is not None:
            return cached
        doc = {"queues": [q.to_dict() for q in queues], "totals": totals.to_dict()}
        part = json.dumps(doc).encode()[1:-1]
        body = b"{" + part + b',"hosts":{' + json.dumps(host).encode() + b":"
        body += st.row_json(stale) + b"}}"
        view = HubStatsView(queues, totals, {host: st.row(stale)}, body)
        self._views[key] = view
        return view

    def known(self) -> list[str]:
        """Host names of the last read."""
        return sorted(self._hosts)

    def host(self, name: str) -> HostState | None:
        return self._hosts.get(name)

    def is_stale(self, name: str) -> bool:
        st = self._hosts.get(name)
        return st is None or is_stale(st.last_seen, self.clock(), self.stale_after)


def _decode_host(
    name: str,
    raw: dict[bytes, bytes],
    old_raw: dict[bytes, bytes],
    old_records: dict[str, QueueRecord],
    old_stats: HostStats | None,
) -> tuple[dict[str, QueueRecord], HostStats, bytes]:
    """A host's queue records decoded (only those whose bytes changed), summarized, and its
    rows encoded (the ``"queues"``/``"totals"`` part of its ``"hosts"`` entry)."""
    records: dict[str, QueueRecord] = {}
    unchanged: set[str] = set()
    for i, (qname, rec) in enumerate(raw.items()):
        _yield_gil(i)
        queue = qname.decode()
        if old_raw.get(qname) == rec and queue in old_records:
            records[queue] = old_records[queue]  # unchanged: no decode
            unchanged.add(queue)
            continue
        try:
            records[queue] = decode_queue(rec)
        except HubCorrupt as exc:
            log.warning("hub: %s queue %r unreadable, skipped: %s", name, queue, exc)
    stats = HostStats(records, old_stats, frozenset(unchanged), pause=_yield_gil)
    rows = _encode_rows(stats.rows, stats.totals_row)
    return records, stats, rows


def _yield_gil(i: int) -> None:
    """Every few items, let the event loop's thread have the GIL (``sleep(0)`` releases it):
    a request then waits for one slice of this thread's work, not for a 5 ms switch."""
    if i % _GIL_SLICE == _GIL_SLICE - 1:
        time.sleep(0)


def _encode_rows(rows: Mapping[str, Any], totals: Mapping[str, Any]) -> bytes:
    """``"queues":{...},"totals":{...}`` (a ``"hosts"`` entry's rows), in slices."""
    items = list(rows.items())
    chunks = []
    for k in range(0, len(items), 4 * _GIL_SLICE):
        time.sleep(0)
        chunks.append(json.dumps(dict(items[k : k + 4 * _GIL_SLICE])).encode()[1:-1])
    return (
        b'"queues":{'
        + b",".join(c for c in chunks if c)
        + b'},"totals":'
        + json.dumps(totals).encode()
    )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Every host's loaded records at one time, merged: what an all-hosts view shows."""

    at: float
    """``time.monotonic()`` when the load began: the records are at least as new."""
    hosts: tuple[tuple[str, int, HostStats | None, tuple[tuple[int, bool], bytes] | None], ...]
    stale: frozenset[str]
    queues: list[QueueStat]
    totals: QueueStat
    part: bytes


def _merge_hosts(
    hosts: list[tuple[dict[str, QueueRecord], bool]],
) -> tuple[list[QueueStat], QueueStat, bytes]:
    """Queues and totals summed over hosts (``(records, live)`` each) and their JSON."""
    per_queue: dict[str, list[QueueRecord]] = {}
    live: dict[str, list[bool]] = {}
    for records, fresh in hosts:
        for q, rec in records.items():
            per_queue.setdefault(q, []).append(rec)
            live.setdefault(q, []).append(fresh)
    merged: dict[str, QueueRecord | Sum] = {}
    for i, q in enumerate(sorted(per_queue)):
        _yield_gil(i)
        merged[q] = sum_records(per_queue[q], live=live[q])
    queues = []
    for i, (q, total) in enumerate(merged.items()):
        _yield_gil(i)
        queues.append(queue_stat(q, total))
    totals = queue_stat("total", sum_records(merged.values()))
    part = json.dumps({"queues": [q.to_dict() for q in queues], "totals": totals.to_dict()})
    return queues, totals, part.encode()[1:-1]
