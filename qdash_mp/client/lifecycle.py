"""Job lifecycle in the client: what the hooks leave behind, and how the sender ships it.

Hooks only append and bump (``qdash_mp.client.hooks``); this module's ``LifeState`` holds
those structures, and ``LifeBatcher`` (sender thread only) turns them into BATCH v2's ``ext``:

    hook side (any thread)                         sender side (one thread)
    runtimes[q].append(rt)  on_processed(rt)  ->   processed += k, runtime buckets += ...
    fruntimes[q].append(rt) on_failed(rt)     ->   runtime buckets (failed is counted apart)
    waits[q].append(w)      on_started(job)   ->   wait buckets
    started[q] += 1         on_started        ->   "s" deltas
    jobs[id] = (q, id, name, wall, mono)      ->   "a" gauges, "j" (first 100 by start)
    started_ids / done_ids  (started / ended by id) -> "a": jobs without an id (below)
    events.append(row)      tracked queues    ->   "t" (at most MAX_EVENTS a batch)

A list is drained as ``k = len(lst); chunk = lst[:k]; del lst[:k]``: hooks only append at
the end and only the sender removes, from the front, so the first ``k`` items are exactly
the ones taken whatever interleaves (docs/lifecycle.md). Bucket counts are cumulative dense
lists, shipped as ``cumulative - sent`` like the counters, so they are exact across resends.

Active per queue = jobs in ``jobs`` + jobs started without an id and not finished, which is
``(started - started_ids) - (processed + failed - done_ids)`` (at least 0) from cumulative
counts: a finish without a job (or with one not started by id here) ends one started without
an id, if any. So the plain hot path keeps no count of its own for it; the gauge, read from
counts the hooks keep changing, may be one off for a cycle and is right at the next.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from qdash_mp.client.record import utf8_ok
from qdash_mp.client.tally import Counts, snapshot
from qdash_mp.histogram import NBUCKETS, bucket_counts
from qdash_mp.records import MAX_ID, MAX_NAME, MAX_TIMESTAMP
from qdash_mp.throttle import LogThrottle
from qdash_mp.wire import EVENT_KINDS, MAX_ACTIVE, MAX_DELTA, MAX_EVENTS, MAX_JOBS

_NOT_A_NUMBER = (TypeError, ValueError, OverflowError)

__all__ = ["MAX_PENDING_EVENTS", "LifeBatcher", "LifeState", "TrackSpec"]

log = logging.getLogger("qdash_mp.client.lifecycle")

MAX_PENDING_EVENTS = 10 * MAX_EVENTS
"""Tracking events a client keeps between batches; newer ones are dropped and counted."""

TrackSpec = bool | frozenset[str]
"""Which queues are tracked: ``True`` all, ``False`` none, or these."""


class LifeState:
    """The hooks' lifecycle structures of one process (fresh in a forked child)."""

    __slots__ = (
        "done_ids",
        "dropped_events",
        "events",
        "fruntimes",
        "jobs",
        "runtimes",
        "started",
        "started_ids",
        "waits",
    )

    def __init__(self) -> None:
        self.runtimes: dict[str, list[Any]] = {}
        self.fruntimes: dict[str, list[Any]] = {}
        self.waits: dict[str, list[Any]] = {}
        self.started: dict[str, int] = {}
        self.jobs: dict[Any, tuple[str, Any, Any, float, float]] = {}
        self.started_ids: dict[str, int] = {}
        self.done_ids: dict[str, int] = {}
        self.events: list[tuple[str, str, Any, Any, float, Any]] = []
        self.dropped_events = 0


def _drain(lists: dict[str, list[Any]]) -> list[tuple[str, list[Any]]]:
    out = []
    for q, lst in list(lists.items()):
        k = len(lst)
        if k:
            chunk = lst[:k]
            del lst[:k]
            out.append((q, chunk))
    return out


def _text(value: object, limit: int) -> str:
    text = (value if isinstance(value, str) else str(value))[:limit]
    return text if utf8_ok(text) else text.encode("utf-8", "replace").decode("utf-8")


def _queue_ok(q: object) -> bool:
    return isinstance(q, str) and 1 <= len(q) <= MAX_NAME and utf8_ok(q)


def _time(value: object) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= MAX_TIMESTAMP:
        return float(value)
    return None


class LifeBatcher:
    """Sender-side: cumulative buckets and counters from a ``LifeState``; ext pieces."""

    __slots__ = (
        "_cum",
        "_dirty",
        "_force",
        "_last_active",
        "_last_jobs",
        "_sent",
        "_sent_started",
        "_throttle",
        "counts",
        "extra_processed",
        "state",
    )

    def __init__(self, state: LifeState) -> None:
        self.state = state
        self.counts: tuple[Counts, ...] = ({}, {}, {}, {})
        """The hooks' cumulative counters (set by the ``Batcher``): for finishes without id."""
        self.extra_processed: dict[str, int] = {}
        """Jobs counted by their runtime (``on_processed(q, runtime=...)``), cumulative."""
        self._cum: dict[str, tuple[list[int], list[int]]] = {}
        self._sent: dict[str, tuple[list[int], list[int]]] = {}
        self._dirty: dict[str, tuple[set[int], set[int]]] = {}
        """Per queue, the runtime and wait buckets where cumulative may differ from sent: a
        tick looks at those only, not at all 2 x 418 (it ran every 100 ms, jobs or not)."""
        self._sent_started: dict[str, int] = {}
        self._last_active: dict[str, int] = {}
        self._last_jobs: list[tuple[str, str, str, float]] = []
        self._force = True
        self._throttle = LogThrottle(log)

    def _bucket(self, q: str, kind: int, values: list[Any]) -> None:
        """Count ``values`` into queue ``q``'s runtime (``kind`` 0) or wait (1) buckets."""
        h = self._cum.get(q)
        if h is None:
            h = self._cum[q] = ([0] * NBUCKETS, [0] * NBUCKETS)
            self._sent[q] = ([0] * NBUCKETS, [0] * NBUCKETS)
            self._dirty[q] = (set(), set())
        target, dirty = h[kind], self._dirty[q][kind]
        try:
            fresh = bucket_counts(values)
        except _NOT_A_NUMBER:
            # A runtime that is no number (the hook appends what it was given): count the
            # good ones one by one (a value that raises adds nothing), drop the rest.
            fresh = {}
            bad = 0
            for x in values:
                try:
                    (i,) = bucket_counts((x,))
                except _NOT_A_NUMBER:
                    bad += 1
                else:
                    fresh[i] = fresh.get(i, 0) + 1
            self._throttle.log(
                "bad-runtime",
                logging.ERROR,
                "qdash_mp client: %d runtimes or wait times that are not numbers were dropped "
                "(the jobs are still counted)",
                bad,
            )
        for i, n in fresh.items():
            target[i] += n
            dirty.add(i)

    def drain(self) -> None:
        """Take the runtimes and waits the hooks left and add them to the cumulative counts."""
        st = self.state
        for q, chunk in _drain(st.runtimes):
            self.extra_processed[q] = self.extra_processed.get(q, 0) + len(chunk)
            self._bucket(q, 0, chunk)
        for q, chunk in _drain(st.fruntimes):
            self._bucket(q, 0, chunk)
        for q, chunk in _drain(st.waits):
            self._bucket(q, 1, chunk)

    def has_news(self, ext: bool) -> bool:
        """Anything to send? Only the processed counts in runtime lists when not ``ext``."""
        st = self.state
        if any(st.runtimes.values()):
            return True
        if not ext:
            return False
        if any(st.fruntimes.values()) or any(st.waits.values()):
            return True
        if st.events or st.started != self._sent_started:
            return True
        if any(dr or dw for dr, dw in self._dirty.values()):
            return True
        active, _ = self.gauges()
        return active != self._last_active or (self._force and bool(active))

    def welcomed(self) -> None:
        """A new connection: the next live batch carries the gauges whatever they are."""
        self._force = True

    def forget_ext(self) -> None:
        """(v1 collector) The counters of ``ext`` cannot be sent: count them as sent."""
        for q, (rt, wt) in self._cum.items():
            srt, swt = self._sent[q]
            srt[:] = rt
            swt[:] = wt
        for dr, dw in self._dirty.values():
            dr.clear()
            dw.clear()
        self._sent_started.update(self.state.started)
        _drain_events(self.state)

    def hist_deltas(self) -> list[tuple[str, dict[int, int], dict[int, int]]]:
        out = []
        for q, (dirty_r, dirty_w) in self._dirty.items():
            if not dirty_r and not dirty_w:
                continue
            rt, wt = self._cum[q]
            srt, swt = self._sent[q]
            dr = {i: min(rt[i] - srt[i], MAX_DELTA) for i in sorted(dirty_r) if rt[i] != srt[i]}
            dw = {i: min(wt[i] - swt[i], MAX_DELTA) for i in sorted(dirty_w) if wt[i] != swt[i]}
            if dr or dw:
                out.append((q, dr, dw))
        return out

    def hist_sent(self, q: str, dr: dict[int, int], dw: dict[int, int]) -> None:
        rt, wt = self._cum[q]
        srt, swt = self._sent[q]
        dirty_r, dirty_w = self._dirty[q]
        for i, n in dr.items():
            srt[i] += n
            if srt[i] == rt[i]:
                dirty_r.discard(i)  # caught up (a capped delta stays: the rest follows)
        for i, n in dw.items():
            swt[i] += n
            if swt[i] == wt[i]:
                dirty_w.discard(i)

    def started_deltas(self) -> list[tuple[str, int]]:
        snap = self.state.started.copy()
        sent = self._sent_started
        return [
            (q, min(v - sent.get(q, 0), MAX_DELTA)) for q, v in snap.items() if v != sent.get(q, 0)
        ]

    def started_sent(self, rows: Iterable[tuple[str, int]]) -> None:
        sent = self._sent_started
        for q, n in rows:
            sent[q] = sent.get(q, 0) + n

    def gauges(self) -> tuple[dict[str, int], list[tuple[str, str, str, float]]]:
        """``(active per queue, the first MAX_JOBS active jobs by start)`` right now."""
        st = self.state
        active: dict[str, int] = {}
        # Finishes first: a job that starts and ends between the reads shows as ended.
        done = snapshot(self.counts[1])
        for q, n in snapshot(self.counts[2]).items():
            done[q] = done.get(q, 0) + n
        for q, n in self.extra_processed.items():
            done[q] = done.get(q, 0) + n
        for q, lst in list(st.runtimes.items()):
            done[q] = done.get(q, 0) + len(lst)
        done_ids = st.done_ids.copy()
        started_ids = st.started_ids.copy()
        for q, n in st.started.copy().items():
            anon = n - started_ids.get(q, 0) - (done.get(q, 0) - done_ids.get(q, 0))
            if anon > 0:
                active[q] = min(anon, MAX_ACTIVE)
        entries = list(st.jobs.values())
        for e in entries:
            active[e[0]] = min(active.get(e[0], 0) + 1, MAX_ACTIVE)
        entries.sort(key=lambda e: e[4])
        jobs = []
        for q, jid, name, wall, _mono in entries[:MAX_JOBS]:
            at = _time(wall)
            ident = _text(jid, MAX_ID)
            if at is not None and ident:
                jobs.append((q, ident, _text(name, MAX_ID), at))
        return active, jobs

    def gauge_update(self) -> tuple[dict[str, int], list[tuple[str, str, str, float]]] | None:
        """The gauges to send now (changed, or the first batch after a WELCOME), else None."""
        active, jobs = self.gauges()
        if not self._force and active == self._last_active and jobs == self._last_jobs:
            return None
        return active, jobs

    def gauges_sent(self, active: dict[str, int], jobs: list[tuple[str, str, str, float]]) -> None:
        self._force = False
        self._last_active = active
        self._last_jobs = jobs

    def events(self) -> list[tuple[str, str, str, str, float, float | None]]:
        """At most ``MAX_EVENTS`` tracking events, checked (a bad one is dropped)."""
        st = self.state
        rows = _drain_events(st, MAX_EVENTS)
        out = []
        for kind, q, jid, name, at, runtime in rows:
            t = _time(at)
            ident = _text(jid, MAX_ID)
            if kind not in EVENT_KINDS or t is None or not ident or not _queue_ok(q):
                continue
            out.append((kind, q, ident, _text(name, MAX_ID), t, _time(runtime)))
        if st.dropped_events:
            self._throttle.log(
                "events-dropped",
                logging.WARNING,
                "qdash_mp client: %d job tracking events dropped so far (more than %d waiting)",
                st.dropped_events,
                MAX_PENDING_EVENTS,
            )
        return out


def _drain_events(st: LifeState, limit: int | None = None) -> list[Any]:
    ev = st.events
    k = len(ev) if limit is None else min(len(ev), limit)
    chunk = ev[:k]
    del ev[:k]
    return chunk
