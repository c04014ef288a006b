"""The worker-side ``Client``: near-free hooks, and a background thread that ships their counts.

A worker calls ``on_pushed`` / ``on_processed`` / ``on_failed`` / ``on_retried`` for every
job. Those hooks are the hot path, so they do as little as a plain dict increment: each
counter kind has its own dict of *cumulative* ints (queue -> count) that only hooks write.
No lock, no syscall, no per-event message. A daemon thread (the *sender*) wakes every
``flush_interval``, reads the dicts, and sends the difference to what it already sent
(``cumulative - last_sent``) to the collector as one numbered BATCH (see
``docs/protocol.md``). Because the sender only reads the dicts, there is no swap to race
with: a hook that runs while a batch is built simply lands in the next one.

Why the unlocked increment is exact (CPython with the GIL, 3.11+)
    ``d[queue] += 1`` is three bytecodes (subscript, add, store subscript). The interpreter
    only gives the GIL away at its eval-breaker checks, which since 3.11 sit at RESUME,
    JUMP_BACKWARD and calls -- none of them between those three. With str keys (hash
    cached, compared in C) and int values no Python code runs inside them either, so no
    other thread can interleave and no increment is lost, however many worker threads share
    one ``Client``. A queue seen for the first time takes the ``KeyError`` path, which checks
    the name and inserts it with ``dict.setdefault`` (one C call, so two threads racing to
    create the same queue both count) before incrementing as usual. On a free-threaded
    build (``sys._is_gil_enabled()`` returns False) that reasoning does not hold, so
    ``Client()`` returns a subclass whose hooks take a lock. Measured on CPython 3.11:
    ``d[k] += 1`` in a loop ~37 ns, ``client.on_processed(q)`` ~58 ns (the cost of any
    method call doing that increment); with a lock it would be ~170 ns.

Hooks never raise and never block: a bad argument is logged once and dropped. ``on_failed``
(not a hot path) also snapshots the job -- id, name, payload exactly as given, attempts,
error text and traceback -- packed to msgpack right away, so later changes to the worker's
objects cannot leak in. Those packed records wait in a bounded deque
(``max_pending_failed``, default 100,000). Without a spool directory, past the bound the
*new* job's details are dropped with one warning while its failure is still counted. A
payload that is not plain msgpack data, or too big for a frame, is replaced by a short text
saying so.

Delivery. Every batch is kept until an ACK covers it (ACKs are cumulative). On disconnect
the sender reconnects with exponential backoff (capped at ``reconnect_max``), says HELLO,
learns from WELCOME which batches were already applied, and resends the rest in order; the
collector drops duplicates by sequence number, so counts stay exact across collector
restarts. While disconnected no batches are built: counts keep accumulating in the
cumulative dicts (memory bounded by the number of queues) and go out as one merged batch
after reconnecting. At most ``max_unacked`` batches are in flight; beyond that, counts
likewise accumulate. ``flush(timeout)`` returns True once everything reported before the
call is acknowledged.

Spool (``spool_dir``). Nothing is dropped, and nothing is lost at exit, while the collector
is away. The hooks do not change (still no I/O): past ``max_pending_failed`` they keep
appending and wake the sender, and the *sender* numbers everything not yet batched and
writes every unacknowledged batch, as the very BATCH frames the wire would carry, to
``<spool_dir>/<client id>.spool`` (format in ``qdash_mp.spool_format``), fsync'd before the
batches leave memory. So does ``close()`` (and so exit) for whatever the collector did not
acknowledge in time. The file is held with an ``flock`` for the life of the client. When
the collector is reachable again, the sender hands that file to the *replayer* thread and
carries on under a **new client id** (so ``client_id`` changes): the spooled stream is
closed, and its replay on its own connection can never interleave with live batches of
the same id. The replayer sends it under the spooled id -- WELCOME says which batches the
collector already applied, the rest follow in order, the file is deleted once the last is
acknowledged -- and it does the same, at start and every 30 s, for spool files no live
process holds (their writer exited or crashed): that is how a worker that failed jobs
while the collector was down and then exited gets them delivered by the next worker
started with the same ``spool_dir``. A torn tail (a crash mid-append) is cut and logged.
The collector's (client id, seq) dedup makes every replay exact. ``flush()`` also waits for
this client's own spooled batches; ``spool_pending()`` counts the spooled batches not yet
acknowledged. Only if spooling cannot keep up or the disk fails, past
``max(2 * max_pending_failed, max_pending_failed + 10,000)`` failed jobs in memory, are
details dropped (still counted). A spool directory is for local disks (``flock``), one
per machine or per worker pool; any number of clients may share it.

Processes. ``os.fork()`` gives the child a fresh identity: a new client id, empty counters
(the child never resends the parent's counts), a new sender thread, new locks. Clients are
closed (and so flushed, waiting at most 2 s in all) at interpreter exit via ``atexit``, and
in ``multiprocessing`` children -- which leave through ``os._exit`` and skip ``atexit`` --
via a ``multiprocessing.util.Finalize``. A process that ends with a bare ``os._exit``
should call ``flush()`` first. A forked child closes its copies of the parent's spool
files, which leaves the parent's locks in place (an ``flock`` belongs to the open file).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import math
import os
import queue as queue_mod
import selectors
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qdash_mp.errors import ConfigError, ProtocolError
from qdash_mp.failed import describe_error
from qdash_mp.models import Job
from qdash_mp.settings import default_socket_path
from qdash_mp.spool import Replayer, SpoolFile
from qdash_mp.throttle import LogThrottle
from qdash_mp.wire import (
    ALL_QUEUES,
    MAX_CLIENT_ID,
    MAX_FRAME,
    MAX_ID,
    MAX_INT,
    MAX_NAME,
    MAX_TIMESTAMP,
    Ack,
    ErrorCode,
    ErrorMsg,
    FrameDecoder,
    Hello,
    Requeue,
    RequeueResult,
    Welcome,
    encode,
    encode_batch,
    pack_failed_fields,
    pack_payload,
)

__all__ = ["Client"]

log = logging.getLogger("qdash_mp.client")

RequeueFn = Callable[[Job], object]

_EXIT_WAIT = 2.0
"""Seconds all clients together may wait for acknowledgements at interpreter exit."""

_BATCH_BYTES = 1024 * 1024
"""Soft size of one batch's failed jobs; a single bigger record still goes alone."""

_MAX_RECORD = 8 * 1024 * 1024
"""A packed failed job bigger than this loses its payload (and long texts are cut)."""

_MAX_TEXT = 64 * 1024
"""Error and traceback texts are cut to this many characters if a record is too big."""

_QUEUES_PER_BATCH = 2000
"""Counter rows per batch, so a batch stays far below ``MAX_FRAME`` whatever the names."""

_SPOOL_SLACK = 10_000
"""With a spool, hooks keep failed jobs up to ``max(2 * bound, bound + this)`` while the
sender thread moves them to disk; only past that (disk failing or far too slow) are details
dropped."""

_SPOOL_RETRY = 5.0
"""Seconds before trying again to create a spool file after that failed."""

_SPOOL_JOIN = 10.0
"""Extra seconds ``close`` waits for the sender thread when it may be writing the spool."""

_HANDSHAKE_TIMEOUT = 5.0
_CONNECT_TIMEOUT = 1.0
_FIRST_BACKOFF = 0.05
_SOCKET_PATH_MAX = 107


def _gil_disabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is not None and not is_enabled()


class Client:
    """Worker-side hooks that stream counts and failed jobs to the collector daemon.

    ``socket_path`` defaults to ``$QDASH_SOCKET``, then the collector's default.
    ``requeue(job)`` (optional) re-enqueues a job when the dashboard retries it; it is
    offered for ``requeue_queues`` (``None``: every queue). ``spool_dir`` (optional) is
    where what cannot be delivered is kept on disk, and where spools left by earlier
    clients are picked up and sent. See the module docstring for the guarantees and how
    they are kept.
    """

    # Slots keep attribute access on the hook path at its fastest: a plain instance dict
    # with this many keys loses CPython's shared-key fast path (~10 ns per hook call).
    __slots__ = (
        "__weakref__",
        "_acked",
        "_backoff",
        "_client_id",
        "_close_result",
        "_closed",
        "_closing",
        "_cond",
        "_conn_gen",
        "_connect_failures",
        "_counts",
        "_cut_gen",
        "_cut_seq",
        "_cut_stream",
        "_decoder",
        "_dropped_failed",
        "_failed",
        "_failed_jobs",
        "_flush_gen",
        "_flush_interval",
        "_gave_up",
        "_gen",
        "_hard_pending",
        "_hello_deadline",
        "_hook_errors",
        "_host",
        "_lock",
        "_max_batch_failed",
        "_max_pending_failed",
        "_max_unacked",
        "_next_connect",
        "_out",
        "_processed",
        "_pushed",
        "_reconnect_max",
        "_replayer",
        "_requeue",
        "_requeue_jobs",
        "_requeue_queues",
        "_requeue_results",
        "_retried",
        "_sel",
        "_sent",
        "_seq",
        "_sock",
        "_socket_path",
        "_spool",
        "_spool_dir",
        "_spool_retry_at",
        "_spools_pending",
        "_stop",
        "_thread",
        "_throttle",
        "_unacked",
        "_wake_every",
        "_wake_r",
        "_wake_w",
        "_welcomed",
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
        self._spool_dir = spool
        self._socket_path = path
        self._requeue = requeue
        self._requeue_queues = _requeue_list(requeue, requeue_queues)
        self._flush_interval = float(flush_interval)
        self._reconnect_max = float(reconnect_max)
        self._max_batch_failed = max_batch_failed
        self._max_pending_failed = max_pending_failed
        self._max_unacked = max_unacked
        if spool is None:
            self._hard_pending = max_pending_failed
            self._wake_every = max_batch_failed
        else:
            self._hard_pending = max(2 * max_pending_failed, max_pending_failed + _SPOOL_SLACK)
            self._wake_every = min(max_batch_failed, max_pending_failed)
        self._host = socket.gethostname()[:MAX_NAME]
        self._closed = False
        self._close_result = False
        self._throttle = LogThrottle(log)
        self._hook_errors = 0
        self._reset(client_id or uuid.uuid4().hex)
        _install_process_hooks()
        _live.add(self)
        self._start()

    # ------------------------------------------------------------------ state

    def _reset(self, client_id: str) -> None:
        """Fresh per-process state (also what a forked child starts from)."""
        self._client_id = client_id
        # Cumulative counts, written only by hooks: pushed, processed, failed, retried.
        self._pushed: dict[str, int] = {}
        self._processed: dict[str, int] = {}
        self._failed: dict[str, int] = {}
        self._retried: dict[str, int] = {}
        self._counts = (self._pushed, self._processed, self._failed, self._retried)
        # What the sender already put into batches, per kind; read/written by the sender only.
        self._sent: tuple[dict[str, int], ...] = ({}, {}, {}, {})
        self._failed_jobs: collections.deque[bytes] = collections.deque()
        self._dropped_failed = 0
        self._lock = threading.Lock()  # hooks' slow paths and locked (free-threaded) hooks
        self._cond = threading.Condition(threading.Lock())  # sender <-> flush/close
        # Batches: numbered 1, 2, 3...; kept until an ACK covers them.
        self._seq = 0
        self._acked = 0
        self._unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        # flush(): waiters bump _flush_gen; the sender sets _cut_gen/_cut_seq/_cut_stream
        # once every count and failed job reported before that generation is inside batch
        # _cut_seq of stream _cut_stream.
        self._flush_gen = 0
        self._cut_gen = 0
        self._cut_seq = 0
        self._cut_stream = 0
        # Spool: _gen numbers this process's streams (client ids). While the collector is
        # away, batches of stream _gen go to the spool file _spool; at the next connection
        # that file is handed to the replayer and the live stream starts over with a new id
        # (_gen + 1). _spools_pending: streams whose spool is not yet fully acknowledged.
        self._gen = 0
        self._spool: SpoolFile | None = None
        self._spools_pending: set[int] = set()
        self._spool_retry_at = 0.0
        self._replayer: Replayer | None = None
        if self._spool_dir is not None:
            self._replayer = Replayer(
                self._spool_dir,
                self._socket_path,
                self._host,
                window=self._max_unacked,
                reconnect_max=self._reconnect_max,
                on_done=self._spool_replayed,
                on_unreachable=self._replay_unreachable,
            )
        self._stop = False
        self._closing = False
        self._gave_up = False
        # Connection state, owned by the sender thread.
        self._sock: socket.socket | None = None
        self._conn_gen = 0
        self._welcomed = False
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._hello_deadline = 0.0
        self._backoff = _FIRST_BACKOFF
        self._next_connect = 0.0
        self._connect_failures = 0
        self._sel: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Requeue requests run in their own thread so they never hold up ACKs.
        self._requeue_jobs: queue_mod.SimpleQueue[tuple[int, int, str, Job] | None] | None = None
        self._requeue_results: collections.deque[tuple[int, int, bool, str]] = collections.deque()
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"qdash-client-{self._client_id[:8]}", daemon=True
        )
        self._thread.start()
        if self._replayer is not None:
            self._replayer.start(name=f"qdash-spool-{self._client_id[:8]}")

    def _after_fork_in_child(self) -> None:
        """Forget the parent's connection, counts and threads; start over as a new client."""
        for s in (self._sock, self._wake_r, self._wake_w):
            if s is not None:
                s.close()  # only this process's copy of the descriptor; the parent keeps its own
        if self._sel is not None:
            self._sel.close()
        # Close only this process's copies: the parent keeps its spool locks and files.
        if self._spool is not None:
            self._spool.release()
        if self._replayer is not None:
            self._replayer.forget_in_child()
        was_closed = self._closed
        self._reset(uuid.uuid4().hex)
        if not was_closed:
            self._start()
        else:
            self._wake_r.close()
            self._wake_w.close()

    @property
    def client_id(self) -> str:
        """This client's id on the wire (new in a forked child)."""
        return self._client_id

    @property
    def socket_path(self) -> str:
        """The collector socket this client connects to."""
        return self._socket_path

    @property
    def dropped_failed(self) -> int:
        """Failed jobs counted but whose details were dropped (pending list full)."""
        return self._dropped_failed

    @property
    def spool_dir(self) -> Path | None:
        """Where undeliverable batches are spooled (``None``: kept in memory only)."""
        return self._spool_dir

    def spool_pending(self) -> int:
        """Spooled batches the collector has not acknowledged yet.

        This client's own and those of earlier clients whose spool files it took over;
        0 without a ``spool_dir``. A snapshot, for tests and monitoring.
        """
        spool = self._spool
        n = spool.pending() if spool is not None else 0
        if self._replayer is not None:
            n += self._replayer.pending()
        return n

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

    def on_failed(self, queue: str, job: Job | None, error: BaseException | str) -> None:
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
            if not (isinstance(queue, str) and 1 <= len(queue) <= MAX_NAME and _utf8_ok(queue)):
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
        if type(error) is str:
            text, trace = error, ""
        else:
            if not isinstance(error, BaseException | str):
                error = repr(error)
            text, trace = describe_error(error)
        # Every field is made valid here, by construction (exact types, in range; what is
        # not is sanitised), and the FAILED array is packed once, as the collector will
        # journal it: only the payload needs a check.
        job_id = getattr(job, "id", None)
        if type(job_id) is not str or not 0 < len(job_id) <= MAX_ID:
            job_id = _job_id(job_id)
        try:
            payload_raw = pack_payload(getattr(job, "payload", None))
        except ProtocolError as exc:
            self._throttle.log(
                "bad-payload",
                logging.WARNING,
                "qdash_mp client: payload of failed job %r replaced: %s",
                job_id,
                exc,
            )
            payload_raw = pack_payload(_utf8(f"<payload not sent: {exc}>"))
        name = getattr(job, "name", "")
        if type(name) is not str or len(name) > MAX_ID:
            name = _text(name, MAX_ID)
        attempts = getattr(job, "attempts", 0)
        if type(attempts) is not int or not -MAX_INT <= attempts <= MAX_INT:
            attempts = _attempts(attempts)
        enqueued_at = getattr(job, "enqueued_at", None)
        if enqueued_at is not None and not (
            type(enqueued_at) is float and -MAX_TIMESTAMP <= enqueued_at <= MAX_TIMESTAMP
        ):
            enqueued_at = _timestamp(enqueued_at)
        queue = str.__str__(queue)  # checked when first counted
        failed_at = time.time()
        try:
            packed = pack_failed_fields(
                job_id, name, payload_raw, attempts, enqueued_at, queue, text, trace, failed_at
            )
        except ProtocolError:  # a str UTF-8 cannot encode (a lone surrogate)
            job_id, name, text, trace = _utf8(job_id), _utf8(name), _utf8(text), _utf8(trace)
            packed = pack_failed_fields(
                job_id, name, payload_raw, attempts, enqueued_at, queue, text, trace, failed_at
            )
        if len(packed) > _MAX_RECORD:
            payload_raw = pack_payload(
                f"<payload not sent: record of {len(packed)} bytes is too big>"
            )
            text, trace = text[:_MAX_TEXT], trace[-_MAX_TEXT:]
            packed = pack_failed_fields(
                job_id, name, payload_raw, attempts, enqueued_at, queue, text, trace, failed_at
            )
        jobs.append(packed)
        if len(jobs) % self._wake_every == 0:
            self._wake()

    # ------------------------------------------------------------------ flush / close

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything reported so far is acknowledged; False on timeout.

        Acknowledged means applied by the collector, failed jobs durably. ``timeout=None``
        waits as long as it takes (also for a collector that is not running yet).
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            if self._thread is None or self._stop:
                return self._settled()
            self._flush_gen += 1
            gen = self._flush_gen
        self._wake()
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._cut_gen >= gen or self._gave_up or self._stop,
                _remaining(deadline),
            ):
                return False
            if self._cut_gen < gen:
                return False
            stream, target = self._cut_stream, self._cut_seq
            return self._cond.wait_for(
                lambda: self._reached(stream, target) or self._gave_up or self._stop,
                _remaining(deadline),
            ) and self._reached(stream, target)

    def _reached(self, stream: int, seq: int) -> bool:
        """(Under ``_cond``) Batch ``seq`` of stream ``stream`` and all before are acknowledged.

        Streams retired to a spool file are acknowledged once their file is replayed; so
        are all earlier streams, which a flush also waits for.
        """
        if any(g <= stream for g in self._spools_pending):
            return False
        return stream < self._gen or self._acked >= seq

    def _settled(self) -> bool:
        """(Closed client) True if nothing reported is left unacknowledged."""
        return not self._unacked and not self._has_news() and not self._spools_pending

    def close(self, timeout: float | None = 5.0) -> bool:
        """Flush (waiting at most ``timeout`` s), then stop; True if all was acknowledged.

        Idempotent. A collector that cannot be reached gives up at once instead of waiting.
        Hooks called after ``close`` are counted but never sent.
        """
        with self._cond:
            if self._closed:
                return self._close_result
            self._closed = True
            self._closing = True
        ok = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            extra = 0.0 if self._spool_dir is None else _SPOOL_JOIN
            thread.join(timeout=_CONNECT_TIMEOUT + 1.0 + extra)
        if self._replayer is not None:
            self._replayer.stop(timeout=_CONNECT_TIMEOUT + 1.0)
        if self._requeue_jobs is not None:
            self._requeue_jobs.put(None)
        if thread is None or not thread.is_alive():
            for s in (self._wake_r, self._wake_w):
                s.close()
        _live.discard(self)
        if not ok and self._spool_dir is not None:
            log.info(
                "qdash_mp client %s closed before the collector at %s acknowledged everything; "
                "the rest is in spool files in %s, sent by the next client started with it",
                self._client_id,
                self._socket_path,
                self._spool_dir,
            )
        elif not ok:
            log.warning(
                "qdash_mp client %s closed with counts or failed jobs not acknowledged by "
                "the collector at %s",
                self._client_id,
                self._socket_path,
            )
        self._close_result = ok
        return ok

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self._client_id} socket={self._socket_path!r}>"

    # ------------------------------------------------------------------ sender thread

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        self._sel = sel
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        next_tick = time.monotonic() + self._flush_interval
        try:
            while not self._stop:
                try:
                    next_tick = self._step(sel, next_tick)
                except Exception:
                    log.exception("qdash_mp client: unexpected error in the sender thread")
                    self._disconnect("internal error")
                    time.sleep(self._reconnect_max)
        finally:
            self._disconnect(None)
            sel.close()
            if self._spool_dir is not None:
                self._final_spool()
            with self._cond:
                self._cond.notify_all()

    def _step(self, sel: selectors.BaseSelector, next_tick: float) -> float:
        now = time.monotonic()
        if self._sock is None and now >= self._next_connect and self._wants_connection():
            self._connect(sel)
        now = time.monotonic()
        if self._sock is None:
            timeout = max(0.0, self._next_connect - now)
            if not self._wants_connection():
                timeout = max(timeout, self._flush_interval)
        elif not self._welcomed:
            timeout = max(0.0, self._hello_deadline - now)
        else:
            timeout = max(0.0, next_tick - now)
        for key, mask in sel.select(timeout):
            if key.data is None:
                self._drain_wake()
            else:
                if mask & selectors.EVENT_READ:
                    self._on_readable()
                if self._sock is not None and mask & selectors.EVENT_WRITE:
                    self._flush_out()
        self._send_requeue_results()
        now = time.monotonic()
        if self._sock is not None and not self._welcomed and now >= self._hello_deadline:
            self._disconnect("no WELCOME from the collector in time")
        if (
            self._spool_dir is not None
            and len(self._failed_jobs) >= self._spool_threshold()
            and not self._can_send()
            and self._can_spool(now)
        ):
            self._spool_now()
        flush_wanted = self._flush_gen > self._cut_gen
        if self._sock is not None and self._welcomed:
            if now >= next_tick or flush_wanted or len(self._failed_jobs) >= self._max_batch_failed:
                self._cycle()
                next_tick = now + self._flush_interval
        elif flush_wanted:
            with self._cond:
                gen = self._flush_gen  # read before looking for news, as in _cycle
            if not self._unacked and not self._has_news():
                self._cut(gen)  # nothing to send: a flush needs no connection
        self._update_interest(sel)
        return next_tick

    def _wants_connection(self) -> bool:
        if self._stop:
            return False
        if self._requeue is not None or self._unacked or self._spool is not None:
            return True
        return self._has_news()

    def _can_send(self) -> bool:
        """A new batch could go out on the live connection right now."""
        return self._sock is not None and self._welcomed and len(self._unacked) < self._max_unacked

    def _has_news(self) -> bool:
        if self._failed_jobs:
            return True
        return any(c != s for c, s in zip(self._counts, self._sent, strict=True))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        # A flush or close asked for something: do not make it wait out a backoff.
        if self._sock is None and (self._flush_gen > self._cut_gen or self._closing):
            self._next_connect = 0.0

    # ------------------------------------------------------------------ connection

    def _connect(self, sel: selectors.BaseSelector) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_CONNECT_TIMEOUT)
            sock.connect(self._socket_path)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self._connect_failures += 1
            self._throttle.log(
                "connect",
                logging.WARNING,
                "qdash_mp client: cannot reach the collector at %s: %s; counts are kept "
                "and sent once it is up",
                self._socket_path,
                exc,
            )
            self._schedule_reconnect()
            if self._closing:
                with self._cond:
                    self._gave_up = True
                    self._cond.notify_all()
            return
        if self._spool is not None:
            self._retire_spool()  # the collector is back: the file goes, a new id comes
        self._sock = sock
        self._conn_gen += 1
        self._welcomed = False
        self._decoder = FrameDecoder(MAX_FRAME)
        self._out = bytearray()
        self._hello_deadline = time.monotonic() + _HANDSHAKE_TIMEOUT
        sel.register(sock, selectors.EVENT_READ, "sock")
        hello = Hello(
            client_id=self._client_id,
            pid=os.getpid(),
            host=self._host,
            requeue=self._requeue_queues,
        )
        self._send(encode(hello))

    def _schedule_reconnect(self) -> None:
        self._next_connect = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._reconnect_max)

    def _disconnect(self, reason: str | None) -> None:
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._welcomed = False
        self._out = bytearray()
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
        sock.close()
        if reason is not None:
            self._throttle.log(
                "disconnect",
                logging.WARNING,
                "qdash_mp client: connection to the collector at %s lost (%s); reconnecting",
                self._socket_path,
                reason,
            )
            self._schedule_reconnect()

    def _update_interest(self, sel: selectors.BaseSelector) -> None:
        sock = self._sock
        if sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
        if sel.get_key(sock).events != events:
            sel.modify(sock, events, "sock")

    def _send(self, frame: bytes) -> None:
        self._out += frame
        self._flush_out()

    def _flush_out(self) -> None:
        sock = self._sock
        out = self._out
        while sock is not None and out:
            try:
                n = sock.send(out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._disconnect(f"send failed: {exc}")
                return
            del out[:n]

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._disconnect(f"receive failed: {exc}")
            return
        if not data:
            self._disconnect("closed by the collector")
            return
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            self._disconnect(f"bad frame from the collector: {exc}")
            return
        for msg in messages:
            if self._sock is None:
                return
            self._handle(msg)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, Welcome):
            if self._welcomed:
                self._disconnect("second WELCOME")
                return
            self._on_welcome(msg.last_seq)
        elif not self._welcomed:
            if isinstance(msg, ErrorMsg):
                self._on_error(msg)
            else:
                self._disconnect(f"expected WELCOME, got {type(msg).__name__}")
        elif isinstance(msg, Ack):
            self._on_ack(msg.seq)
        elif isinstance(msg, Requeue):
            self._on_requeue(msg)
        elif isinstance(msg, ErrorMsg):
            self._on_error(msg)
        else:
            self._disconnect(f"unexpected {type(msg).__name__} from the collector")

    def _on_welcome(self, last_seq: int) -> None:
        self._welcomed = True
        self._backoff = _FIRST_BACKOFF
        if self._connect_failures:
            log.info(
                "qdash_mp client: connected to the collector at %s after %d failed attempts",
                self._socket_path,
                self._connect_failures,
            )
            self._connect_failures = 0
        self._throttle.reset("connect")
        if last_seq > self._seq:
            # The collector knows more batches of this id than we ever made (an id clash):
            # number on from there so new batches are not mistaken for duplicates.
            log.warning(
                "qdash_mp client: collector reports batch %d applied for client %s, which "
                "only made %d; continuing from %d",
                last_seq,
                self._client_id,
                self._seq,
                last_seq,
            )
            self._seq = last_seq
        self._on_ack(last_seq)
        for _seq, frame in self._unacked:
            self._out += frame
        self._flush_out()

    def _on_ack(self, seq: int) -> None:
        seq = min(seq, self._seq)
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            unacked.popleft()
        if seq > self._acked:
            with self._cond:
                self._acked = seq
                self._cond.notify_all()

    def _on_error(self, msg: ErrorMsg) -> None:
        level = logging.ERROR if msg.code == ErrorCode.VERSION else logging.WARNING
        self._throttle.log(
            f"error-{msg.code}",
            level,
            "qdash_mp client: the collector at %s refused the connection (%s): %s",
            self._socket_path,
            msg.code,
            msg.reason,
        )
        self._disconnect(None)
        if msg.code == ErrorCode.VERSION:
            self._backoff = self._reconnect_max
        self._schedule_reconnect()
        if self._closing:
            with self._cond:
                self._gave_up = True
                self._cond.notify_all()

    # ------------------------------------------------------------------ batches

    def _cycle(self) -> None:
        """Turn everything new into batches (as far as ``max_unacked`` allows) and send."""
        with self._cond:
            gen = self._flush_gen
        owed = len(self._failed_jobs)  # reported before this cycle; all must go out to cut
        pending = list(self._deltas().items())
        while len(self._unacked) < self._max_unacked and self._sock is not None:
            batch = self._next_batch(pending, 0)
            if batch is None:
                break
            seq, frame, taken = batch
            owed -= taken
            self._unacked.append((seq, frame))
            self._send(frame)
        if not pending and owed <= 0:
            self._cut(gen)

    def _next_batch(
        self, pending: list[tuple[str, list[int]]], max_jobs: int
    ) -> tuple[int, bytes, int] | None:
        """Number the next batch from counter rows taken off ``pending`` and failed jobs
        taken off the deque: as many as fit in a batch, and at most ``max_jobs`` of them
        (``max_jobs < 1``: no such limit). ``(seq, frame, failed jobs taken)``, or ``None``
        if there is nothing to send.
        """
        jobs = self._failed_jobs
        chunk = pending[:_QUEUES_PER_BATCH]
        del pending[: len(chunk)]
        limit = self._max_batch_failed if max_jobs < 1 else min(self._max_batch_failed, max_jobs)
        packed: list[bytes] = []
        size = 0
        while jobs and len(packed) < limit:
            item = jobs[0]
            if packed and size + len(item) > _BATCH_BYTES:
                break
            packed.append(jobs.popleft())
            size += len(item)
        if not chunk and not packed:
            return None
        seq = self._seq + 1
        frame = encode_batch(seq, {q: (d[0], d[1], d[2], d[3]) for q, d in chunk}, packed)
        self._seq = seq
        for q, deltas in chunk:
            for kind, delta in enumerate(deltas):
                if delta:
                    sent = self._sent[kind]
                    sent[q] = sent.get(q, 0) + delta
        return seq, frame, len(packed)

    def _cut(self, gen: int) -> None:
        """Every count and failed job reported before flush generation ``gen`` is batched."""
        with self._cond:
            self._cut_gen = max(self._cut_gen, gen)
            self._cut_seq = self._seq
            self._cut_stream = self._gen
            self._cond.notify_all()

    # ------------------------------------------------------------------ spool

    def _spool_threshold(self) -> int:
        """Failed jobs in memory past which they go to disk (if they cannot go out now).

        The bound itself while disconnected; halfway to the hard limit while a connection
        is being set up or is busy, so a collector that is merely slow or just came back
        gets a chance before its client retires its id to a spool file.
        """
        bound = self._max_pending_failed
        return bound if self._sock is None else (bound + self._hard_pending) // 2

    def _can_spool(self, now: float) -> bool:
        spool = self._spool
        if spool is None:
            return now >= self._spool_retry_at
        return not spool.broken

    def _spool_now(self) -> bool:
        """Batch everything not yet batched and move every unacknowledged batch to disk.

        The batches are numbered first and stay in ``_unacked`` until the spool file has
        them durably (fsync); so a failed write loses nothing and leaves the state as if
        the collector were merely slow. After a write the live connection (if any) is
        dropped: this client id's batches now live in the file, and the next connection
        hands the file to the replayer and goes on under a new id (``_retire_spool``).
        """
        assert self._spool_dir is not None
        with self._cond:
            gen = self._flush_gen
        owed = len(self._failed_jobs)
        pending = list(self._deltas().items())
        while owed > 0 or pending:
            batch = self._next_batch(pending, owed)
            if batch is None:
                break
            seq, frame, taken = batch
            owed -= taken
            self._unacked.append((seq, frame))
        self._cut(gen)
        if not self._unacked:
            return True
        spool = self._spool
        try:
            if spool is None:
                spool = SpoolFile.create(self._spool_dir, self._client_id, tag=self._gen)
                spool.acked = self._acked
                self._spool = spool
                with self._cond:
                    self._spools_pending.add(self._gen)
            spool.append([(s, f) for s, f in self._unacked if s > spool.last_seq])
        except (OSError, ValueError) as exc:
            self._spool_retry_at = time.monotonic() + _SPOOL_RETRY
            self._throttle.log(
                "spool-error",
                logging.ERROR,
                "qdash_mp client: cannot write the spool in %s (%s); failed jobs stay in "
                "memory, and past %d their details are dropped",
                self._spool_dir,
                exc,
                self._hard_pending,
            )
            return False
        self._unacked.clear()
        if self._sock is not None:
            self._disconnect(None)
        return True

    def _final_spool(self) -> None:
        """(Sender thread, stopping) Spool whatever the collector has not acknowledged."""
        try:
            if self._unacked or self._has_news():
                if self._spool is not None and self._spool.broken:
                    log.error(
                        "qdash_mp client %s: %d batches and the counts since are lost: the "
                        "spool file %s could not be written",
                        self._client_id,
                        len(self._unacked),
                        self._spool.path,
                    )
                else:
                    self._spool_now()
        except Exception:
            log.exception("qdash_mp client: could not spool at close")
        finally:
            if self._spool is not None:
                self._spool.release()  # the file stays, for the next client with this dir

    def _retire_spool(self) -> None:
        """Hand the spool of the current client id to the replayer; continue as a new id."""
        spool = self._spool
        replayer = self._replayer
        assert spool is not None
        assert replayer is not None
        self._spool = None
        spool.extra = list(self._unacked)  # only after a failed write: the rest of the id
        spool.acked = max(spool.acked, self._acked)
        self._unacked.clear()
        old = self._client_id
        self._client_id = uuid.uuid4().hex
        self._seq = 0
        with self._cond:
            self._gen += 1
            self._acked = 0
        log.info(
            "qdash_mp client: the collector at %s is back; %d spooled batches of client %s "
            "are replayed from %s, new batches go out as client %s",
            self._socket_path,
            spool.pending(),
            old,
            spool.path,
            self._client_id,
        )
        replayer.add(spool)

    def _spool_replayed(self, spool: SpoolFile) -> None:
        """(Replayer thread) A spool file was fully acknowledged."""
        if isinstance(spool.tag, int):
            with self._cond:
                self._spools_pending.discard(spool.tag)
                self._cond.notify_all()

    def _replay_unreachable(self) -> None:
        """(Replayer thread) The collector could not be reached for a replay."""
        if self._closing:
            with self._cond:
                self._gave_up = True
                self._cond.notify_all()

    def _deltas(self) -> dict[str, list[int]]:
        """``cumulative - sent`` per queue, for the queues where anything changed."""
        rows: dict[str, list[int]] = {}
        for kind, (counts, sent) in enumerate(zip(self._counts, self._sent, strict=True)):
            snap = counts.copy()  # one C call: a consistent view while hooks keep counting
            if snap == sent:
                continue
            for q, value in snap.items():
                delta = value - sent.get(q, 0)
                if delta:
                    row = rows.get(q)
                    if row is None:
                        row = rows[q] = [0, 0, 0, 0]
                    row[kind] = min(delta, MAX_INT)
        return rows

    # ------------------------------------------------------------------ requeue

    def _on_requeue(self, msg: Requeue) -> None:
        queues = self._requeue_queues
        if self._requeue is None or queues is None:
            self._answer(msg.request_id, False, "this client has no requeue callback")
            return
        if ALL_QUEUES not in queues and msg.queue not in queues:
            self._answer(msg.request_id, False, f"this client does not requeue {msg.queue!r}")
            return
        if self._requeue_jobs is None:
            self._requeue_jobs = queue_mod.SimpleQueue()
            threading.Thread(
                target=self._requeue_worker,
                args=(self._requeue_jobs,),
                name=f"qdash-requeue-{self._client_id[:8]}",
                daemon=True,
            ).start()
        self._requeue_jobs.put((self._conn_gen, msg.request_id, msg.queue, msg.failed.job()))

    def _requeue_worker(
        self, jobs: queue_mod.SimpleQueue[tuple[int, int, str, Job] | None]
    ) -> None:
        requeue = self._requeue
        assert requeue is not None
        while (item := jobs.get()) is not None:
            conn_gen, request_id, _queue, job = item
            try:
                requeue(job)
            except Exception as exc:  # noqa: BLE001 -- any failure is the answer
                text, _trace = describe_error(exc)
                self._requeue_results.append((conn_gen, request_id, False, text[:4096]))
            else:
                self._requeue_results.append((conn_gen, request_id, True, ""))
            self._wake()

    def _send_requeue_results(self) -> None:
        results = self._requeue_results
        while results:
            conn_gen, request_id, ok, error = results.popleft()
            if conn_gen == self._conn_gen and self._sock is not None:
                self._answer(request_id, ok, error)
            else:
                log.warning(
                    "qdash_mp client: requeue answer %d (ok=%s) not delivered: the "
                    "connection it came on is gone",
                    request_id,
                    ok,
                )

    def _answer(self, request_id: int, ok: bool, error: str) -> None:
        self._send(encode(RequeueResult(request_id=request_id, ok=ok, error=error)))


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

    def on_failed(self, queue: str, job: Job | None, error: BaseException | str) -> None:
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


# ---------------------------------------------------------------------- helpers


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _requeue_list(
    requeue: RequeueFn | None, queues: Iterable[str] | None
) -> tuple[str, ...] | None:
    if requeue is None:
        if queues is not None:
            raise ConfigError("requeue_queues needs a requeue callback")
        return None
    if not callable(requeue):
        raise ConfigError(f"requeue must be callable, not {type(requeue).__name__}")
    if queues is None:
        return (ALL_QUEUES,)
    if isinstance(queues, str):
        raise ConfigError("requeue_queues must be a list of queue names, not a str")
    names = tuple(queues)
    if not names:
        raise ConfigError("requeue_queues must not be empty (None means every queue)")
    for q in names:
        if not isinstance(q, str) or not 1 <= len(q) <= MAX_NAME:
            raise ConfigError(f"invalid queue name in requeue_queues: {q!r}")
    return tuple(str.__str__(q) for q in names)


def _text(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return str.__str__(text)[:limit]


def _job_id(value: object) -> str:
    return _text(value, MAX_ID) or uuid.uuid4().hex


def _attempts(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT:
        return int(value)
    return 0


def _timestamp(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        ts = float(value)
        if math.isfinite(ts) and abs(ts) <= MAX_TIMESTAMP:  # a datetime-able second
            return ts
    return None


def _utf8_ok(text: str) -> bool:
    """Can ``text`` travel as a msgpack str (no lone surrogates)?"""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------------- process hooks

_live: weakref.WeakSet[Client] = weakref.WeakSet()
_hooks_installed = False
_mp_watched = False
_hooks_lock = threading.Lock()


class _Token:
    """A weak-referenceable key for ``multiprocessing.util.register_after_fork``."""


_MP_TOKEN = _Token()


def _install_process_hooks() -> None:
    """Once per interpreter (inherited by forks): atexit close, fork reset, mp finalizer."""
    global _hooks_installed  # noqa: PLW0603 -- once-per-interpreter registration
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(_close_all_at_exit)
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _watch_multiprocessing(direct=True)


def _watch_multiprocessing(*, direct: bool) -> None:
    """Close clients when a ``multiprocessing`` child exits (it skips ``atexit``).

    Only if ``multiprocessing`` is already imported (it is never imported here). A forked
    ``multiprocessing`` child clears its finalizers in ``Process._bootstrap`` and then runs
    the after-fork registry, which (inherited from the parent) installs ours again.
    """
    global _mp_watched  # noqa: PLW0603 -- once per interpreter, inherited by forks
    mp_util: Any = sys.modules.get("multiprocessing.util")
    if mp_util is None or _mp_watched:
        return
    _mp_watched = True
    mp_util.register_after_fork(_MP_TOKEN, _install_mp_finalizer)
    if direct:
        _install_mp_finalizer(_MP_TOKEN)


def _install_mp_finalizer(_token: object) -> None:
    mp_util: Any = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.Finalize(None, _close_all_at_exit, exitpriority=100)


def _after_fork_in_child() -> None:
    global _hooks_lock  # noqa: PLW0603 -- the parent's lock may have been held at fork
    _hooks_lock = threading.Lock()
    for client in list(_live):
        try:
            client._after_fork_in_child()
        except Exception:
            log.exception("qdash_mp client: could not reset a client after fork")
    _watch_multiprocessing(direct=False)


def _close_all_at_exit() -> None:
    deadline = time.monotonic() + _EXIT_WAIT
    for client in list(_live):
        try:
            client.close(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("qdash_mp client: close at exit failed")
