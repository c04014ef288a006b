"""The dashboard web app: ``create_app(inspector)`` → an aiohttp ``Application``.

Routes, relative to wherever the app is mounted (``root.add_subapp("/ops", create_app(...))``)::

    GET  /queues/                    overview: per-queue counters, totals, jobs/s
    GET  /queues/failed?page=N       failed jobs, newest first, PAGE_SIZE a page
    GET  /queues/failed/{id}         one failed job (payload, error, traceback) *
    POST /queues/failed/{id}/retry   re-enqueue and drop            (CSRF-guarded)
    POST /queues/failed/{id}/forget  drop                           (CSRF-guarded)
    POST /queues/failed/flush        drop all                       (CSRF-guarded)
    GET  /queues/api/stats           {"queues": [QueueStat...], "totals": QueueStat}
    GET  /queues/api/failed?page=N   {"page", "page_size", "total", "pages", "jobs": [JobView...]}
    GET  /queues/api/failed/{id}     JobView fields + payload, traceback, enqueued_at *
    GET  /queues/static/...          the stylesheet
    GET  /queues/login, POST /queues/login, POST /queues/logout   sign in / out (when auth is on)
    GET  /queues/audit, /queues/api/audit?page=N                  operator actions, newest first
    GET  /queues/api/health          public liveness probe {"ok": true, ...}
    GET  /queues/api/openapi.json    OpenAPI 3.1 of the JSON routes
    GET  /metrics                    Prometheus (added at the collector root, ``collector_app``)

    * only when the inspector implements ``FailedDetails``; otherwise 404 with a reason.

Failed-list JSON: ``{"page": N, "page_size": 50, "total": T, "pages": P, "jobs": [...]}``;
``total``/``pages`` are ``null`` when the inspector cannot count (no ``FailedDetails``). A page
past the end is an empty ``jobs`` list there, and the last page (with a notice) in the HTML.
Bad HTTP input is always a 4xx: bad ``page`` 400, CSRF 403, wrong method 405, body over
64 KiB 413, unparsable form 400.

Every request first goes through the access middleware (``access``: proxy view, Host
allowlist 421, fetch metadata and Origin 403, authentication 401/429, authorization 403,
audit); see ``docs/exposing.md``.

Modules: ``app`` (the factory, app keys, sampler lifetime), ``views`` (handlers), ``guard``
(headers, body limits, CSRF on POST), ``csrf`` (the token scheme), ``flash`` (one-shot
messages), ``urls``/``paging``/``display`` (pure helpers); access control: ``access`` (the
middleware and its routes), ``access_build``, ``hosts``, ``proxy``, ``auth``, ``passwords``,
``authz``, ``openapi``, ``collector_app`` (the collector's app: audit file, /metrics).
The narrative is in ``docs/web.md`` and ``docs/exposing.md``.
"""

from qdash_mp.web.app import ACCESS, DASHBOARD, SAMPLER, create_app
from qdash_mp.web.authz import Identity
from qdash_mp.web.csrf import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    check_request,
    issue_token,
    new_secret,
    new_token,
    same_origin,
    set_token_cookie,
    sign,
    token_valid,
    tokens_match,
    unsign,
)
from qdash_mp.web.flash import FLASH_COOKIE, FLASH_TTL, Flash
from qdash_mp.web.guard import CSP, MAX_BODY
from qdash_mp.web.paging import MAX_PAGE, page_numbers, parse_page
from qdash_mp.web.urls import Urls, addressable, quote_id
from qdash_mp.web.views import REFRESH_SECONDS, Dashboard, FailedDetails

__all__ = [
    "ACCESS",
    "CSP",
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "DASHBOARD",
    "FLASH_COOKIE",
    "FLASH_TTL",
    "MAX_BODY",
    "MAX_PAGE",
    "REFRESH_SECONDS",
    "SAMPLER",
    "Dashboard",
    "FailedDetails",
    "Identity",
    "Flash",
    "Urls",
    "addressable",
    "create_app",
    "page_numbers",
    "parse_page",
    "quote_id",
    # qdash_mp.web.csrf, formerly qdash_mp.csrf
    "check_request",
    "issue_token",
    "new_secret",
    "new_token",
    "same_origin",
    "set_token_cookie",
    "sign",
    "token_valid",
    "tokens_match",
    "unsign",
]
