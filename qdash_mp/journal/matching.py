"""Queries over the filter columns: pages and totals of a ``FailedFilter``. Pure.

The ``Matching`` half of ``qdash_mp.journal.columns.Columns`` (the table of what each kind
of filter walks and costs is in that module's docstring). Two ways through the matches:

- ``_walk``: lazily, newest first, for a page near the top (stops after ``offset + limit``);
- ``_all_matches``: every match at once, for totals and for pages deeper than ``_LAZY_MAX``:
  the candidates (a code list, the text walk's slots, or the range with time blocks skipped
  or taken whole), then C-level passes (one ``map`` per condition, ``compress``).

Totals the live counters cannot give are memoised per (filter, snapshot) and advanced
incrementally (``_advance``): newer slots are counted, killed ones are taken off.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import contains, gt, le, methodcaller
from typing import Any, Final

from qdash_mp.failed_filter import FailedFilter

__all__ = ["TIME_BLOCK_SHIFT", "Matching", "Selection"]

TIME_BLOCK_SHIFT: Final = 10
"""failed_at bounds are kept per block of 1 << TIME_BLOCK_SHIFT slots."""
_TB: Final = TIME_BLOCK_SHIFT
_MEMO_MAX: Final = 64
_LAZY_MAX: Final = 1000
"""Pages ending deeper than this many matches are cut from the full match list."""
_START: Final = methodcaller("start")
_PLUS_ONE: Final = (1).__add__
_MINUS_ONE: Final = (-1).__add__


_IS_CODE: Final = [bytes(int(b == c) for b in range(256)) for c in range(256)]
"""``bytes.translate`` tables: a 'B' code column -> 1 where it holds code ``c``, else 0."""


@dataclass(slots=True)
class Selection:
    """A page of matching slots (newest first) and how many match in all."""

    slots: list[int]
    total: int


@dataclass(slots=True)
class _Memo:
    total: int
    seq_hw: int  # slots with seq < seq_hw are counted
    log_pos: int  # kills up to here are accounted for


class Matching:
    """Query methods over the columns ``Columns`` keeps (see the module docstring)."""

    __slots__ = ()

    seq: range | array[int]
    fat: array[float]
    fat_min: array[float]
    fat_max: array[float]
    qc: array[int]
    nc: array[int]
    eoff: array[int]
    blob: bytearray
    queues: dict[str, int]
    names: dict[str, int]
    q_slots: list[array[int] | None]
    n_slots: list[array[int] | None]
    q_live: list[int]
    n_live: list[int]
    kill_log: array[int]
    memo: dict[tuple[FailedFilter, int], _Memo]

    def _time_range(self, f: FailedFilter, alive: bytearray, lo: int, hi: int) -> list[int]:
        """Live slots in ``lo .. hi`` within the time range of ``f``, ascending. Blocks whose
        failed_at bounds lie outside are skipped, wholly inside are taken by ``alive``
        alone; only blocks straddling a bound are checked slot by slot (failed_at mostly
        grows with the slots, so those are few)."""
        after, before = f.after, f.before
        out: list[int] = []
        for b in range(lo >> _TB, ((hi - 1) >> _TB) + 1 if hi > lo else 0):
            s = max(lo, b << _TB)
            e = min(hi, (b + 1) << _TB)
            mn, mx = self.fat_min[b], self.fat_max[b]
            if (after is not None and mx < after) or (before is not None and mn >= before):
                continue
            slots = range(s, e)
            if (after is None or mn >= after) and (before is None or mx < before):
                out += compress(slots, alive[s:e])
                continue
            preds: list[Iterator[Any]] = [map(alive.__getitem__, slots)]
            if after is not None:
                preds.append(map(le, repeat(after), map(self.fat.__getitem__, slots)))
            if before is not None:
                preds.append(map(gt, repeat(before), map(self.fat.__getitem__, slots)))
            out += compress(slots, map(all, zip(*preds, strict=True)))
        return out

    @staticmethod
    def code_slots(lists: list[array[int] | None], col: array[int], code: int) -> array[int]:
        """The slot list of ``code`` (``q_slots`` / ``n_slots`` with column ``qc`` / ``nc``),
        built now in one C-level pass over the column if no query needed it before."""
        lst = lists[code]
        if lst is None:
            if col.typecode == "B":  # a byte per slot: flags by one translate, no call per slot
                flags: Iterable[Any] = col.tobytes().translate(_IS_CODE[code])
            else:  # (at 1M slots: ~2x the translate's ~20 ms of CPU, under load)
                flags = map(code.__eq__, col)
            lst = lists[code] = array("i", compress(range(len(col)), flags))
        return lst

    def seq_slot(self, seq: int) -> int:
        """The first slot whose seq is ``>= seq`` (slots are in seq order)."""
        return bisect_left(self.seq, seq)

    def text_of(self, p: int) -> bytes:
        end = self.eoff[p + 1] if p + 1 < len(self.eoff) else len(self.blob)
        return bytes(self.blob[self.eoff[p] : end])

    def _codes(self, f: FailedFilter) -> tuple[int | None, int | None] | None:
        """The queue / name codes of ``f`` (None: no condition); None if one is unknown."""
        q = n = None
        if f.queue is not None:
            q = self.queues.get(f.queue)
            if q is None:
                return None
        if f.name is not None:
            n = self.names.get(f.name)
            if n is None:
                return None
        return q, n

    def _candidates(
        self,
        f: FailedFilter,
        codes: tuple[int | None, int | None],
        alive: bytearray,
        lo: int,
        hi: int,
    ) -> Iterator[int]:
        """Slots in ``lo .. hi`` that may match, newest first (live ones only)."""
        q, n = codes
        if q is not None or n is not None:
            if q is not None and (n is None or self.q_live[q] <= self.n_live[n]):
                lst = self.code_slots(self.q_slots, self.qc, q)
            else:
                assert n is not None
                lst = self.code_slots(self.n_slots, self.nc, n)
            i = bisect_left(lst, hi)
            stop = bisect_left(lst, lo)
            while i > stop:
                i -= 1
                p = lst[i]
                if alive[p]:
                    yield p
            return
        needle = f.needle
        if needle:
            nb = needle.encode("utf-8", "surrogatepass")
            blob = self.blob
            eoff = self.eoff
            nslots = len(eoff)
            end = len(blob) if hi >= nslots else eoff[hi]
            floor = eoff[lo] if lo < nslots else len(blob)
            while True:
                pos = blob.rfind(nb, floor, end)
                if pos < 0:
                    return
                p = bisect_right(eoff, pos) - 1
                slot_end = eoff[p + 1] if p + 1 < nslots else len(blob)
                if pos + len(nb) <= slot_end:
                    if alive[p]:
                        yield p
                    end = eoff[p]  # this slot is done: on to the ones before it
                else:
                    end = pos + len(nb) - 1  # straddles a boundary: look further back
            return
        p = hi
        while True:
            p = alive.rfind(1, lo, p)
            if p < 0:
                return
            yield p

    def _all_matches(
        self,
        f: FailedFilter,
        codes: tuple[int | None, int | None],
        alive: bytearray,
        lo: int,
        hi: int,
    ) -> list[int]:
        """Every matching live slot in ``lo .. hi``, ascending, in C-level passes (totals,
        deep pages): the candidates (a code list, the text's slots, or the range), then one
        ``map`` per condition over them, combined by ``compress``."""
        q, n = codes
        needle = f.needle
        nb = needle.encode("utf-8", "surrogatepass") if needle else b""
        eoff = self.eoff
        eoff.append(len(self.blob))  # sentinel: slot p's text is eoff[p] .. eoff[p + 1]
        try:
            cands: Sequence[int]
            check_q = check_n = False
            text_done = False
            if q is not None or n is not None:
                if q is not None and (n is None or self.q_live[q] <= self.n_live[n]):
                    lst = self.code_slots(self.q_slots, self.qc, q)
                    check_n = n is not None
                else:
                    assert n is not None
                    lst = self.code_slots(self.n_slots, self.nc, n)
                    check_q = q is not None
                cands = lst[bisect_left(lst, lo) : bisect_left(lst, hi)]
            elif nb:
                # the blob walk (one rfind per matching slot, newest first), reversed
                found = list(self._candidates(f, codes, alive, lo, hi))
                found.reverse()
                cands = found
                text_done = True
            elif f.after is not None or f.before is not None:
                return self._time_range(f, alive, lo, hi)
            else:
                cands = range(lo, hi)
            preds: list[Iterator[Any]] = [map(alive.__getitem__, cands)]
            if check_q:
                preds.append(map(q.__eq__, map(self.qc.__getitem__, cands)))
            if check_n:
                preds.append(map(n.__eq__, map(self.nc.__getitem__, cands)))
            if f.after is not None:
                preds.append(map(le, repeat(f.after), map(self.fat.__getitem__, cands)))
            if f.before is not None:
                preds.append(map(gt, repeat(f.before), map(self.fat.__getitem__, cands)))
            if nb and not text_done:
                texts = map(
                    self.blob.__getitem__,
                    map(
                        slice,
                        map(eoff.__getitem__, cands),
                        map(eoff.__getitem__, map(_PLUS_ONE, cands)),
                    ),
                )
                preds.append(map(contains, texts, repeat(nb)))
            if len(preds) == 1:
                return list(compress(cands, preds[0]))
            return list(compress(cands, map(all, zip(*preds, strict=True))))
        finally:
            eoff.pop()

    def _check(self, f: FailedFilter, codes: tuple[int | None, int | None], p: int) -> bool:
        """The conditions the candidate walk did not already guarantee."""
        q, n = codes
        if q is not None and self.qc[p] != q:
            return False
        if n is not None and self.nc[p] != n:
            return False
        fa = self.fat[p]
        if f.after is not None and not fa >= f.after:
            return False
        if f.before is not None and not fa < f.before:
            return False
        needle = f.needle
        if needle and (q is not None or n is not None):
            return needle.encode("utf-8", "surrogatepass") in self.text_of(p)
        return True

    def _walk(
        self,
        f: FailedFilter,
        codes: tuple[int | None, int | None],
        alive: bytearray,
        lo: int,
        hi: int,
    ) -> Iterator[int]:
        check = self._check
        for p in self._candidates(f, codes, alive, lo, hi):
            if check(f, codes, p):
                yield p

    def select(
        self,
        f: FailedFilter,
        alive: bytearray,
        live: int,
        offset: int,
        limit: int,
        *,
        seq_hw: int | None = None,
        seq_lo: int | None = None,
    ) -> Selection:
        """Matching live slots ``offset .. offset+limit`` newest first, and their total.

        ``seq_hw``: only slots appended before it (a snapshot); ``seq_lo``: only from it on
        (what is new since a snapshot). ``live``: the index's live count (the total of an
        unfiltered, unbounded query).
        """
        codes = self._codes(f)
        if codes is None:
            return Selection([], 0)
        nslots = len(alive)
        hi = nslots if seq_hw is None else self.seq_slot(seq_hw)
        lo = 0 if seq_lo is None else self.seq_slot(seq_lo)
        slots: list[int] = []
        if limit > 0 and offset + limit > _LAZY_MAX:  # a deep page: all matches, in C passes
            every = self._all_matches(f, codes, alive, lo, hi)
            stop = max(len(every) - offset, 0)
            slots = every[max(stop - limit, 0) : stop][::-1]
        elif limit > 0:
            it = self._walk(f, codes, alive, lo, hi)
            for _ in range(offset):
                if next(it, None) is None:
                    break
            else:
                for p in it:
                    slots.append(p)
                    if len(slots) >= limit:
                        break
        total = self._total(f, codes, alive, live, lo, hi, seq_hw, seq_lo)
        return Selection(slots, total)

    def _total(
        self,
        f: FailedFilter,
        codes: tuple[int | None, int | None],
        alive: bytearray,
        live: int,
        lo: int,
        hi: int,
        seq_hw: int | None,
        seq_lo: int | None,
    ) -> int:
        whole = lo == 0 and hi == len(alive)
        plain = f.q is None and f.after is None and f.before is None
        if whole and plain:
            q, n = codes
            if q is not None and n is not None:
                pass  # counted below (memoised), walking the smaller list
            elif q is not None:
                return self.q_live[q]
            elif n is not None:
                return self.n_live[n]
            else:
                return live
        if seq_lo is not None:  # "new since": a short tail, counted directly
            return len(self._all_matches(f, codes, alive, lo, hi))
        key = (f, -1 if seq_hw is None else seq_hw)
        memo = self.memo.get(key)
        if memo is not None:
            return self._advance(f, codes, alive, memo, seq_hw)
        if len(self.memo) >= _MEMO_MAX:
            self.memo.clear()
            del self.kill_log[:]
        total = len(self._all_matches(f, codes, alive, lo, hi))
        self.memo[key] = _Memo(total, hi and self.seq[hi - 1] + 1, len(self.kill_log))
        return total

    def _advance(
        self,
        f: FailedFilter,
        codes: tuple[int | None, int | None],
        alive: bytearray,
        memo: _Memo,
        seq_hw: int | None,
    ) -> int:
        """Bring a memoised total up to date: newer slots in, killed counted slots out."""
        log = self.kill_log
        check = self._check
        seq = self.seq
        for i in range(memo.log_pos, len(log)):
            p = log[i]
            if seq[p] < memo.seq_hw and check(f, codes, p) and self._text_ok(f, codes, p):
                memo.total -= 1
        memo.log_pos = len(log)
        if seq_hw is None:
            start = self.seq_slot(memo.seq_hw)
            hi = len(alive)
            if start < hi:
                memo.total += len(self._all_matches(f, codes, alive, start, hi))
                memo.seq_hw = seq[hi - 1] + 1
        return memo.total

    def _text_ok(self, f: FailedFilter, codes: tuple[int | None, int | None], p: int) -> bool:
        """The ``q`` condition for a slot reached without the blob walk (a killed one)."""
        needle = f.needle
        if not needle or codes[0] is not None or codes[1] is not None:
            return True  # _check did it (or there is none)
        return needle.encode("utf-8", "surrogatepass") in self.text_of(p)
