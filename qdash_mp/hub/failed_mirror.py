"""The hub's in-memory mirror of the failed-job index, for ``queue``/``name``/``q`` pages.

Filtering in Redis means reading every record (``failed_scan.scan_failed``: ~1.5-2 s at
100,000 entries). The hub instead keeps, per entry of ``qdash:fall``, the fields the filters
look at -- host, queue, job name (interned codes), failed_at, arrival sequence, the
case-folded error text -- in flat columns (the single-host journal's ``Columns`` idea), and
answers a filtered page with C-level passes over them (``select``: a few ms at 100,000).

Keeping in step costs one round trip per request when nothing changed. Every event on the
index has a value of ``qdash:fseq``: an arrival (new or changed record) its ``fseqz`` score, a
removal its ``frmz`` score (``publish.lua``). ``sync`` reads, in one ``MULTI``, ``fseq``, the
events above the mirror's ``cursor`` (``CHUNK`` of each kind at most) and ``ZCARD fall``;
applies them in sequence order (the arrivals' records fetched with ``HMGET``); and moves the
cursor. Replaying an event is harmless (an arrival replaces the entry, a removal of an
absent one does nothing), which is what makes the full read below safe.

A *full read* (``ZSCAN`` of ``fall`` + the arrival sequences + the records the mirror lacks or
has with another failed_at) replaces the incremental step when:

* the mirror is empty (the first filtered request: as slow as one scan);
* ``qdash:fepoch`` changed (Redis lost its data), or ``fseq`` went below the cursor;
* ``frmz`` was trimmed above the cursor (``frmlo``: this hub was idle for 100,000 removals);
* after catching up, the mirror's count is not ``ZCARD fall``: a host whose publisher
  predates ``frmz`` removed entries (or predates ``fseqz`` and added some). Such hosts make
  filtered pages slow again, never wrong; upgrading them makes them fast.

Memory: per entry ~150 bytes plus its member and error text (the records themselves stay in
Redis). One mirror per ``HubInspector``; ``sync`` and ``select`` run under its lock.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from array import array
from collections.abc import Sequence
from itertools import compress, repeat
from operator import contains, gt, le
from typing import Any, Final

import msgpack

from qdash_mp.errors import HubCorrupt
from qdash_mp.failed_filter import FailedFilter
from qdash_mp.hub.failed_scan import SCAN_COUNT, Match
from qdash_mp.hub.format_failed import split_fall_member
from qdash_mp.hub.keys import Keys

__all__ = ["CHUNK", "FailedMirror"]

log = logging.getLogger("qdash_mp.hub.failed_mirror")

CHUNK: Final = 5000
"""Events of each kind read per round trip."""
_MAX_ROUNDS: Final = 1000
_FETCH: Final = 1000


class _Entry:
    """The filtered fields of one record (what ``_fields`` returns)."""

    __slots__ = ("error", "failed_at", "name", "queue")

    def __init__(self, queue: str, name: str, error: str, failed_at: float) -> None:
        self.queue = queue
        self.name = name
        self.error = error
        self.failed_at = failed_at


def _fields(raw: bytes) -> _Entry:
    """Queue, name, error and failed_at of a FAILED record, unpacked plainly (C speed); a
    page's rows are decoded strictly when shown, so a damaged record is never shown."""
    f = msgpack.unpackb(raw, raw=False)
    queue, name, error, failed_at = f[5], f[1], f[6], f[8]
    if not (isinstance(queue, str) and isinstance(name, str) and isinstance(error, str)):
        raise TypeError("queue, name and error must be strings")
    return _Entry(queue, name, error, float(failed_at))


class FailedMirror:
    """The filter columns of every entry of ``qdash:fall``; see the module docstring."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.lock = asyncio.Lock()
        self.epoch: str | None = None
        self.cursor = 0
        """Every event with a sequence up to this one is applied."""
        self.full_reads = 0
        """Full reads done (for tests and the benchmark)."""
        self._clear()

    def _clear(self) -> None:
        self.members: list[bytes] = []
        self.hc: array[int] = array("I")
        self.qc: array[int] = array("I")
        self.nc: array[int] = array("I")
        self.fat: array[float] = array("d")
        self.seq: array[int] = array("q")
        self.texts: list[str] = []
        self.alive = bytearray()
        self.pos: dict[bytes, int] = {}
        self.hosts: dict[str, int] = {}
        self.host_names: list[str] = []
        self.host_live: list[int] = []
        self.max_seq = 0
        self.queues: dict[str, int] = {}
        self.names: dict[str, int] = {}
        self.loaded = False

    @property
    def live(self) -> int:
        return len(self.pos)

    # ------------------------------------------------------------------ keeping in step

    def _code(self, table: dict[str, int], key: str) -> int:
        code = table.get(key)
        if code is None:
            code = table[key] = len(table)
            if table is self.hosts:
                self.host_names.append(key)
                self.host_live.append(0)
        return code

    def _kill(self, member: bytes) -> None:
        p = self.pos.pop(member, None)
        if p is not None:
            self.alive[p] = 0
            self.host_live[self.hc[p]] -= 1
            self.texts[p] = ""  # the text is the big part; the rest waits for _squeeze

    def _put(self, member: bytes, host: str, seq: int, e: _Entry) -> None:
        self._kill(member)
        self.pos[member] = len(self.members)
        self.members.append(member)
        hc = self._code(self.hosts, host)
        self.hc.append(hc)
        self.host_live[hc] += 1
        self.max_seq = max(self.max_seq, seq)
        self.qc.append(self._code(self.queues, e.queue))
        self.nc.append(self._code(self.names, e.name))
        self.fat.append(e.failed_at)
        self.seq.append(seq)
        self.texts.append(e.error.casefold())
        self.alive.append(1)

    def _squeeze(self) -> None:
        """Drop dead slots once they outnumber the live ones (slot numbers change)."""
        dead = len(self.members) - self.live
        if dead <= max(1024, self.live):
            return
        keep = bytes(self.alive)
        self.members = list(compress(self.members, keep))
        self.hc = array("I", compress(self.hc, keep))
        self.qc = array("I", compress(self.qc, keep))
        self.nc = array("I", compress(self.nc, keep))
        self.fat = array("d", compress(self.fat, keep))
        self.seq = array("q", compress(self.seq, keep))
        self.texts = list(compress(self.texts, keep))
        self.alive = bytearray(b"\x01" * len(self.members))
        self.pos = {m: p for p, m in enumerate(self.members)}

    async def _records(self, members: Sequence[bytes]) -> list[bytes | None]:
        """The FAILED records of ``members`` (``None``: gone meanwhile, or unreadable)."""
        out: list[bytes | None] = []
        for k in range(0, len(members), _FETCH):
            part = members[k : k + _FETCH]
            pairs: list[tuple[str, str] | None] = []
            async with self.redis.pipeline(transaction=False) as pipe:
                for m in part:
                    try:
                        h, id = split_fall_member(m)
                    except HubCorrupt as exc:
                        log.warning("hub: failed index member unreadable: %s", exc)
                        pairs.append(None)
                        continue
                    pairs.append((h, id))
                    pipe.hget(self.keys.fj(h), id)
                replies = iter(await pipe.execute())
            out.extend(None if pair is None else next(replies) for pair in pairs)
        return out

    async def _apply_adds(self, adds: Sequence[tuple[bytes, int]]) -> int:
        """Put the entries of ``(member, seq)``; how many records were gone meanwhile."""
        raws = await self._records([m for m, _ in adds])
        missing = 0
        for (member, seq), raw in zip(adds, raws, strict=True):
            if raw is None:
                missing += 1
                self._kill(member)
                continue
            try:
                host = split_fall_member(member)[0]
                e = _fields(raw)
            except (HubCorrupt, ValueError, TypeError, IndexError, KeyError) as exc:
                log.warning("hub: failed job %r unreadable: %s", member[:80], exc)
                self._kill(member)
                continue
            self._put(member, host, seq, e)
        return missing

    async def sync(self, epoch: str) -> None:
        """Bring the mirror up to date with Redis (call with ``lock`` held)."""
        if epoch != self.epoch:
            self._clear()
            self.epoch = epoch
            self.cursor = 0
        if not self.loaded:
            await self._full_read()
        checked = False
        k = self.keys
        for _ in range(_MAX_ROUNDS):
            since = f"({self.cursor}"
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(k.fseq)
                pipe.get(k.frmlo)
                pipe.zcard(k.fall)
                pipe.zrangebyscore(k.fseqz, since, "+inf", start=0, num=CHUNK, withscores=True)
                pipe.zrangebyscore(k.frmz, since, "+inf", start=0, num=CHUNK, withscores=True)
                hw_raw, lo_raw, card, adds, removes = await pipe.execute()
            hw, lo = int(hw_raw or 0), int(lo_raw or 0)
            if hw < self.cursor or lo > self.cursor:
                # Redis went back, or removals this mirror has not seen were trimmed
                await self._full_read()
                continue
            end = hw
            if len(adds) >= CHUNK:
                end = min(end, int(adds[-1][1]))
            if len(removes) >= CHUNK:
                end = min(end, int(removes[-1][1]))
            events = sorted(
                [(int(s), 1, m) for m, s in adds if s <= end]
                + [(int(s), 0, m) for m, s in removes if s <= end]
            )
            missing = 0
            # apply in sequence order, the arrivals' records fetched per run of arrivals
            run: list[tuple[bytes, int]] = []
            for seq, kind, member in events:
                if kind:
                    run.append((member, seq))
                    continue
                if run:
                    missing += await self._apply_adds(run)
                    run = []
                self._kill(member)
            if run:
                missing += await self._apply_adds(run)
            self.cursor = end
            if end < hw:
                continue
            if missing or self.live == int(card) or checked:
                break
            # caught up, yet the counts differ: a host without frmz/fseqz; read it all
            log.info(
                "hub: failed-list mirror holds %d entries, the index %d: reading it in full",
                self.live,
                card,
            )
            checked = True
            await self._full_read()
        self._squeeze()

    async def _full_read(self) -> None:
        """Make the mirror equal ``qdash:fall`` (see the module docstring)."""
        k = self.keys
        self.full_reads += 1
        cursor = int(await self.redis.get(k.fseq) or 0)  # events from here on are replayed
        scores: dict[bytes, float] = {}
        zc = 0
        while True:
            zc, chunk = await self.redis.zscan(k.fall, zc, count=SCAN_COUNT)
            for raw, score in chunk:
                scores[raw] = float(score)
            if zc == 0:
                break
        for member in [m for m in self.pos if m not in scores]:
            self._kill(member)
        members = list(scores)
        seqs: list[Any] = []
        for i in range(0, len(members), SCAN_COUNT):
            seqs += await self.redis.zmscore(k.fseqz, members[i : i + SCAN_COUNT])
        todo: list[tuple[bytes, int]] = []
        for member, s in zip(members, seqs, strict=True):
            seq = int(s) if s is not None else 0
            p = self.pos.get(member)
            if p is None or self.seq[p] != seq or self.fat[p] != scores[member]:
                todo.append((member, seq))
        todo.sort(key=lambda t: t[1])
        await self._apply_adds(todo)
        self.cursor = cursor
        self.loaded = True

    # ------------------------------------------------------------------ queries

    def matches(
        self,
        flt: FailedFilter,
        host: str | None,
        *,
        below: int | None = None,
        since: int | None = None,
    ) -> list[int]:
        """The live slots matching ``flt`` (of ``host``) with sequence in ``[since, below)``.

        C-level passes, the narrowing ones first: a code column (queue, name, then host,
        skipped when that host holds every entry), the text (dead slots hold ``""``), then
        the live flags, the time range and the sequence bounds over what is left."""
        n = len(self.members)
        idx: list[int] | None = None  # None: every slot, dead ones too
        wanted: list[tuple[int, array[int]]] = []
        for value, table, col in (
            (flt.queue, self.queues, self.qc),
            (flt.name, self.names, self.nc),
            (host, self.hosts, self.hc),
        ):
            if value is None:
                continue
            code = table.get(value)
            if code is None:
                return []
            if col is self.hc and self.host_live[code] == self.live:
                continue  # every entry is that host's: nothing to narrow
            wanted.append((code, col))
        for code, col in wanted:
            if idx is None:
                idx = list(compress(range(n), map(code.__eq__, col)))
            else:
                idx = list(compress(idx, map(code.__eq__, map(col.__getitem__, idx))))
        needle = flt.needle
        texts = self.texts
        if needle:  # ("" is in every text: no condition)
            if idx is None:
                idx = list(compress(range(n), map(contains, texts, repeat(needle))))
            else:
                found = map(contains, map(texts.__getitem__, idx), repeat(needle))
                idx = list(compress(idx, found))
        if idx is None:
            idx = list(compress(range(n), self.alive))
        else:
            idx = list(compress(idx, map(self.alive.__getitem__, idx)))
        fat, seq = self.fat, self.seq
        if flt.after is not None:
            idx = list(compress(idx, map(le, repeat(flt.after), map(fat.__getitem__, idx))))
        if flt.before is not None:
            idx = list(compress(idx, map(gt, repeat(flt.before), map(fat.__getitem__, idx))))
        if below is not None and below <= self.max_seq:
            idx = list(compress(idx, map(gt, repeat(below), map(seq.__getitem__, idx))))
        if since is not None and since > 0:
            idx = list(compress(idx, map(le, repeat(since), map(seq.__getitem__, idx))))
        return idx

    def hub_ids(
        self, flt: FailedFilter, host: str | None, *, below: int | None = None
    ) -> list[str]:
        """Hub ids (``ID@HOST``) of the slots ``matches`` gives (what the bulk actions take)."""
        return [self._match(p).hub_id for p in self.matches(flt, host, below=below)]

    def _match(self, p: int) -> Match:
        host, id = split_fall_member(self.members[p])
        return Match(host, id, self.fat[p], self.seq[p])

    def select(
        self,
        flt: FailedFilter,
        host: str | None,
        offset: int,
        limit: int,
        *,
        below: int | None = None,
        since: int | None = None,
    ) -> tuple[list[Match], int]:
        """A page (newest failed_at first; ties by host, then id, as the scan orders) of
        the matches, and their total."""
        slots = self.matches(flt, host, below=below, since=since)
        keep = offset + limit
        fat = self.fat
        if 0 < keep < len(slots):
            # the keep-th newest failed_at, then only the slots at or above it are sorted
            floor = heapq.nlargest(keep, map(fat.__getitem__, slots))[-1]
            top = list(compress(slots, map(le, repeat(floor), map(fat.__getitem__, slots))))
        else:
            top = slots
        rows = [self._match(p) for p in top]
        rows.sort(key=lambda m: (m.failed_at, m.host, m.id), reverse=True)
        return rows[offset:keep], len(slots)
