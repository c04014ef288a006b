"""Find, repair, replace or create a writer's table: the decision behind ``create_or_attach``.

A live segment always wins over a snapshot file: the segment is only ever left behind by a
writer that did not finish a clean stop (``kill -9``, a failed start, or a snapshot that could
not be written), and in each case it holds every batch applied, a superset of what any earlier
snapshot holds. See "Which state wins" in ``docs/shm.md``.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qdash_mp.errors import ShmError, ShmIncompatible
from qdash_mp.shm import layout as hdr
from qdash_mp.shm import snapshot
from qdash_mp.shm.layout import HEADER_SIZE, MAGIC, Layout, segment_name
from qdash_mp.shm.redo import recover
from qdash_mp.shm.segment import Segment, attach, create, follow, lock, retire, unlink, writer_link

__all__ = ["Opened", "at_least", "open_table"]

log = logging.getLogger("qdash_mp.shm")


@dataclass
class Opened:
    """A table ready for its writer: generation 0, the block in use, the lock fd."""

    base: Segment
    seg: Segment
    fd: int
    restored: bool
    reattached: bool

    def abandon(self) -> None:
        """Unmap and unlock (the writer could not be built on it); the table stays."""
        if self.seg is not self.base:
            self.seg.close()
        self.base.close()
        os.close(self.fd)


def at_least(capacity: int, need: int) -> int:
    """``capacity`` doubled until it holds ``need``."""
    while capacity < need:
        capacity *= 2
    return capacity


def open_table(
    name: str,
    *,
    ring: int,
    capacity: int,
    client_capacity: int,
    clock: Callable[[], float],
    restore_from: Path | None,
) -> Opened:
    """Reattach to the table ``name``, else create it (from ``restore_from`` if it verifies)."""
    content: snapshot.Content | None = None
    loaded = restore_from is None
    for _ in range(4):
        try:
            base = attach(name)
        except FileNotFoundError:
            if not loaded:
                assert restore_from is not None
                content = snapshot.load(Path(restore_from), ring - 1)
                loaded = True
            queues, clients = capacity, client_capacity
            if content is not None:
                queues = at_least(capacity, len(content.queues))
                clients = at_least(client_capacity, len(content.clients))
            layout = Layout(ring, queues, clients)
            started = int(clock()) if content is None else content.started
            try:
                seg, fd = create(
                    name,
                    layout,
                    generation=0,
                    started=started,
                    incarnation=secrets.randbits(63),
                    content=content,
                )
            except FileExistsError:
                continue
            log.info(
                "created shared stats %r (%d queues, %d clients, %d bytes)",
                name,
                queues,
                clients,
                layout.size,
            )
            if content is not None:
                log.info(
                    "restored shared stats %r from %s (saved at %d): %d queues, %d clients",
                    name,
                    restore_from,
                    content.saved_at,
                    len(content.queues),
                    len(content.clients),
                )
            return Opened(seg, seg, fd, content is not None, False)
        except ShmIncompatible:
            # Empty: its creator died before sizing it (or is about to: then it is locked).
            os.close(lock(name))
            unlink(name)
            continue
        opened = _reattach(name, base, ring)
        if opened is not None:
            if restore_from is not None and Path(restore_from).exists():
                log.info(
                    "not restoring from %s: the shared stats %r survived in memory and "
                    "are newer than that snapshot, which is stale",
                    restore_from,
                    name,
                )
            return opened
    raise ShmError(f"could not create or attach shared stats {name!r}: it keeps changing")


def _reattach(name: str, base: Segment, ring: int) -> Opened | None:
    """Reattach to ``base``'s table, or retire it and return None (caller creates anew)."""
    try:
        fd = lock(name, base.q[hdr.PID] if len(base.buf) >= HEADER_SIZE else 0)
    except BaseException:
        base.close()
        raise
    why = base.header_ok(ring)
    if why is None and base.q[hdr.STATUS] == hdr.CLOSED:
        why = "it was shut down"
    seg = base
    if why is None:
        try:
            seg = follow(name, base, writer_link)
        except ShmIncompatible as exc:
            why = str(exc)
    if why is None:
        opened = Opened(base, seg, fd, False, True)
        try:
            recover(seg)
            gen = seg.generation
            for stale in (*range(1, gen), gen + 1):
                if unlink(segment_name(name, stale)):
                    log.info("removed stale shared-memory segment %r", segment_name(name, stale))
            seg.q[hdr.PID] = base.q[hdr.PID] = os.getpid()
        except BaseException:
            opened.abandon()
            raise
        return opened
    if bytes(base.buf[:8]) not in (MAGIC, bytes(8)):
        base.close()
        os.close(fd)
        raise ShmIncompatible(
            f"shared-memory segment {name!r} exists and is not a qdash_mp stats table "
            f"({why}); choose another name, or remove it if it is a leftover"
        )
    log.warning("replacing shared stats %r (%s): counters restart from 0", name, why)
    try:
        retire(name, base)
    finally:
        base.close()
        os.close(fd)
    return None
