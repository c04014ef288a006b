"""The hub's web app and server: the same ``create_app`` over a ``HubInspector``.

``hub_app(inspector, ...)`` is ``create_app`` plus two things of the hub's own:

* the ``?host=NAME`` filter: a middleware (innermost: after the access checks) that sets
  ``qdash_mp.hub.inspector.HOST`` for the request, so every page and JSON route reads one
  host; an unknown name is a 404;
* ``GET /queues/hosts``: a page of the hosts (last seen, stale, seq, queued commands, totals),
  linked from the nav; the nav and footer links carry ``?host=`` (``hub_host`` in the
  templates' globals), and so does every other in-page link and form of a host-scoped page
  (``qdash_mp.hub.host_links`` rewrites the rendered HTML: pager, job rows, queue links,
  the filter, flush and bulk forms, polled fragments).

``serve_hub(settings)`` runs it until SIGTERM/SIGINT (``qdash-mp hub``), with a
``redis.asyncio`` client closed on the way out. The hub holds no state of its own: a restart
reads everything back from Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from qdash_mp.access_settings import AccessSettings
from qdash_mp.hub.host_links import carry_host, with_host
from qdash_mp.hub.inspector import HOST, NO_WAIT, HubInspector
from qdash_mp.hub.merge import STALE_AFTER
from qdash_mp.web.app import DASHBOARD, create_app

__all__ = ["HubSettings", "hub_app", "serve_hub"]

_BULK_PATHS = frozenset(("/queues/failed/retry", "/queues/failed/forget"))

log = logging.getLogger("qdash_mp.hub.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def hub_app(
    inspector: HubInspector,
    *,
    access: AccessSettings | None = None,
    allowed_hosts: list[str] | None = None,
    read_only: bool = False,
) -> web.Application:
    """The dashboard over a Redis hub (see the module docstring)."""
    app = create_app(inspector, access=access, allowed_hosts=allowed_hosts, read_only=read_only)

    @web.middleware
    async def host_filter(request: web.Request, handler: Handler) -> web.StreamResponse:
        if "/failed" in request.path:
            # snapshot tokens are checked against the current run of the arrival sequence
            await inspector.refresh_epoch()
        # a bulk action's task, created in the handler, inherits this context: its retries
        # and forgets are queued to the hosts without waiting for each answer
        bulk = NO_WAIT.set(request.method == "POST" and request.path in _BULK_PATHS)
        try:
            name = request.query.get("host")
            if not name:
                return await handler(request)
            if name not in await inspector.hosts():
                raise web.HTTPNotFound(text=f"No host {name!r} has published to this hub.")
            token = HOST.set(name)
            try:
                resp = await handler(request)
            except web.HTTPRedirection as exc:
                _carry_location(app, exc, name)
                raise
            finally:
                HOST.reset(token)
            return _carry_host(app, resp, name)
        finally:
            NO_WAIT.reset(bulk)

    app.middlewares.append(host_filter)
    # base.html: the Hosts link, and the nav carrying ?host= (read in the request's context)
    app[DASHBOARD].env.globals["hub_host"] = HOST.get

    async def hosts_page(request: web.Request) -> web.Response:
        view = await inspector.stats()
        dashboard = app[DASHBOARD]
        return dashboard.render(
            request,
            "hub_hosts.html",
            active="hosts",
            hosts=sorted(view.hosts.items()),
            now=time.time(),
            failed_total=await inspector.failed_count(),
        )

    app.router.add_get("/queues/hosts", hosts_page, name="qdash.hosts")
    return app


def _carry_host(app: web.Application, resp: web.StreamResponse, host: str) -> web.StreamResponse:
    """An HTML page of a host-scoped request with ``host=`` in its in-page links and forms
    (``qdash_mp.hub.host_links``); anything else as it is."""
    if 300 <= resp.status < 400:
        _carry_location(app, resp, host)
        return resp
    if not isinstance(resp, web.Response) or resp.content_type != "text/html":
        return resp
    if not isinstance(resp.body, bytes) or resp.prepared:
        return resp
    urls = app[DASHBOARD].urls()
    charset = resp.charset or "utf-8"
    page = with_host(resp.body.decode(charset), host, urls.base, urls.static_base)
    resp.body = page.encode(charset)
    return resp


def _carry_location(app: web.Application, resp: web.StreamResponse, host: str) -> None:
    """A redirect of a host-scoped request back into the dashboard keeps ``host=``."""
    where = resp.headers.get("Location")
    if where:
        urls = app[DASHBOARD].urls()
        carried = carry_host(where, host, urls.base, urls.static_base)
        if carried is not None:
            resp.headers["Location"] = carried


@dataclass(frozen=True, slots=True)
class HubSettings:
    """What ``qdash-mp hub`` runs with."""

    redis_url: str
    http_host: str = "127.0.0.1"
    http_port: int = 8710
    prefix: str = "qdash:"
    stale_after: float = STALE_AFTER
    access: AccessSettings = field(default_factory=AccessSettings)
    ready: Callable[[str], None] | None = None


async def serve_hub(settings: HubSettings, stop: asyncio.Event | None = None) -> None:
    """Serve the hub dashboard until SIGTERM/SIGINT (or ``stop`` is set)."""
    import redis.asyncio as aioredis

    client: Any = aioredis.from_url(settings.redis_url)  # type: ignore[no-untyped-call]
    inspector = HubInspector(client, prefix=settings.prefix, stale_after=settings.stale_after)
    app = hub_app(
        inspector, access=settings.access, allowed_hosts=[settings.http_host], read_only=False
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        bound = runner.addresses  # the port actually bound (http_port 0 picks one)
        port = bound[0][1] if bound else settings.http_port
        host = settings.http_host
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/queues/"
        log.info("hub dashboard at %s over %s", url, _redacted(settings.redis_url))
        if settings.ready is not None:
            settings.ready(url)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await runner.cleanup()
        await client.aclose()


def _redacted(url: str) -> str:
    """``url`` without a password (logs are read by more people than the config)."""
    scheme, sep, rest = url.partition("://")
    creds, at, where = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':***' if user else '***'}@{where}"
