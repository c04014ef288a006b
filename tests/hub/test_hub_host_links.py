"""``?host=`` kept by every in-page link and form of a host-scoped hub page (HTTP level).

What is proved: on the overview, a queue page, the workers page, the failed list (filtered,
page 2), a job page and a bulk action's status page of ``?host=a``, every ``href``,
``action``, ``formaction``, ``hx-get`` and ``data-since-url`` into the dashboard carries
``host=a`` -- except the static files, the hosts page and the nav's "all hosts" link (which
says ``host=`` empty) -- every GET form has a hidden ``host`` field, and the redirect after
a forget keeps the host; pages without ``?host=`` get no host added. The rewriting itself
(``qdash_mp.hub.host_links``) on URLs with and without a query, fragments and entities.
"""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp.test_utils import TestClient
from qdash_testing.http import csrf_token_in

from qdash_mp.hub.format import encode_workers
from qdash_mp.hub.host_links import ATTRIBUTES, carry_host, with_host

from .test_hub_view import _record, publish
from .test_hub_view_failed import T0, Host, K, client_for

BASE = "/queues/"


class _Links(HTMLParser):
    """Every URL attribute in the page and the GET forms' fields."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, url)
        self.get_forms: list[list[tuple[str, str]]] = []
        self._form: list[tuple[str, str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for name in (*ATTRIBUTES, "src", "sse-connect", "data-events-url"):
            if name in a:
                self.urls.append((tag, name, a[name]))
        if tag == "form" and a.get("method", "").lower() == "get":
            self._form = []
            self.get_forms.append(self._form)
        if tag == "input" and self._form is not None:
            self._form.append((a.get("name", ""), a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None


def _exempt(tag: str, attr: str, url: str) -> bool:
    path = urlsplit(url).path
    return (
        not url.startswith(BASE)
        or path.startswith(BASE + "static/")
        or path == BASE + "hosts"
        # read by scripts, outside the page's links (the event stream serves every host)
        or attr in ("src", "sse-connect", "data-events-url")
    )


async def _check(client: TestClient[Any, Any], path: str) -> str:
    resp = await client.get(path)
    assert resp.status == 200, (path, resp.status)
    page = await resp.text()
    links = _Links()
    links.feed(page)
    checked = 0
    for tag, attr, url in links.urls:
        if _exempt(tag, attr, url):
            continue
        host = parse_qs(urlsplit(url).query, keep_blank_values=True).get("host")
        if host == [""]:
            assert tag == "a", url  # the nav's "all hosts"
            continue
        assert host == ["a"], f"{path}: <{tag} {attr}={url!r}> lost the host"
        checked += 1
    assert checked >= 3, path
    for fields in links.get_forms:
        assert ("host", "a") in fields, f"{path}: a GET form without the host"
    return page


async def _seed(r: Any) -> None:
    await publish(r, "a", 1, {"mail": _record(1, 50), "pdf": _record(2, 20)})
    await publish(r, "b", 1, {"mail": _record(3, 10)})
    row = {
        "id": "w1",
        "pid": 11,
        "host": "box",
        "name": "worker-1",
        "queues": ["mail"],
        "connected_at": 1.0,
        "last_seen": 2.0,
        "active": [],
        "state": "connected",
        "can_requeue": True,
    }
    await r.set(K.w("a"), encode_workers([row]))
    a, b = Host(r, "a"), Host(r, "b")
    a.seq = b.seq = 1  # above the stats' publish
    await a.publish([(f"a{i}", "mail", T0 + i, "send", f"E{i}") for i in range(60)])
    await b.publish([(f"b{i}", "mail", T0 + i, "send", f"E{i}") for i in range(3)])


async def test_every_in_page_link_and_form_keeps_the_host(
    r: Any,
    aiohttp_client: Any,
) -> None:
    await _seed(r)
    client = await client_for(aiohttp_client, r)
    await _check(client, "/queues/?host=a")
    await _check(client, "/queues/q/mail?host=a")
    await _check(client, "/queues/workers?host=a")
    await _check(client, "/queues/failed?host=a")
    page = await _check(client, "/queues/failed?host=a&queue=mail&page=2")
    await _check(client, "/queues/failed/a5@a?host=a")
    # a POST from the host's page comes back to the host's page
    token = csrf_token_in(page)
    resp = await client.post(
        "/queues/failed/a7@a/forget?host=a",
        data={"csrf_token": token},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert parse_qs(urlsplit(resp.headers["Location"]).query)["host"] == ["a"]
    # without ?host= nothing is added
    plain = await (await client.get("/queues/failed?queue=mail")).text()
    assert "host=" not in plain


def test_the_rewriting_of_one_url() -> None:
    s = "/queues/static"
    assert carry_host("/queues/failed", "a", BASE, s) == "/queues/failed?host=a"
    assert carry_host("/queues/failed?page=2#x", "a b", BASE, s) == (
        "/queues/failed?page=2&host=a%20b#x"
    )
    assert carry_host("/queues/failed?host=", "a", BASE, s) is None
    assert carry_host("/queues/hosts", "a", BASE, s) is None
    assert carry_host("/queues/static/q.css", "a", BASE, s) is None
    assert carry_host("https://example.com/queues/", "a", BASE, s) is None
    page = (
        '<a href="/queues/failed?queue=x&amp;page=2">n</a><form method="get" action="/queues/f">'
        '<div data-href="/queues/x" data-history="/queues/api/history"></div>'
    )
    assert with_host(page, "h&1", BASE, s) == (
        '<a href="/queues/failed?queue=x&amp;page=2&amp;host=h%261">n</a>'
        '<form method="get" action="/queues/f?host=h%261">'
        '<input type="hidden" name="host" value="h&amp;1">'
        '<div data-href="/queues/x" data-history="/queues/api/history?host=h%261"></div>'
    )
