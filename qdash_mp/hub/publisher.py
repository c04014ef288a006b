"""The collector's hub publisher: its absolute state into Redis, one script call a second.

``Publisher`` runs as a task inside the collector (``collector --hub URL``). Every
``interval`` (1 s) it builds one publish -- the queue records that changed since the last
*acknowledged* publish (absolute shared-memory values), history points not acknowledged yet,
the workers list if it changed, the failed-index entries that changed, the results of
finished hub commands and always the host info (the heartbeat) -- and sends it as one
``EVALSHA`` of ``publish.lua`` with the next ``seq``. The script applies it only if ``seq`` is
above the host's applied seq and returns the pending commands, so the collector makes one
Redis command a second at any job rate. Nothing is marked acknowledged until the script
answered "applied": a lost reply or an error leaves everything to the next publish, which
sends it again (absolute values and set operations: applying twice is applying once).

The failed index follows the journal through ``Journal.on_applied`` (a set of changed ids,
called in the committing thread): at publish time each changed id is read back from the
journal -- there: an add with its FAILED record; gone: a removal. After a start, an
overflowing change list (``max_changes``), a journal flush, or when Redis lost this host's
state (its applied seq went below the acknowledged one), a full reconciliation compares the
journal with ``fi:{host}`` (ids and failed_at scores, read in chunks) and queues every
difference; everything drains in batches of ``batch`` ids per publish, publishes following
each other quickly while a backlog remains. That half lives in ``FailedChanges``
(``qdash_mp.hub.publish_failed``); this module builds, sends and acknowledges the publishes,
with the queue records, history points, workers and host info.

History points carry the period's runtime bucket counts when ``PeriodBuckets`` (looking at
the history's state before each publish attempt) knows them, so the hub merges per-period
percentiles of several hosts exactly (``qdash_mp.hub.period_buckets``).

``seq`` starts at the current time in microseconds (monotonic over restarts while the clock
is); a publish refused as not newer moves it above the applied seq and republishes all.

Redis away: publishes fail (5 s socket timeout, never blocking the event loop), the
collector keeps working locally, retries back off from 0.5 s to 30 s, and the first publish
that gets through catches up exactly. State changes are logged once. See ``docs/hub.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

from qdash_mp.errors import QdashError
from qdash_mp.hub.commands import Ack, Commands
from qdash_mp.hub.format import (
    HostInfo,
    QueueRecord,
    encode_host,
    encode_point,
    encode_queue,
    encode_workers,
    sparse,
)
from qdash_mp.hub.keys import DEFAULT_PREFIX, RESULT_TTL, Keys
from qdash_mp.hub.period_buckets import PeriodBuckets
from qdash_mp.hub.publish_failed import FailedChanges
from qdash_mp.models import QueueStat
from qdash_mp.wire import ALL_QUEUES

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from qdash_mp.collector.daemon import Collector
    from qdash_mp.journal.format import Op

__all__ = ["Publisher", "build_args", "redact"]

log = logging.getLogger("qdash_mp.hub.publisher")

SCRIPT: Final = importlib.resources.files("qdash_mp.hub").joinpath("publish.lua").read_text()
MINUTE_KEEP: Final = 24 * 3600 + 60
HOUR_KEEP: Final = 30 * 86400 + 3600


def redact(url: str) -> str:
    """``url`` without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(slots=True)
class Publish:
    """What one publish carries (and, once applied, what becomes acknowledged)."""

    seq: int
    host: bytes
    workers: bytes | None = None
    queues: list[tuple[str, bytes]] = field(default_factory=list)
    history: list[tuple[str, str, int, bytes]] = field(default_factory=list)
    adds: list[tuple[str, str, bytes]] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    taken: dict[str, int | None] = field(default_factory=dict)
    """Failed ids read for this publish -> their change generation (None: not in the list)."""


def build_args(
    prefix: str, host: str, p: Publish, now: float, max_commands: int
) -> list[str | bytes | int]:
    """The ARGV of ``publish.lua`` for ``p`` (layout in the script's header)."""
    args: list[str | bytes | int] = [
        prefix,
        host,
        str(p.seq),
        p.host,
        b"" if p.workers is None else p.workers,
        str(int(now - MINUTE_KEEP)),
        str(int(now - HOUR_KEEP)),
        max_commands,
        RESULT_TTL,
        len(p.queues),
    ]
    for queue, rec in p.queues:
        args += (queue, rec)
    args.append(len(p.history))
    for res, queue, t, point in p.history:
        args += (res, queue, str(t), point)
    args.append(len(p.adds))
    for id, score, rec in p.adds:
        args += (id, score, rec)
    args.append(len(p.removes))
    args += p.removes
    args.append(len(p.acks))
    for ack in p.acks:
        args += (ack.entry, ack.req or "", ack.blob)
    return args


class Publisher:
    """Publishes one collector's state to the hub; see the module docstring."""

    def __init__(
        self,
        collector: Collector,
        url: str,
        host: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        interval: float = 1.0,
        batch: int = 2_000,
        history_batch: int = 5_000,
        max_changes: int = 100_000,
        max_commands: int = 100,
        timeout: float = 5.0,
    ) -> None:
        self._c = collector
        self.url = url
        self.host = host
        self._keys = Keys(prefix)
        self._prefix = prefix
        self.interval = interval
        self._history_batch = history_batch
        self._max_commands = max_commands
        self._timeout = timeout
        self._clock: Callable[[], float] = time.time
        self._started_at = self._clock()
        self._redis: Redis | None = None
        self._script: AsyncScript | None = None
        self._seq = time.time_ns() // 1000
        self._acked_seq: int | None = None
        self._acked_queues: dict[str, bytes] = {}
        self._acked_workers: bytes | None = None
        self._acked_minute: dict[str, int] = {}
        self._acked_hour: dict[str, tuple[int, bytes]] = {}
        self._hist_pending: dict[tuple[str, str, int], bytes] = {}
        self._hist_scanned: tuple[int, int] | None = None
        self._buckets: dict[str, tuple[tuple[int, int], dict[int, int], dict[int, int]]] = {}
        self._periods = PeriodBuckets()
        self.failed = FailedChanges(batch, max_changes)
        """The failed-job index: change list, reconciliation (``hub.publish_failed``)."""
        self.commands = Commands(collector, self._clock)
        self.up: bool | None = None
        self.published = 0
        """Publishes applied by Redis (for tests and the benchmark)."""

    # ------------------------------------------------------------------ journal hook

    def on_applied(self, ops: list[Op]) -> None:
        """``Journal.on_applied``: remember which failed ids changed (bounded)."""
        self.failed.on_applied(ops)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Publish until cancelled; never raises (Redis errors are retried with backoff)."""
        from redis.exceptions import RedisError

        log.info("hub: publishing to %s as host %r", redact(self.url), self.host)
        delay = 0.5
        down_since = 0.0
        while True:
            began = time.monotonic()
            try:
                more = await self.publish_once()
            except (RedisError, OSError, TimeoutError) as exc:
                if self.up is not False:
                    log.warning(
                        "hub %s unreachable (%s): the collector keeps counting locally and "
                        "catches up when it is back",
                        redact(self.url),
                        str(exc) or type(exc).__name__,
                    )
                    down_since = time.monotonic()
                self.up = False
                await self._drop_connection()
                await asyncio.sleep(delay * (0.75 + random.random() / 2))
                delay = min(delay * 2, 30.0)
                continue
            except QdashError as exc:
                if self.up is not False:
                    log.error("hub publish failed (will try again): %s", exc)
                    down_since = time.monotonic()
                self.up = False
                await asyncio.sleep(self.interval)
                continue
            if self.up is False:
                log.info(
                    "hub %s reachable again after %.1f s: caught up",
                    redact(self.url),
                    time.monotonic() - down_since,
                )
            self.up = True
            delay = 0.5
            # a steady cadence: one publish per interval however long building it took
            spent = time.monotonic() - began
            await asyncio.sleep(0.02 if more else max(0.0, self.interval - spent))

    async def publish_once(self) -> bool:
        """One publish (after a reconciliation if one is due); True if a backlog remains."""
        await self._observe()  # before anything that needs Redis: minutes close without it
        r = self._connection()
        if self.failed.reconcile_due():
            await self.failed.reconcile_now(r, self._keys.fi(self.host), self._c.journal)
            self.failed.reconcile = False
        p = await self._build()
        assert self._script is not None
        args = build_args(self._prefix, self.host, p, self._hclock(), self._max_commands)
        reply = await self._script(args=args)
        applied, prev_raw, entries = reply
        prev = int(prev_raw)
        if not applied:
            log.warning(
                "hub: host %r has applied seq %d, above this publish's %d (the clock went "
                "back, or another collector publishes under this host name): publishing "
                "everything again above it",
                self.host,
                prev,
                p.seq,
            )
            self._seq = max(self._seq, prev)
            self._resync()
            return True
        self.published += 1
        lost = self._acked_seq is not None and prev < self._acked_seq
        if lost:
            log.warning(
                "hub: Redis lost this host's state (applied seq %d, acknowledged %s): "
                "publishing everything again",
                prev,
                self._acked_seq,
            )
        self._acked_seq = p.seq
        self.commands.acknowledged(p.acks)
        if lost:
            self._resync()
        else:
            self._acknowledge(p)
        self.commands.offer([(_text(e[0]), _fields(e[1])) for e in entries])
        # Quickly again only if this publish was full (a backlog: a reconciliation, a
        # catch-up); changes that arrived meanwhile wait for the next second, or the
        # command rate would follow the failure rate.
        full = len(p.taken) >= self.failed.batch or len(p.history) >= self._history_batch
        return full or self.failed.reconcile

    def _connection(self) -> Redis:
        if self._redis is None:
            from redis.asyncio import Redis

            self._redis = Redis.from_url(
                self.url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                single_connection_client=True,
            )
            self._script = self._redis.register_script(SCRIPT)
        return self._redis

    async def _drop_connection(self) -> None:
        r, self._redis, self._script = self._redis, None, None
        if r is not None:
            with contextlib.suppress(Exception):
                await r.aclose()

    def _resync(self) -> None:
        """Forget what was acknowledged: the next publishes send everything again."""
        self._acked_queues.clear()
        self._acked_workers = None
        self._acked_minute.clear()
        self._acked_hour.clear()
        self._hist_pending.clear()
        self._hist_scanned = None
        self.failed.reconcile = True

    # ------------------------------------------------------------------ building

    def _hclock(self) -> float:
        return self._c.lifecycle.clock()

    async def _build(self) -> Publish:
        now = self._clock()
        self._seq += 1
        p = Publish(self._seq, b"")
        view = await self._c.inspector.stats()
        for q in view.queues:
            rec = encode_queue(self._record(q))
            if self._acked_queues.get(q.queue) != rec:
                p.queues.append((q.queue, rec))
        workers = encode_workers([w.to_dict() for w in self._c.lifecycle.workers.views()])
        if workers != self._acked_workers:
            p.workers = workers
        await self._history(p)
        p.acks = self.commands.acks()
        first = [a.id for a in p.acks if a.id is not None]
        p.adds, p.removes, p.taken = await self.failed.take(self._c.journal, first)
        p.host = encode_host(
            HostInfo(
                seq=p.seq,
                last_seen=now,
                started_at=self._started_at,
                version=_version(),
                pid=os.getpid(),
                requeue=self._requeue_queues(),
            )
        )
        return p

    def _record(self, q: QueueStat) -> QueueRecord:
        key = (q.runtime.count, q.wait.count)
        cached = self._buckets.get(q.queue)
        if cached is None or cached[0] != key:
            runtime, wait = self._c.stats.buckets(q.queue)
            cached = ((sum(runtime), sum(wait)), sparse(runtime), sparse(wait))
            self._buckets[q.queue] = cached
        return QueueRecord(
            pushed=q.pushed,
            processed=q.processed,
            failed=q.failed,
            retried=q.retried,
            active=q.active,
            throughput=q.throughput,
            runtime=cached[1],
            wait=cached[2],
        )

    def _requeue_queues(self) -> tuple[str, ...]:
        if self._c.settings.requeue or self._c.retries.has_requeue_fn:
            return (ALL_QUEUES,)
        out: set[str] = set()
        for conn in self._c.connections.conns:
            req = conn.hello.requeue if conn.hello else None
            if req:
                out.update(req)
        return (ALL_QUEUES,) if ALL_QUEUES in out else tuple(sorted(out))

    async def _observe(self) -> None:
        """Derive the bucket counts of the history periods that closed since the last look."""
        lc = self._c.lifecycle
        history = lc.history
        if history is None:
            return
        periods = self._periods
        try:
            await lc.locked(lambda: periods.observe(history))
        except Exception:  # a bug here must not stop publishing: counts stay exact
            log.exception("hub: reading the history's period buckets failed")

    async def _history(self, p: Publish) -> None:
        lc = self._c.lifecycle
        history = lc.history
        now = self._hclock()
        # 5 s after each minute the lifecycle tick (every second) has closed it; a second
        # look 30 s after catches a tick that was late (a loaded machine). Two reads of the
        # history files a minute, not one a second.
        due = (int((now - 5) // 60), int((now - 30) // 60))
        if history is not None and due != self._hist_scanned:
            self._hist_scanned = due
            # under the lifecycle's lock: the tick's thread adds queue files meanwhile
            read: list[tuple[str, str, dict[str, Any]]] = []
            for queue in await lc.locked(history.queues):
                for res, resolution in (("m", "minute"), ("h", "hour")):
                    points = await lc.points(queue, resolution)  # type: ignore[arg-type]
                    read.extend((res, queue, point) for point in points)
            # a minute that closed after the last look and before its point was read: look
            # again, or it would go out without its buckets (minutes are sent once)
            await self._observe()
            for res, queue, point in read:
                self._consider(res, queue, point)
        for k, data in self._hist_pending.items():
            if len(p.history) >= self._history_batch:
                break
            p.history.append((k[0], k[1], k[2], data))

    def _consider(self, res: str, queue: str, point: dict[str, Any]) -> None:
        t = int(point["t"])
        if res == "m":
            if t <= self._acked_minute.get(queue, -1):
                return
            buckets = self._periods.buckets_for(queue, res, point)
            self._hist_pending[(res, queue, t)] = encode_point(point, buckets)
            return
        data = encode_point(point, self._periods.buckets_for(queue, res, point))
        acked = self._acked_hour.get(queue)
        if acked is not None and (t < acked[0] or (t == acked[0] and data == acked[1])):
            return
        self._hist_pending[(res, queue, t)] = data

    # ------------------------------------------------------------------ acknowledging

    def _acknowledge(self, p: Publish) -> None:
        self._acked_queues.update(p.queues)
        if p.workers is not None:
            self._acked_workers = p.workers
        for res, queue, t, point in p.history:
            self._hist_pending.pop((res, queue, t), None)
            if res == "m":
                self._acked_minute[queue] = max(t, self._acked_minute.get(queue, -1))
                self._periods.acknowledged(queue, t)
            else:
                acked = self._acked_hour.get(queue)
                if acked is None or t >= acked[0]:
                    self._acked_hour[queue] = (t, point)
        self.failed.acknowledge(p.taken)

    # ------------------------------------------------------------------ stopping

    async def close(self, *, final: bool = True) -> None:
        """Stop the commands; with ``final``, one last publish (2 s at most), then
        disconnect."""
        await self.commands.close()
        if final and self._redis is not None and self.up:
            try:
                await asyncio.wait_for(self.publish_once(), 2.0)
            except Exception as exc:  # noqa: BLE001 - stopping goes on whatever this was
                log.info("hub: last publish on stop did not get through: %s", exc)
        await self._drop_connection()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _version() -> str:
    from qdash_mp import __version__

    return __version__
