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
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qdash_mp.errors import HubCorrupt
from qdash_mp.hub.format import HostInfo, QueueRecord, decode_host, decode_queue
from qdash_mp.hub.keys import Keys
from qdash_mp.hub.merge import STALE_AFTER, HostStats, is_stale, queue_stat, sum_records
from qdash_mp.models import QueueStat, StatsView

__all__ = ["MAX_LAG", "HostState", "HubReader", "HubStatsView"]

MAX_LAG = 1.0
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

    def to_dict(self) -> dict[str, Any]:
        doc = StatsView.to_dict(self)
        doc["hosts"] = self.hosts
        return doc


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

    @property
    def seq(self) -> int:
        return self.info.seq if self.info is not None else 0

    @property
    def last_seen(self) -> float:
        return self.info.last_seen if self.info is not None else 0.0

    def row(self, now: float, stale_after: float) -> dict[str, Any]:
        """The host's entry in ``"hosts"`` of ``/queues/api/stats`` (a stale host's rates
        are shown as 0: they are not rates any more)."""
        stale = is_stale(self.last_seen, now, stale_after)
        info = self.info
        rows: Mapping[str, dict[str, Any]] = {}
        totals: dict[str, Any] = QueueStat("total").to_dict()
        if self.stats is not None:
            rows, totals = self.stats.rows, self.stats.totals_row
        if stale:
            rows = {q: {**r, "throughput": 0.0} for q, r in rows.items()}
            totals = {**totals, "throughput": 0.0}
        return {
            "last_seen": self.last_seen,
            "stale": stale,
            "seq": self.loaded_seq,
            "queued": self.queued,
            "version": info.version if info is not None else None,
            "pid": info.pid if info is not None else None,
            "started_at": info.started_at if info is not None else None,
            "queues": rows,
            "totals": totals,
        }


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
        self._loaded_at = -math.inf  # monotonic time of the last read that left nothing behind

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
        if not behind:
            self._loaded_at = time.monotonic()
        return behind

    async def refresh(self) -> dict[str, HostState]:
        """Every host's current state, records included (waits for them)."""
        for _ in range(3):  # a host may publish again meanwhile; settle for a bounded while
            if not await self.sync():
                break
            await self._start_loading()
        return self._hosts

    def _start_loading(self) -> asyncio.Task[None]:
        """The one load in flight (started if none): every host whose records are behind."""
        task = self._loading
        if task is None or task.done():
            task = self._loading = asyncio.ensure_future(self._load_behind())
        return task

    async def _load_behind(self) -> None:
        behind = [st for st in self._hosts.values() if st.seq != st.loaded_seq]
        if behind:
            await self._load(behind)
        if all(st.seq == st.loaded_seq for st in self._hosts.values()):
            self._loaded_at = time.monotonic()

    async def _load(self, hosts: list[HostState]) -> None:
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for st in hosts:
                pipe.hgetall(k.q(st.name))
            replies = await pipe.execute()
        seqs = [st.seq for st in hosts]  # what the records read are at least as new as
        for st, seq, raw in zip(hosts, seqs, replies, strict=True):
            await asyncio.sleep(0)  # one host at a time: requests get in between
            records: dict[str, QueueRecord] = {}
            unchanged: set[str] = set()
            for qname, rec in raw.items():
                queue = qname.decode()
                if st.raw_records.get(qname) == rec and queue in st.records:
                    records[queue] = st.records[queue]  # unchanged: no decode
                    unchanged.add(queue)
                    continue
                try:
                    records[queue] = decode_queue(rec)
                except HubCorrupt as exc:
                    log.warning("hub: %s queue %r unreadable, skipped: %s", st.name, queue, exc)
            st.raw_records = raw
            st.records = records
            st.stats = HostStats(records, st.stats, frozenset(unchanged))
            st.loaded_seq = seq

    # -- views -------------------------------------------------------------------------------

    async def view(self, host: str | None = None) -> HubStatsView:
        """The merged stats (of one ``host`` only, when given); see the module docstring
        for how far behind Redis it may be (``max_lag``)."""
        if await self.sync():
            task = self._start_loading()
            if time.monotonic() - self._loaded_at > self.max_lag or not self._views:
                await asyncio.shield(task)
        hosts = self._hosts
        now = self.clock()
        if host is None:
            chosen = [hosts[h] for h in sorted(hosts)]
        else:
            chosen = [hosts[host]] if host in hosts else []
        stale = {st.name: is_stale(st.last_seen, now, self.stale_after) for st in chosen}
        key = (host, tuple((st.name, st.loaded_seq, st.queued, stale[st.name]) for st in chosen))
        cached = self._views.get(key)
        if cached is not None:
            return cached
        view = self._build(chosen, stale, now)
        if len(self._views) > 64:  # old keys (seqs long gone) are never asked again
            self._views.clear()
        self._views[key] = view
        return view

    def _build(self, chosen: list[HostState], stale: dict[str, bool], now: float) -> HubStatsView:
        rows = {st.name: st.row(now, self.stale_after) for st in chosen}
        if len(chosen) == 1 and chosen[0].stats is not None and not stale[chosen[0].name]:
            own = chosen[0].stats.view  # one host: its own view, nothing to merge
            return HubStatsView(own.queues, own.totals, rows)
        per_queue: dict[str, list[QueueRecord]] = {}
        live: dict[str, list[bool]] = {}
        for st in chosen:
            fresh = not stale[st.name]
            for q, rec in st.records.items():
                per_queue.setdefault(q, []).append(rec)
                live.setdefault(q, []).append(fresh)
        merged = {q: sum_records(per_queue[q], live=live[q]) for q in sorted(per_queue)}
        queues = [queue_stat(q, rec) for q, rec in merged.items()]
        totals = queue_stat("total", sum_records(merged.values()))
        return HubStatsView(queues, totals, rows)

    def known(self) -> list[str]:
        """Host names of the last read."""
        return sorted(self._hosts)

    def host(self, name: str) -> HostState | None:
        return self._hosts.get(name)

    def is_stale(self, name: str) -> bool:
        st = self._hosts.get(name)
        return st is None or is_stale(st.last_seen, self.clock(), self.stale_after)
