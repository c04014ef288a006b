"""The dashboard web app: ``create_app(inspector)`` → an aiohttp ``Application``.

Routes, relative to wherever the app is mounted (``root.add_subapp("/ops", create_app(...))``)::

    GET  /queues/                    overview: per-queue counters, totals, jobs/min
    GET  /queues/failed?page=N       failed jobs, newest first, PAGE_SIZE a page
    GET  /queues/failed/{id}         one failed job (payload, error, traceback) *
    POST /queues/failed/{id}/retry   re-enqueue and drop            (CSRF-guarded)
    POST /queues/failed/{id}/forget  drop                           (CSRF-guarded)
    POST /queues/failed/flush        drop all                       (CSRF-guarded)
    GET  /queues/api/stats           {"queues": [QueueStat...], "totals": QueueStat}
    GET  /queues/api/failed?page=N   {"page", "page_size", "total", "pages", "jobs": [JobView...]}
    GET  /queues/api/failed/{id}     JobView fields + payload, traceback, enqueued_at *
    GET  /queues/static/...          the stylesheet

    * only when the inspector implements ``FailedDetails``; otherwise 404 with a reason.

``{id}`` is one path segment: job ids are percent-quoted with no safe characters (``/`` is
``%2F``). The ids ``""``, ``"."`` and ``".."`` cannot be path segments (clients resolve dot
segments, even quoted ones); such rows are listed without links or buttons.

Failed-list JSON: ``{"page": N, "page_size": 50, "total": T, "pages": P, "jobs": [...]}``;
``total``/``pages`` are ``null`` when the inspector cannot count (no ``FailedDetails``). A page
past the end is an empty ``jobs`` list there, and the last page (with a notice) in the HTML.

A POST answers JSON (``{"ok": true, ...}`` or ``{"error": "..."}`` with the status) when the
client asks for ``application/json`` and not ``text/html``; browsers get a 303 back to the failed
page they were on, with a one-shot flash message in a signed cookie that lives a minute.
Statuses: unknown id 404, ``RetryError`` (no requeue, retry in flight) 409, re-enqueue raised
502 — the record stays in both cases. Bad HTTP input is always a 4xx: bad ``page`` 400,
missing/invalid CSRF token or foreign ``Origin`` 403, wrong method 405, body over 64 KiB 413,
unparsable form 400.

Job data is hostile: templates autoescape everything, and every response carries a strict
Content-Security-Policy (no scripts at all; the overview refreshes with ``<meta refresh>``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import pprint
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, quote

import jinja2
from aiohttp import web

from qdash_mp import csrf
from qdash_mp.errors import NotFound, RetryError
from qdash_mp.failed import describe_error
from qdash_mp.inspector import Inspector
from qdash_mp.models import PAGE_SIZE, FailedJob, JobView, QueueStat, StatsView
from qdash_mp.sampler import Sampler

__all__ = [
    "CSP",
    "DASHBOARD",
    "FLASH_COOKIE",
    "MAX_BODY",
    "MAX_PAGE",
    "Dashboard",
    "addressable",
    "FailedDetails",
    "create_app",
    "page_numbers",
    "parse_page",
    "quote_id",
]

log = logging.getLogger("qdash_mp.web")

MAX_BODY = 64 * 1024
"""Largest accepted request body, in bytes (413 beyond)."""

MAX_PAGE = sys.maxsize // PAGE_SIZE
"""Page numbers above this are treated as this one (always past the end of any real list)."""

REFRESH_SECONDS = 5
"""The overview reloads itself this often."""

FLASH_COOKIE = "qdash_flash"
FLASH_TTL = 60  # seconds a flash message stays readable
_FLASH_PURPOSE = "qdash-flash"
_FLASH_MAX_TEXT = 300
_LIST_ERROR_CHARS = 200
_PAYLOAD_MAX_CHARS = 64 * 1024
_MAX_FORM_FIELDS = 20
_PAGE_DIGITS = 30

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

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


# -- pure helpers ----------------------------------------------------------------------------


def parse_page(text: str | None) -> int:
    """A ``?page=`` value as a page number: missing means 1; huge values cap at ``MAX_PAGE``.

    Only plain ASCII digits are accepted; ``ValueError`` for anything else or for < 1.
    """
    if text is None:
        return 1
    if not text or not text.isascii() or not text.isdigit():
        raise ValueError("page must be a whole number ≥ 1")
    if len(text.lstrip("0")) > _PAGE_DIGITS:
        return MAX_PAGE
    page = int(text)
    if page < 1:
        raise ValueError("page must be a whole number ≥ 1")
    return min(page, MAX_PAGE)


def page_numbers(current: int, last: int, spread: int = 2) -> list[int | None]:
    """Page links to show: first, last and ``current ± spread``; ``None`` marks a gap."""
    wanted = {1, last, *range(current - spread, current + spread + 1)}
    pages = sorted(p for p in wanted if 1 <= p <= last)
    out: list[int | None] = []
    for p in pages:
        if out and p - (out[-1] or 0) > 1:
            out.append(None)
        out.append(p)
    return out


def quote_id(id: str) -> str:
    """A job id as one URL path segment: percent-quoted, ``/`` included."""
    return quote(id, safe="")


def addressable(id: str) -> bool:
    """Whether ``id`` survives as a URL path segment.

    ``""``, ``"."`` and ``".."`` do not: clients resolve dot segments (even ``%2E``-quoted
    ones) before sending. Such jobs are listed without links; flush still drops them.
    """
    return id not in ("", ".", "..")


def _pretty(payload: Any) -> str:
    """Payload as indented JSON (falling back to ``pprint``), cut at a readable size."""
    try:
        text = json.dumps(payload, indent=2, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = pprint.pformat(payload, width=100)
    if len(text) > _PAYLOAD_MAX_CHARS:
        text = text[:_PAYLOAD_MAX_CHARS] + f"\n… ({len(text) - _PAYLOAD_MAX_CHARS} more chars)"
    return text


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold (bytes, odd keys) turned into text."""
    try:
        return json.loads(json.dumps(value, default=repr))
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _encode_flash(secret: bytes, level: str, text: str, now: float) -> str:
    if len(text) > _FLASH_MAX_TEXT:
        text = text[: _FLASH_MAX_TEXT - 1] + "…"
    body = json.dumps([level, text, int(now) + FLASH_TTL], ensure_ascii=True)
    return csrf.sign(secret, _FLASH_PURPOSE, _b64(body.encode("ascii")))


def _decode_flash(secret: bytes, value: str, now: float) -> Flash | None:
    data = csrf.unsign(secret, _FLASH_PURPOSE, value)
    if data is None:
        return None
    try:
        level, text, expires = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    except (binascii.Error, ValueError, TypeError):
        return None
    if level not in ("ok", "error") or not isinstance(text, str) or not isinstance(expires, int):
        return None
    return Flash(level, text) if now <= expires else None


def _wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _epoch(value: float) -> str:
    try:
        return _when(datetime.fromtimestamp(value, UTC))
    except (OverflowError, OSError, ValueError):
        return str(value)


def _clip(text: str, limit: int = _LIST_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Flash:
    """A one-shot message shown on the next page: ``level`` is ``ok`` or ``error``."""

    level: str
    text: str


@dataclass(frozen=True, slots=True)
class Urls:
    """Every dashboard URL, built from the mount point (``base`` ends with ``/queues/``)."""

    base: str
    static_base: str

    @property
    def overview(self) -> str:
        return self.base

    def failed(self, page: int = 1) -> str:
        return f"{self.base}failed" + (f"?page={page}" if page > 1 else "")

    def job(self, id: str, page: int = 1) -> str:
        return f"{self.base}failed/{quote_id(id)}" + (f"?page={page}" if page > 1 else "")

    def retry(self, id: str) -> str:
        return f"{self.base}failed/{quote_id(id)}/retry"

    def forget(self, id: str) -> str:
        return f"{self.base}failed/{quote_id(id)}/forget"

    @property
    def flush(self) -> str:
        return f"{self.base}failed/flush"

    @property
    def api_stats(self) -> str:
        return f"{self.base}api/stats"

    @property
    def api_failed(self) -> str:
        return f"{self.base}api/failed"

    def static(self, name: str) -> str:
        return f"{self.static_base}/{quote(name)}"


@dataclass(frozen=True, slots=True)
class _Row:
    """One overview line."""

    stat: QueueStat
    per_minute: float


# -- the app ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Dashboard:
    """The dashboard's state and handlers; one per ``create_app`` call (``app[DASHBOARD]``)."""

    inspector: Inspector
    sampler: Sampler
    secret: bytes = field(default_factory=csrf.new_secret, repr=False)
    env: jinja2.Environment = field(init=False, repr=False)
    app: web.Application = field(init=False, repr=False)
    _stats_body: tuple[StatsView, bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("qdash_mp", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["num"] = lambda n: f"{n:,}"
        self.env.filters["rate"] = lambda r: f"{r:,.1f}"
        self.env.filters["when"] = _when
        self.env.filters["epoch"] = _epoch
        self.env.filters["clip"] = _clip
        self.env.tests["addressable"] = addressable

    @property
    def details(self) -> FailedDetails | None:
        insp = self.inspector
        return insp if isinstance(insp, FailedDetails) else None

    def urls(self) -> Urls:
        # The app's own router: after add_subapp its resources carry the mount prefix.
        router = self.app.router
        base = str(router["qdash.overview"].url_for())
        static = str(router["qdash.static"].url_for(filename="x"))
        return Urls(base=base, static_base=static.rsplit("/", 1)[0])

    # -- lifecycle ---------------------------------------------------------------------------

    async def on_startup(self, app: web.Application) -> None:
        self.sampler.start()

    async def on_cleanup(self, app: web.Application) -> None:
        await self.sampler.stop()

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in _SECURITY_HEADERS.items():
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
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except Exception:
            log.exception("dashboard handler failed: %s %s", request.method, request.path)
            return self._error(request, 500, "Internal error; see the server log.")

    # -- rendering ---------------------------------------------------------------------------

    def _render(
        self,
        request: web.Request,
        template: str,
        *,
        status: int = 200,
        **context: Any,
    ) -> web.Response:
        urls = self.urls()
        token = csrf.issue_token(request, self.secret)
        flash: Flash | None = None
        raw_flash = request.cookies.get(FLASH_COOKIE)
        if raw_flash is not None:
            flash = _decode_flash(self.secret, raw_flash, time.time())
        context.setdefault("failed_total", None)
        context.setdefault("active", None)
        html = self.env.get_template(template).render(
            urls=urls,
            csrf_token=token,
            csrf_field=csrf.CSRF_FIELD,
            flash=flash,
            **context,
        )
        response = web.Response(text=html, content_type="text/html", status=status)
        csrf.set_token_cookie(response, token, urls.base, secure=request.secure)
        if raw_flash is not None:
            response.del_cookie(FLASH_COOKIE, path=urls.base)
        return response

    def _error(self, request: web.Request, status: int, message: str) -> web.Response:
        if _wants_json(request) or "/queues/api/" in request.path:
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
    ) -> web.Response:
        """The answer to a POST: JSON, or a 303 back to the failed page with a flash."""
        ok = status < 400
        if _wants_json(request):
            body = {"ok": True, **(data or {})} if ok else {"error": message}
            return web.json_response(body, status=status)
        urls = self.urls()
        response = web.Response(status=303, headers={"Location": urls.failed(page)})
        flash = _encode_flash(self.secret, "ok" if ok else "error", message, time.time())
        response.set_cookie(
            FLASH_COOKIE,
            flash,
            path=urls.base,
            max_age=FLASH_TTL,
            httponly=True,
            samesite="Strict",
            secure=request.secure or None,
        )
        return response

    async def _failed_total(self) -> int | None:
        details = self.details
        return await details.failed_count() if details is not None else None

    # -- input -------------------------------------------------------------------------------

    @staticmethod
    def _page(request: web.Request) -> int:
        try:
            return parse_page(request.query.get("page"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None

    async def _guarded_form(self, request: web.Request) -> dict[str, str]:
        """Read a small form body (413/400) and pass the CSRF checks (403)."""
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(MAX_BODY, request.content_length)
        body = bytearray()
        async for chunk in request.content.iter_chunked(16 * 1024):
            body += chunk
            if len(body) > MAX_BODY:
                raise web.HTTPRequestEntityTooLarge(MAX_BODY, len(body))
        form: dict[str, str] = {}
        if request.content_type == "application/x-www-form-urlencoded":
            try:
                pairs = parse_qsl(
                    body.decode("utf-8"),
                    keep_blank_values=True,
                    max_num_fields=_MAX_FORM_FIELDS,
                )
            except ValueError:  # includes UnicodeDecodeError
                raise web.HTTPBadRequest(text="unreadable form body") from None
            for key, value in pairs:
                form.setdefault(key, value)
        problem = csrf.check_request(request, self.secret, form)
        if problem is not None:
            log.warning("refused %s %s: %s", request.method, request.path, problem)
            raise web.HTTPForbidden(text=problem)
        return form

    @staticmethod
    def _back_page(form: Mapping[str, str]) -> int:
        try:
            return parse_page(form.get("page"))
        except ValueError:
            return 1

    # -- pages -------------------------------------------------------------------------------

    async def redirect_root(self, request: web.Request) -> web.Response:
        return web.Response(status=301, headers={"Location": self.urls().overview})

    async def overview(self, request: web.Request) -> web.Response:
        view = await self.inspector.stats()
        rows = [_Row(q, self._per_minute(q)) for q in view.queues]
        return self._render(
            request,
            "overview.html",
            active="overview",
            rows=rows,
            totals=_Row(view.totals, sum(r.per_minute for r in rows)),
            refresh=REFRESH_SECONDS,
            failed_total=await self._failed_total(),
        )

    def _per_minute(self, stat: QueueStat) -> float:
        if len(self.sampler.window(stat.queue)) >= 2:
            return self.sampler.rate(stat.queue)
        return stat.throughput * 60.0

    async def _failed_page(self, page: int) -> tuple[int, list[JobView], int | None, int | None]:
        """``(page shown, rows, total, last page)``; past the end shows the last page."""
        total = await self._failed_total()
        if total is None:
            return page, await self.inspector.failed(page), None, None
        last = max(1, math.ceil(total / PAGE_SIZE))
        shown = min(page, last)
        return shown, await self.inspector.failed(shown), total, last

    async def failed_list(self, request: web.Request) -> web.Response:
        requested = self._page(request)
        page, jobs, total, last = await self._failed_page(requested)
        notice = None
        if page != requested:
            notice = f"There is no page {requested}; showing the last page, {page}."
        elif not jobs and page > 1:
            notice = f"Page {page} is empty; the list is shorter than that."
        if last is not None:
            numbers = page_numbers(page, last)
            has_next = page < last
        else:
            numbers = page_numbers(page, page) if jobs else []
            has_next = len(jobs) >= PAGE_SIZE
        return self._render(
            request,
            "failed.html",
            active="failed",
            jobs=jobs,
            page=page,
            numbers=numbers,
            has_prev=page > 1,
            has_next=has_next,
            notice=notice,
            failed_total=total,
            details=self.details is not None,
        )

    async def _job(self, request: web.Request) -> FailedJob:
        details = self.details
        id = request.match_info["id"]
        if details is None:
            raise web.HTTPNotFound(text="this inspector does not provide job details")
        try:
            return await details.failed_job(id)
        except NotFound:
            raise web.HTTPNotFound(text=f"No failed job with id {id!r}.") from None

    async def job_page(self, request: web.Request) -> web.Response:
        try:
            back = parse_page(request.query.get("page"))
        except ValueError:
            back = 1
        job = await self._job(request)
        return self._render(
            request,
            "job.html",
            active="failed",
            job=job,
            payload=_pretty(job.job.payload),
            page=back,
            failed_total=await self._failed_total(),
        )

    # -- JSON API ----------------------------------------------------------------------------

    async def api_stats(self, request: web.Request) -> web.Response:
        view = await self.inspector.stats()
        cached = self._stats_body
        if cached is None or cached[0] is not view:
            # An inspector that hands out the same view while nothing changed (the
            # collector's does) gets its JSON encoded once, however many viewers poll.
            cached = self._stats_body = (view, json.dumps(view.to_dict()).encode())
        return web.Response(body=cached[1], content_type="application/json", charset="utf-8")

    async def api_failed(self, request: web.Request) -> web.Response:
        page = self._page(request)
        total = await self._failed_total()
        last = max(1, math.ceil(total / PAGE_SIZE)) if total is not None else None
        beyond = last is not None and page > last
        jobs = [] if beyond else await self.inspector.failed(page)
        return web.json_response(
            {
                "page": page,
                "page_size": PAGE_SIZE,
                "total": total,
                "pages": last,
                "jobs": [j.to_dict() for j in jobs],
            }
        )

    async def api_job(self, request: web.Request) -> web.Response:
        job = await self._job(request)
        data = job.view().to_dict()
        data["payload"] = _jsonable(job.job.payload)
        data["traceback"] = job.traceback
        data["enqueued_at"] = job.job.enqueued_at
        return web.json_response(data)

    # -- actions -----------------------------------------------------------------------------

    async def retry(self, request: web.Request) -> web.Response:
        form = await self._guarded_form(request)
        id = request.match_info["id"]
        page = self._back_page(form)
        try:
            await self.inspector.retry(id)
        except NotFound:
            raise web.HTTPNotFound(text=f"No failed job with id {id!r}.") from None
        except RetryError as exc:
            return self._done(request, page, f"Could not retry job {id}: {exc}", status=409)
        except Exception as exc:
            log.exception("re-enqueue of failed job %r raised", id)
            text, _ = describe_error(exc)
            return self._done(request, page, f"Re-enqueue of job {id} failed: {text}", status=502)
        return self._done(request, page, f"Retried job {id}.", data={"action": "retry", "id": id})

    async def forget(self, request: web.Request) -> web.Response:
        form = await self._guarded_form(request)
        id = request.match_info["id"]
        try:
            await self.inspector.forget(id)
        except NotFound:
            raise web.HTTPNotFound(text=f"No failed job with id {id!r}.") from None
        return self._done(
            request,
            self._back_page(form),
            f"Forgot job {id}.",
            data={"action": "forget", "id": id},
        )

    async def flush(self, request: web.Request) -> web.Response:
        await self._guarded_form(request)
        n = await self.inspector.flush_failed()
        plural = "" if n == 1 else "s"
        return self._done(
            request, 1, f"Flushed {n} failed job{plural}.", data={"action": "flush", "flushed": n}
        )


DASHBOARD = web.AppKey("qdash_mp.dashboard", Dashboard)
"""Where ``create_app`` keeps its ``Dashboard`` (inspector, sampler, secret) in the app."""


def create_app(inspector: Inspector, *, sampler: Sampler | None = None) -> web.Application:
    """The dashboard for ``inspector``; mount it anywhere with ``add_subapp``.

    The app owns a ``Sampler`` over ``inspector`` (or the one given), started on startup and
    stopped on cleanup, and a fresh CSRF secret.
    """
    dashboard = Dashboard(inspector, sampler if sampler is not None else Sampler(inspector))
    app = web.Application(client_max_size=MAX_BODY, middlewares=[dashboard.errors])
    dashboard.app = app
    app[DASHBOARD] = dashboard
    app.on_startup.append(dashboard.on_startup)
    app.on_cleanup.append(dashboard.on_cleanup)
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
    r.add_static("/queues/static", Path(__file__).parent / "static", name="qdash.static")
    return app
