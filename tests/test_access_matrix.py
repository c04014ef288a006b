"""The access matrix: every dashboard route x every kind of caller, expected status, and no
mutation on any refused request.

Callers: no credentials, wrong credentials, a read-only user, a full user, a foreign ``Host``
(DNS rebinding), a foreign ``Origin``, cross-site fetch metadata, and the auth proxy header
from an address that is not a trusted proxy. Each cell runs against a fresh embedded app
(``create_app`` with the collector's access settings) through a real HTTP server; mutating
requests carry a valid CSRF token (primed by the full user), so a refusal is the condition's.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from qdash_testing.http import csrf_token_in

from qdash_mp import Job, MemoryFailedJobs, Stats, create_app, new_inspector
from qdash_mp.access_settings import AccessSettings, User
from qdash_mp.metrics import metrics_handler
from qdash_mp.web.app import ACCESS
from qdash_mp.web.passwords import PasswordHash

TOKEN = "t" * 24 + "-matrix-token"
IDS = ("j1", "j2", "j3")


def fast_hash(password: str) -> str:
    """A valid PBKDF2 line hash with the lowest accepted cost (tests run many logins)."""
    h = PasswordHash("pbkdf2_sha256", (1000,), secrets.token_bytes(16), b"\0" * 32)
    return PasswordHash(h.scheme, h.params, h.salt, h.derive(password)).encode()


USERS = (
    User("admin", fast_hash("admin-pass"), frozenset({"view", "retry", "forget", "flush"})),
    User("viewer", fast_hash("viewer-pass"), frozenset({"view"})),
)
SETTINGS = AccessSettings(
    token=TOKEN,
    users=USERS,
    proxy_header="X-Remote-User",
    trusted_proxies=("10.0.0.0/8",),  # the test client (127.0.0.1) is not a trusted proxy
)


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


FULL = basic("admin", "admin-pass")

# (method, path, kind, status for the full user); kind: public | view | api | mutate
ROUTES: list[tuple[str, str, str, int]] = [
    ("GET", "/queues", "public", 301),
    ("GET", "/queues/", "view", 200),
    ("GET", "/queues/failed", "view", 200),
    ("GET", "/queues/failed/j1", "view", 200),
    ("GET", "/queues/audit", "view", 200),
    ("GET", "/queues/workers", "view", 200),
    ("GET", "/queues/q/default", "view", 200),
    ("GET", "/queues/api/stats", "api", 200),
    ("GET", "/queues/api/failed", "api", 200),
    ("GET", "/queues/api/failed/j1", "api", 200),
    ("GET", "/queues/api/audit", "api", 200),
    ("GET", "/queues/api/openapi.json", "api", 200),
    ("GET", "/metrics", "api", 200),
    ("GET", "/queues/api/health", "public", 200),
    ("GET", "/queues/login", "public", 200),
    ("GET", "/queues/static/qdash.css", "public", 200),
    ("GET", "/favicon.ico", "public", 200),
    ("GET", "/queues/api/events?once=1", "api", 200),
    ("POST", "/queues/failed/j1/retry", "mutate", 200),
    ("POST", "/queues/failed/j1/forget", "mutate", 200),
    ("POST", "/queues/failed/flush", "mutate", 200),
    ("POST", "/queues/failed/retry", "mutate", 200),  # bulk (ids=j1)
    ("POST", "/queues/failed/forget", "mutate", 200),  # bulk (ids=j1)
    ("GET", "/queues/api/bulk/none", "api", 404),
    ("POST", "/queues/login", "public", 401),  # the form carries a wrong token
    ("POST", "/queues/logout", "public", 303),
]


def _none(kind: str, full: int, method: str) -> int:
    if kind == "public":
        return full
    return 303 if kind == "view" else 401  # HTML pages redirect to the login form


def _wrong(kind: str, full: int, method: str) -> int:
    return full if kind == "public" else 401


def _readonly(kind: str, full: int, method: str) -> int:
    return 403 if kind == "mutate" else full


def _origin(kind: str, full: int, method: str) -> int:
    return 403 if method == "POST" else full


CONDITIONS: dict[str, tuple[dict[str, str], Callable[[str, int, str], int]]] = {
    "no credentials": ({}, _none),
    "wrong credentials": ({"Authorization": "Bearer not-the-token-at-all"}, _wrong),
    "read-only user": (basic("viewer", "viewer-pass"), _readonly),
    "full user": (FULL, lambda kind, full, method: full),
    "foreign Host": ({**FULL, "Host": "evil.example"}, lambda *a: 421),
    "foreign Origin": ({**FULL, "Origin": "http://evil.example"}, _origin),
    "cross-site fetch": (
        {**FULL, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"},
        lambda *a: 403,
    ),
    "proxy header, untrusted peer": ({"X-Remote-User": "admin"}, _none),
}

CASES = [
    pytest.param(route, cond, id=f"{route[0]} {route[1]} | {cond}")
    for route in ROUTES
    for cond in CONDITIONS
]


def make_app() -> tuple[web.Application, MemoryFailedJobs, list[Job], Stats]:
    requeued: list[Job] = []
    stats = Stats()
    failed = MemoryFailedJobs(requeue=requeued.append).with_stats(stats)
    stats.on_pushed("default")  # the queue page needs a queue that reported
    for id in IDS:
        failed.record(Job(id=id, name="task", payload={"secret": id}), "default", "boom")
    inspector = new_inspector(stats, failed)
    app = create_app(inspector, access=SETTINGS)
    app.router.add_get("/metrics", metrics_handler(inspector.stats), name="qdash.metrics")
    return app, failed, requeued, stats


def test_matrix_size() -> None:
    assert len(CASES) == len(ROUTES) * len(CONDITIONS) == 208


@pytest.mark.parametrize(("route", "condition"), CASES)
async def test_access_matrix(
    aiohttp_client: Any, route: tuple[str, str, str, int], condition: str
) -> None:
    method, path, kind, full_status = route
    headers, expect = CONDITIONS[condition]
    expected = expect(kind, full_status, method)
    app, failed, requeued, stats = make_app()
    client = await aiohttp_client(app)

    data: dict[str, str] | None = None
    if method == "POST":
        page = await client.get("/queues/failed", headers=FULL)  # primes the CSRF cookie
        assert page.status == 200
        data = {"csrf_token": csrf_token_in(await page.text())}
        if path.endswith("/login"):
            data["token"] = "wrong-token-wrong-token"
        if path in ("/queues/failed/retry", "/queues/failed/forget"):
            data["ids"] = "j1"
    req_headers = {"Accept": "application/json"} if method == "POST" else {}
    req_headers.update(headers)
    resp = await client.request(method, path, headers=req_headers, data=data, allow_redirects=False)
    body = await resp.text()
    assert resp.status == expected, f"{method} {path} [{condition}]: {resp.status} {body[:200]}"

    audit = app[ACCESS].audit
    mutated = resp.status < 400 and kind == "mutate"
    if not mutated:
        assert {j.id for j in failed.list()} == set(IDS), "a refused request changed the jobs"
        assert requeued == []
        assert len(audit) == 0, "a refused request reached the audit log"
        assert stats.snapshot().totals.retried == 0
    else:
        entries = audit.page(0, 10)
        assert [(e.who, e.status) for e in entries] == [("admin", 200)]
    if resp.status == 401 and kind in ("api", "mutate"):
        assert "Bearer" in resp.headers["WWW-Authenticate"]
    if resp.status == 303 and kind == "view":
        assert resp.headers["Location"].startswith("/queues/login?next=")
