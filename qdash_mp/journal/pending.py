"""The pending state: what the journal will hold once everything staged is committed.

Removals are checked against it and retention counts it (``staging.py``), so it is kept as
an overlay of the staged records on the committed index (``segments.JournalBase`` declares
it): ``_p_ids`` (id -> its live staged FAILED op, or ``GONE``), ``_p_queue`` (staged FAILED
ops, oldest first), ``_p_flushed`` (a FLUSHED is staged: nothing committed counts), ``_p_len``
(live jobs, ``None`` while not counted). This module answers the questions staging asks of
it (is an id live, how many are, which are oldest) and re-derives it after a commit. How
retention stays exact where it matters and free where it does not: ``docs/journal.md``.
All of it runs with the journal's lock held.
"""

from __future__ import annotations

import re
from collections import deque
from itertools import compress, filterfalse, takewhile
from operator import itemgetter
from typing import Final

from qdash_mp.journal.format import Op, RecordType
from qdash_mp.journal.segments import JournalBase

__all__ = ["GONE", "PendingState"]

_FAILED: Final = int(RecordType.FAILED)
_REMOVED: Final = int(RecordType.REMOVED)
_FLUSHED: Final = int(RecordType.FLUSHED)
_REMOVED_OR_FLUSHED: Final = re.compile(rb"[\x%02x\x%02x]" % (_REMOVED, _FLUSHED))
_IS_FAILED: Final = bytes(int(b == _FAILED) for b in range(256))
"""``bytes.translate`` table: a string of record types -> 1 where FAILED, else 0."""
GONE: Final[Op] = (0, "", 0, None)
"""``_p_ids`` value of an id whose staged removal makes it dead in the pending state."""


class PendingState(JournalBase):
    """The pending-state queries of ``Journal`` (see the module docstring)."""

    def _p_oldest_ids(self, n: int) -> list[str]:
        """The ids of (up to) the ``n`` oldest jobs live in the pending state, oldest first,
        in the order ``_p_oldest`` would give them as each one is removed (lock held).
        """
        out: list[str] = []
        touched = self._p_ids
        if not self._p_flushed:
            alive = self._index.alive
            slot_ids = self._index.ids
            p = self._index.front
            while len(out) < n:
                p = alive.find(1, p)
                if p < 0:
                    break
                # A stretch of live slots (at the cap, all of it: pruned from the front) in
                # C-level slices; a staged record of an id makes its slot dead in the pending
                # state, so those are left out.
                q = alive.find(0, p, p + n - len(out))
                q = p + n - len(out) if q < 0 else q
                keys = slot_ids.slice(p, q)
                if not out:  # nothing below p still counts (as ``_p_oldest`` moves it)
                    self._index.front = p + sum(1 for _ in takewhile(touched.__contains__, keys))
                if touched:
                    keys = list(filterfalse(touched.__contains__, keys))
                out += keys
                p = q
        if len(out) < n:
            for op in self._p_queue:
                if touched.get(op[1]) is op:
                    out.append(op[1])
                    if len(out) == n:
                        break
        return out

    def _p_live(self, id: str) -> bool:
        """Is ``id`` live in the pending state (committed, then everything staged)?"""
        op = self._p_ids.get(id)
        if op is not None:
            return op is not GONE
        return not self._p_flushed and id in self._index.pos

    def _pending_len(self) -> int:
        """Live jobs in the pending state (lock held), counted now if they were not."""
        if self._p_len is None:
            pos = self._index.pos
            touched = self._p_ids
            if self._p_flushed:
                n = sum(1 for op in touched.values() if op is not GONE)
            else:  # a staged id replaces its committed state
                n = len(pos)
                for id, op in touched.items():
                    n += (op is not GONE) - (id in pos)
            self._p_len = n
        return self._p_len

    def _p_oldest(self) -> tuple[str, int, Op] | None:
        """The oldest job live in the pending state: ``(id, slot, GONE)`` if committed,
        ``(id, -1, op)`` if staged.

        Amortised O(1): being dead in the pending state is permanent for a slot (and for a
        staged record), so both cursors only move forward.
        """
        if not self._p_flushed:
            alive = self._index.alive
            ids = self._index.ids
            touched = self._p_ids
            p = self._index.front
            while True:
                p = alive.find(1, p)
                if p < 0:
                    break
                key = ids[p]
                if key not in touched:
                    self._index.front = p
                    return key, p, GONE
                p += 1
            self._index.front = len(alive)
        # Every committed job is dead in the pending state: the oldest is a staged one.
        queue = self._p_queue
        touched = self._p_ids
        while queue:
            op = queue[0]
            if touched.get(op[1]) is op:
                return op[1], -1, op
            queue.popleft()
        return None

    def _refresh_pending(self) -> None:
        """Re-derive the pending overlay from what is still staged (after a commit)."""
        ops = self._ops
        kinds = bytes(map(itemgetter(0), ops))
        if _REMOVED_OR_FLUSHED.search(kinds) is None:
            # Only failures (and client seqs) staged, the usual case: in C-level passes.
            failed = list(compress(ops, kinds.translate(_IS_FAILED)))
            self._p_ids = dict(zip(map(itemgetter(1), failed), failed, strict=True))
            self._p_queue = deque(failed)
            self._p_flushed = False
            return
        touched: dict[str, Op] = {}
        queue: deque[Op] = deque()
        flushed = False
        for op in self._ops:
            rtype = op[0]
            if rtype == _FAILED:
                touched[op[1]] = op
                queue.append(op)
            elif rtype == _REMOVED:
                touched[op[1]] = GONE
            elif rtype == _FLUSHED:
                touched.clear()
                queue.clear()
                flushed = True
        self._p_ids = touched
        self._p_queue = queue
        self._p_flushed = flushed
        if flushed:
            self._index.front = len(self._index.alive)
