"""The failed-job index: one slot per committed FAILED record, in append order.

Pure data structure, no I/O: the store (``qdash_mp.journal.store``) applies what it wrote
or recovered; the records themselves stay on disk. Parallel compact arrays::

    ids     _Ids               job id (kept when dead, until the arrays are squeezed)
    alive   bytearray          1 = live
    loc     array('q')         segment number << 40 | file offset of the record
    size    array('H')         bytes of the record (widened to 'I' by the first record over
                               64 KiB: most are far smaller, and it is bytes per job)
    blocks  array('i')         live slots per block of 1024 slots
    pos     dict[str, int]     job id -> slot

Appends and removals are O(1) (a removal clears ``alive`` and decrements its block's
count); ``newest_slots(offset, limit)`` walks the block counts from the newest end, then
``bytearray.rfind``, so deep pages cost the same as the first. When dead slots outnumber
live ones the arrays are squeezed. Why this shape, and why ``ids`` is sealed in tuples
(the cyclic GC), is in ``docs/journal.md``.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from itertools import accumulate, chain, compress, islice, repeat
from operator import itemgetter
from typing import Final

from qdash_mp.journal.columns import Columns, Meta, fit
from qdash_mp.journal.format import Op

__all__ = ["BLOCK_SHIFT", "LOC_MASK", "LOC_SHIFT", "Index", "loc_of"]

LOC_SHIFT: Final = 40
LOC_MASK: Final = (1 << LOC_SHIFT) - 1
BLOCK_SHIFT: Final = 10
_BLOCK_MASK: Final = (1 << BLOCK_SHIFT) - 1
_REBUILD_MIN: Final = 4096
_NO_META: Final[Meta] = ("", "", "")


def loc_of(num: int, offset: int) -> int:
    """The ``loc`` of the record at ``offset`` of segment ``num``."""
    return (num << LOC_SHIFT) | offset


class _Ids:
    """The job id of every slot, in blocks of ``1 << BLOCK_SHIFT`` sealed as tuples.

    Full blocks are tuples of str, which the cyclic GC stops tracking after its first look
    at them; only the last block is a list: a flat list of a million ids would make every
    full collection visit a million str objects.
    """

    __slots__ = ("_sealed", "_tail")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._sealed: list[tuple[str, ...]] = []
        self._tail: list[str] = []
        self.extend(ids)

    def __len__(self) -> int:
        return (len(self._sealed) << BLOCK_SHIFT) + len(self._tail)

    def __getitem__(self, p: int) -> str:
        block = p >> BLOCK_SHIFT
        if block < len(self._sealed):
            return self._sealed[block][p & _BLOCK_MASK]
        return self._tail[p - (block << BLOCK_SHIFT)]

    def __iter__(self) -> Iterator[str]:
        return chain(chain.from_iterable(self._sealed), self._tail)

    def slice(self, start: int, stop: int) -> list[str]:
        """The ids of slots ``start .. stop`` (C-level slices of the blocks)."""
        out: list[str] = []
        stop = min(stop, len(self))
        sealed = self._sealed
        while start < stop:
            block = start >> BLOCK_SHIFT
            lo = block << BLOCK_SHIFT
            hi = min(stop, lo + (1 << BLOCK_SHIFT))
            src = sealed[block] if block < len(sealed) else self._tail
            out += src[start - lo : hi - lo]
            start = hi
        return out

    def extend(self, ids: Iterable[str]) -> None:
        tail = self._tail
        tail += ids
        size = 1 << BLOCK_SHIFT
        if len(tail) >= size:
            full = len(tail) - len(tail) % size
            self._sealed += [tuple(tail[i : i + size]) for i in range(0, full, size)]
            del tail[:full]


class Index:
    """Slots of committed FAILED records (see the module docstring)."""

    __slots__ = (
        "alive",
        "blocks",
        "cols",
        "dead",
        "front",
        "frozen",
        "ids",
        "live_bytes",
        "loc",
        "pos",
        "size",
    )

    def __init__(self) -> None:
        self.ids = _Ids()
        self.alive = bytearray()
        self.loc: array[int] = array("q")
        self.size: array[int] = array("H")  # widened (``fit``) when a record needs it
        self.blocks: array[int] = array("i")
        self.pos: dict[str, int] = {}
        self.dead = 0
        self.live_bytes = 0
        self.front = 0
        """No live slot below this one that the store still counts (a forward cursor)."""
        self.frozen = False
        """Slots keep their numbers while True (a compaction holds a snapshot of them)."""
        self.cols = Columns()
        """The filter columns (``qdash_mp.journal.columns``), kept in step with the slots."""

    def __len__(self) -> int:
        return len(self.pos)

    def append_failed(
        self, base: int, off: int, run: list[Op], metas: list[Meta] | None = None
    ) -> int:
        """Give each FAILED record of ``run`` (written back to back from ``off`` of the
        segment whose ``loc`` is ``base``) a new slot, superseding the live record of its
        id; returns the offset after the run. ``metas``: each record's (queue, name, error).
        """
        keys: list[str] = list(map(itemgetter(1), run))
        sizes: list[int] = list(map(itemgetter(2), run))
        k = len(run)
        p0 = len(self.ids)
        self.ids.extend(keys)
        self.alive += b"\x01" * k
        self.loc.extend(islice(accumulate(sizes, initial=base + off), k))
        self.size = fit(self.size, max(sizes, default=0))
        self.size.extend(sizes)
        blocks = self.blocks
        p, stop = p0, p0 + k
        while p < stop:  # live slots per block of 1 << BLOCK_SHIFT
            upto = min(stop, ((p >> BLOCK_SHIFT) + 1) << BLOCK_SHIFT)
            if p & _BLOCK_MASK:
                blocks[p >> BLOCK_SHIFT] += upto - p
            else:
                blocks.append(upto - p)
            p = upto
        self.cols.append(p0, list(map(itemgetter(3), run)), metas or [_NO_META] * k)
        total = sum(sizes)
        self.live_bytes += total
        # One probe per id: setdefault returns the slot of a live record of the same id,
        # which the new one supersedes (an earlier record of this very run included).
        slots = range(p0, stop)
        found = list(map(self.pos.setdefault, keys, slots))
        if found != list(slots):
            pos = self.pos
            for key, new, old in zip(keys, slots, found, strict=True):
                if old != new:
                    self.kill(pos[key])
                    pos[key] = new
        return off + total

    def append_one(
        self, loc: int, key: str, size: int, failed_at: float = 0.0, meta: Meta | None = None
    ) -> None:
        """``append_failed`` of a run of one record, at ``loc`` (``_apply``'s short path)."""
        p = len(self.ids)
        self.cols.append(p, [failed_at], [meta or _NO_META])
        self.ids.extend((key,))
        self.alive.append(1)
        self.loc.append(loc)
        self.size = fit(self.size, size)
        self.size.append(size)
        if p & _BLOCK_MASK:
            self.blocks[p >> BLOCK_SHIFT] += 1
        else:
            self.blocks.append(1)
        self.live_bytes += size
        old = self.pos.setdefault(key, p)
        if old != p:
            self.kill(old)
            self.pos[key] = p

    def remove_many(self, keys: list[str]) -> None:
        """``remove`` of each of ``keys`` (a batch's retention prunes), in tighter loops."""
        slots = [p for p in map(self.pos.pop, keys, repeat(None)) if p is not None]
        alive = self.alive
        blocks = self.blocks
        kill = self.cols.kill
        for p in slots:
            alive[p] = 0
            blocks[p >> BLOCK_SHIFT] -= 1
            kill(p)
        self.live_bytes -= sum(map(self.size.__getitem__, slots))
        self.dead += len(slots)

    def remove(self, key: str) -> None:
        """Drop the live record of ``key``, if any."""
        p = self.pos.pop(key, None)
        if p is not None:
            self.kill(p)

    def kill(self, p: int) -> None:
        """Mark slot ``p`` dead (its id must already be out of ``pos`` or about to be)."""
        self.alive[p] = 0
        self.blocks[p >> BLOCK_SHIFT] -= 1
        self.live_bytes -= self.size[p]
        self.dead += 1
        self.cols.kill(p)

    def kill_all(self) -> None:
        """Drop every record."""
        self.pos.clear()
        self.live_bytes = 0
        n = len(self.ids)
        if self.frozen:  # slots must keep their numbers until the compaction installs
            self.alive[:] = bytes(n)
            self.blocks[:] = array("i", bytes(4 * len(self.blocks)))
            self.dead = n
            self.cols.kill_all()
            return
        self.cols.reset()
        self.ids = _Ids()
        del self.alive[:], self.loc[:], self.size[:]
        del self.blocks[:]
        self.dead = 0
        self.front = 0

    def maybe_rebuild(self) -> None:
        """Squeeze dead slots out of the arrays once they outnumber live ones."""
        if self.frozen or self.dead <= max(_REBUILD_MIN, len(self.pos)):
            return
        keep = bytes(self.alive)
        self.cols.squeeze(keep)
        self.ids = _Ids(compress(self.ids, keep))
        self.loc = array("q", compress(self.loc, keep))
        self.size = array(self.size.typecode, compress(self.size, keep))
        n = len(self.ids)
        self.alive = bytearray(b"\x01") * n
        full, rest = divmod(n, 1 << BLOCK_SHIFT)
        self.blocks = array("i", repeat(1 << BLOCK_SHIFT, full))
        if rest:
            self.blocks.append(rest)
        self.pos = dict(zip(self.ids, range(n), strict=True))
        self.dead = 0
        self.front = 0

    def newest_slots(self, offset: int, limit: int) -> list[int]:
        """Slots of the live records ``offset .. offset+limit`` counted from the newest."""
        blocks = self.blocks
        alive = self.alive
        b = len(blocks) - 1
        skip = offset
        while b >= 0 and blocks[b] <= skip:
            skip -= blocks[b]
            b -= 1
        if b < 0:
            return []
        lo = b << BLOCK_SHIFT
        p = min(lo + (1 << BLOCK_SHIFT), len(alive))
        for _ in range(skip + 1):
            p = alive.rfind(1, lo, p)
        slots = [p]
        while len(slots) < limit:
            p = alive.rfind(1, 0, p)
            if p < 0:
                break
            slots.append(p)
        return slots

    def live_slots(self) -> array[int]:
        """Every live slot, oldest first."""
        return array("q", compress(range(len(self.alive)), self.alive))

    def relocate(self, slots: Iterable[int], locs: Iterable[int]) -> None:
        """Point the still-live ``slots`` at ``locs`` (after a compaction copied them)."""
        alive = self.alive
        loc = self.loc
        for p, new in zip(slots, locs, strict=True):
            if alive[p]:
                loc[p] = new
