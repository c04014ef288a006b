"""The worker-side ``Client``: hooks as cheap as a dict increment, counted for a sender thread.

Hot path: each counter kind has its own dict of *cumulative* ints (queue -> count) that only
hooks write; ``on_processed(q)`` is ``self._processed[q] += 1`` in a ``try``. No lock, no
syscall, no per-event message: the sender thread (``qdash_mp.client.sender``) reads the
dicts and ships the differences. Why the unlocked increment is exact under the GIL, and what
is guaranteed about delivery, spooling and forks, is in ``docs/client.md``.

Measured on CPython 3.11: ``d[k] += 1`` in a loop ~37 ns, ``client.on_processed(q)`` ~58 ns;
with a lock ~170 ns, which is what ``_LockedClient`` (picked by ``Client()`` on a free-threaded
build) pays. Hooks never raise and never block: a bad argument is logged once and dropped.
``on_failed`` (not a hot path) also packs the job to a FAILED record right away.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qdash_mp.client import process
from qdash_mp.client.record import pack_failed_job, utf8_ok
from qdash_mp.client.requeue import RequeueFn, requeue_list
from qdash_mp.client.sender import Sender, SenderConfig
from qdash_mp.client.spool import SpoolFile
from qdash_mp.errors import ConfigError
from qdash_mp.hooks import Hooks
from qdash_mp.models import Job
from qdash_mp.settings import default_socket_path
from qdash_mp.throttle import LogThrottle
from qdash_mp.wire import MAX_CLIENT_ID, MAX_NAME

__all__ = ["Client"]

log = logging.getLogger("qdash_mp.client.hooks")

_SPOOL_SLACK = 10_000
"""With a spool, hooks keep failed jobs up to ``max(2 * bound, bound + this)`` while the
sender thread moves them to disk; only past that (disk failing or far too slow) are details
dropped."""

_SOCKET_PATH_MAX = 107


def _gil_disabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is not None and not is_enabled()


class Client(Hooks):
    """Worker-side hooks that stream counts and failed jobs to the collector daemon.

    ``socket_path`` defaults to ``$QDASH_SOCKET``, then the collector's default.
    ``requeue(job)`` (optional) re-enqueues a job when the dashboard retries it; it is
    offered for ``requeue_queues`` (``None``: every queue). ``spool_dir`` (optional) is
    where what cannot be delivered is kept on disk, and where spools left by earlier
    clients are picked up and sent. See ``docs/client.md`` for the guarantees.
    """

    # Slots keep attribute access on the hook path at its fastest: a plain instance dict
    # with this many keys loses CPython's shared-key fast path (~10 ns per hook call).
    __slots__ = (
        "__weakref__",
        "_close_result",
        "_closed",
        "_config",
        "_counts",
        "_dropped_failed",
        "_failed",
        "_failed_jobs",
        "_hard_pending",
        "_hook_errors",
        "_lock",
        "_processed",
        "_pushed",
        "_retried",
        "_sender",
        "_spool_dir",
        "_throttle",
        "_wake_every",
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> Client:
        kind = _LockedClient if cls is Client and _gil_disabled() else cls
        return super().__new__(kind)

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
    ) -> None:
        path = os.fspath(socket_path) if socket_path is not None else str(default_socket_path())
        if len(os.fsencode(path)) > _SOCKET_PATH_MAX:
            raise ConfigError(f"socket path is longer than {_SOCKET_PATH_MAX} bytes: {path!r}")
        if client_id is not None and not (
            isinstance(client_id, str) and 1 <= len(client_id) <= MAX_CLIENT_ID
        ):
            raise ConfigError(f"client_id must be a str of 1..{MAX_CLIENT_ID} characters")
        if not flush_interval > 0:
            raise ConfigError(f"flush_interval must be > 0, not {flush_interval}")
        if not reconnect_max > 0:
            raise ConfigError(f"reconnect_max must be > 0, not {reconnect_max}")
        for name, value in (
            ("max_batch_failed", max_batch_failed),
            ("max_pending_failed", max_pending_failed),
            ("max_unacked", max_unacked),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name} must be an int >= 1, not {value!r}")
        spool = None
        if spool_dir is not None:
            spool = Path(os.fspath(spool_dir)).absolute()
            try:
                spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot use spool_dir {str(spool)!r}: {exc}") from None
        queues = requeue_list(requeue, requeue_queues)
        if spool is None:
            self._hard_pending = max_pending_failed
            self._wake_every = max_batch_failed
        else:
            self._hard_pending = max(2 * max_pending_failed, max_pending_failed + _SPOOL_SLACK)
            self._wake_every = min(max_batch_failed, max_pending_failed)
        self._spool_dir = spool
        self._config = SenderConfig(
            socket_path=path,
            host=socket.gethostname()[:MAX_NAME],
            requeue=requeue,
            requeue_queues=queues,
            flush_interval=float(flush_interval),
            reconnect_max=float(reconnect_max),
            max_batch_failed=max_batch_failed,
            max_pending_failed=max_pending_failed,
            hard_pending=self._hard_pending,
            max_unacked=max_unacked,
            spool_dir=spool,
        )
        self._closed = False
        self._close_result = False
        self._throttle = LogThrottle(log)
        self._hook_errors = 0
        self._reset(client_id or uuid.uuid4().hex)
        process.track(self)
        self._sender.start()

    def _reset(self, client_id: str) -> None:
        """Fresh per-process state (also what a forked child starts from)."""
        # Cumulative counts, written only by hooks: pushed, processed, failed, retried.
        self._pushed: dict[str, int] = {}
        self._processed: dict[str, int] = {}
        self._failed: dict[str, int] = {}
        self._retried: dict[str, int] = {}
        self._counts = (self._pushed, self._processed, self._failed, self._retried)
        self._failed_jobs: collections.deque[bytes] = collections.deque()
        self._dropped_failed = 0
        self._lock = threading.Lock()  # hooks' slow paths and locked (free-threaded) hooks
        self._sender = Sender(self._config, client_id, self._counts, self._failed_jobs, self)

    def _after_fork_in_child(self) -> None:
        """Forget the parent's connection, counts and threads; start over as a new client."""
        self._sender.forget_in_child()
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
            self._pushed[queue] += 1
        except KeyError:
            self._count_new(self._pushed, queue)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def on_processed(
        self, queue: str, job: Job | None = None, runtime: float | None = None
    ) -> None:
        """A job of ``queue`` finished successfully."""
        try:
            self._processed[queue] += 1
        except KeyError:
            self._count_new(self._processed, queue)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def on_retried(self, queue: str) -> None:
        """A job of ``queue`` was retried."""
        try:
            self._retried[queue] += 1
        except KeyError:
            self._count_new(self._retried, queue)
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
        try:
            self._failed[queue] += 1
        except KeyError:
            if not self._count_new(self._failed, queue):
                return
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)
            return
        if job is not None:
            try:
                self._record_failed(queue, job, error)
            except Exception as exc:  # noqa: BLE001 -- hooks never raise
                self._hook_error(exc)

    def _count_new(self, counts: dict[str, int], queue: object) -> bool:
        """First count of ``queue`` (or a bad name): check it, create the entry, count."""
        try:
            if not (isinstance(queue, str) and 1 <= len(queue) <= MAX_NAME and utf8_ok(queue)):
                self._throttle.log(
                    "bad-queue",
                    logging.ERROR,
                    "qdash_mp client: event for an invalid queue name %r dropped "
                    "(a queue name is a str of 1..%d characters that UTF-8 can encode)",
                    queue,
                    MAX_NAME,
                )
                return False
            counts.setdefault(str.__str__(queue), 0)  # one C call: racing creators both count
            counts[queue] += 1
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


class _LockedClient(Client):
    """``Client`` for free-threaded CPython: unlocked read-modify-write could lose counts.

    ``Client()`` returns one of these by itself when the GIL is disabled.
    """

    __slots__ = ()

    def on_pushed(self, queue: str, job: Job | None = None) -> None:
        try:
            self._bump(self._pushed, queue)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def on_processed(
        self, queue: str, job: Job | None = None, runtime: float | None = None
    ) -> None:
        try:
            self._bump(self._processed, queue)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def on_retried(self, queue: str) -> None:
        try:
            self._bump(self._retried, queue)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def on_failed(
        self,
        queue: str,
        job: Job | None,
        error: BaseException | str,
        runtime: float | None = None,
    ) -> None:
        try:
            if self._bump(self._failed, queue) and job is not None:
                self._record_failed(queue, job, error)
        except Exception as exc:  # noqa: BLE001 -- hooks never raise
            self._hook_error(exc)

    def _bump(self, counts: dict[str, int], queue: str) -> bool:
        if isinstance(queue, str) and queue in counts:
            with self._lock:
                key = str.__str__(queue)
                counts[key] = counts.get(key, 0) + 1
            return True
        with self._lock:
            return self._count_new(counts, queue)  # checks the name, logs and drops a bad one
