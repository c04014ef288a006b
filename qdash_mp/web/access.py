"""The access middleware: proxy view, Host allowlist, fetch metadata, Origin, authentication,
authorization, audit; and the routes that go with it (login, logout, audit, health).

Order of the checks on every request (each refusal happens before any handler runs, so a
refused request changes nothing):

1. the client's view through a ``--trusted-proxy`` (``proxy.forwarded``): scheme, host,
   link prefix, client address;
2. ``Host`` not allowed -> 421 (DNS rebinding, ``hosts``);
3. ``Sec-Fetch-Site: cross-site`` on anything but a top-level GET navigation -> 403;
4. a mutating request whose ``Origin`` is not an allowed host of the same origin -> 403;
5. credentials (``auth``): wrong -> 401, too many wrong from one address -> 429; none when
   auth is configured -> 401 (API, POST) or a redirect to the login page (HTML);
6. ``--read-only`` and a mutating route -> 403; the identity's actions or the embedded
   ``authorize(request, action)`` refuse -> 403.

A mutating request that passes reaches its handler (which still checks CSRF, except for a
bearer-token request); whatever it answers, one ``AuditEntry`` is appended (fsync'd in the
collector) before the answer leaves.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL

from qdash_mp.audit import AuditEntry, AuditLog, MemoryAuditLog
from qdash_mp.errors import AuditError
from qdash_mp.web import csrf
from qdash_mp.web.auth import SESSION_COOKIE, Authenticator, BadCredentials
from qdash_mp.web.authz import (
    ALL_ACTIONS,
    CURRENT,
    MUTATIONS,
    Authorize,
    Identity,
    RequestAccess,
    action_for,
    permits,
)
from qdash_mp.web.guard import guarded_form, wants_json
from qdash_mp.web.hosts import HostAllowlist
from qdash_mp.web.paging import last_page, parse_page
from qdash_mp.web.proxy import LINK_PREFIX, TrustedProxies, forwarded

__all__ = ["ANONYMOUS", "AUDIT_PAGE_SIZE", "Access", "Handler", "Health"]

log = logging.getLogger("qdash_mp.web.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Health = Callable[[], Awaitable[dict[str, Any]]]

ANONYMOUS = Identity("anonymous", "none", ALL_ACTIONS)
AUDIT_PAGE_SIZE = 50
_SAFE = frozenset(("GET", "HEAD", "OPTIONS"))


async def _true(request: web.Request, action: str) -> bool:
    return True


@dataclass(eq=False)
class Access:
    """Everything the middleware checks against; one per app (``create_app`` builds it)."""

    auth: Authenticator
    hosts: HostAllowlist | None = None  # None: any Host (embedded, allowed_hosts=["*"])
    proxies: TrustedProxies = field(default_factory=TrustedProxies)
    read_only: bool = False
    authorize: Authorize | None = None
    audit: AuditLog = field(default_factory=MemoryAuditLog)
    metrics_public: bool = False
    health: Health | None = None

    # -- the middleware ----------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        state = RequestAccess()
        CURRENT.set(state)  # fresh for every request, also on a keep-alive connection
        peer = request.remote
        fwd = forwarded(request.headers, peer, request.scheme, request.host, self.proxies)
        LINK_PREFIX.set(fwd.prefix)
        if fwd.via_proxy:
            request = request.clone(
                scheme=fwd.scheme, host=fwd.host, remote=fwd.remote or peer or "?"
            )
        if self.hosts is not None and not self.hosts.allows(request.host):
            log.warning("refused Host %r from %s (add --allowed-host)", request.host, peer)
            return web.Response(
                status=421,
                text="421 Misdirected Request: this dashboard does not answer to that host name.\n",
            )
        self._check_fetch(request)
        action = action_for(request, metrics_public=self.metrics_public)
        identity = ANONYMOUS
        if self.auth.enabled and action is not None:
            found = await self._authenticate(request, peer, state)
            if found is None:
                raise self._unauthenticated(request)
            identity = found
        if action is not None:
            await self._authorize(request, identity, action)
        state.identity = identity
        if request.method in ("GET", "HEAD"):
            state.actions = await self._actions(request, identity)
        if action is None or action == "view":
            return await handler(request)
        return await self._audited(request, handler, state, action)

    def _check_fetch(self, request: web.Request) -> None:
        site = request.headers.get("Sec-Fetch-Site", "").lower()
        mode = request.headers.get("Sec-Fetch-Mode", "navigate").lower()
        if site == "cross-site" and not (request.method in ("GET", "HEAD") and mode == "navigate"):
            raise web.HTTPForbidden(text="cross-site request refused")
        if request.method in _SAFE:
            return
        origin = request.headers.get("Origin")
        if origin is not None and not (
            (self.hosts is None or self.hosts.allows_origin(origin))
            and csrf.same_origin(origin, request.scheme, request.host)
        ):
            raise web.HTTPForbidden(text="cross-origin request refused")

    async def _authenticate(
        self, request: web.Request, peer: str | None, state: RequestAccess
    ) -> Identity | None:
        auth = self.auth
        header = request.headers.get("Authorization")
        if header:
            key = request.remote or "?"
            now = time.monotonic()
            wait = auth.limiter.retry_after(key, now)
            if wait > 0:
                raise web.HTTPTooManyRequests(
                    text="too many failed attempts; try again later",
                    headers={"Retry-After": str(int(wait) + 1)},
                )
            scheme, _, value = header.strip().partition(" ")
            try:
                if scheme.lower() == "bearer" and auth.has_token:
                    identity = auth.check_token(value.strip())
                    state.csrf_exempt = True  # browsers never attach a bearer token themselves
                    return identity
                if scheme.lower() == "basic" and auth.has_users:
                    user, password = auth.parse_basic(value.strip())
                    return await asyncio.to_thread(auth.check_password, user, password)
                raise BadCredentials(f"unsupported Authorization scheme {scheme!r}")
            except BadCredentials as exc:
                auth.limiter.failure(key, now)
                log.warning("refused credentials from %s: %s", key, exc)
                raise self._unauthenticated(request, str(exc)) from None
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            session = auth.session(cookie)
            if session is not None:
                return session
        if auth.proxy_header and self.proxies.trusts(peer):
            user = request.headers.get(auth.proxy_header, "").strip()
            if user:
                return auth.proxy_identity(user)
        return None

    def _unauthenticated(self, request: web.Request, reason: str = "") -> web.HTTPException:
        api = "/queues/api/" in request.path or request.path.endswith("/metrics")
        if request.method in ("GET", "HEAD") and not api and not wants_json(request) and not reason:
            base = LINK_PREFIX.get() + str(request.app.router["qdash.login"].url_for())
            target = LINK_PREFIX.get() + request.path_qs
            return web.HTTPSeeOther(str(URL(base).with_query(next=target)))
        challenges = []
        if self.auth.has_token:
            challenges.append('Bearer realm="qdash"')
        if self.auth.has_users:
            challenges.append('Basic realm="qdash", charset="UTF-8"')
        headers = {"WWW-Authenticate": ", ".join(challenges)} if challenges else {}
        text = f"authentication required{': ' + reason if reason else ''}"
        return web.HTTPUnauthorized(text=text, headers=headers)

    async def _allowed(self, request: web.Request, action: str) -> bool:
        if self.authorize is None:
            return True
        verdict = self.authorize(request, action)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    async def _authorize(self, request: web.Request, identity: Identity, action: str) -> None:
        if action != "view" and self.read_only:
            raise web.HTTPForbidden(text="this dashboard is read-only")
        if not permits(identity.actions, action) or not await self._allowed(request, action):
            log.warning(
                "refused %s to %s (%s %s)", action, identity.user, request.method, request.path
            )
            raise web.HTTPForbidden(text=f"{identity.user} may not {action}")

    async def _actions(self, request: web.Request, identity: Identity) -> frozenset[str]:
        allowed = identity.actions - (MUTATIONS if self.read_only else frozenset())
        if self.authorize is None:
            return allowed
        return frozenset([a for a in allowed if await self._allowed(request, a)])

    async def _audited(
        self, request: web.Request, handler: Handler, state: RequestAccess, action: str
    ) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            if exc.text:
                state.audit.setdefault("message", exc.text)
            raise
        finally:
            await self._record(request, state, action, status)

    async def _record(
        self, request: web.Request, state: RequestAccess, action: str, status: int
    ) -> None:
        detail = state.audit
        identity = state.identity or ANONYMOUS
        status = int(detail.get("status", status))
        ok = status < 400
        id = request.match_info.get("id")
        ids = tuple(str(i) for i in detail.get("ids") or (() if id is None else (id,)))
        count = detail.get("flushed", detail.get("count"))
        if not isinstance(count, int):
            count = len(ids) if ok else 0
        message = str(detail.get("message") or ("ok" if ok else f"HTTP {status}"))
        entry = AuditEntry(
            t=time.time(),
            who=identity.user,
            remote=request.remote or "?",
            action=action if action in MUTATIONS else request.path,
            ids=ids,
            filter=detail.get("filter") if isinstance(detail.get("filter"), dict) else None,
            count=count if ok else 0,
            result=message,
            status=status,
        )
        try:
            await self.audit.append(entry)
        except (AuditError, OSError, ValueError) as exc:
            log.error("could not append to the audit log: %s (%r)", exc, entry)

    # -- routes ------------------------------------------------------------------------------

    def add_routes(self, app: web.Application, render: Render) -> None:
        """Login, logout, audit and health routes on the dashboard ``app``."""
        views = _Views(self, render)
        r = app.router
        r.add_get("/queues/login", views.login_page, name="qdash.login")
        r.add_post("/queues/login", views.login, name="qdash.login.post")
        r.add_post("/queues/logout", views.logout, name="qdash.logout")
        r.add_get("/queues/audit", views.audit_page, name="qdash.audit")
        r.add_get("/queues/api/audit", views.api_audit, name="qdash.api.audit")
        r.add_get("/queues/api/health", views.health, name="qdash.api.health")


Render = Callable[..., web.Response]
"""``Dashboard._render(request, template, status=..., **context)``."""


def _base(request: web.Request) -> str:
    return LINK_PREFIX.get() + str(request.app.router["qdash.overview"].url_for())


@dataclass(eq=False)
class _Views:
    access: Access
    render: Render

    def _next(self, request: web.Request, value: str | None) -> str:
        base = _base(request)
        if value and value.startswith(base) and "//" not in value and "\\" not in value:
            return value
        return base

    def _login_form(
        self, request: web.Request, *, status: int = 200, error: str | None = None
    ) -> web.Response:
        auth = self.access.auth
        return self.render(
            request,
            "login.html",
            status=status,
            error=error,
            next=self._next(request, request.query.get("next")),
            has_token=auth.has_token,
            has_users=auth.has_users,
            login_url=_base(request) + "login",
        )

    async def login_page(self, request: web.Request) -> web.Response:
        if not (self.access.auth.has_token or self.access.auth.has_users):
            raise web.HTTPSeeOther(_base(request))
        return self._login_form(request)

    async def login(self, request: web.Request) -> web.Response:
        auth = self.access.auth
        if not (auth.has_token or auth.has_users):
            raise web.HTTPSeeOther(_base(request))
        form = await guarded_form(request, _secret(request))
        key = request.remote or "?"
        now = time.monotonic()
        wait = auth.limiter.retry_after(key, now)
        if wait > 0:
            response = self._login_form(
                request, status=429, error="Too many failed attempts; wait a minute."
            )
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        try:
            if form.get("token") and auth.has_token:
                identity = auth.check_token(form["token"].strip())
            elif form.get("user") and auth.has_users:
                identity = await asyncio.to_thread(
                    auth.check_password, form["user"], form.get("password", "")
                )
            else:
                raise BadCredentials("no credentials given")
        except BadCredentials as exc:
            auth.limiter.failure(key, now)
            log.warning("failed login from %s: %s", key, exc)
            return self._login_form(request, status=401, error="Wrong credentials.")
        log.info("login: %s from %s", identity.user, key)
        response = web.Response(
            status=303, headers={"Location": self._next(request, form.get("next"))}
        )
        response.set_cookie(
            SESSION_COOKIE,
            auth.new_session(identity),
            path=_base(request),
            max_age=int(auth.session_ttl),
            httponly=True,
            samesite="Lax",
            secure=request.secure or None,
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        await guarded_form(request, _secret(request))
        response = web.Response(status=303, headers={"Location": _base(request) + "login"})
        response.del_cookie(SESSION_COOKIE, path=_base(request))
        return response

    def _audit_page(self, request: web.Request) -> tuple[int, list[AuditEntry], int]:
        try:
            page = parse_page(request.query.get("page"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        offset = (page - 1) * AUDIT_PAGE_SIZE
        return page, self.access.audit.page(offset, AUDIT_PAGE_SIZE), len(self.access.audit)

    async def audit_page(self, request: web.Request) -> web.Response:
        page, entries, total = self._audit_page(request)
        return self.render(
            request,
            "audit.html",
            active="audit",
            entries=entries,
            page=page,
            pages=last_page(total),
            total=total,
            audit_url=_base(request) + "audit",
        )

    async def api_audit(self, request: web.Request) -> web.Response:
        page, entries, total = self._audit_page(request)
        return web.json_response(
            {
                "page": page,
                "page_size": AUDIT_PAGE_SIZE,
                "total": total,
                "pages": last_page(total),
                "entries": [e.to_dict() for e in entries],
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {"ok": True}
        if self.access.health is not None:
            try:
                body.update(await self.access.health())
            except Exception as exc:
                log.exception("health check failed")
                return web.json_response({"ok": False, "error": str(exc)}, status=503)
        return web.json_response(body, status=200 if body.get("ok") else 503)


SECRET = web.AppKey("qdash_mp.secret", bytes)


def _secret(request: web.Request) -> bytes:
    return request.app[SECRET]
