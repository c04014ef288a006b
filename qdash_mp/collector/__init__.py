"""The collector daemon: one asyncio process that workers' ``Client`` hooks report to.

It listens on a Unix socket (owner-only by default, peers checked with ``SO_PEERCRED``),
speaks ``qdash_mp.wire``, applies counter deltas to the shared-memory ``SharedStats``
(exactly once per ``(client id, seq)``), journals failed jobs durably before acknowledging
them, routes dashboard retries back to a worker that registered a ``requeue`` callback, and
serves the dashboard over HTTP on the same loop.

Modules: ``daemon`` (life cycle, signals, lock, state file), ``connections`` (socket,
handshake, batches, ACKs, resource bounds), ``retry`` (requeue routing, retry/forget/flush),
``inspector`` (the dashboard's view), ``lifecycle`` (the once-a-second tick: rolling windows,
history) over the pure ``workers``, ``tracking`` and ``windows``. The narrative is in
docs/collector.md.
"""

from __future__ import annotations

from qdash_mp.collector.conn import PeerCred, peer_credentials
from qdash_mp.collector.daemon import Collector, run, serve
from qdash_mp.collector.inspector import CollectorInspector
from qdash_mp.collector.retry import RequeueFn, load_requeue

__all__ = [
    "Collector",
    "CollectorInspector",
    "PeerCred",
    "RequeueFn",
    "load_requeue",
    "peer_credentials",
    "run",
    "serve",
]
