"""Per-queue history that survives restarts: a point per minute for 24 h and per hour for 30 days.

Each point holds the jobs pushed / processed / failed in its minute (hour) and the runtime
summary (count, p50, p90, p95, p99, max) of the jobs that finished in it. The byte layout is in
``qdash_mp.history_format``; one fixed-size file per queue (153,024 bytes), so the directory
is bounded by the number of queues, and files of queues idle for 30 days are removed.

Two ways in:

* ``tick(totals, now)``: the collector calls it every second or so with each queue's
  *cumulative* totals (its shared-memory counters and lifetime runtime bucket counts). When
  the minute changes, the difference to the totals already counted (``base``, kept on disk)
  becomes the point of the minute that ended. Counts are exact over any sequence of restarts
  and ``kill -9``: what happened while the collector was down lands in the first minute
  closed after it is back, and a collector that dies mid-minute loses no count, only the
  attribution of that partial minute. An event is attributed to the minute in which the tick
  after it ran (at most one tick interval late).
* ``record(queue, minute_start, pushed, processed, failed, runtime_counts)``: deltas for one
  minute, when the caller already has them. Use one way or the other for a queue: ``record``
  does not move ``base``, so a later ``tick`` would count those deltas again.

Durability. Closing a minute writes, in this order: the finished hour's slot when the hour
changed, the new state copy (the alternate of A/B, holding the hour accumulator, ``base`` and
the minute's point), one ``fsync``, then the minute's slot. The fsync of the next minute
covers that slot; on open the slot is redone from the state. So a ``kill -9`` or power loss
loses at most the minute being accumulated (and with ``tick``, not even its counts). A state
copy or ring slot with a bad checksum is what a torn write leaves: the state falls back to
the other copy, a slot is skipped with a warning. A bad header, a wrong file size, both state
copies bad, or a slot in the wrong place raise ``HistoryCorrupt``.

Memory per queue: the state (two ``array('Q')`` of 418 counters, ~7 KiB) and a file
descriptor; reading points reads one ring (92 KiB or 46 KiB) and decodes it.
"""

from __future__ import annotations

import array
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qdash_mp.errors import HistoryCorrupt, HistoryError
from qdash_mp.fsio import fsync_dir, pwrite_all, try_flock, write_atomically
from qdash_mp.histogram import NBUCKETS, Counts, dense
from qdash_mp.history_format import (
    FILE_SIZE,
    HEADER_SIZE,
    HOUR,
    HOUR_RING,
    HOUR_SLOTS,
    MINUTE,
    MINUTE_RING,
    MINUTE_SLOTS,
    SLOT_SIZE,
    STATE_A,
    STATE_B,
    STATE_SIZE,
    Point,
    State,
    file_name,
    make_point,
    pack_header,
    pack_slot,
    pack_state,
    point_dict,
    unpack_header,
    unpack_slot,
    unpack_state,
)

__all__ = ["History", "QueueTotals", "RETENTION"]

log = logging.getLogger("qdash_mp.history")

RETENTION: dict[str, int] = {"minute": MINUTE_SLOTS * MINUTE, "hour": HOUR_SLOTS * HOUR}
"""Seconds of history per resolution (24 h of minutes, 30 days of hours)."""

_RINGS = {"minute": (MINUTE_RING, MINUTE_SLOTS, MINUTE), "hour": (HOUR_RING, HOUR_SLOTS, HOUR)}


@dataclass(frozen=True, slots=True)
class QueueTotals:
    """A queue's cumulative totals, as the collector's counters hold them."""

    pushed: int = 0
    processed: int = 0
    failed: int = 0
    runtime: Counts = ()


class _QueueFile:
    __slots__ = ("fd", "open_minute", "path", "queue", "state")

    def __init__(self, path: Path, queue: str, fd: int, state: State) -> None:
        self.path = path
        self.queue = queue
        self.fd = fd
        self.state = state
        self.open_minute: int | None = None  # tick's minute being accumulated (memory only)


class History:
    """The history directory; one writer process at a time (a ``flock`` on ``history.lock``).

    Not thread-safe: the collector calls ``tick`` and ``points`` from one thread (or one
    ``asyncio.to_thread`` at a time). A minute close costs one ``fsync`` per queue file.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        clock: Callable[[], float] = time.time,
        *,
        durable: bool = True,
    ) -> None:
        self._dir = Path(directory)
        self._clock = clock
        self._durable = durable  # False only for tests that simulate days of minutes
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self._dir / "history.lock", os.O_RDWR | os.O_CREAT, 0o600)
        if not try_flock(self._lock_fd):
            os.close(self._lock_fd)
            raise HistoryError(f"another process writes the history in {self._dir}")
        self._files: dict[str, _QueueFile] = {}
        try:
            for path in sorted(self._dir.glob("q-*.qh")):
                qf = self._open(path)
                self._files[qf.queue] = qf
        except BaseException:
            self.close()
            raise

    # -- files ---------------------------------------------------------------------------

    def _open(self, path: Path) -> _QueueFile:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size != FILE_SIZE:
                raise HistoryCorrupt(f"{path}: {size} bytes, a history file has {FILE_SIZE}")
            queue, _ = unpack_header(os.pread(fd, HEADER_SIZE, 0), str(path))
            if file_name(queue) != path.name:
                raise HistoryCorrupt(f"{path}: holds queue {queue!r}, not this file's")
            a = unpack_state(os.pread(fd, STATE_SIZE, STATE_A), str(path))
            b = unpack_state(os.pread(fd, STATE_SIZE, STATE_B), str(path))
            if a is None and b is None:
                raise HistoryCorrupt(f"{path}: both state copies are damaged")
            state = max((s for s in (a, b) if s is not None), key=lambda s: s.seq)
            qf = _QueueFile(path, queue, fd, state)
            if state.last is not None:  # redo the last minute's slot (maybe torn or lost)
                self._write_slot(qf, "minute", state.last)
        except BaseException:
            os.close(fd)
            raise
        return qf

    def _file(self, queue: str) -> _QueueFile:
        qf = self._files.get(queue)
        if qf is None:
            path = self._dir / file_name(queue)
            state = State()
            image = bytearray(FILE_SIZE)
            image[:HEADER_SIZE] = pack_header(queue, self._clock())
            image[STATE_A : STATE_A + STATE_SIZE] = pack_state(state)
            write_atomically(path, bytes(image))
            qf = self._files[queue] = self._open(path)
        return qf

    def _write_slot(self, qf: _QueueFile, resolution: str, p: Point) -> None:
        ring, slots, period = _RINGS[resolution]
        pwrite_all(qf.fd, pack_slot(p), ring + (p.t // period) % slots * SLOT_SIZE)

    def _save_state(self, qf: _QueueFile) -> None:
        s = qf.state
        s.seq += 1
        pwrite_all(qf.fd, pack_state(s), STATE_B if s.seq % 2 else STATE_A)
        if self._durable:
            os.fsync(qf.fd)

    # -- writing -------------------------------------------------------------------------

    def record(
        self,
        queue: str,
        minute_start: float,
        pushed: int,
        processed: int,
        failed: int,
        runtime_counts: Counts = (),
    ) -> None:
        """Add one minute's deltas; durable when this returns."""
        t = int(minute_start) // MINUTE * MINUTE
        self._close_minute(self._file(queue), t, [pushed, processed, failed], runtime_counts)

    def _close_minute(
        self,
        qf: _QueueFile,
        t: int,
        jobs: list[int],
        counts: Counts,
        new_base: QueueTotals | None = None,
    ) -> None:
        s = qf.state
        if s.last is not None and t <= s.last.t:
            # the clock stepped back: keep the rings monotonic, credit the next minute
            t = s.last.t + MINUTE
        hour = t // HOUR * HOUR
        if s.hour_t and hour != s.hour_t:
            self._write_slot(qf, "hour", make_point(s.hour_t, s.hour, s.hour_counts))
            s.hour = [0, 0, 0]
            s.hour_counts = array.array("Q", bytes(8 * NBUCKETS))
        s.hour_t = hour
        delta = dense(counts)
        for i, n in enumerate(jobs):
            s.hour[i] += n
        for i, n in enumerate(delta):
            if n:
                s.hour_counts[i] += n
        s.last = make_point(t, jobs, delta)
        if new_base is not None:
            s.base = [new_base.pushed, new_base.processed, new_base.failed]
            s.base_counts = array.array("Q", dense(new_base.runtime))
        self._save_state(qf)
        self._write_slot(qf, "minute", s.last)

    def tick(self, totals: Mapping[str, QueueTotals], now: float | None = None) -> int:
        """Close the minute that ended before ``now`` (default: the clock) for each queue in
        ``totals`` (cumulative); returns how many minutes were closed."""
        now = self._clock() if now is None else now
        minute = int(now // MINUTE * MINUTE)
        closed = 0
        for queue, tot in totals.items():
            qf = self._file(queue)
            if qf.open_minute is None:
                qf.open_minute = minute
                continue
            if minute <= qf.open_minute:
                continue
            s = qf.state
            jobs = [tot.pushed - s.base[0], tot.processed - s.base[1], tot.failed - s.base[2]]
            runtime = dense(tot.runtime)
            delta = [n - b for n, b in zip(runtime, s.base_counts, strict=True)]
            if min(jobs) < 0 or min(delta) < 0:
                # the totals went back (counters reset): count them from zero
                log.warning("history: totals of %r went back; counting from zero", queue)
                jobs = [tot.pushed, tot.processed, tot.failed]
                delta = runtime
            self._close_minute(qf, qf.open_minute, jobs, delta, tot)
            qf.open_minute = minute
            closed += 1
        if closed:
            self._prune(now, totals)
        return closed

    def _prune(self, now: float, active: Mapping[str, Any]) -> None:
        for queue, qf in list(self._files.items()):
            last = qf.state.last.t if qf.state.last is not None else 0
            if queue not in active and last < now - RETENTION["hour"]:
                os.close(qf.fd)
                qf.path.unlink()
                del self._files[queue]
                fsync_dir(self._dir)
                log.info("history: removed %r, idle for 30 days", queue)

    # -- reading -------------------------------------------------------------------------

    def queues(self) -> list[str]:
        """Queues with a history file."""
        return sorted(self._files)

    def queue_states(self) -> list[tuple[str, State]]:
        """Each queue file's in-memory state (its ``history_format.State``), live objects
        the next ``tick`` changes: read them under the caller's lock, copy what is kept.

        The files keep per-period summaries only; right after a minute closed this state
        holds the lifetime runtime buckets it was closed at and the current hour's bucket
        counts, from which the hub publisher derives per-period buckets
        (``qdash_mp.hub.period_buckets``)."""
        return [(queue, qf.state) for queue, qf in self._files.items()]

    def points(
        self, queue: str, resolution: Literal["minute", "hour"] = "minute"
    ) -> list[dict[str, Any]]:
        """Points of ``queue`` kept at ``resolution``, oldest first, DESIGN.md's shape. The
        hour resolution ends with the current, partial hour."""
        if resolution not in _RINGS:
            raise ValueError(f"resolution {resolution!r}: 'minute' or 'hour'")
        qf = self._files.get(queue)
        if qf is None:
            return []
        ring, slots, period = _RINGS[resolution]
        data = os.pread(qf.fd, slots * SLOT_SIZE, ring)
        oldest = self._clock() - RETENTION[resolution]
        found: list[Point] = []
        with memoryview(data) as view:
            for k in range(slots):
                where = f"{qf.path} {resolution} slot {k}"
                try:
                    p = unpack_slot(view[k * SLOT_SIZE : (k + 1) * SLOT_SIZE], where)
                except HistoryCorrupt as e:
                    log.warning("history: %s (a torn write): skipped", e)
                    continue
                if p is None:
                    continue
                if p.t % period or (p.t // period) % slots != k:
                    raise HistoryCorrupt(f"{where}: holds time {p.t}, not this slot's")
                if p.t + period > oldest:  # ends within the retention
                    found.append(p)
        s = qf.state
        if resolution == "hour" and s.hour_t and s.hour_t + HOUR > oldest:
            found = [p for p in found if p.t != s.hour_t]
            found.append(make_point(s.hour_t, s.hour, s.hour_counts))
        found.sort(key=lambda p: p.t)
        return [point_dict(p) for p in found]

    def close(self) -> None:
        """Close every file and release the lock (idempotent)."""
        for qf in self._files.values():
            os.close(qf.fd)
        self._files.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
