"""``HubInspector``: the dashboard's ``Inspector`` over every host that publishes to a Redis hub.

What the views use, read from Redis per request (``qdash_mp.hub.view`` caches by host seq):

* ``stats()``: totals across hosts and per-host rows (``HubStatsView.hosts``);
* ``failed(page)`` newest first across hosts through ``qdash:fall``; ``failed_count``,
  ``failed_job`` from the payload copies ``qdash:fj:{host}``; ``history``, ``workers``;
* ``retry``/``forget``: ``XADD qdash:cmd:{host}`` to the owning host's command stream, then a
  bounded wait for ``qdash:res:{req}``. A host that is stale, or does not answer in time,
  leaves the command queued: ``RetryQueued`` (the dashboard answers 202 "queued"); the job
  stays listed until the host executed it and published the removal.
* ``flush_failed``: a forget command per stored job of each host (hosts act on their own).
* ``FailedQueries`` (filters, snapshots, bulk actions): the hub's mirror of the failed index
  (``qdash_mp.hub.failed_mirror``), or ``failed_scan.page_by_time`` for unfiltered pages;
  snapshots are high-water marks of the hub's failed-entry arrival sequence
  (``qdash:fseq``/``fseqz``, written by ``publish.lua``) in the run ``qdash:fepoch``; bulk
  actions send one command per job and do not wait (``NO_WAIT``). See ``docs/hub.md``.

Failed job ids on the hub are ``{id}@{host}`` (two hosts may use the same job id); a bare id
is accepted when exactly one host holds it. ``?host=NAME`` (the ``HOST`` context variable,
set by ``qdash_mp.hub.app``) narrows every read and action to one host.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from qdash_mp.errors import HubCorrupt, NotFound, RetryError, RetryQueued
from qdash_mp.failed_filter import FailedFilter
from qdash_mp.history import RETENTION
from qdash_mp.hub.failed_mirror import FailedMirror
from qdash_mp.hub.failed_scan import Match, page_by_time, scan_failed
from qdash_mp.hub.format import decode_point, decode_workers
from qdash_mp.hub.format_failed import (
    Command,
    Result,
    decode_failed,
    decode_result,
    encode_command,
    fall_member,
    split_fall_member,
)
from qdash_mp.hub.keys import Keys
from qdash_mp.hub.merge import STALE_AFTER, merge_points
from qdash_mp.hub.view import MAX_LAG, HubReader, HubStatsView
from qdash_mp.inspector import FailedPage, page_bounds
from qdash_mp.models import ActiveJob, FailedJob, JobView, TrackedJob, WorkerView
from qdash_mp.records import FailedRecord

__all__ = ["COMMAND_WAIT", "HOST", "NO_WAIT", "HubInspector", "split_id"]

log = logging.getLogger("qdash_mp.hub.inspector")

HOST: contextvars.ContextVar[str | None] = contextvars.ContextVar("qdash_hub_host", default=None)
"""The ``?host=`` of the current request (``None``: every host)."""

NO_WAIT: contextvars.ContextVar[bool] = contextvars.ContextVar("qdash_hub_no_wait", default=False)
"""Set (by ``qdash_mp.hub.app`` for the bulk routes, inherited by their background task):
``retry``/``forget`` send the command and return without waiting for the host's answer."""

COMMAND_WAIT = 3.0
"""Seconds a retry/forget waits for the owning host's answer before reporting it queued
(a live host reads its commands with its ~1/s publish)."""

_POLL = 0.05
_PERIOD = {"minute": 60, "hour": 3600}


def split_id(hub_id: str) -> tuple[str, str | None]:
    """``"{id}@{host}"`` -> ``(id, host)``; an id without ``@`` -> ``(id, None)``."""
    job_id, sep, host = hub_id.rpartition("@")
    if not sep or not job_id or not host:
        return hub_id, None
    return job_id, host


def _job_view(host: str, rec: FailedRecord) -> JobView:
    return JobView(
        id=f"{rec.job_id}@{host}",
        queue=rec.queue,
        name=rec.name,
        error=rec.error,
        attempts=rec.attempts,
        failed_at=datetime.fromtimestamp(rec.failed_at, UTC),
    )


class HubInspector:
    """An ``Inspector`` over a Redis hub (see the module docstring)."""

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = "qdash:",
        stale_after: float = STALE_AFTER,
        command_wait: float = COMMAND_WAIT,
        max_lag: float = MAX_LAG,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.reader = HubReader(
            redis, self.keys, stale_after=stale_after, max_lag=max_lag, clock=clock
        )
        self.command_wait = command_wait
        self.clock = clock
        self._epoch = ""
        self.mirror = FailedMirror(redis, self.keys)
        """Filter columns of the failed index, for ``queue``/``name``/``q`` pages."""

    # -- stats -------------------------------------------------------------------------------

    async def stats(self) -> HubStatsView:
        return await self.reader.view(HOST.get())

    async def hosts(self) -> list[str]:
        """Names of the hosts that published (after a fresh read)."""
        await self.reader.sync()
        return self.reader.known()

    def _hosts(self) -> list[str]:
        host = HOST.get()
        return [host] if host is not None else self.reader.known()

    async def pending(self, queue: str, page: int) -> list[TrackedJob]:
        """Tracked jobs stay on their host: the hub has none."""
        return []

    async def recent(self, queue: str, page: int) -> list[TrackedJob]:
        return []

    async def history(
        self, queue: str, resolution: Literal["minute", "hour"]
    ) -> list[dict[str, Any]]:
        """The history points of ``queue`` merged across hosts per minute/hour, oldest first."""
        await self.reader.sync()
        hosts = self._hosts()
        k = self.keys
        key = k.hm if resolution == "minute" else k.hh
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in hosts:
                pipe.hgetall(key(h, queue))
            replies = await pipe.execute()
        per_host = []
        for raw in replies:
            points = []
            for t, value in raw.items():
                try:
                    points.append(decode_point(value))
                except HubCorrupt as exc:
                    log.warning("hub: history point %s of %r unreadable: %s", t, queue, exc)
            per_host.append(points)
        oldest = self.clock() - RETENTION[resolution]
        period = _PERIOD[resolution]
        return [p for p in merge_points(per_host) if p["t"] + period > oldest]

    async def workers(self) -> list[WorkerView]:
        """Every host's published workers; ``host`` is the publishing host's name."""
        await self.reader.sync()
        hosts = self._hosts()
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in hosts:
                pipe.get(self.keys.w(h))
            replies = await pipe.execute()
        out: list[WorkerView] = []
        for h, raw in zip(hosts, replies, strict=True):
            if not raw:
                continue
            try:
                rows = decode_workers(raw)
            except HubCorrupt as exc:
                log.warning("hub: %s published unreadable workers, skipped: %s", h, exc)
                continue
            out.extend(_worker(h, w) for w in rows)
        return out

    # -- failed jobs -------------------------------------------------------------------------

    async def failed_count(self) -> int:
        host = HOST.get()
        if host is None:
            return int(await self.redis.zcard(self.keys.fall))
        return int(await self.redis.zcard(self.keys.fi(host)))

    async def failed(self, page: int) -> list[JobView]:
        offset, limit = page_bounds(page)
        host = HOST.get()
        pairs: list[tuple[str, str]]
        if host is None:
            members = await self.redis.zrevrange(self.keys.fall, offset, offset + limit - 1)
            pairs = []
            for m in members:
                try:
                    pairs.append(split_fall_member(m))
                except HubCorrupt as exc:
                    log.warning("hub: %s", exc)
        else:
            ids = await self.redis.zrevrange(self.keys.fi(host), offset, offset + limit - 1)
            pairs = [(host, i.decode()) for i in ids]
        records = await self._records(pairs)
        return [_job_view(h, r) for (h, _), r in zip(pairs, records, strict=True) if r]

    async def _records(self, pairs: list[tuple[str, str]]) -> list[FailedRecord | None]:
        if not pairs:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for h, job_id in pairs:
                pipe.hget(self.keys.fj(h), job_id)
            replies = await pipe.execute()
        out: list[FailedRecord | None] = []
        for (h, job_id), raw in zip(pairs, replies, strict=True):
            if raw is None:
                out.append(None)  # removed between the index read and this one
                continue
            try:
                out.append(decode_failed(raw))
            except HubCorrupt as exc:
                log.warning("hub: failed job %r of %s unreadable: %s", job_id, h, exc)
                out.append(None)
        return out

    async def _locate(self, hub_id: str) -> tuple[str, str]:
        """``(host, job id)`` of a hub id; ``NotFound`` if no host holds it."""
        job_id, host = split_id(hub_id)
        only = HOST.get()
        if (
            host is not None
            and only in (None, host)
            and await self.redis.zscore(self.keys.fi(host), job_id) is not None
        ):
            return host, job_id
        if only is None:
            await self.reader.sync()
        hosts = [only] if only is not None else self.reader.known()
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in hosts:
                pipe.zscore(self.keys.fi(h), hub_id)
            scores = await pipe.execute()
        holders = [h for h, s in zip(hosts, scores, strict=True) if s is not None]
        if len(holders) == 1:
            return holders[0], hub_id
        if len(holders) > 1:
            raise NotFound(f"{hub_id} (on hosts {', '.join(holders)}: use ID@HOST)")
        raise NotFound(hub_id)

    async def failed_job(self, id: str) -> FailedJob:
        host, job_id = await self._locate(id)
        (rec,) = await self._records([(host, job_id)])
        if rec is None:
            raise NotFound(id)
        job = rec.to_failed_job()
        job.id = f"{rec.job_id}@{host}"
        return job

    # -- filters, snapshots and bulk actions (FailedQueries) ----------------------------------

    @property
    def failed_epoch(self) -> str:
        """The run id of the hub's arrival sequence (``qdash:fepoch``), as last read
        (``refresh_epoch``; ``qdash_mp.hub.app`` reads it for every failed-list request)."""
        return self._epoch

    async def refresh_epoch(self) -> str:
        """Read ``qdash:fepoch``, creating it if missing (a new or emptied Redis)."""
        key = self.keys.fepoch
        raw = await self.redis.get(key)
        if raw is None:
            await self.redis.set(key, secrets.token_hex(8), nx=True)
            raw = await self.redis.get(key)
        self._epoch = raw.decode() if isinstance(raw, bytes) else str(raw or "")
        return self._epoch

    async def _high_water(self) -> int:
        return int(await self.redis.get(self.keys.fseq) or 0) + 1

    async def failed_query(
        self, flt: FailedFilter, page: int, *, snapshot: int | None = None, since: int | None = None
    ) -> FailedPage:
        """A page (newest failed_at first) of the failed jobs matching ``flt`` that arrived
        before ``snapshot`` (default: now) and from ``since`` on; ``total`` counts them all."""
        await self.refresh_epoch()
        hw = snapshot if snapshot is not None else await self._high_water()
        offset, limit = page_bounds(page)
        fast = await page_by_time(
            self.redis, self.keys, HOST.get(), flt, offset, limit, below=hw, since=since
        )
        if fast is not None:
            return FailedPage(await self._views(fast[0]), fast[1], hw, self._epoch)
        async with self._synced_mirror() as mirror:
            rows, total = mirror.select(flt, HOST.get(), offset, limit, below=hw, since=since)
        return FailedPage(await self._views(rows), total, hw, self._epoch)

    @contextlib.asynccontextmanager
    async def _synced_mirror(self) -> AsyncIterator[FailedMirror]:
        """The mirror under its lock, in step with Redis for the epoch last read."""
        async with self.mirror.lock:
            await self.mirror.sync(self._epoch)
            yield self.mirror

    async def failed_query_by_scan(
        self, flt: FailedFilter, page: int, *, snapshot: int, since: int | None = None
    ) -> FailedPage:
        """``failed_query`` by one scan of the index in Redis, without the mirror (what the
        mirror is tested against; ``snapshot`` is required: no epoch read)."""
        hw = snapshot
        offset, limit = page_bounds(page)
        keep = offset + limit
        total = 0
        top: list[tuple[float, str, str, Match]] = []  # a min-heap of the newest ``keep``
        async for batch in scan_failed(
            self.redis, self.keys, HOST.get(), flt, below=hw, since=since
        ):
            total += len(batch)
            for m in batch:
                item = (m.failed_at, m.host, m.id, m)
                if len(top) < keep:
                    heapq.heappush(top, item)
                elif item[:3] > top[0][:3]:
                    heapq.heapreplace(top, item)
        ordered = [item[3] for item in sorted(top, key=lambda i: i[:3], reverse=True)]
        return FailedPage(await self._views(ordered[offset:keep]), total, hw, self._epoch)

    async def _views(self, rows: list[Match]) -> list[JobView]:
        records = await self._records([(m.host, m.id) for m in rows])
        return [_job_view(m.host, rec) for m, rec in zip(rows, records, strict=True) if rec]

    async def failed_ids(self, flt: FailedFilter, snapshot: int) -> list[str]:
        """Hub ids (``ID@HOST``) of the failed jobs matching ``flt`` that arrived before
        ``snapshot``."""
        await self.refresh_epoch()
        async with self._synced_mirror() as mirror:  # what list pages read: no scan of Redis
            return mirror.hub_ids(flt, HOST.get(), below=snapshot)

    async def failed_seq(self, id: str) -> int | None:
        """The arrival sequence of ``id`` on the hub (0: published before the hub had one)."""
        try:
            host, job_id = await self._locate(id)
        except NotFound:
            return None
        score = await self.redis.zscore(self.keys.fseqz, fall_member(host, job_id))
        return int(score) if score is not None else 0

    async def forget_many(self, ids: Sequence[str]) -> int:
        """A forget command to the owning host of each id still on the hub (not waited for:
        each host runs them with its next publish, or when it is back); returns how many
        were sent."""
        by_host: dict[str, list[bytes]] = {}
        for id in ids:
            try:
                host, job_id = await self._locate(id)
            except NotFound:
                continue
            by_host.setdefault(host, []).append(job_id.encode())
        return sum([await self._forget_all(h, batch) for h, batch in by_host.items()])

    async def flush_before(self, snapshot: int) -> int:
        """Forget commands for every failed job (of the ``?host=`` one) that arrived before
        ``snapshot``; returns how many were sent."""
        return await self.forget_many(await self.failed_ids(FailedFilter(), snapshot))

    def can_retry(self, queue: str) -> bool:
        """Whether a host (the ``?host=`` one) published a requeue route for ``queue``."""
        for h in self._hosts():
            st = self.reader.host(h)
            requeue = st.info.requeue if st is not None and st.info is not None else ()
            if "*" in requeue or queue in requeue:
                return True
        return False

    async def failed_history(self, id: str) -> list[FailedJob]:
        """Retry histories stay on the hosts: the hub has none."""
        return []

    # -- commands ----------------------------------------------------------------------------

    async def retry(self, id: str) -> None:
        host, job_id = await self._locate(id)
        await self._command(host, "retry", job_id)

    async def forget(self, id: str) -> None:
        host, job_id = await self._locate(id)
        await self._command(host, "forget", job_id)

    async def flush_failed(self) -> int:
        """A forget command per failed job of each host (of the ``?host=`` one); returns how
        many were sent. Each host drops them itself, as it reads its stream."""
        await self.reader.sync()
        sent = 0
        for h in self._hosts():
            # ZSCAN, not offsets: the host may be removing ids meanwhile (a live host runs
            # the forgets as they come), and a scan still returns every id that stays.
            seen: set[bytes] = set()
            batch: list[bytes] = []
            async for member, _score in self.redis.zscan_iter(self.keys.fi(h), count=1000):
                if member not in seen:
                    seen.add(member)
                    batch.append(member)
                if len(batch) >= 1000:
                    sent += await self._forget_all(h, batch)
                    batch = []
            sent += await self._forget_all(h, batch)
        return sent

    async def _forget_all(self, host: str, ids: list[bytes]) -> int:
        if ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.xadd(self.keys.cmd(host), self._fields("forget", i.decode()))
                await pipe.execute()
        return len(ids)

    def _fields(self, op: str, job_id: str, req: str | None = None) -> dict[str, str]:
        from qdash_mp.web.authz import current  # the signed-in user, when in a request

        identity = current().identity
        who = identity.user if identity is not None and identity.method != "none" else "hub"
        command = Command(op, job_id, req or uuid.uuid4().hex, who[:255], self.clock())
        return encode_command(command)

    async def _command(self, host: str, op: str, job_id: str) -> None:
        req = uuid.uuid4().hex
        await self.redis.xadd(self.keys.cmd(host), self._fields(op, job_id, req))
        if NO_WAIT.get():
            return  # a bulk action: the command is queued, the host runs it once
        if self.reader.is_stale(host):
            raise RetryQueued(
                f"host {host} is offline; the {op} is queued and runs when it is back", host
            )
        result = await self._wait_result(req)
        if result is None:
            raise RetryQueued(
                f"host {host} has not answered yet; the {op} is queued and runs once", host
            )
        if not result.ok:
            raise RetryError(f"host {host}: {result.error or 'refused'}")

    async def _wait_result(self, req: str) -> Result | None:
        key = self.keys.res(req)
        deadline = time.monotonic() + self.command_wait
        while True:
            raw = await self.redis.get(key)
            if raw is not None:
                return decode_result(raw)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(_POLL)


def _worker(host: str, w: dict[str, Any]) -> WorkerView:
    return WorkerView(
        id=str(w["id"]),
        pid=int(w.get("pid") or 0),
        host=host,
        name=str(w.get("name") or ""),
        queues=tuple(str(q) for q in w.get("queues") or ()),
        connected_at=float(w.get("connected_at") or 0.0),
        last_seen=float(w.get("last_seen") or 0.0),
        active=tuple(
            ActiveJob(
                str(a["queue"]), str(a["id"]), str(a.get("name") or ""), float(a["started_at"])
            )
            for a in w.get("active") or ()
        ),
        state=str(w.get("state") or "connected"),
        can_requeue=bool(w.get("can_requeue")),
    )
