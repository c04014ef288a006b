"""Deferred job hooks: an adapter appends one tuple per hook; the sender thread replays them.

Why: in a real worker a hook runs cold. Between two tasks the library, redis-server and the
kernel have filled the caches and branch predictors, so every line of Python a hook runs
costs several times what it costs in a loop. Measured in a Dramatiq worker (one CPU,
``docs/integrations.md``): the adapter's ``before_process_message`` took 16 us and its end
hook 10 us there, against 1.4 us for both in a loop. A ``list.append`` of a tuple is the
least code a hook can run; the sender turns a tick's records into ``Client`` hook calls in
one warm loop, before it reads any count (``Batcher.replay``), so a flush still covers
everything appended before it.

Records, appended by any thread (a job's records in the order its hooks ran)::

    (obj, mono)                 the job ``obj`` started, at ``time.monotonic()`` ``mono``
    (obj, mono, PROCESSED, None)   it ended: processed,
    (obj, mono, RETRIED, None)     ended in a library retry (the next attempt is a new run),
    (obj, mono, FAILED, error)     failed with ``error`` (an exception, or a text),
    (obj, mono, DROPPED, None)     ended uncounted (skipped by the library): no longer active

``describe(obj, full)`` (the adapter's, called on the sender thread) returns ``(queue, job)``;
``full`` asks for the failed job's payload. An end that is not a failure reuses what its
start's record described (the same ``obj``, held until then): one call a job, not two.
``obj`` is whatever the adapter's hook holds (a Dramatiq message): it must still describe the
same job when the sender gets to it, which is at most a tick later. The start's wall time is
its ``mono`` moved by ``time.time() - time.monotonic()`` taken at the replay; the runtime is
end ``mono`` minus start ``mono``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qdash_mp.models import Job
from qdash_mp.throttle import LogThrottle

if TYPE_CHECKING:
    from qdash_mp.client.hooks import Client

__all__ = ["DROPPED", "FAILED", "PROCESSED", "RETRIED", "Describe", "RunLog"]

log = logging.getLogger("qdash_mp.client.runlog")

PROCESSED = 0
RETRIED = 1
FAILED = 2
DROPPED = 3

Describe = Callable[[Any, bool], tuple[str, Job]]
"""``describe(obj, full) -> (queue, job)``: the job a record's ``obj`` stands for."""

MAX_OPEN = 100_000
"""Started jobs whose description a log keeps for their end; beyond, it forgets them all
(their ends are then described again: nothing is lost but the saving)."""

_CLOSED: Any = collections.deque(maxlen=0)
"""Where records go while no client replays them (none yet, or it closed): dropped as they
come, so a worker running tasks with no client to report them does not grow a list forever."""


class RunLog:
    """Records of job hooks for one process's ``Client`` (``Client(run_log=...)``).

    Hooks append to ``records`` (read it at each call: it is swapped). Records are kept
    only while a client replays them: from ``attach`` (``Client(run_log=...)`` calls it)
    until that client closes, so a log no client ever took drops what it is given.
    """

    __slots__ = ("_describe", "_lock", "_open", "_owner", "_throttle", "records")

    def __init__(self, describe: Describe) -> None:
        self.records: list[Any] = _CLOSED
        self._describe = describe
        self._lock = threading.Lock()  # one replayer at a time (an old client may still run)
        self._owner: object = None
        self._throttle = LogThrottle(log)
        # id(obj) -> (obj, queue, job) of jobs replayed as started and not yet ended; obj is
        # held, so its id cannot be reused meanwhile (sender thread only).
        self._open: dict[int, tuple[Any, str, Job]] = {}

    def attach(self, client: object) -> None:
        """``client`` replays this log from now on: records are kept (again)."""
        with self._lock:
            self._owner = client
            if self.records is _CLOSED:
                self.records = []

    def detach(self, client: object) -> None:
        """(``client`` closed, its last replay done) Unless another client took the log over
        meanwhile, drop records from now on."""
        with self._lock:
            if self._owner is client:
                self._owner = None
                self.records = _CLOSED

    def forget_in_child(self) -> None:
        """(Forked child) The parent's records are the parent's to report: start empty."""
        self.records = []
        self._open = {}
        self._lock = threading.Lock()  # the parent's sender may have held it at the fork

    def pending(self) -> int:
        """Records not replayed yet."""
        return len(self.records)

    def replay(self, client: Client) -> int:
        """Call ``client``'s hooks for every record so far, in order; the records replayed."""
        with self._lock:
            records = self.records
            k = len(records)
            if not k:
                return 0
            # Hooks only append at the end and only this takes from the front: the first k
            # are exactly the ones taken, whatever is appended meanwhile.
            chunk = records[:k]  # (the closed sink is always empty: k was 0)
            del records[:k]
        offset = time.time() - time.monotonic()
        describe = self._describe
        jobs = client._jobs
        opened = self._open
        for rec in chunk:
            try:
                if len(rec) == 2:
                    obj = rec[0]
                    queue, job = describe(obj, False)
                    client._started_at(queue, job, rec[1] + offset, rec[1])
                    opened[id(obj)] = (obj, queue, job)
                    continue
                obj, mono, outcome, error = rec
                known = opened.pop(id(obj), None)
                if known is not None and known[0] is obj and outcome != FAILED:
                    queue, job = known[1], known[2]
                else:  # a failure's payload, or a start this log did not see
                    queue, job = describe(obj, outcome == FAILED)
                entry = jobs.get(job.id)
                runtime = None if entry is None else max(mono - entry[4], 0.0)
                if outcome == PROCESSED:
                    client.on_processed(queue, job, runtime)
                elif outcome == RETRIED:
                    client.on_retried(queue, job)
                elif outcome == FAILED:
                    client.on_failed(queue, job, error, runtime)
                else:  # as on_retried's end of the entry, counting nothing
                    jobs.pop(job.id, None)
            except Exception as exc:  # noqa: BLE001 -- one bad record must not stop the rest
                self._throttle.log(
                    "bad-record",
                    logging.ERROR,
                    "qdash_mp client: a job record could not be reported (%r): %s",
                    rec[:2],
                    exc,
                )
        if len(opened) > MAX_OPEN:  # starts that never ended (a bug's leak): forget them
            opened.clear()
        return k
