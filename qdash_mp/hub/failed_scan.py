"""Filtered, snapshot-bounded scans of the hub's failed-job index (``qdash:fall``) in Redis.

What ``HubInspector``'s failed-list filters and bulk actions read (``FailedQueries``):

* the index is scanned with ``ZSCAN`` (``SCAN_COUNT`` members a call), so every member that
  stays in it for the whole scan is seen -- hosts remove ids meanwhile (forgets, retries)
  without making the scan skip others -- and duplicates the scan may return are dropped;
* per batch: ``after``/``before`` on the index score (failed_at); the arrival sequence of
  each member (``ZMSCORE qdash:fseqz``; written by ``publish.lua``, absent for entries of a
  publisher older than it: sequence 0, i.e. seen by every snapshot, new to none); then, only
  if the filter has ``queue``/``name``/``q``, the records (``HGET qdash:fj:{host}``, pipelined)
  decoded and matched;
* a snapshot ``hw`` keeps members with sequence ``< hw``; ``since`` those ``>= since``.

Cost per query: one pass over the index (about ``N / SCAN_COUNT`` round trips, plus the
records when a text filter is set); memory: the seen members and the page. ``?host=`` scans
that host's ``qdash:fi:{host}`` only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from qdash_mp.errors import HubCorrupt
from qdash_mp.failed_filter import FailedFilter
from qdash_mp.hub.format import decode_failed, fall_member, split_fall_member
from qdash_mp.hub.keys import Keys
from qdash_mp.records import FailedRecord

__all__ = ["SCAN_COUNT", "Match", "scan_failed"]

log = logging.getLogger("qdash_mp.hub.failed_scan")

SCAN_COUNT: Final = 1000


@dataclass(slots=True)
class Match:
    """A failed job of the hub that passed the filter."""

    host: str
    id: str
    failed_at: float
    seq: int
    record: FailedRecord | None = None

    @property
    def hub_id(self) -> str:
        return f"{self.id}@{self.host}"


async def scan_failed(
    redis: Any,
    keys: Keys,
    host: str | None,
    flt: FailedFilter,
    *,
    below: int | None = None,
    since: int | None = None,
    records: bool = False,
) -> AsyncIterator[list[Match]]:
    """Batches of the failed jobs (of ``host``, or all) matching ``flt`` with arrival
    sequence ``< below`` and ``>= since`` (see the module docstring). With ``records`` (or a
    text filter) each match carries its decoded record."""
    key = keys.fall if host is None else keys.fi(host)
    need = records or flt.queue is not None or flt.name is not None or flt.q is not None
    seen: set[bytes] = set()
    cursor = 0
    while True:
        cursor, chunk = await redis.zscan(key, cursor, count=SCAN_COUNT)
        batch: list[Match] = []
        members: list[bytes] = []
        for raw, score in chunk:
            if raw in seen:
                continue
            seen.add(raw)
            if flt.after is not None and not score >= flt.after:
                continue
            if flt.before is not None and not score < flt.before:
                continue
            try:
                h, id = split_fall_member(raw) if host is None else (host, raw.decode())
            except (HubCorrupt, UnicodeDecodeError) as exc:
                log.warning("hub: failed index member %r unreadable: %s", raw[:80], exc)
                continue
            batch.append(Match(h, id, float(score), 0))
            members.append(raw if host is None else fall_member(h, id))
        if batch:
            seqs = await redis.zmscore(keys.fseqz, members)
            kept = []
            for m, s in zip(batch, seqs, strict=True):
                m.seq = int(s) if s is not None else 0
                if below is not None and not m.seq < below:
                    continue
                if since is not None and not m.seq >= since:
                    continue
                kept.append(m)
            if need and kept:
                kept = await _with_records(redis, keys, kept, flt)
            if kept:
                yield kept
        if cursor == 0:
            return


async def _with_records(
    redis: Any, keys: Keys, matches: list[Match], flt: FailedFilter
) -> list[Match]:
    async with redis.pipeline(transaction=False) as pipe:
        for m in matches:
            pipe.hget(keys.fj(m.host), m.id)
        replies = await pipe.execute()
    out = []
    for m, raw in zip(matches, replies, strict=True):
        if raw is None:
            continue  # removed between the index read and this one
        try:
            rec = decode_failed(raw)
        except HubCorrupt as exc:
            log.warning("hub: failed job %r of %s unreadable: %s", m.id, m.host, exc)
            continue
        if flt.matches(rec.queue, rec.name, rec.error, rec.failed_at):
            m.record = rec
            out.append(m)
    return out
