"""The client's sender thread: cumulative counts -> numbered batches -> the session or the spool.

Every ``flush_interval`` (or sooner when a flush, a close or a full failed-job backlog asks)
the thread reads the hooks' cumulative dicts, sends ``cumulative - last_sent`` plus the
packed failed jobs as BATCH frames through its ``Session`` (at most ``max_unacked`` in
flight), and marks a flush *cut* once everything reported before that flush is batched; the
flush is done when the cut batch is acknowledged. With a ``spool_dir``, what cannot go out
goes to a spool file, which the ``Replayer`` sends later under its own id (see
``docs/client.md``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

from qdash_mp.client.batcher import Batcher
from qdash_mp.client.lifecycle import LifeBatcher, LifeState
from qdash_mp.client.options import SenderConfig
from qdash_mp.client.replay import Replayer
from qdash_mp.client.requeue import Requeuer
from qdash_mp.client.session import CONNECT_TIMEOUT, Session, SessionEvents, new_selector
from qdash_mp.client.spool import SpoolFile
from qdash_mp.client.spooling import Spooling
from qdash_mp.client.tally import Counts
from qdash_mp.throttle import LogThrottle
from qdash_mp.wire import ErrorCode, ErrorMsg, Requeue

__all__ = ["Sender"]

log = logging.getLogger("qdash_mp.client.sender")

_SPOOL_JOIN = 10.0
"""Extra seconds ``close`` waits for the sender thread when it may be writing the spool."""


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Sender(Spooling, SessionEvents):
    """Ships the counts in ``counts`` (pushed, processed, failed, retried: queue -> cumulative
    counter, written only by hooks) and the packed records in ``failed_jobs`` as client
    ``client_id``.
    """

    def __init__(
        self,
        config: SenderConfig,
        client_id: str,
        counts: tuple[Counts, ...],
        failed_jobs: collections.deque[bytes],
        owner: object = None,
        life: LifeState | None = None,
        replay: Callable[[], None] | None = None,
    ) -> None:
        # The running thread holds the sender and so the owner (the Client): a client
        # dropped without close() stays alive, and is still closed and flushed at exit.
        self._owner = owner
        self._config = config
        self._failed_jobs = failed_jobs
        self._life = None if life is None else LifeBatcher(life)
        self._batcher = Batcher(counts, failed_jobs, config.max_batch_failed, self._life, replay)
        self._cond = threading.Condition(threading.Lock())  # sender <-> flush/close
        self._throttle = LogThrottle(log)
        self.session = Session(
            config.socket_path,
            config.host,
            self,
            window=config.max_unacked,
            reconnect_max=config.reconnect_max,
            requeue=config.requeue_queues,
            name=config.name,
            track=config.track,
        )
        self.session.new_stream(client_id)
        # flush(): waiters bump _flush_gen; the thread sets _cut_gen/_cut_seq/_cut_stream
        # once every count and failed job reported before that generation is inside batch
        # _cut_seq of stream _cut_stream.
        self._flush_gen = 0
        self._cut_gen = 0
        self._cut_seq = 0
        self._cut_stream = 0
        # Spool: _gen numbers this process's streams (client ids). While the collector is
        # away, batches of stream _gen go to the spool file; at the next connection that
        # file is handed to the replayer and the live stream starts over with a new id
        # (_gen + 1). _spools_pending: streams whose spool is not yet fully acknowledged.
        self._gen = 0
        self.spool: SpoolFile | None = None
        self._spools_pending: set[int] = set()
        self._spool_retry_at = 0.0
        self.replayer: Replayer | None = None
        if config.spool_dir is not None:
            self.replayer = Replayer(
                config.spool_dir,
                config.socket_path,
                config.host,
                window=config.max_unacked,
                reconnect_max=config.reconnect_max,
                on_done=self._spool_replayed,
                on_unreachable=self._replay_unreachable,
            )
        self._stop = False
        self._closing = False
        self._gave_up = False
        self._sel: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._requeuer = Requeuer(
            config.requeue, config.requeue_queues, self.wake, f"qdash-requeue-{client_id[:8]}"
        )
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        tag = self.session.client_id[:8]
        self._thread = threading.Thread(target=self._run, name=f"qdash-client-{tag}", daemon=True)
        self._thread.start()
        if self.replayer is not None:
            self.replayer.start(name=f"qdash-spool-{tag}")

    def forget_in_child(self) -> None:
        """(Forked child) Close this process's copies of sockets and files; touch no lock."""
        self.session.forget_in_child()
        for s in (self._wake_r, self._wake_w):
            s.close()
        if self._sel is not None:
            self._sel.close()
        if self.spool is not None:
            self.spool.release()  # the parent keeps its lock and file
        if self.replayer is not None:
            self.replayer.forget_in_child()

    def spool_pending(self) -> int:
        spool = self.spool
        n = spool.pending() if spool is not None else 0
        if self.replayer is not None:
            n += self.replayer.pending()
        return n

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------ flush / close

    def flush(self, timeout: float | None) -> bool:
        """Wait until everything reported so far is acknowledged; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            if self._thread is None or self._stop:
                return self._settled()
            self._flush_gen += 1
            gen = self._flush_gen
        self.wake()
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
        return stream < self._gen or self.session.acked >= seq

    def _settled(self) -> bool:
        """(Stopped) True if nothing reported is left unacknowledged."""
        return (
            not self.session.unacked and not self._batcher.has_news() and not self._spools_pending
        )

    def close(self, timeout: float | None) -> bool:
        """Flush (waiting at most ``timeout`` s), then stop every thread; True if all acked."""
        with self._cond:
            self._closing = True
        ok = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            extra = 0.0 if self._config.spool_dir is None else _SPOOL_JOIN
            thread.join(timeout=CONNECT_TIMEOUT + 1.0 + extra)
        if self.replayer is not None:
            self.replayer.stop(timeout=CONNECT_TIMEOUT + 1.0)
        self._requeuer.stop()
        if thread is None or not thread.is_alive():
            for s in (self._wake_r, self._wake_w):
                s.close()
        return ok

    def _give_up_if_closing(self) -> None:
        if self._closing:
            with self._cond:
                self._gave_up = True
                self._cond.notify_all()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        sel = new_selector()
        self._sel = sel
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        next_tick = time.monotonic() + self._config.flush_interval
        try:
            while not self._stop:
                try:
                    next_tick = self._step(sel, next_tick)
                except Exception:
                    log.exception("qdash_mp client: unexpected error in the sender thread")
                    self.session.disconnect("internal error")
                    time.sleep(self._config.reconnect_max)
        finally:
            self.session.disconnect(None)
            sel.close()
            if self._config.spool_dir is not None:
                self._final_spool()
            with self._cond:
                self._cond.notify_all()

    def _step(self, sel: selectors.BaseSelector, next_tick: float) -> float:
        session = self.session
        interval = self._config.flush_interval
        now = time.monotonic()
        if session.sock is None and now >= session.next_connect and self._wants_connection():
            session.connect(sel)
        now = time.monotonic()
        if session.sock is None:
            timeout = max(0.0, session.next_connect - now)
            if not self._wants_connection():
                timeout = max(timeout, interval)
        elif not session.welcomed:
            timeout = max(0.0, session.hello_deadline - now)
        else:
            timeout = max(0.0, next_tick - now)
        for key, mask in sel.select(timeout):
            if key.data is None:
                self._drain_wake()
            else:
                session.on_event(mask)
        self._requeuer.deliver(self.session)
        now = time.monotonic()
        session.check_handshake(now)
        if (
            self._config.spool_dir is not None
            and len(self._failed_jobs) >= self._spool_threshold()
            and not session.room
            and self._can_spool(now)
        ):
            self._spool_now()
        flush_wanted = self._flush_gen > self._cut_gen
        if self._life is not None and now >= next_tick and not session.welcomed:
            # Runtime lists are drained into the cumulative buckets whether or not the
            # collector is there, so they hold at most ~an interval's (or a backoff's) worth.
            # So are the hooks a RunLog recorded.
            self._batcher.replay()
            self._life.drain()
            next_tick = now + interval
        if session.sock is not None and session.welcomed:
            full = len(self._failed_jobs) >= self._config.max_batch_failed
            if now >= next_tick or flush_wanted or full:
                self._cycle()
                next_tick = now + interval
        elif flush_wanted:
            with self._cond:
                gen = self._flush_gen  # read before looking for news, as in _cycle
            if not session.unacked and not self._batcher.has_news():
                self._cut(gen)  # nothing to send: a flush needs no connection
        session.update_interest()
        return next_tick

    def _wants_connection(self) -> bool:
        if self._stop:
            return False
        if self._config.requeue is not None or self.session.unacked or self.spool is not None:
            return True
        return self._batcher.has_news()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        # A flush or close asked for something: do not make it wait out a backoff.
        if self.session.sock is None and (self._flush_gen > self._cut_gen or self._closing):
            self.session.next_connect = 0.0

    # ------------------------------------------------------------------ session events

    def on_unreachable(self, reason: str) -> None:
        self._throttle.log(
            "connect",
            logging.WARNING,
            "qdash_mp client: cannot reach the collector at %s: %s; counts are kept "
            "and sent once it is up",
            self._config.socket_path,
            reason,
        )
        self._give_up_if_closing()

    def on_connected(self) -> None:
        if self.spool is not None:
            self._retire_spool()  # the collector is back: the file goes, a new id comes

    def on_welcome(self, failures: int) -> None:
        self._batcher.ext_ok = self.session.version >= 2
        if self._life is not None:
            self._life.welcomed()
        if failures:
            log.info(
                "qdash_mp client: connected to the collector at %s after %d failed attempts",
                self._config.socket_path,
                failures,
            )
        self._throttle.reset("connect")

    def on_lost(self, reason: str) -> None:
        self._throttle.log(
            "disconnect",
            logging.WARNING,
            "qdash_mp client: connection to the collector at %s lost (%s); reconnecting",
            self._config.socket_path,
            reason,
        )

    def on_refused(self, msg: ErrorMsg) -> None:
        level = logging.ERROR if msg.code == ErrorCode.VERSION else logging.WARNING
        self._throttle.log(
            f"error-{msg.code}",
            level,
            "qdash_mp client: the collector at %s refused the connection (%s): %s",
            self._config.socket_path,
            msg.code,
            msg.reason,
        )
        self._give_up_if_closing()

    def on_acked(self, seq: int) -> None:
        with self._cond:
            self._cond.notify_all()

    def on_requeue(self, msg: Requeue) -> bool:
        self._requeuer.handle(msg, self.session)
        return True

    # ------------------------------------------------------------------ batches

    def _cycle(self) -> None:
        """Turn everything new into batches (as far as ``max_unacked`` allows) and send."""
        with self._cond:
            gen = self._flush_gen
        self._batcher.replay()  # hooks recorded before the flush: their failed jobs are owed
        owed = len(self._failed_jobs)  # reported before this cycle; all must go out to cut
        pending = self._batcher.deltas()
        session = self.session
        while session.room:
            seq = session.seq + 1
            batch = self._batcher.next_batch(seq, pending, 0)
            if batch is None:
                break
            frame, taken = batch
            session.seq = seq
            owed -= taken
            session.push(seq, frame)
        if not pending and owed <= 0:
            self._cut(gen)

    def _cut(self, gen: int) -> None:
        """Every count and failed job reported before flush generation ``gen`` is batched."""
        with self._cond:
            self._cut_gen = max(self._cut_gen, gen)
            self._cut_seq = self.session.seq
            self._cut_stream = self._gen
            self._cond.notify_all()
