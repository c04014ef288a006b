"""The hub's read side: every host's published state, read from Redis per request, cached by seq.

The hub keeps no state of its own: what it shows is read from Redis on each request. To keep
``/queues/api/stats`` cheap (10 hosts x 100 queues in <= 5 ms), a read is::

    1 round trip   HGETALL qdash:hosts  +  XLEN qdash:cmd:{host} of each known host
    +1 round trip  HGETALL qdash:q:{host}  of the hosts whose seq changed (pipelined), if any

and only queue records whose bytes changed are decoded again. The merged ``StatsView`` is
rebuilt only when some host's ``(seq, stale)`` changed; otherwise the same object is returned
(and the dashboard reuses its encoded JSON). The cache is a pure function of what Redis holds
(keyed by each host's seq), so a hub restart loses nothing.

Throughput is each host's own (its rolling window, published as a gauge), summed over the
hosts that are not stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qdash_mp.errors import HubCorrupt
from qdash_mp.hub.format import HostInfo, QueueRecord, decode_host, decode_queue
from qdash_mp.hub.keys import Keys
from qdash_mp.hub.merge import STALE_AFTER, HostStats, is_stale, queue_stat, sum_records
from qdash_mp.models import QueueStat, StatsView

__all__ = ["HostState", "HubReader", "HubStatsView"]

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
        """The host's entry in ``"hosts"`` of ``/queues/api/stats``."""
        stale = is_stale(self.last_seen, now, stale_after)
        view = self.stats.view if self.stats is not None else StatsView()
        info = self.info
        return {
            "last_seen": self.last_seen,
            "stale": stale,
            "seq": self.seq,
            "queued": self.queued,
            "version": info.version if info is not None else None,
            "pid": info.pid if info is not None else None,
            "started_at": info.started_at if info is not None else None,
            "queues": {q.queue: _row(q, stale) for q in view.queues},
            "totals": _row(view.totals, stale),
        }


def _row(q: QueueStat, stale: bool) -> dict[str, Any]:
    d = q.to_dict()
    if stale:
        d["throughput"] = 0.0
    return d


class HubReader:
    """Reads and caches the hosts' published state (see the module docstring)."""

    def __init__(
        self,
        redis: Any,
        keys: Keys | None = None,
        *,
        stale_after: float = STALE_AFTER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.stale_after = stale_after
        self.clock = clock
        self._hosts: dict[str, HostState] = {}
        self._views: dict[tuple[Any, ...], HubStatsView] = {}

    # -- reading -----------------------------------------------------------------------------

    async def refresh(self) -> dict[str, HostState]:
        """Every host's current state (reads Redis: one or two round trips)."""
        k = self.keys
        known = sorted(self._hosts)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.hosts)
            for h in known:
                pipe.xlen(k.cmd(h))
            replies = await pipe.execute()
        metas: dict[bytes, bytes] = replies[0]
        queued = dict(zip(known, replies[1:], strict=True))
        seen: dict[str, HostState] = {}
        changed: list[HostState] = []
        for raw_name, raw in metas.items():
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
                changed.append(st)
            seen[name] = st
        if changed:
            await self._load(changed)
        self._hosts = seen
        return seen

    async def _load(self, hosts: list[HostState]) -> None:
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for st in hosts:
                pipe.hgetall(k.q(st.name))
                pipe.xlen(k.cmd(st.name))
            replies = await pipe.execute()
        for i, st in enumerate(hosts):
            raw: dict[bytes, bytes] = replies[2 * i]
            st.queued = int(replies[2 * i + 1])
            records: dict[str, QueueRecord] = {}
            for qname, rec in raw.items():
                queue = qname.decode()
                if st.raw_records.get(qname) == rec and queue in st.records:
                    records[queue] = st.records[queue]  # unchanged: no decode
                    continue
                try:
                    records[queue] = decode_queue(rec)
                except HubCorrupt as exc:
                    log.warning("hub: %s queue %r unreadable, skipped: %s", st.name, queue, exc)
            st.raw_records = raw
            st.records = records
            st.stats = HostStats(records)
            st.loaded_seq = st.seq

    # -- views -------------------------------------------------------------------------------

    async def view(self, host: str | None = None) -> HubStatsView:
        """The merged stats (of one ``host`` only, when given)."""
        hosts = await self.refresh()
        now = self.clock()
        chosen = [hosts[host]] if host is not None and host in hosts else []
        if host is None:
            chosen = [hosts[h] for h in sorted(hosts)]
        stale = {st.name: is_stale(st.last_seen, now, self.stale_after) for st in chosen}
        key = (host, tuple((st.name, st.seq, st.queued, stale[st.name]) for st in chosen))
        cached = self._views.get(key)
        if cached is not None:
            return cached
        view = self._build(chosen, stale, now)
        if len(self._views) > 64:  # old keys (seqs long gone) are never asked again
            self._views.clear()
        self._views[key] = view
        return view

    def _build(self, chosen: list[HostState], stale: dict[str, bool], now: float) -> HubStatsView:
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
        rows = {st.name: st.row(now, self.stale_after) for st in chosen}
        return HubStatsView(queues, totals, rows)

    def known(self) -> list[str]:
        """Host names of the last read."""
        return sorted(self._hosts)

    def host(self, name: str) -> HostState | None:
        return self._hosts.get(name)

    def is_stale(self, name: str) -> bool:
        st = self._hosts.get(name)
        return st is None or is_stale(st.last_seen, self.clock(), self.stale_after)
