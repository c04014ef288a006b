"""Recovery through the redo log: repair what a writer killed mid-update left behind.

The writer (``SharedStats._apply``) writes the log inline, on the hot path; this module is the
other half: a reattaching writer ends a write section left open and replays a committed log.
Log layout: see ``layout``; the protocol (log, commit point, copy back): see ``docs/shm.md``.
"""

from __future__ import annotations

import logging

from qdash_mp.shm import layout as hdr
from qdash_mp.shm.segment import Segment

__all__ = ["recover", "replay"]

log = logging.getLogger("qdash_mp.shm")


def recover(seg: Segment) -> None:
    """End a write section a dead writer left open; redo its batch if it had committed it."""
    q, lay = seg.q, seg.layout
    pending, odd = q[hdr.LOG_COUNT], q[hdr.SEQ] & 1
    if not pending and not odd:
        return
    seq = q[hdr.SEQ] - odd
    q[hdr.SEQ] = seq + 1
    if 0 < pending <= lay.capacity + 1:
        replay(seg, pending)
        what = f"redid its last batch ({pending} log entries)"
    elif pending:
        what = f"ignored a corrupt redo log ({pending} entries)"
    else:
        what = "its last batch had not been committed, nothing to redo"
    q[hdr.LOG_COUNT] = 0
    q[hdr.SEQ] = seq + 2
    log.warning("shared stats %r: the previous writer died mid-update; %s", seg.name, what)


def replay(seg: Segment, entries: int) -> None:
    """Copy ``entries`` committed redo-log entries over their records and client entries.

    Idempotent: replaying a log that was already (partly) copied back changes nothing more.
    """
    q, lay = seg.q, seg.layout
    rs, hs, count, cs = lay.rec_slots, lay.head_slots, q[hdr.COUNT], hdr.CLIENT_SLOTS
    for k in range(entries):
        e = lay.log_slot + k * lay.log_slots
        tag, n = q[e], q[e + 1]
        if 0 <= tag < count and n in (hs, rs):
            r = lay.rec_slot + tag * rs
            q[r : r + n] = q[e + 2 : e + 2 + n]
        elif tag < 0 and -1 - tag <= q[hdr.CLIENTS] and -1 - tag < lay.clients and n == cs:
            j = -1 - tag
            c = lay.client_slot(j)
            q[c : c + cs] = q[e + 2 : e + 2 + cs]
            if j == q[hdr.CLIENTS]:  # a new client's entry
                q[hdr.CLIENTS] = j + 1
