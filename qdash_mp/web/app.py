"""``create_app(inspector)``: the dashboard as an aiohttp ``Application``, mountable anywhere.

The one factory used by the collector, the demo, embedding applications and the tests. The
app's state lives under ``AppKey``s (``DASHBOARD``, ``SAMPLER``); the sampler runs for the
app's lifetime through ``cleanup_ctx`` (started on startup, stopped on cleanup).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from aiohttp import web

from qdash_mp.access_settings import AccessSettings
from qdash_mp.audit import AuditLog
from qdash_mp.inspector import Inspector
from qdash_mp.sampler import Sampler
from qdash_mp.web import lifecycle_api
from qdash_mp.web.access import SECRET, Access
from qdash_mp.web.access_build import build_access
from qdash_mp.web.authz import Authorize
from qdash_mp.web.events import add_events_route
from qdash_mp.web.failed_views import add_failed_routes
from qdash_mp.web.guard import MAX_BODY
from qdash_mp.web.openapi import add_openapi_route
from qdash_mp.web.pages import add_page_routes
from qdash_mp.web.views import Dashboard

__all__ = ["ACCESS", "DASHBOARD", "SAMPLER", "STATIC_DIR", "create_app"]

DASHBOARD = web.AppKey("qdash_mp.dashboard", Dashboard)
"""Where ``create_app`` keeps its ``Dashboard`` (inspector, sampler, secret) in the app."""

SAMPLER = web.AppKey("qdash_mp.sampler", Sampler)
"""The app's ``Sampler`` (also ``app[DASHBOARD].sampler``)."""

ACCESS = web.AppKey("qdash_mp.access", Access)
"""The app's access checks (``qdash_mp.web.access``): auth, Host allowlist, audit log."""

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    """Sample throughput while the app runs."""
    sampler = app[SAMPLER]
    sampler.start()
    yield
    await sampler.stop()


def create_app(
    inspector: Inspector,
    *,
    read_only: bool = False,
    authorize: Authorize | None = None,
    allowed_hosts: Iterable[str] | None = None,
    sampler: Sampler | None = None,
    access: AccessSettings | None = None,
    audit: AuditLog | None = None,
) -> web.Application:
    """The dashboard for ``inspector``; mount it anywhere with ``add_subapp``.

    The app owns a ``Sampler`` over ``inspector`` (or the one given), started on startup and
    stopped on cleanup, and a fresh CSRF secret. Access control (``docs/exposing.md``):
    ``read_only`` refuses every mutation (403) and hides the buttons; ``authorize(request,
    action) -> bool`` (may be async; action in ``view, retry, forget, flush``) decides per
    request; ``allowed_hosts`` adds names to the Host allowlist (``localhost``, ``127.0.0.1``,
    ``[::1]``; ``"*"`` turns the check off); ``access`` carries the collector's settings (token,
    users, proxies); ``audit`` is where actions are logged (default: in memory).
    """
    dashboard = Dashboard(inspector, sampler if sampler is not None else Sampler(inspector))
    checks = build_access(
        access,
        dashboard.secret,
        read_only=read_only,
        authorize=authorize,
        allowed_hosts=allowed_hosts,
        audit=audit,
    )
    app = web.Application(
        client_max_size=MAX_BODY, middlewares=[dashboard.errors, checks.middleware]
    )
    dashboard.app = app
    app[DASHBOARD] = dashboard
    app[SAMPLER] = dashboard.sampler
    app[ACCESS] = checks
    app[SECRET] = dashboard.secret
    app.cleanup_ctx.append(_sampling)
    app.on_response_prepare.append(dashboard.on_response_prepare)

    r = app.router
    r.add_get("/favicon.ico", dashboard.favicon, name="qdash.favicon")
    r.add_get("/queues", dashboard.redirect_root, name="qdash.root")
    r.add_get("/queues/", dashboard.overview, name="qdash.overview")
    add_page_routes(r, dashboard)
    failed_views = add_failed_routes(r, dashboard)  # list, flush, bulk, job page, api/failed
    app.on_cleanup.append(lambda _app: failed_views.bulk.close())
    r.add_post("/queues/failed/{id}/retry", dashboard.retry, name="qdash.retry")
    r.add_post("/queues/failed/{id}/forget", dashboard.forget, name="qdash.forget")
    r.add_get("/queues/api/stats", dashboard.api_stats, name="qdash.api.stats")
    r.add_get("/queues/api/failed/{id}", dashboard.api_job, name="qdash.api.job")
    lifecycle_api.add_routes(r, inspector)
    add_events_route(app, inspector)
    r.add_static("/queues/static", STATIC_DIR, name="qdash.static")
    checks.add_routes(app, dashboard.render)
    add_openapi_route(app)
    return app
