"""The worker-side ``Client``: hooks as cheap as a dict increment, counted for a sender thread.

Hot path: each counter kind has its own dict of *cumulative* counters (queue ->
``itertools.count``, ``qdash_mp.client.tally``) that only hooks advance; ``on_processed(q)``
is ``next(self._processed[q])`` in a ``try``. No lock, no syscall, no per-event message: the
sender thread (``qdash_mp.client.sender``) reads the counters and ships the differences. Why
that is exact under the GIL, and what is guaranteed about delivery, spooling and forks, is in
``docs/client.md``; options are checked in ``qdash_mp.client.options``.

Cost: ~1.45x a ``d[k] += 1`` loop on CPython 3.11, ~1.3x on 3.13 (``benchmarks/README.md``);
a free-threaded build gets the locked ``client.locked._LockedClient``. Hooks never raise or
block: a bad argument is logged once and dropped. ``on_failed`` packs its FAILED record now.

Lifecycle hooks (runtimes, active jobs by id and without one): the table in
``docs/client.md``; the plain path pays one ``is None`` test more.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeGuard

from qdash_mp.client import process
from qdash_mp.client.lifecycle import MAX_PENDING_EVENTS, LifeState
from qdash_mp.client.options import gil_disabled, sender_config, wake_every
from qdash_mp.client.record import pack_failed_job, utf8_ok
from qdash_mp.client.requeue import RequeueFn
from qdash_mp.client.runlog import RunLog
from qdash_mp.client.sender import Sender
from qdash_mp.client.spool import SpoolFile
from qdash_mp.client.tally import Counts
from qdash_mp.hooks import Hooks
from qdash_mp.models import Job
from qdash_mp.throttle import LogThrottle
from qdash_mp.wire import MAX_NAME

__all__ = ["Client"]

log = logging.getLogger("qdash_mp.client.hooks")

_wall = time.time
_mono = time.monotonic


class Client(Hooks):
    """Worker-side hooks that stream counts and failed jobs to the collector daemon.

    ``socket_path`` defaults to ``$QDASH_SOCKET``, then the collector's default.
    ``requeue(job)`` (optional) re-enqueues a job when the dashboard retries it; it is
    offered for ``requeue_queues`` (``None``: every queue). ``spool_dir`` (optional) is
    where what cannot be delivered is kept on disk, and where spools left by earlier
    clients are picked up and sent. See ``docs/client.md`` for the guarantees.

    ``name`` is the worker's name on the dashboard (default: program name and pid).
    ``track_jobs`` (``True``, or a list of queues) reports each job of those queues (pushed,
    started, finished) so the dashboard can list pending and recent jobs; best effort and
    bounded (``docs/client.md``).
    ``run_log`` (a ``RunLog``, for library adapters) is replayed into these hooks by the
    sender thread: hooks recorded as tuples cost the worker's thread the least.
    """

    # Slots keep attribute access on the hook path at its fastest: a plain instance dict
    # with this many keys loses CPython's shared-key fast path (~10 ns per hook call).
    __slots__ = (
        "__weakref__",
        "_close_result",
        "_closed",
        "_config",
        "_counts",
        "_done_ids",
        "_dropped_failed",
        "_events",
        "_failed",
        "_failed_jobs",
        "_fruntimes",
        "_hard_pending",
        "_hook_errors",
        "_jobs",
        "_life",
        "_lock",
        "_processed",
        "_pushed",
        "_retried",
        "_run_log",
        "_runtimes",
        "_sender",
        "_spool_dir",
        "_started",
        "_started_ids",
        "_throttle",
        "_track",
        "_wait_lists",
        "_wake_every",
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> Client:
        if cls is Client and gil_disabled():
            from qdash_mp.client.locked import _LockedClient  # imports this module

            return super().__new__(_LockedClient)
        return super().__new__(cls)

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        client_id: str | None = None,
        requeue: RequeueFn | None = None,
        requeue_queues: Iterable[str] | None = None,
        flush_interval: float = 0.1,
        max_batch_failed: int = 1000,
        reconnect_max: float = 1.0,
        max_pending_failed: int = 100_000,
        max_unacked: int = 16,
        spool_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        track_jobs: bool | Iterable[str] = False,
        run_log: RunLog | None = None,
    ) -> None:
        config = sender_config(
            socket_path,
            client_id=client_id,
            requeue=requeue,
            requeue_queues=requeue_queues,
            flush_interval=flush_interval,
            max_batch_failed=max_batch_failed,
            reconnect_max=reconnect_max,
            max_pending_failed=max_pending_failed,
            max_unacked=max_unacked,
            spool_dir=spool_dir,
            name=name,
            track_jobs=track_jobs,
        )
        track = config.track
        self._track: bool | frozenset[str] = (
            False if track is None else True if track == ("*",) else frozenset(track)
        )
        self._hard_pending = config.hard_pending
        self._wake_every = wake_every(config)
        self._spool_dir = config.spool_dir
        self._config = config
        self._closed = False
        self._close_result = False
        self._throttle = LogThrottle(log)
        self._hook_errors = 0
        self._run_log = run_log
        if run_log is not None:
            run_log.attach(self)
        self._reset(client_id or uuid.uuid4().hex)
        process.track(self)
        self._sender.start()

    def _reset(self, client_id: str) -> None:
        """Fresh per-process state (also what a forked child starts from)."""
        # Cumulative counts, written only by hooks: pushed, processed, failed, retried.
        self._pushed: Counts = {}
        self._processed: Counts = {}
        self._failed: Counts = {}
        self._retried: Counts = {}
        self._counts = (self._pushed, self._processed, self._failed, self._retried)
        self._failed_jobs: collections.deque[bytes] = collections.deque()
        self._dropped_failed = 0
        self._lock = threading.Lock()  # hooks' slow paths and locked (free-threaded) hooks
        life = self._life = LifeState()
        self._runtimes = life.runtimes  # processed with a runtime: counted by the sender
        self._fruntimes = life.fruntimes  # failed with a runtime: buckets only
        self._wait_lists = life.waits
        self._started = life.started
        self._started_ids = life.started_ids
        self._jobs = life.jobs
        self._done_ids = life.done_ids
        self._events = life.events
        self._sender = Sender(
            self._config,
            client_id,
            self._counts,
            self._failed_jobs,
            self,
            life,
            None if self._run_log is None else self._replay,
        )

    def _after_fork_in_child(self) -> None:
        """Forget the parent's connection, counts and threads; start over as a new client."""
        self._sender.forget_in_child()
        if self._run_log is not None:
            self._run_log.forget_in_child()
        self._reset(uuid.uuid4().hex)
        if not self._closed:
            self._sender.start()
        else:
            self._sender.close(0.0)  # a closed client stays closed: no thread, no sockets

    @property
    def client_id(self) -> str:
        """This client's id on the wire (new in a forked child, and after a spool replay)."""
        return self._sender.session.client_id

    @property
    def socket_path(self) -> str:
        """The collector socket this client connects to."""
        return self._config.socket_path

    @property
    def dropped_failed(self) -> int:
        """Failed jobs counted but whose details were dropped (pending list full)."""
        return self._dropped_failed

    @property
    def spool_dir(self) -> Path | None:
        """Where undeliverable batches are spooled (``None``: kept in memory only)."""
        return self._spool_dir

    @property
    def _spool(self) -> SpoolFile | None:
        """The spool file being written now, if any (a peek for tests)."""
        return self._sender.spool

    def spool_pending(self) -> int:
        """Spooled batches the collector has not acknowledged yet.

        This client's own and those of earlier clients whose spool files it took over;
        0 without a ``spool_dir``. A snapshot, for tests and monitoring.
        """
        return self._sender.spool_pending()

    # ------------------------------------------------------------------ hooks (hot path)

    def on_pushed(self, queue: str, job: Job | None = None) -> None:
        """A job was enqueued on ``queue``."""
        try:
            next(self._pushed[queue])
        except KeyError:
            if not self._count_new(self._pushed, queue):
                return
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)
            return
        if job is not None and self._track is not False:
            self._event("p", queue, job, None, None)

    def on_processed(
        self, queue: str, job: Job | None = None, runtime: float | None = None
    ) -> None:
        """A job of ``queue`` finished successfully (in ``runtime`` seconds, if given)."""
        if job is runtime:  # type: ignore[comparison-overlap]  # both None: the hot path
            try:
                next(self._processed[queue])
            except KeyError:
                self._count_new(self._processed, queue)
            except Exception as exc:  # noqa: BLE001 -- hooks never raise
                self._hook_error(exc)
            return
        if job is None:  # a runtime given: the deferred runtime path
            try:
                self._runtimes[queue].append(runtime)  # counted and bucketed by the sender
            except KeyError:
                self._list_new(self._runtimes, queue, runtime)
            except Exception as exc:  # noqa: BLE001 -- hooks never raise
                self._hook_error(exc)
            return
        runtime = self._finish(queue, job, runtime)
        if runtime is None:
            try:
                next(self._processed[queue])
            except KeyError:
                self._count_new(self._processed, queue)
            except Exception as exc:  # noqa: BLE001 -- hooks never raise
                self._hook_error(exc)
        else:
            self._add(self._runtimes, queue, runtime)
        if self._track is not False:
            self._event("d", queue, job, runtime, None)

    def on_started(self, queue: str, job: Job | None = None) -> None:
        """A worker began a job of ``queue``: counted, active, timed until it finishes."""
        self._started_at(queue, job, None, 0.0)

    def _started_at(self, queue: str, job: Job | None, wall: float | None, mono: float) -> None:
        """``on_started``, begun at ``wall`` / ``mono`` (``None``: now; a ``RunLog`` replay)."""
        try:
            self._started[queue] += 1
        except KeyError:
            if not self._start_new(queue):
                return
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)
            return
        try:
            if job is None:
                return  # active "without an id": started minus finished (the sender)
            if wall is None:
                wall, mono = _wall(), _mono()
            jid = job.id
            self._jobs[jid] = (queue, jid, job.name, wall, mono)
            started_ids = self._started_ids
            started_ids[queue] = started_ids.get(queue, 0) + 1
            enqueued = getattr(job, "enqueued_at", None)  # duck-typed jobs may lack it
            if enqueued is not None and (type(enqueued) is float or type(enqueued) is int):
                self._add(self._wait_lists, queue, wall - enqueued)
            if self._track is not False:
                self._event("s", queue, job, None, wall)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def _finish(self, queue: str, job: Job, runtime: float | None) -> float | None:
        """End the job's active entry, if it was started by id here; its measured runtime
        unless one was given. (A job not found ends one started without an id, if any.)"""
        try:
            entry = self._jobs.pop(job.id, None)
            if entry is None:
                return runtime
            done = self._done_ids
            done[entry[0]] = done.get(entry[0], 0) + 1
            if runtime is None:
                return _mono() - entry[4]
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)
        return runtime

    def _event(
        self, kind: str, queue: str, job: Job, runtime: float | None, at: float | None
    ) -> None:
        try:
            track = self._track
            if track is not True and queue not in track:  # type: ignore[operator]
                return
            events = self._events
            if len(events) >= MAX_PENDING_EVENTS:
                self._life.dropped_events += 1
                return
            when = _wall() if at is None else at
            events.append((kind, queue, job.id, job.name, when, runtime))
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def on_retried(self, queue: str, job: Job | None = None) -> None:
        """A job of ``queue`` will run again (a library retry, or a dashboard retry).

        With ``job``, the attempt that ended in the retry stops being active here (it is
        neither processed nor failed; its runtime is not recorded): the next attempt may start
        in another process.
        """
        try:
            next(self._retried[queue])
        except KeyError:
            self._count_new(self._retried, queue)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)
        if job is not None:
            try:
                # Only the entry goes: the attempt is neither processed nor failed, so the
                # "done by id" count that balances finished jobs is not touched.
                self._jobs.pop(job.id, None)
            except Exception as exc:  # noqa: BLE001 -- hooks never raise
                self._hook_error(exc)

    def on_failed(
        self,
        queue: str,
        job: Job | None,
        error: BaseException | str,
        runtime: float | None = None,
    ) -> None:
        """A job of ``queue`` failed with ``error``; ``job`` (if given) is kept for retry."""
        if job is not None:
            runtime = self._finish(queue, job, runtime)
        try:
            next(self._failed[queue])
        except KeyError:
            if not self._count_new(self._failed, queue):
                return
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)
            return
        if runtime is not None:
            self._add(self._fruntimes, queue, runtime)
        if job is not None:
            try:
                self._record_failed(queue, job, error)
            except Exception as exc:  # noqa: BLE001 -- hooks never raise
                self._hook_error(exc)
            if self._track is not False:
                self._event("f", queue, job, runtime, None)

    def _replay(self) -> None:
        """(Sender thread, before it reads counts) Run the hooks the ``RunLog`` recorded."""
        if self._run_log is not None:
            self._run_log.replay(self)

    def _add(self, lists: dict[str, list[Any]], queue: str, value: object) -> None:
        try:
            lists[queue].append(value)
        except KeyError:
            self._list_new(lists, queue, value)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def _list_new(self, lists: dict[str, list[Any]], queue: object, value: object) -> None:
        """First value of ``queue`` in ``lists`` (or a bad name): check, create, append."""
        try:
            if not self._good_queue(queue):
                return
            lists.setdefault(str.__str__(queue), []).append(value)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def _good_queue(self, queue: object) -> TypeGuard[str]:
        if isinstance(queue, str) and 1 <= len(queue) <= MAX_NAME and utf8_ok(queue):
            return True
        self._throttle.log(
            "bad-queue",
            logging.ERROR,
            "qdash_mp client: event for an invalid queue name %r dropped "
            "(a queue name is a str of 1..%d characters that UTF-8 can encode)",
            queue,
            MAX_NAME,
        )
        return False

    def _count_new(self, counts: Counts, queue: object) -> bool:
        """First count of ``queue`` (or a bad name): check it, create the counter, count."""
        try:
            if not self._good_queue(queue):
                return False
            # one C call: racing creators both count on the counter that won
            next(counts.setdefault(str.__str__(queue), itertools.count()))
            return True
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)
            return False

    def _start_new(self, queue: object) -> bool:
        """``_count_new`` for ``started`` (a plain int dict: ``on_started`` is no hot path)."""
        try:
            if not self._good_queue(queue):
                return False
            started = self._started
            started.setdefault(str.__str__(queue), 0)  # one C call: racing creators both count
            started[queue] += 1
            return True
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)
            return False

    def _hook_error(self, exc: Exception) -> None:
        try:
            self._hook_errors += 1
            if self._hook_errors == 1:
                log.error(
                    "qdash_mp client hook failed; further hook errors are not logged", exc_info=exc
                )
        except Exception:  # noqa: BLE001, S110 -- a hook must not raise, not even while logging
            pass

    # ------------------------------------------------------------------ failed jobs

    def _record_failed(self, queue: str, job: Job, error: BaseException | str) -> None:
        jobs = self._failed_jobs
        if len(jobs) >= self._hard_pending:
            self._dropped_failed += 1
            self._throttle.log(
                "failed-full",
                logging.WARNING,
                "qdash_mp client: %d failed jobs are waiting for the collector%s; details of "
                "newer failures are dropped (they are still counted)",
                len(jobs),
                "" if self._spool_dir is None else " and cannot be spooled",
            )
            return
        jobs.append(pack_failed_job(queue, job, error, self._throttle))
        if len(jobs) % self._wake_every == 0:
            self._sender.wake()

    # ------------------------------------------------------------------ flush / close

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything reported so far is acknowledged; False on timeout.

        Acknowledged means applied by the collector, failed jobs durably. ``timeout=None``
        waits as long as it takes (also for a collector that is not running yet).
        """
        return self._sender.flush(timeout)

    def close(self, timeout: float | None = 5.0) -> bool:
        """Flush (waiting at most ``timeout`` s), then stop; True if all was acknowledged.

        Idempotent. A collector that cannot be reached gives up at once instead of waiting.
        Hooks called after ``close`` are counted but never sent.
        """
        with self._lock:
            if self._closed:
                return self._close_result
            self._closed = True
        ok = self._sender.close(timeout)
        if self._run_log is not None:
            self._run_log.detach(self)
        process.forget(self)
        if not ok and self._spool_dir is not None:
            log.info(
                "qdash_mp client %s closed before the collector at %s acknowledged everything; "
                "the rest is in spool files in %s, sent by the next client started with it",
                self.client_id,
                self.socket_path,
                self._spool_dir,
            )
        elif not ok:
            log.warning(
                "qdash_mp client %s closed with counts or failed jobs not acknowledged by "
                "the collector at %s",
                self.client_id,
                self.socket_path,
            )
        self._close_result = ok
        return ok

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.client_id} socket={self.socket_path!r}>"
