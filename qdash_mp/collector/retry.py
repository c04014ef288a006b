"""Dashboard actions on failed jobs: requeue routing, retry (exactly once), forget, flush.

A retry hands the job back to a worker that registered a ``requeue`` callback for its queue
(round robin over the connections that did), or to the collector's own ``--requeue``
function. Rules (see docs/collector.md, "Retries"):

* **Exactly once.** The id is claimed before the first ``await``: a second retry of the same
  id while one runs gets ``RetryConflict`` (HTTP 409 "retry in progress"); one after a retry
  succeeded finds no record (``NotFound``, 404). The claim is held until dropping the record is
  durable, so no retry can read the committed record of a job already re-enqueued.
* **Nothing newer is lost.** The record is dropped only if it is still the failure that was
  re-enqueued (``if_failed_at``): a newer failure of the same job id that arrived meanwhile
  stays. A forget (or flush) during a retry wins over the record; the retry still succeeds,
  since the job was re-enqueued.
* **Counts.** A successful retry counts ``retried`` +1 *and* ``pushed`` +1 on the job's queue
  (the job is enqueued again, so pending goes up by one): ``pushed == processed + failed +
  pending`` holds at rest across retries. The requeue callback must therefore not report the
  re-enqueue as a push itself. The job handed to it carries ``attempts + 1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import inspect
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from qdash_mp.errors import (
    ConfigError,
    JournalError,
    NotFound,
    RetryConflict,
    RetryError,
    RetryUnavailable,
)
from qdash_mp.failed_filter import FailedFilter
from qdash_mp.journal import Journal
from qdash_mp.models import FailedJob, Job
from qdash_mp.wire import FailedRecord, Requeue, RequeueResult

if TYPE_CHECKING:
    from qdash_mp.collector.daemon import Collector

__all__ = ["RequeueFn", "Retries", "load_requeue", "read_for_retry", "retried_copy"]

log = logging.getLogger("qdash_mp.collector")

REQUEUE_TIMEOUT = 30.0
"""Seconds a worker has to answer a REQUEUE."""
FORGET_CHUNK = 1000
"""``forget_many`` makes this many removals durable per commit."""

RequeueFn = Callable[[Job], object]


def load_requeue(spec: str) -> RequeueFn:
    """Import ``module:function`` (for ``--requeue``); ``ConfigError`` says what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--requeue expects module:function, not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--requeue: cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"--requeue: {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"--requeue: {spec!r} is not callable")
    fn: RequeueFn = target
    return fn


def retried_copy(failed: FailedJob) -> FailedJob:
    """``failed`` with its job's ``attempts`` one higher: what a retry re-enqueues."""
    job = dataclasses.replace(failed.job, attempts=failed.job.attempts + 1)
    return dataclasses.replace(failed, job=job)


def read_for_retry(journal: Journal, id: str) -> tuple[FailedJob, bytes, float]:
    """The committed record of ``id``, its payload bytes and its exact ``failed_at``.

    Two reads (the journal has no single call for both): a failure committed between them
    shows as a changed ``failed_at``, and the pair is read again. Blocking (disk reads): call
    it in a worker thread. Used by retries and by the hub publisher; raises ``NotFound`` when
    ``id`` is not in the journal, ``RetryConflict`` when it keeps changing.
    """
    for _ in range(8):
        failed_at = journal.failed_at(id)
        failed, raw = journal.get_raw(id)
        if journal.failed_at(id) == failed_at:
            return failed, raw, failed_at
    raise RetryConflict(f"job {id!r} keeps failing again while being read; try again")


class Retries:
    """The retry/forget/flush actions of one ``Collector``."""

    def __init__(self, collector: Collector, requeue: RequeueFn | None) -> None:
        self._c = collector
        self._requeue_fn = requeue
        self._request_ids = itertools.count(1)
        self._rr = itertools.count()
        self._claimed: set[str] = set()
        self._settling: set[asyncio.Task[None]] = set()

    @property
    def has_requeue_fn(self) -> bool:
        """Whether a requeue function (``--requeue``, or one given in code) takes every
        retry, whatever the queue and whichever workers are connected."""
        return self._requeue_fn is not None

    def can_retry(self, queue: str) -> bool:
        """Whether a retry of a job of ``queue`` has a requeue route now: ``--requeue``, or
        a connected worker that registered ``requeue`` for that queue (or all)."""
        if self._requeue_fn is not None:
            return True
        return any(c.can_requeue(queue) for c in self._c.connections.conns)

    async def requeue(self, failed: FailedJob, payload_raw: bytes | None = None) -> None:
        """Hand ``failed.job`` back to a worker (or ``--requeue``); raise if that failed.

        ``payload_raw`` (the payload's msgpack bytes as journaled) is sent to the worker as
        is, so a retry carries exactly the bytes the failing worker sent.
        """
        if self._requeue_fn is not None:
            fn = self._requeue_fn
            if inspect.iscoroutinefunction(fn):
                await fn(failed.job)
            else:
                outcome = await asyncio.to_thread(fn, failed.job)
                if inspect.isawaitable(outcome):
                    await outcome
            return
        conns = self._c.connections.conns
        candidates = [c for c in conns if c.can_requeue(failed.queue)]
        if not candidates:
            raise RetryUnavailable(
                f"no connected worker accepts retries for queue {failed.queue!r}: start a worker "
                "with Client(requeue=...) or run the collector with --requeue module:function"
            )
        conn = candidates[next(self._rr) % len(candidates)]
        request_id = next(self._request_ids)
        fut: asyncio.Future[RequeueResult] = asyncio.get_running_loop().create_future()
        conn.pending[request_id] = fut
        conn.send(
            Requeue(
                request_id=request_id,
                queue=failed.queue,
                failed=FailedRecord.from_failed_job(failed, payload_raw=payload_raw),
            )
        )
        try:
            answer = await asyncio.wait_for(fut, REQUEUE_TIMEOUT)
        except TimeoutError:
            raise RetryError(
                f"worker {conn.label()} did not answer the requeue within {REQUEUE_TIMEOUT:g}s"
            ) from None
        finally:
            conn.pending.pop(request_id, None)
        if not answer.ok:
            raise RetryError(f"worker {conn.label()} could not requeue the job: {answer.error}")

    async def retry(self, id: str) -> None:
        """Requeue failed job ``id`` exactly once; it leaves the journal once that succeeded."""
        live = self._c.live
        # Claimed before any await: two retries of one id cannot both get past here.
        if id in self._claimed:
            raise RetryConflict(f"retry in progress: a retry of job {id!r} is already running")
        self._claimed.add(id)
        release = True
        try:
            failed, payload_raw, failed_at = await asyncio.to_thread(
                read_for_retry, live.journal, id
            )
            await self.requeue(retried_copy(failed), payload_raw)
            live.stats.add(failed.queue, pushed=1, retried=1)
            self._c.stats_version += 1
            try:
                # A newer failure of the same job that arrived meanwhile stays.
                # The failure re-enqueued becomes the job's retry history (HISTORY record).
                removed = live.journal.stage_removed(
                    id, "retried", if_failed_at=failed_at, keep_history=True
                )
            except NotFound:
                removed = False  # forgotten or flushed meanwhile: nothing left to drop
            if removed:
                try:
                    await live.group.commit()
                except JournalError as exc:
                    # Re-enqueued, but the drop is not durable yet: keep the claim until it
                    # is, or a second retry could read the committed record and requeue again.
                    log.error("retried job %r; dropping its record is not durable yet: %s", id, exc)
                    release = False
                    self._settle(id)
        finally:
            if release:
                self._claimed.discard(id)

    def _settle(self, id: str) -> None:
        async def commit_then_release() -> None:
            try:
                delay = 0.05
                while True:
                    try:
                        await self._c.live.group.commit()
                        return
                    except JournalError:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
            finally:
                self._claimed.discard(id)

        task = asyncio.get_running_loop().create_task(commit_then_release())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def forget(self, id: str) -> None:
        """Drop failed job ``id`` (durably); ``NotFound`` if unknown."""
        live = self._c.live
        live.journal.stage_removed(id, "forgotten")
        await live.group.commit()

    async def forget_many(self, ids: Sequence[str]) -> int:
        """Drop the records of ``ids`` (unknown or being retried: skipped), durably, in
        commits of ``FORGET_CHUNK``; returns how many went. A crash leaves each id either
        dropped (its chunk's commit was durable) or untouched."""
        live = self._c.live
        n = 0
        for start in range(0, len(ids), FORGET_CHUNK):
            staged = 0
            for id in ids[start : start + FORGET_CHUNK]:
                if id in self._claimed:
                    continue
                try:
                    live.journal.stage_removed(id, "forgotten")
                except NotFound:
                    continue
                staged += 1
            if staged:
                await live.group.commit()
            n += staged
        return n

    async def flush_before(self, snapshot: int) -> int:
        """Drop every failed job appended before ``snapshot`` (durably); later ones stay.

        Nothing new since: one FLUSHED record. Otherwise the snapshot's ids are forgotten."""
        live = self._c.live
        n = len(live.journal)
        if live.journal.flush_if_unchanged(snapshot):
            await live.group.commit()
            return n
        ids = await asyncio.to_thread(live.journal.snapshot_ids, FailedFilter(), snapshot)
        return await self.forget_many(ids)

    async def flush_failed(self) -> int:
        """Drop every failed job (durably); returns how many there were."""
        live = self._c.live
        n = len(live.journal)
        live.journal.stage_flush()
        await live.group.commit()
        return n

    async def close(self) -> None:
        for task in list(self._settling):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
