"""``SharedStatsReader``: the seqlock read side, from any local process (never writes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from qdash_mp.errors import ShmBusy, ShmIncompatible, ShmMissing
from qdash_mp.models import StatsView
from qdash_mp.shm import layout as hdr
from qdash_mp.shm.layout import Layout, check_name, decode_names
from qdash_mp.shm.rows import Rows
from qdash_mp.shm.segment import Segment, attach, follow, pid_alive, writer_link
from qdash_mp.stats import build_view, merged_hists

__all__ = ["SharedStatsReader"]

_T = TypeVar("_T")

_SPIN_SECONDS = 0.0005
"""How long a reader retries at once (write sections take microseconds) before sleeping."""
_PAUSE_MIN, _PAUSE_MAX = 5e-5, 1e-3


class SharedStatsReader:
    """Read a collector's ``SharedStats`` from any local process, without asking the daemon.

    Opening checks the table (``ShmMissing`` when there is none: the collector is not
    running; ``ShmIncompatible`` for a bad magic or layout version). ``snapshot()`` is
    consistent (seqlock; ``ShmBusy`` after ``timeout`` seconds of failed attempts), sees new
    queues, follows the table when it grows and reopens it when a new collector replaced it.
    ``clock`` (Unix seconds) is the reader's own, for the throughput window. A reader keeps
    decoded names and rows between snapshots: use one per thread.
    """

    def __init__(
        self, name: str, *, clock: Callable[[], float] = time.time, timeout: float = 1.0
    ) -> None:
        check_name(name)
        self._name = name
        self._clock = clock
        self._timeout = timeout
        self._seg: Segment | None = None
        self._names: list[str] = []
        self._rows = Rows()
        self._open()

    @property
    def name(self) -> str:
        """The table's name."""
        return self._name

    @property
    def writer_pid(self) -> int:
        """Pid of the attached writer, 0 if none is (the collector closed the table)."""
        pid: int = self._open_seg().q[hdr.PID]
        return pid

    def snapshot(self) -> StatsView:
        """A consistent view of every queue, sorted by name, with totals."""
        for _ in range(16):
            seg = self._open_seg()
            status, count, started, known, new_names, records = self._read(seg, self._copy)
            if status != hdr.LIVE:  # superseded by a bigger block, or shut down
                self._open()
                continue
            if known < len(self._names):
                del self._names[known:]
            self._names.extend(decode_names(new_names, count - known, self._name))
            now = int(self._clock())
            lay = seg.layout
            rows = self._rows.rows(records, lay, self._names, now, started)
            rs = lay.rec_slots
            merged = merged_hists(
                memoryview(records).cast("q"),
                (i * rs for i, row in enumerate(rows) if row.runtime.count or row.wait.count),
                lay.ring,
            )
            return build_view(rows, merged)
        raise ShmBusy(f"shared stats {self._name!r} keep moving; try again")  # pragma: no cover

    def _copy(self, seg: Segment) -> tuple[int, int, int, int, bytes, bytes]:
        q, lay = seg.q, seg.layout
        status, started = q[hdr.STATUS], q[hdr.STARTED]
        count = min(max(q[hdr.COUNT], 0), lay.capacity)
        known = len(self._names) if len(self._names) <= count else 0
        names = bytes(seg.buf[Layout.entry_at(known) : Layout.entry_at(count)])
        records = bytes(seg.buf[lay.rec_at : lay.rec_at + count * lay.rec_slots * 8])
        return status, count, started, known, names, records

    def _read(self, seg: Segment, copy: Callable[[Segment], _T]) -> _T:
        """``copy(seg)`` taken outside any write section (the seqlock read side)."""
        q = seg.q
        seq = q[hdr.SEQ]
        if not seq & 1:
            data = copy(seg)
            if q[hdr.SEQ] == seq:
                return data
        start = time.monotonic()
        spin_until, deadline = start + _SPIN_SECONDS, start + self._timeout
        pause = _PAUSE_MIN
        while True:
            seq = q[hdr.SEQ]
            if not seq & 1:
                data = copy(seg)
                if q[hdr.SEQ] == seq:
                    return data
            now = time.monotonic()
            if now < spin_until:
                continue
            if now >= deadline:
                raise self._busy(seg)
            time.sleep(pause)
            pause = min(pause * 2, _PAUSE_MAX)

    def _busy(self, seg: Segment) -> ShmBusy:
        pid = seg.q[hdr.PID]
        if seg.q[hdr.SEQ] & 1 and not pid_alive(pid):
            return ShmBusy(
                f"shared stats {self._name!r}: the collector (pid {pid}) died in the middle of "
                "an update; start it again (`qdash-mp collector`), it repairs the table"
            )
        return ShmBusy(
            f"shared stats {self._name!r}: no consistent snapshot within {self._timeout} s "
            "(the collector is updating them nonstop)"
        )

    def _open_seg(self) -> Segment:
        return self._seg if self._seg is not None else self._open()

    def _open(self) -> Segment:
        """(Re)open the table by name and follow it to its newest block."""
        self._drop()
        try:
            base = attach(self._name)
        except FileNotFoundError:
            raise ShmMissing(
                f"no shared stats {self._name!r}: is the collector running? "
                "start it with `qdash-mp collector`"
            ) from None
        why = base.header_ok()
        if why is not None:
            base.close()
            raise ShmIncompatible(f"shared-memory segment {self._name!r}: {why}")
        try:
            seg = follow(self._name, base, self._link)
            status = self._link(seg)[0]
        except BaseException:
            base.close()
            raise
        if seg is not base:
            base.close()
        if status == hdr.CLOSED:
            seg.close()
            raise ShmMissing(
                f"shared stats {self._name!r} were closed: the collector shut down; "
                "start it with `qdash-mp collector`"
            )
        self._seg = seg
        return seg

    def _link(self, seg: Segment) -> tuple[int, int]:
        return self._read(seg, writer_link)

    def _drop(self) -> None:
        seg, self._seg = self._seg, None
        self._names = []
        self._rows.clear()
        if seg is not None:
            seg.close()

    def close(self) -> None:
        """Unmap the table. Idempotent."""
        self._drop()

    def __enter__(self) -> SharedStatsReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
