"""``create_app(inspector)``: the dashboard as an aiohttp ``Application``, mountable anywhere.

The one factory used by the collector, the demo, embedding applications and the tests. The
app's state lives under ``AppKey``s (``DASHBOARD``, ``SAMPLER``); the sampler runs for the
app's lifetime through ``cleanup_ctx`` (started on startup, stopped on cleanup).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from qdash_mp.inspector import Inspector
from qdash_mp.sampler import Sampler
from qdash_mp.web import lifecycle_api
from qdash_mp.web.guard import MAX_BODY
from qdash_mp.web.views import Dashboard

__all__ = ["DASHBOARD", "SAMPLER", "STATIC_DIR", "create_app"]

DASHBOARD = web.AppKey("qdash_mp.dashboard", Dashboard)
"""Where ``create_app`` keeps its ``Dashboard`` (inspector, sampler, secret) in the app."""

SAMPLER = web.AppKey("qdash_mp.sampler", Sampler)
"""The app's ``Sampler`` (also ``app[DASHBOARD].sampler``)."""

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    """Sample throughput while the app runs."""
    sampler = app[SAMPLER]
    sampler.start()
    yield
    await sampler.stop()


def create_app(inspector: Inspector, *, sampler: Sampler | None = None) -> web.Application:
    """The dashboard for ``inspector``; mount it anywhere with ``add_subapp``.

    The app owns a ``Sampler`` over ``inspector`` (or the one given), started on startup and
    stopped on cleanup, and a fresh CSRF secret.
    """
    dashboard = Dashboard(inspector, sampler if sampler is not None else Sampler(inspector))
    app = web.Application(client_max_size=MAX_BODY, middlewares=[dashboard.errors])
    dashboard.app = app
    app[DASHBOARD] = dashboard
    app[SAMPLER] = dashboard.sampler
    app.cleanup_ctx.append(_sampling)
    app.on_response_prepare.append(dashboard.on_response_prepare)

    r = app.router
    r.add_get("/queues", dashboard.redirect_root, name="qdash.root")
    r.add_get("/queues/", dashboard.overview, name="qdash.overview")
    r.add_get("/queues/failed", dashboard.failed_list, name="qdash.failed")
    r.add_post("/queues/failed/flush", dashboard.flush, name="qdash.flush")
    r.add_get("/queues/failed/{id}", dashboard.job_page, name="qdash.job")
    r.add_post("/queues/failed/{id}/retry", dashboard.retry, name="qdash.retry")
    r.add_post("/queues/failed/{id}/forget", dashboard.forget, name="qdash.forget")
    r.add_get("/queues/api/stats", dashboard.api_stats, name="qdash.api.stats")
    r.add_get("/queues/api/failed", dashboard.api_failed, name="qdash.api.failed")
    r.add_get("/queues/api/failed/{id}", dashboard.api_job, name="qdash.api.job")
    lifecycle_api.add_routes(r, inspector)
    r.add_static("/queues/static", STATIC_DIR, name="qdash.static")
    return app
