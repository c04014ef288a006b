"""The dashboard's pages, JSON API and actions: ``Dashboard`` holds the state and handlers.

One ``Dashboard`` per ``create_app`` call (``app[DASHBOARD]``): the inspector it reads, the
sampler that measures throughput, the CSRF/flash secret and the template environment.

A POST answers JSON (``{"ok": true, ...}`` or ``{"error": "..."}`` with the status) when the
client asks for ``application/json`` and not ``text/html``; browsers get a 303 back to the failed
page they were on, with a one-shot flash message. Statuses: unknown id 404, ``RetryError`` (no
requeue, retry in flight) 409, re-enqueue raised 502 — the record stays in both cases.

Throughput on the overview is in jobs/s, like ``QueueStat.throughput`` in ``/api/stats`` and
the CLI's ``stats``: the sampler's rate over its window once it has two readings, the
inspector's own ``throughput`` before that.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jinja2
from aiohttp import web

from qdash_mp.errors import NotFound, RetryError, RetryQueued
from qdash_mp.failed import describe_error
from qdash_mp.inspector import Inspector
from qdash_mp.models import FailedJob, JobView, QueueStat, StatsView
from qdash_mp.sampler import Sampler
from qdash_mp.web import csrf
from qdash_mp.web.authz import current, template_context
from qdash_mp.web.display import jsonable, template_env
from qdash_mp.web.flash import FLASH_COOKIE, Flash, decode_flash, set_flash
from qdash_mp.web.guard import SECURITY_HEADERS, guarded_form, wants_json
from qdash_mp.web.overview_rows import queue_rows
from qdash_mp.web.paging import last_page, parse_back_page, parse_page
from qdash_mp.web.proxy import LINK_PREFIX
from qdash_mp.web.urls import Urls

__all__ = ["REFRESH_SECONDS", "Dashboard", "FailedDetails"]

log = logging.getLogger("qdash_mp.web.views")

FAVICON = Path(__file__).resolve().parent.parent / "static" / "favicon.svg"

REFRESH_SECONDS = 5
"""Without JavaScript the overview reloads itself this often (with it, it updates live)."""

CHART_QUEUES = 20
"""The overview's throughput chart sums the history of at most this many (busiest) queues."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@runtime_checkable
class FailedDetails(Protocol):
    """Optional inspector extras: a count (page links) and one job's full record (detail)."""

    async def failed_count(self) -> int:
        """How many failed jobs are stored."""
        ...

    async def failed_job(self, id: str) -> FailedJob:
        """The full record of ``id``; ``NotFound`` if unknown."""
        ...


def _in_scope(request: web.Request, base: str, *, rotate: bool) -> bool:
    """Whether a reply may set the CSRF cookie (scoped to ``base``).

    Not outside ``base``: the browser never sends the cookie there (``/favicon.ico``), so the
    request looks tokenless, and a fresh cookie would replace the valid one the open pages'
    forms carry. Error pages (``rotate=False``) never replace a cookie the request carried.
    """
    path = LINK_PREFIX.get() + request.path
    if not (path + "/").startswith(base):
        return False
    return rotate or csrf.CSRF_COOKIE not in request.cookies


@dataclass(frozen=True, slots=True)
class _Row:
    """One overview line: the counters and the throughput in jobs/s."""

    stat: QueueStat
    per_second: float


@dataclass(eq=False)
class Dashboard:
    """The dashboard's state and handlers; one per ``create_app`` call (``app[DASHBOARD]``)."""

    inspector: Inspector
    sampler: Sampler
    secret: bytes = field(default_factory=csrf.new_secret, repr=False)
    env: jinja2.Environment = field(default_factory=template_env, repr=False)
    app: web.Application = field(init=False, repr=False)
    _stats_body: tuple[StatsView, bytes] | None = field(default=None, init=False, repr=False)

    @property
    def details(self) -> FailedDetails | None:
        insp = self.inspector
        return insp if isinstance(insp, FailedDetails) else None

    def urls(self) -> Urls:
        # The app's own router: after add_subapp its resources carry the mount prefix.
        router = self.app.router
        prefix = LINK_PREFIX.get()  # X-Forwarded-Prefix from a trusted proxy (web.proxy)
        base = prefix + str(router["qdash.overview"].url_for())
        static = prefix + str(router["qdash.static"].url_for(filename="x"))
        return Urls(base=base, static_base=static.rsplit("/", 1)[0])

    # -- every request -----------------------------------------------------------------------

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        if not request.path.startswith(self.urls().static_base + "/"):
            response.headers["Cache-Control"] = "no-store"

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error becomes a rendered (or JSON) 4xx/5xx page with the same headers."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else ""
            response = self._error(request, exc.status, reason or exc.reason)
            for name in ("Allow", "WWW-Authenticate", "Retry-After"):
                if name in exc.headers:
                    response.headers[name] = exc.headers[name]
            return response
        except Exception:
            log.exception("dashboard handler failed: %s %s", request.method, request.path)
            return self._error(request, 500, "Internal error; see the server log.")

    # -- rendering ---------------------------------------------------------------------------

    def render(
        self, request: web.Request, template: str, *, status: int = 200, **context: Any
    ) -> web.Response:
        """A page of the dashboard's look (``qdash_mp.web.access`` renders login/audit)."""
        return self._render(request, template, status=status, **context)

    def _render(
        self, request: web.Request, template: str, *, status: int = 200, **context: Any
    ) -> web.Response:
        urls = self.urls()
        token = csrf.issue_token(request, self.secret)
        flash: Flash | None = None
        raw_flash = request.cookies.get(FLASH_COOKIE)
        if raw_flash is not None:
            flash = decode_flash(self.secret, raw_flash, time.time())
        context.setdefault("failed_total", None)
        context.setdefault("active", None)
        context.update(template_context(request))  # buttons the user may press (web.authz)
        html = self.env.get_template(template).render(
            urls=urls, csrf_token=token, csrf_field=csrf.CSRF_FIELD, flash=flash, **context
        )
        response = web.Response(text=html, content_type="text/html", status=status)
        if _in_scope(request, urls.base, rotate=status < 400):
            csrf.set_token_cookie(response, token, urls.base, secure=request.secure)
        if raw_flash is not None:
            response.del_cookie(FLASH_COOKIE, path=urls.base)
        return response

    def _error(self, request: web.Request, status: int, message: str) -> web.Response:
        if wants_json(request) or "/queues/api/" in request.path:
            return web.json_response({"error": message}, status=status)
        try:
            return self._render(
                request, "error.html", status=status, status_code=status, message=message
            )
        except Exception:
            log.exception("rendering the %d page failed", status)
            return web.Response(text=f"{status}: {message}", status=status)

    def _done(
        self,
        request: web.Request,
        page: int,
        message: str,
        *,
        status: int = 200,
        data: Mapping[str, Any] | None = None,
        location: str | None = None,
    ) -> web.Response:
        """The answer to a POST: JSON, or a 303 back to the failed page (or ``location``)
        with a flash."""
        ok = status < 400
        current().audit.update(status=status, message=message, **(data or {}))  # web.access
        if wants_json(request):
            body = {"ok": True, **(data or {})} if ok else {"error": message}
            return web.json_response(body, status=status)
        urls = self.urls()
        where = location if location is not None else urls.failed(page)
        response = web.Response(status=303, headers={"Location": where})
        flash = Flash("ok" if ok else "error", message)
        set_flash(response, self.secret, flash, urls.base, time.time(), secure=request.secure)
        return response

    async def _failed_total(self) -> int | None:
        details = self.details
        return await details.failed_count() if details is not None else None

    @staticmethod
    def _page(request: web.Request) -> int:
        try:
            return parse_page(request.query.get("page"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None

    # -- pages -------------------------------------------------------------------------------

    async def favicon(self, request: web.Request) -> web.FileResponse:
        """``/favicon.ico``: browsers ask the root for it; answer with the SVG, not a 404."""
        return web.FileResponse(FAVICON, headers={"Content-Type": "image/svg+xml"})

    async def redirect_root(self, request: web.Request) -> web.Response:
        return web.Response(status=301, headers={"Location": self.urls().overview})

    async def overview(self, request: web.Request) -> web.Response:
        view = await self.inspector.stats()
        rows = [_Row(q, self._per_second(q)) for q in view.queues]
        busiest = sorted(view.queues, key=lambda q: -q.processed)[:CHART_QUEUES]
        shown = len(busiest)
        return self._render(
            request,
            "overview.html",
            active="overview",
            rows=rows,
            totals=_Row(view.totals, sum(r.per_second for r in rows)),
            refresh=REFRESH_SECONDS,
            window=round(self.sampler.window_seconds),
            failed_total=await self._failed_total(),
            queue_rows=queue_rows(rows, self.urls()),
            chart_queues=[q.queue for q in busiest],
            chart_title="All queues" if shown == len(rows) else f"The {shown} busiest queues",
            runtime_note="(p99 of the busiest queues, per period)",
        )

    def _per_second(self, stat: QueueStat) -> float:
        """Jobs/s: the sampler's window once it has two readings, else the inspector's own."""
        if len(self.sampler.window(stat.queue)) >= 2:
            return self.sampler.rate(stat.queue) / 60.0  # Sampler.rate is jobs/min
        return stat.throughput

    async def _failed_page(self, page: int) -> tuple[int, list[JobView], int | None, int | None]:
        """``(page shown, rows, total, last page)``; past the end shows the last page."""
        total = await self._failed_total()
        if total is None:
            return page, await self.inspector.failed(page), None, None
        last = last_page(total)
        shown = min(page, last)
        return shown, await self.inspector.failed(shown), total, last

    async def _job(self, request: web.Request) -> FailedJob:
        details = self.details
        id = request.match_info["id"]
        if details is None:
            raise web.HTTPNotFound(text="this inspector does not provide job details")
        try:
            return await details.failed_job(id)
        except NotFound:
            raise web.HTTPNotFound(text=f"No failed job with id {id!r}.") from None

    # -- JSON API ----------------------------------------------------------------------------

    async def api_stats(self, request: web.Request) -> web.Response:
        view = await self.inspector.stats()
        cached = self._stats_body
        if cached is None or cached[0] is not view:
            # An inspector that hands out the same view while nothing changed (the
            # collector's does) gets its JSON encoded once, however many viewers poll.
            encode = getattr(view, "to_json", None)  # a view may encode itself (the hub's)
            body = encode() if encode is not None else json.dumps(view.to_dict()).encode()
            cached = self._stats_body = (view, body)
        return web.Response(body=cached[1], content_type="application/json", charset="utf-8")

    async def api_job(self, request: web.Request) -> web.Response:
        job = await self._job(request)
        data = job.view().to_dict()
        data["payload"] = jsonable(job.job.payload)
        data["traceback"] = job.traceback
        data["enqueued_at"] = job.job.enqueued_at
        return web.json_response(data)

    # -- actions -----------------------------------------------------------------------------

    async def retry(self, request: web.Request) -> web.Response:
        form = await guarded_form(request, self.secret)
        id = request.match_info["id"]
        page = parse_back_page(form.get("page"))
        try:
            await self.inspector.retry(id)
        except NotFound:
            raise web.HTTPNotFound(text=f"No failed job with id {id!r}.") from None
        except RetryQueued as exc:  # a hub command waiting for its host (qdash_mp.hub)
            return self._queued(request, page, "retry", id, exc)
        except RetryError as exc:
            return self._done(request, page, f"Could not retry job {id}: {exc}", status=409)
        except Exception as exc:
            log.exception("re-enqueue of failed job %r raised", id)
            text, _ = describe_error(exc)
            return self._done(request, page, f"Re-enqueue of job {id} failed: {text}", status=502)
        return self._done(request, page, f"Retried job {id}.", data={"action": "retry", "id": id})

    async def forget(self, request: web.Request) -> web.Response:
        form = await guarded_form(request, self.secret)
        id = request.match_info["id"]
        try:
            await self.inspector.forget(id)
        except NotFound:
            raise web.HTTPNotFound(text=f"No failed job with id {id!r}.") from None
        except RetryQueued as exc:  # a hub command waiting for its host (qdash_mp.hub)
            return self._queued(request, parse_back_page(form.get("page")), "forget", id, exc)
        return self._done(
            request,
            parse_back_page(form.get("page")),
            f"Forgot job {id}.",
            data={"action": "forget", "id": id},
        )

    def _queued(
        self, request: web.Request, page: int, action: str, id: str, exc: RetryQueued
    ) -> web.Response:
        """202: the action waits in its host's command stream (``qdash_mp.hub``)."""
        data = {"action": action, "id": id, "queued": True, "host": exc.host}
        return self._done(request, page, f"Job {id}: {exc}", status=202, data=data)
