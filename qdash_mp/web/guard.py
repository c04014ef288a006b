"""What every dashboard request and response is held to: headers, body limits, CSRF on POST.

Bad HTTP input is always a 4xx: body over ``MAX_BODY`` 413, unparsable form 400, missing or
invalid CSRF token or a foreign ``Origin`` 403 (the rules are in ``qdash_mp.web.csrf``).
Every response carries a strict Content-Security-Policy: scripts and styles only from the
dashboard's own static files (``script-src 'self'``: no inline script, no ``eval``; no inline
style), the live updates (``EventSource``, htmx requests) only to the dashboard's origin.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from aiohttp import web

from qdash_mp.web import csrf
from qdash_mp.web.authz import current

__all__ = ["CSP", "MAX_BODY", "SECURITY_HEADERS", "guarded_form", "read_form", "wants_json"]

log = logging.getLogger("qdash_mp.web.guard")

MAX_BODY = 64 * 1024
"""Largest accepted request body, in bytes (413 beyond)."""

_MAX_FORM_FIELDS = 20
_CHUNK = 16 * 1024

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def wants_json(request: web.Request) -> bool:
    """Whether the client asked for ``application/json`` and not ``text/html``."""
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


async def read_form(request: web.Request) -> dict[str, str]:
    """A small urlencoded body as a dict (first value of each key); 413 if too big, 400 if junk.

    Other content types (a JSON client sending its token in the header) read as ``{}``.
    """
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY, request.content_length)
    body = bytearray()
    async for chunk in request.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(MAX_BODY, len(body))
    form: dict[str, str] = {}
    if request.content_type == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(
                body.decode("utf-8"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS
            )
        except ValueError:  # includes UnicodeDecodeError
            raise web.HTTPBadRequest(text="unreadable form body") from None
        for key, value in pairs:
            form.setdefault(key, value)
    return form


async def guarded_form(request: web.Request, secret: bytes) -> dict[str, str]:
    """``read_form`` of a mutating request that passed the CSRF checks (403 otherwise)."""
    form = await read_form(request)
    if current().csrf_exempt:  # authenticated by a bearer token (web.access)
        return form
    problem = csrf.check_request(request, secret, form)
    if problem is not None:
        log.warning("refused %s %s: %s", request.method, request.path, problem)
        raise web.HTTPForbidden(text=problem)
    return form
