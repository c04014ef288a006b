"""Authorization: which action a request is, and whether its identity may do it.

Pure apart from reading the route of an aiohttp request. Actions are ``view`` (every page and
GET route), ``retry``, ``forget`` and ``flush``. A mutating route is matched by name, else by
its last path segment; a POST that matches nothing needs *every* action, so a route added later
without a mapping is refused to limited users rather than let through.

Public routes (no identity needed): the login and logout pages, the stylesheet, the health
probe, and ``/metrics`` with ``--metrics-public``. Everything else needs ``view`` at least.

``RequestAccess`` (one per request, in the ``CURRENT`` context variable, set fresh by the access
middleware at the start of every request) is how the middleware talks to the views and the
guard: who the user is, which buttons to show, whether the request came with a bearer token
(browsers never send one by themselves, so it needs no CSRF token), and what a mutating handler
did (for the audit log). A context variable rather than ``request[...]``: the middleware hands
handlers a ``clone()`` of the request behind a proxy, and aiohttp wants typed request keys.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from qdash_mp.access_settings import ACTIONS

__all__ = [
    "ACTIONS",
    "ALL_ACTIONS",
    "CURRENT",
    "MUTATIONS",
    "PUBLIC_ROUTES",
    "Authorize",
    "Identity",
    "RequestAccess",
    "current",
    "action_for",
    "permits",
    "template_context",
]

ALL_ACTIONS = frozenset(ACTIONS)
MUTATIONS = frozenset(("retry", "forget", "flush"))

PUBLIC_ROUTES = frozenset(
    (
        "qdash.login",
        "qdash.login.post",
        "qdash.logout",
        "qdash.static",
        "qdash.favicon",
        "qdash.root",
        "qdash.api.health",
    )
)
_BY_NAME = {
    "qdash.retry": "retry",
    "qdash.forget": "forget",
    "qdash.flush": "flush",
    "qdash.bulk.retry": "retry",
    "qdash.bulk.forget": "forget",
}
_EVERYTHING = "*"

Authorize = Callable[[web.Request, str], bool | Awaitable[bool]]
"""Embedded hook: ``authorize(request, action) -> bool`` (may be async)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is: the user name, how it was established, what it may do."""

    user: str
    method: str  # "token", "basic", "session", "proxy", "none"
    actions: frozenset[str] = ALL_ACTIONS


@dataclass(slots=True)
class RequestAccess:
    """What the access middleware decided about the current request (see the docstring)."""

    identity: Identity | None = None
    actions: frozenset[str] = ALL_ACTIONS
    csrf_exempt: bool = False
    audit: dict[str, Any] = field(default_factory=dict)


CURRENT: ContextVar[RequestAccess | None] = ContextVar("qdash_mp.request_access", default=None)


def current() -> RequestAccess:
    """The current request's ``RequestAccess`` (a fresh default outside the middleware)."""
    state = CURRENT.get()
    return state if state is not None else RequestAccess()


def action_for(request: web.Request, *, metrics_public: bool = False) -> str | None:
    """The action ``request`` performs (``"*"``: needs all), or ``None`` for a public route."""
    route = request.match_info.route
    name = route.name
    if name in PUBLIC_ROUTES or (name == "qdash.metrics" and metrics_public):
        return None
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return "view"
    if name in _BY_NAME:
        return _BY_NAME[name]
    last = request.path.rstrip("/").rsplit("/", 1)[-1]
    return last if last in MUTATIONS else _EVERYTHING


def permits(actions: frozenset[str], action: str) -> bool:
    """Whether a set of allowed actions covers ``action`` (``"*"`` needs all of them)."""
    return actions >= ALL_ACTIONS if action == _EVERYTHING else action in actions


def template_context(request: web.Request) -> dict[str, Any]:
    """What every page needs to show buttons and the signed-in user (see ``base.html``)."""
    state = current()
    identity = state.identity
    who = identity.user if identity is not None and identity.method != "none" else None
    return {"actions": state.actions, "who": who}
