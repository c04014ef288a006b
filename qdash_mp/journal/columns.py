"""The failed-job index's filter columns: per-slot fields, per-queue / per-name slot lists. Pure.

``Index`` (``qdash_mp.journal.index``) owns one ``Columns`` and keeps it in step with its
slots on every append, removal, flush and squeeze (recovery and compaction go through those
same calls: compaction keeps slot numbers, a squeeze renumbers and rebuilds). Per slot::

    seq     range        append sequence: monotonic over the journal's life in this process
            | array('I') (the bulk actions' snapshot is "seq < high-water"). A ``range`` (no
                         bytes per job) while the slots' sequences run without a gap -- from
                         the start, after a reset, after a squeeze that kept a contiguous run
                         (retention prunes the oldest); an array after any other squeeze
    fat     array('d')   failed_at, Unix seconds
    qc, nc  array('B')   interned queue / job name code
    eoff    array('I')   start of the slot's error text in ``blob``; it ends where the next
                         slot's starts (the last one: at the end of ``blob``)
    blob    bytearray    every slot's error text, case-folded, its first ``ERROR_KEY``
                         characters, UTF-8, back to back

The int columns start in the narrowest type shown and are widened once when a value needs
it (``fit``: 'B' -> 'H' -> 'I' -> 'q'). Per code: ``q_slots[code]`` / ``n_slots[code]``
(``array('i')``, ascending slots, dead ones left in until the next squeeze; built by the
first query that needs that code -- one C-level pass over ``qc`` / ``nc`` -- and kept in
step from then on: a code nobody filters on costs nothing per job) and live counts
``q_live``, ``n_live``.

A query (``select``) walks candidates newest first and checks the rest per candidate:

    filter                       candidates                       page        total
    none                         live slots (alive.rfind)         O(page)     O(1)
    queue or name                the code list, reversed          O(page+d)   O(1) (counters)
    queue and name               the smaller code list            O(page+d)   memo
    q alone / with time          blob.rfind of the needle         O(page+m)   memo, see below
    time range only              live slots                       O(page+s)   memo

``d``: dead entries passed over; ``m``: slots holding the needle that fail another condition;
``s``: slots skipped by the time range. A total that the counters cannot give is counted
once per (filter, snapshot) with the same walk, then kept up to date incrementally: newer
slots are counted as they are appended, and removals since are taken off via the kill log
(a removed slot's columns stay intact until a squeeze, so whether it matched is known).
``q`` matches the first ``ERROR_KEY`` characters of the error (the page shows 120).
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable
from itertools import accumulate, compress, count, islice, repeat
from operator import itemgetter
from typing import Final

from qdash_mp.failed_filter import FailedFilter
from qdash_mp.journal.matching import _TB, Matching, Selection, _Memo
from qdash_mp.records import FailedMeta

__all__ = ["ERROR_KEY", "Columns", "Meta", "Selection", "fit"]

ERROR_KEY: Final = 256
"""Characters of each error text the ``q`` filter searches."""
_PREFIX: Final = itemgetter(slice(0, ERROR_KEY))
_LOG_MAX: Final = 1 << 20
_WIDER: Final = {"B": ("H", 0xFF), "H": ("I", 0xFFFF), "I": ("q", 0xFFFFFFFF)}


def fit(arr: array[int], top: int) -> array[int]:
    """``arr``, or a copy of it in a wider type if its type cannot hold ``top``.

    The int columns start narrow (codes in one byte while there are at most 256 queues,
    say) and widen once when a value needs it: bytes per job, not per possible job.
    """
    while arr.typecode in _WIDER and top > _WIDER[arr.typecode][1]:
        arr = array(_WIDER[arr.typecode][0], arr)
    return arr


Meta = FailedMeta
"""``(queue, name, error)`` of a FAILED record: what the columns need beyond failed_at."""


class Columns(Matching):
    """Filter columns parallel to an ``Index``'s slots (see the module docstring)."""

    __slots__ = (
        "blob",
        "eoff",
        "fat",
        "fat_max",
        "fat_min",
        "kill_log",
        "memo",
        "n_live",
        "n_slots",
        "names",
        "nc",
        "next_seq",
        "q_live",
        "q_slots",
        "qc",
        "queues",
        "seq",
    )

    def __init__(self) -> None:
        self.seq: range | array[int] = range(0)  # see the module docstring
        self.fat: array[float] = array("d")
        self.fat_min: array[float] = array("d")  # per block of 1 << _TB slots (dead ones too)
        self.fat_max: array[float] = array("d")
        self.qc: array[int] = array("B")
        self.nc: array[int] = array("B")
        self.eoff: array[int] = array("I")
        self.blob = bytearray()
        self.queues: dict[str, int] = {}
        self.names: dict[str, int] = {}
        self.q_slots: list[array[int] | None] = []  # None: not built yet (``code_slots``)
        self.n_slots: list[array[int] | None] = []
        self.q_live: list[int] = []
        self.n_live: list[int] = []
        self.next_seq = 0
        self.kill_log: array[int] = array("i")
        self.memo: dict[tuple[FailedFilter, int], _Memo] = {}

    # ------------------------------------------------------------------ keeping in step

    @staticmethod
    def _codes_of(
        keys: list[str], table: dict[str, int], lists: list[array[int] | None], live: list[int]
    ) -> list[int]:
        """The codes of ``keys``, interning new ones (C-level passes over the batch)."""
        if keys and keys.count(keys[0]) == len(keys):  # the usual batch: one queue (or name)
            code = table.get(keys[0])
            if code is None:
                code = table[keys[0]] = len(lists)
                lists.append(None)
                live.append(0)
            return [code] * len(keys)
        for key in set(keys).difference(table):
            table[key] = len(lists)
            lists.append(None)
            live.append(0)
        return list(map(table.__getitem__, keys))

    @staticmethod
    def _file(codes: list[int], p0: int, lists: list[array[int] | None], live: list[int]) -> None:
        """Append slots ``p0 ..`` to their code's list (if built) and count them live."""
        first = codes[0]
        if codes.count(first) == len(codes):  # the usual batch: one queue (or name)
            lst = lists[first]
            if lst is not None:
                lst.extend(range(p0, p0 + len(codes)))
            live[first] += len(codes)
            return
        counts = Counter(codes)
        for c, n in counts.items():
            live[c] += n
        if all(lists[c] is None for c in counts):  # none of them queried yet
            return
        # Mixed: one append per slot measured cheaper than a C-level pass per code
        # (compress over the batch), already with 5 codes in a batch.
        for c, p in zip(codes, count(p0)):
            lst = lists[c]
            if lst is not None:
                lst.append(p)

    def append(self, p0: int, failed_ats: list[float], metas: list[Meta]) -> None:
        """Slots ``p0 ..`` were appended for records with these fields."""
        seq0 = self.next_seq
        k = len(metas)
        self.next_seq = seq0 + k
        seq = self.seq
        if type(seq) is range and (not seq or seq.stop == seq0):  # no gap: still a range
            self.seq = range(seq.start if seq else seq0, seq0 + k)
        else:  # a gap (a squeeze dropped the newest slots): an array from now on
            arr = fit(array("I"), seq0 + k) if type(seq) is range else fit(seq, seq0 + k)
            if type(seq) is range:
                arr.extend(seq)
            arr.extend(range(seq0, seq0 + k))
            self.seq = arr
        self.fat.extend(failed_ats)
        self._time_blocks(p0)
        queues = list(map(itemgetter(0), metas))
        names = list(map(itemgetter(1), metas))
        qcodes = self._codes_of(queues, self.queues, self.q_slots, self.q_live)
        ncodes = self._codes_of(names, self.names, self.n_slots, self.n_live)
        self.qc = fit(self.qc, len(self.q_slots))
        self.nc = fit(self.nc, len(self.n_slots))
        for col, codes in ((self.qc, qcodes), (self.nc, ncodes)):
            if col.typecode == "B":  # bytes() of small ints: one C loop, not an item each
                col.frombytes(bytes(codes))
            else:
                col.extend(codes)
        self._file(qcodes, p0, self.q_slots, self.q_live)
        self._file(ncodes, p0, self.n_slots, self.n_live)
        self._texts(list(map(itemgetter(2), metas)))

    def _texts(self, errors: list[str]) -> None:
        """Append the search text of each of ``errors`` to ``blob`` (and its start to
        ``eoff``): its first ``ERROR_KEY`` characters, case-folded, UTF-8.

        The usual batch -- all short, all ASCII (``str.isascii`` is O(1)) -- in one join,
        one ``lower`` (``casefold`` of ASCII) and one ``encode`` for the batch: a character
        is a byte, so the lengths give the offsets. Anything else, text by text
        (``_texts_plain``: the twin the tests compare it with).
        """
        blob = self.blob
        start = len(blob)
        joined = "".join(errors)
        if joined.isascii() and (not errors or max(map(len, errors)) <= ERROR_KEY):
            lens: Iterable[int] = map(len, errors)
            blob += joined.lower().encode("ascii")
        else:
            texts = self._texts_plain(errors)
            lens = map(len, texts)
            blob += b"".join(texts)
        self.eoff = fit(self.eoff, len(blob))
        self.eoff.extend(islice(accumulate(lens, initial=start), len(errors)))

    @staticmethod
    def _texts_plain(errors: list[str]) -> list[bytes]:
        """Each error's search text, one by one (see ``_texts``)."""
        return list(
            map(
                str.encode,
                map(str.casefold, map(_PREFIX, errors)),
                repeat("utf-8"),
                repeat("surrogatepass"),
            )
        )

    def _time_blocks(self, p0: int) -> None:
        """Take slots ``p0 ..`` (new) into the per-block failed_at bounds."""
        fat = self.fat
        for b in range(p0 >> _TB, ((len(fat) - 1) >> _TB) + 1 if fat else 0):
            chunk = fat[max(p0, b << _TB) : (b + 1) << _TB]
            if b < len(self.fat_min):
                self.fat_min[b] = min(self.fat_min[b], *chunk)
                self.fat_max[b] = max(self.fat_max[b], *chunk)
            else:
                self.fat_min.append(min(chunk))
                self.fat_max.append(max(chunk))

    def kill(self, p: int) -> None:
        """Slot ``p`` went dead (its columns stay until the next squeeze)."""
        q = self.qc[p]
        n = self.nc[p]
        self.q_live[q] -= 1
        self.n_live[n] -= 1
        if self.memo:
            if len(self.kill_log) >= _LOG_MAX:
                self.memo.clear()
                del self.kill_log[:]
            else:
                self.kill_log.append(p)

    def kill_all(self) -> None:
        """Every slot went dead, slot numbers kept (a compaction is running)."""
        self.q_live = [0] * len(self.q_live)
        self.n_live = [0] * len(self.n_live)
        self.memo.clear()
        del self.kill_log[:]

    def reset(self) -> None:
        """Every slot dropped (the arrays start again; ``next_seq`` keeps counting)."""
        nxt = self.next_seq
        self.__init__()  # type: ignore[misc]
        self.next_seq = nxt

    def squeeze(self, keep: bytes) -> None:
        """Keep only the slots flagged in ``keep`` (renumbered from 0, order kept)."""
        n = len(keep)
        old_eoff = self.eoff
        ends = [*old_eoff[1:n], len(self.blob)]
        blob = self.blob
        new_blob = bytearray()
        new_eoff: array[int] = array(old_eoff.typecode)
        for start, end in compress(zip(old_eoff, ends, strict=True), keep):
            new_eoff.append(len(new_blob))
            new_blob += blob[start:end]
        self.blob = new_blob
        self.eoff = new_eoff
        kept = fit(array("I"), self.next_seq)
        kept.extend(compress(self.seq, keep))
        if not kept:
            self.seq = range(self.next_seq, self.next_seq)
        elif kept[-1] - kept[0] == len(kept) - 1:  # no gap (strictly increasing): a range again
            self.seq = range(kept[0], kept[-1] + 1)  # (the usual squeeze: the oldest pruned)
        else:
            self.seq = kept
        self.fat = array("d", compress(self.fat, keep))
        del self.fat_min[:], self.fat_max[:]
        self._time_blocks(0)
        self.qc = array(self.qc.typecode, compress(self.qc, keep))
        self.nc = array(self.nc.typecode, compress(self.nc, keep))
        self.q_slots = [None] * len(self.q_slots)  # built again when next queried
        self.n_slots = [None] * len(self.n_slots)
        self.memo.clear()
        del self.kill_log[:]
