"""The spool replayer: a thread that sends spool files to the collector, one at a time.

Each file is replayed through the same ``Session`` the live sender uses, as the file's
client id: HELLO, WELCOME's ``last_seq`` says which batches are applied, the rest follow in
order (at most ``window`` unacknowledged), and the file is deleted once an ACK covers its
last batch. The collector's (client id, seq) dedup makes a repeated or partial replay exact.
A collector that refuses the file's batches (ERROR ``sequence`` or ``protocol``) gets the
file set aside as ``.rejected``; one that cannot be reached is retried with the session's
backoff. Orphans are looked for at start and every ``rescan`` seconds.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from qdash_mp.client.session import Session, SessionEvents, new_selector
from qdash_mp.client.spool import REJECTED, SpoolFile, adopt_orphans
from qdash_mp.throttle import LogThrottle
from qdash_mp.wire import ErrorCode

__all__ = ["ACK_TIMEOUT", "RESCAN_INTERVAL", "Replayer"]

log = logging.getLogger("qdash_mp.client.replay")

RESCAN_INTERVAL = 30.0
ACK_TIMEOUT = 30.0
"""A replay connection that gets no ACK progress for this long is dropped and retried."""
_POLL = 0.2


class _Unavailable(Exception):
    """The collector cannot take the replay now; try again later."""


class _Rejected(Exception):
    """The collector refuses this file's batches as they are; set the file aside."""


class _Stopped(Exception):
    """The replayer is stopping."""


class Replayer:
    """A thread that sends spool files to the collector, one at a time, oldest first.

    ``add`` hands it a file this process spooled itself (sent before orphans); it also
    takes over orphans in ``directory`` at start and every ``rescan`` seconds.
    ``on_done(spool)`` runs (in the replayer thread) after a file was fully acknowledged
    and deleted; ``on_unreachable()`` after each failed attempt to reach the collector.
    """

    def __init__(
        self,
        directory: Path,
        socket_path: str,
        host: str,
        *,
        window: int = 16,
        reconnect_max: float = 1.0,
        rescan: float = RESCAN_INTERVAL,
        on_done: Callable[[SpoolFile], None] | None = None,
        on_unreachable: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self.socket_path = socket_path
        self.rescan = rescan
        self._on_done = on_done
        self._on_unreachable = on_unreachable
        self._lock = threading.Lock()
        self._own: collections.deque[SpoolFile] = collections.deque()
        self._orphans: collections.deque[SpoolFile] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        # Events go nowhere: what went wrong is read off the session after each attempt.
        self._session = Session(
            socket_path, host, SessionEvents(), window=window, reconnect_max=reconnect_max
        )
        self._sel: selectors.BaseSelector | None = None
        self._throttle = LogThrottle(log)

    def start(self, name: str = "qdash-spool") -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, spool: SpoolFile) -> None:
        """Replay ``spool`` (held by this process) before any orphan."""
        with self._lock:
            self._own.append(spool)
        self._wake.set()

    def pending(self) -> int:
        """Batches in the files held here that the collector has not acknowledged."""
        with self._lock:
            return sum(s.pending() for s in (*self._own, *self._orphans))

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread; the files it still holds are released (left for a later client)."""
        self._stop = True
        self._wake.set()
        thread = self._thread
        if thread is None:
            self._release_all()
        elif thread is not threading.current_thread():
            thread.join(timeout)

    def forget_in_child(self) -> None:
        """In a forked child: close the inherited descriptors, touching no lock and no file."""
        for spool in [*self._own, *self._orphans]:
            spool.release()
        self._own.clear()
        self._orphans.clear()
        self._session.forget_in_child()
        if self._sel is not None:
            self._sel.close()
            self._sel = None

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        next_scan = 0.0
        self._sel = sel = new_selector()
        try:
            while not self._stop:
                now = time.monotonic()
                if now >= next_scan:
                    self._scan()
                    next_scan = now + self.rescan
                spool = self._next()
                if spool is None:
                    self._sleep(next_scan - time.monotonic())
                    continue
                self._attempt(spool, sel)
        finally:
            self._session.disconnect(None)
            sel.close()
            self._release_all()

    def _attempt(self, spool: SpoolFile, sel: selectors.BaseSelector) -> None:
        try:
            self._replay(spool, sel)
        except _Stopped:
            return
        except _Unavailable as exc:
            self._throttle.log(
                "unavailable",
                logging.WARNING,
                "qdash_mp spool: cannot replay %s to the collector at %s (%s); "
                "%d batches wait on disk, retrying",
                spool.path.name,
                self.socket_path,
                exc,
                spool.pending(),
            )
            if self._on_unreachable is not None:
                self._on_unreachable()
            self._sleep(self._session.next_connect - time.monotonic())
        except _Rejected as exc:
            self._drop(spool)
            with contextlib.suppress(OSError):
                aside = spool.set_aside(REJECTED)
                log.error(
                    "qdash_mp spool: the collector refuses %s (%s); set aside as %s",
                    spool.path,
                    exc,
                    aside.name,
                )
        except OSError as exc:
            log.error("qdash_mp spool: cannot read %s: %s; left for later", spool.path, exc)
            self._drop(spool)
            spool.release()
        except Exception:
            log.exception("qdash_mp spool: unexpected error replaying %s", spool.path)
            self._sleep(self._session.reconnect_max)
        else:
            self._finish(spool)
        finally:
            self._session.disconnect(None)

    def _scan(self) -> None:
        found = adopt_orphans(self.directory)
        if found:
            with self._lock:
                self._orphans.extend(found)

    def _next(self) -> SpoolFile | None:
        with self._lock:
            if self._own:
                return self._own[0]
            return self._orphans[0] if self._orphans else None

    def _drop(self, spool: SpoolFile) -> None:
        with self._lock:
            for queue in (self._own, self._orphans):
                with contextlib.suppress(ValueError):
                    queue.remove(spool)

    def _finish(self, spool: SpoolFile) -> None:
        self._drop(spool)
        try:
            spool.remove()
        except OSError as exc:
            log.error(
                "qdash_mp spool: %s is replayed but could not be deleted: %s", spool.path, exc
            )
        else:
            log.info(
                "qdash_mp spool: %s replayed (client %s, batches up to %d) and deleted",
                spool.path.name,
                spool.client_id,
                spool.last_seq,
            )
        self._throttle.reset("unavailable")
        if self._on_done is not None:
            self._on_done(spool)

    def _release_all(self) -> None:
        with self._lock:
            spools = [*self._own, *self._orphans]
            self._own.clear()
            self._orphans.clear()
        for spool in spools:
            spool.release()

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and not self._stop:
            self._wake.wait(seconds)
        self._wake.clear()

    # ------------------------------------------------------------------ one connection

    def _replay(self, spool: SpoolFile, sel: selectors.BaseSelector) -> None:
        """Send ``spool``'s unapplied batches; returns once the collector acknowledged them all."""
        session = self._session
        session.new_stream(spool.client_id, seq=spool.last_seq, acked=spool.acked)
        if not session.connect(sel):
            raise _Unavailable(session.lost or "cannot connect")
        frames: Iterator[tuple[int, bytes]] | None = None
        progress = time.monotonic()
        while spool.pending():
            if self._stop:
                raise _Stopped
            for _key, mask in sel.select(_POLL):
                session.on_event(mask)
            now = time.monotonic()
            session.check_handshake(now)
            if session.sock is None:
                self._failed(session)
            if not session.welcomed:
                continue
            if session.acked > spool.acked:
                progress = now
                spool.ack(session.acked)
            if frames is None:
                frames = spool.frames(spool.acked)  # WELCOME said what is applied already
            while session.room:
                item = next(frames, None)
                if item is None:
                    break
                session.push(*item)
            if now - progress > ACK_TIMEOUT:
                session.disconnect(f"no acknowledgement for {ACK_TIMEOUT:g} s")
                self._failed(session)
            session.update_interest()

    @staticmethod
    def _failed(session: Session) -> None:
        """The connection is gone: why, as the exception the thread acts on."""
        msg = session.refused
        if msg is not None and msg.code in (ErrorCode.SEQUENCE, ErrorCode.PROTOCOL):
            raise _Rejected(f"ERROR {msg.code}: {msg.reason}")
        raise _Unavailable(session.lost or "connection closed")
