"""The sender's spool half: while the collector is away, batches go to a spool file.

Mixed into ``Sender`` (``qdash_mp.client.sender``), whose state it shares: the batches are
numbered and kept in ``session.unacked`` until the spool file holds them durably, the file
is handed to the ``Replayer`` at the next connection, and the live stream goes on under a
new client id. What is guaranteed, and why, is in ``docs/client.md`` (spooling).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

from qdash_mp.client.spool import SpoolFile

if TYPE_CHECKING:
    from qdash_mp.client.batcher import Batcher
    from qdash_mp.client.options import SenderConfig
    from qdash_mp.client.replay import Replayer
    from qdash_mp.client.session import Session
    from qdash_mp.throttle import LogThrottle

__all__ = ["Spooling"]

log = logging.getLogger("qdash_mp.client.spooling")

_SPOOL_RETRY = 5.0
"""Seconds before trying again to create a spool file after that failed."""


class Spooling:
    """``Sender``'s methods that write, retire and account for spool files."""

    # The sender's state these methods use (set in ``Sender.__init__``).
    _config: SenderConfig
    session: Session
    _batcher: Batcher
    _cond: threading.Condition
    _failed_jobs: collections.deque[bytes]
    _throttle: LogThrottle
    _flush_gen: int
    _gen: int
    spool: SpoolFile | None
    _spools_pending: set[int]
    _spool_retry_at: float
    replayer: Replayer | None

    def _cut(self, gen: int) -> None:
        raise NotImplementedError  # ``Sender._cut``

    def _give_up_if_closing(self) -> None:
        raise NotImplementedError  # ``Sender._give_up_if_closing``

    def _spool_threshold(self) -> int:
        """Failed jobs in memory past which they go to disk (if they cannot go out now).

        The bound itself while disconnected; halfway to the hard limit while a connection
        is being set up or is busy, so a collector that is merely slow or just came back
        gets a chance before its client retires its id to a spool file.
        """
        bound = self._config.max_pending_failed
        if self.session.sock is None:
            return bound
        return (bound + self._config.hard_pending) // 2

    def _can_spool(self, now: float) -> bool:
        spool = self.spool
        if spool is None:
            return now >= self._spool_retry_at
        return not spool.broken

    def _spool_now(self) -> bool:
        """Batch everything not yet batched and move every unacknowledged batch to disk.

        The batches are numbered first and stay in ``unacked`` until the spool file has
        them durably (fsync); so a failed write loses nothing and leaves the state as if
        the collector were merely slow. After a write the live connection (if any) is
        dropped: this client id's batches now live in the file, and the next connection
        hands the file to the replayer and goes on under a new id (``_retire_spool``).
        """
        spool_dir = self._config.spool_dir
        assert spool_dir is not None
        session = self.session
        with self._cond:
            gen = self._flush_gen
        self._batcher.replay()  # as in _cycle: recorded hooks' failed jobs are owed too
        owed = len(self._failed_jobs)
        pending = self._batcher.deltas(live=False)  # a spool carries no gauges or events
        while owed > 0 or pending:
            seq = session.seq + 1
            batch = self._batcher.next_batch(seq, pending, owed)
            if batch is None:
                break
            frame, taken = batch
            session.seq = seq
            owed -= taken
            session.unacked.append((seq, frame))
        self._cut(gen)
        if not session.unacked:
            return True
        spool = self.spool
        try:
            if spool is None:
                spool = SpoolFile.create(spool_dir, session.client_id, tag=self._gen)
                spool.acked = session.acked
                self.spool = spool
                with self._cond:
                    self._spools_pending.add(self._gen)
            spool.append([(s, f) for s, f in session.unacked if s > spool.last_seq])
        except (OSError, ValueError) as exc:
            self._spool_retry_at = time.monotonic() + _SPOOL_RETRY
            self._throttle.log(
                "spool-error",
                logging.ERROR,
                "qdash_mp client: cannot write the spool in %s (%s); failed jobs stay in "
                "memory, and past %d their details are dropped",
                spool_dir,
                exc,
                self._config.hard_pending,
            )
            return False
        session.unacked.clear()
        if session.sock is not None:
            session.disconnect(None)
        return True

    def _final_spool(self) -> None:
        """(Sender thread, stopping) Spool whatever the collector has not acknowledged."""
        try:
            if self.session.unacked or self._batcher.has_news():
                if self.spool is not None and self.spool.broken:
                    log.error(
                        "qdash_mp client %s: %d batches and the counts since are lost: the "
                        "spool file %s could not be written",
                        self.session.client_id,
                        len(self.session.unacked),
                        self.spool.path,
                    )
                else:
                    self._spool_now()
        except Exception:
            log.exception("qdash_mp client: could not spool at close")
        finally:
            if self.spool is not None:
                self.spool.release()  # the file stays, for the next client with this dir

    def _retire_spool(self) -> None:
        """Hand the spool of the current client id to the replayer; continue as a new id."""
        spool = self.spool
        replayer = self.replayer
        session = self.session
        assert spool is not None
        assert replayer is not None
        self.spool = None
        spool.extra = list(session.unacked)  # only after a failed write: the rest of the id
        spool.acked = max(spool.acked, session.acked)
        old = session.client_id
        with self._cond:
            session.new_stream(uuid.uuid4().hex)
            self._gen += 1
        log.info(
            "qdash_mp client: the collector at %s is back; %d spooled batches of client %s "
            "are replayed from %s, new batches go out as client %s",
            self._config.socket_path,
            spool.pending(),
            old,
            spool.path,
            session.client_id,
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
        self._give_up_if_closing()
