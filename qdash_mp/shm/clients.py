"""The writer's mirror of the client table: which entry a client's seq goes to, in memory.

Only the writer reads the client entries (``layout``); it mirrors them here (id and seq per
entry, id to entry, entries by last update), rebuilt on attach, so ``client_seq`` costs a dict
lookup. Which entry a new client takes (a free one, an idle client's, or a grown table's) is
decided here; the entry itself is written through the redo log by the writer.
"""

from __future__ import annotations

import collections
import logging

from qdash_mp.shm.layout import check_client_id
from qdash_mp.stats import INT64_MAX

__all__ = ["ClientTable"]

log = logging.getLogger("qdash_mp.shm")


class ClientTable:
    """Client id -> (entry, last applied seq), and the entries from least to most recent."""

    __slots__ = ("_by_id", "_lru", "_table", "_ttl", "ids", "seqs")

    def __init__(self, entries: list[tuple[str, int, int]], ttl: float, table: str) -> None:
        """``entries``: ``(id, seq, second)`` per entry in use; ``ttl``: see ``plan``."""
        self._table = table
        self._ttl = ttl
        self.ids = [client_id for client_id, _, _ in entries]
        self.seqs = [seq for _, seq, _ in entries]
        self._by_id = {client_id: j for j, client_id in enumerate(self.ids)}
        self._lru: collections.OrderedDict[int, int] = collections.OrderedDict(
            sorted(((j, second) for j, (_, _, second) in enumerate(entries)), key=_by_second)
        )

    def __len__(self) -> int:
        return len(self.ids)

    def seq(self, client_id: str) -> int:
        """The seq of ``client_id``'s last applied batch; 0 if unknown."""
        j = self._by_id.get(client_id)
        return 0 if j is None else self.seqs[j]

    def by_age(self) -> list[tuple[str, int, int]]:
        """``(id, seq, second)`` of every client, least recently updated first."""
        return [(self.ids[j], self.seqs[j], t) for j, t in self._lru.items()]

    def plan(self, client_id: str, seq: int, capacity: int, now: int) -> tuple[int, bytes]:
        """The entry ``client_id``'s new ``seq`` goes to, and its id bytes if it is new there.

        ``ValueError`` (before anything is written) unless ``seq`` is after the client's last
        and at most ``INT64_MAX``. A known client keeps its entry. A new one gets the next free
        entry; when there is none, the least recently updated client's if that one is idle for
        ``ttl`` seconds, else entry ``capacity`` (the caller grows the table).
        """
        if seq > INT64_MAX:
            raise ValueError(f"client {client_id!r}: batch seq {seq} is beyond int64")
        j = self._by_id.get(client_id)
        if j is not None:
            last = self.seqs[j]
            if seq <= last:
                raise ValueError(
                    f"client {client_id!r}: batch {seq} is not after {last}, its last applied"
                )
            return j, b""
        check_client_id(client_id)
        if seq < 1:
            raise ValueError(f"client {client_id!r}: batch seq must be >= 1, not {seq}")
        stored = client_id.encode("utf-8", "surrogatepass")
        known = len(self.ids)
        if known < capacity:
            return known, stored
        oldest, second = next(iter(self._lru.items()))
        if second <= now - self._ttl:
            return oldest, stored
        return known, stored

    def remember(self, j: int, client_id: str, seq: int, now: int, claimed: bool) -> None:
        """Mirror a committed client entry update (``claimed``: ``client_id`` is new in ``j``)."""
        if claimed:
            if j < len(self.ids):
                old = self.ids[j]
                log.info(
                    "shared stats %r: forgot client %r (last batch %d, %d s ago) to make room "
                    "for %r",
                    self._table,
                    old,
                    self.seqs[j],
                    now - self._lru[j],
                    client_id,
                )
                del self._by_id[old]
                self.ids[j] = client_id
            else:
                self.ids.append(client_id)
                self.seqs.append(0)
            self._by_id[client_id] = j
        self.seqs[j] = seq
        self._lru[j] = now
        self._lru.move_to_end(j)


def _by_second(entry: tuple[int, int]) -> tuple[int, int]:
    j, second = entry
    return second, j
