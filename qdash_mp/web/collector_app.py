"""The collector's web app: the dashboard with the collector's access settings, its audit log
file, the health probe and ``/metrics`` at the root.

Kept out of ``qdash_mp.collector`` so the daemon's only line about it is
``app = collector_app(self)``; what it reads from the collector is ``settings``,
``inspector``, ``journal`` and (for metrics) ``connections.conns``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from qdash_mp.access_settings import AccessSettings
from qdash_mp.audit import AUDIT_FILE, DEFAULT_MAX_ENTRIES, FileAuditLog
from qdash_mp.errors import QdashError
from qdash_mp.metrics import Health, metrics_handler
from qdash_mp.web.app import ACCESS, create_app

__all__ = ["collector_app"]


def collector_app(collector: Any) -> web.Application:
    """The dashboard app of a started-up ``Collector`` (its journal is open)."""
    s = collector.settings
    access: AccessSettings = getattr(s, "access", None) or AccessSettings()
    audit = FileAuditLog(
        s.data_dir / AUDIT_FILE,
        max_entries=min(s.max_failed_jobs, DEFAULT_MAX_ENTRIES),
        max_age=s.max_failed_age,
    )
    app = create_app(collector.inspector, access=access, allowed_hosts=[s.http_host], audit=audit)

    def health() -> Health:
        try:
            journal = collector.journal
        except QdashError:
            return Health(up=False)
        conns = getattr(getattr(collector, "connections", None), "conns", None)
        return Health(
            connected_clients=len(conns) if conns is not None else None,
            failed_jobs_stored=len(journal),
            journal_bytes=journal.total_bytes,
            audit_entries=len(audit),
        )

    async def probe() -> dict[str, Any]:
        # The journal is sound while the collector holds it open: recovery refused corruption
        # at start (unless --salvage), and a failed write stops the daemon.
        h = health()
        return {"ok": h.up, "failed_jobs": h.failed_jobs_stored, "journal_bytes": h.journal_bytes}

    app[ACCESS].health = probe
    app.router.add_get(
        "/metrics", metrics_handler(collector.inspector.stats, health), name="qdash.metrics"
    )

    async def close_audit(app: web.Application) -> None:
        audit.close()

    app.on_cleanup.append(close_audit)
    return app
