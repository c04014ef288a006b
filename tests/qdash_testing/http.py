"""HTTP helpers for tests that talk to a real dashboard: JSON GETs and a CSRF-aware session."""

from __future__ import annotations

import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TOKEN_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
JSON_TYPE = "application/json; charset=utf-8"


def csrf_token_in(page_html: str) -> str:
    """The CSRF token a dashboard page embeds in its forms."""
    match = TOKEN_RE.search(page_html)
    assert match is not None, "page has no CSRF form field"
    return match.group(1)


def get_json(url: str, *, content_type: str | None = None) -> Any:
    """GET ``url`` and decode its JSON body (checking ``Content-Type`` when given)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        if content_type is not None:
            assert resp.headers["Content-Type"] == content_type
        return json.loads(resp.read())


class DashboardSession:
    """A browser-like HTTP session: cookie jar plus the CSRF token from the failed page."""

    def __init__(self, base: str) -> None:
        self.base = base
        jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with self.opener.open(base + "/queues/failed", timeout=10) as resp:
            self.token = csrf_token_in(resp.read().decode())

    def post(self, path: str, token: str | None = None) -> tuple[int, Any]:
        """POST a form asking for JSON; ``(status, body)``, also for 4xx/5xx answers."""
        req = urllib.request.Request(
            self.base + path,
            data=urllib.parse.urlencode({"csrf_token": token or self.token}).encode(),
            method="POST",
            headers={"Accept": "application/json"},
        )
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


def timeless(view: dict[str, Any]) -> dict[str, Any]:
    """A ``/api/stats`` view without its ``throughput`` fields (checked to be numbers).

    Throughput moves with the clock (jobs over the last seconds): two views read a moment
    apart may differ there, and only there, when a second boundary passes between them.
    """
    assert all(isinstance(r["throughput"], (int, float)) for r in [*view["queues"], view["totals"]])

    def row(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k != "throughput"}

    return {**view, "queues": [row(q) for q in view["queues"]], "totals": row(view["totals"])}
