"""The dashboard app end to end: real aiohttp server, real in-process stores, real HTTP."""

from __future__ import annotations

import asyncio
import html
import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from qdash_testing.http import timeless

from qdash_mp import (
    PAGE_SIZE,
    Job,
    JobView,
    MemoryFailedJobs,
    Sampler,
    Stats,
    StatsView,
    create_app,
    new_inspector,
)
from qdash_mp.errors import RetryUnavailable
from qdash_mp.inspector import LocalInspector
from qdash_mp.web import CSP, DASHBOARD, FLASH_COOKIE, MAX_BODY, page_numbers, parse_page
from qdash_mp.web.csrf import CSRF_COOKIE, new_secret, new_token

if TYPE_CHECKING:
    from conftest import DashboardClient, MakeDashboard, PageToken

JSON = {"Accept": "application/json"}
XSS = '<script>alert(1)</script>"onmouseover="'
XSS_ESCAPED = html.escape(XSS, quote=True).replace("&quot;", "&#34;")
PREV, NEXT = "\u2039 Prev", "Next \u203a"  # pager labels
# the per-row Forget forms (Retry shows only where the queue has a requeue route; the bulk
# forms post to failed/retry and failed/forget themselves and are skipped)
ACTION_RE = re.compile(r'action="([^"]*)/forget"')


def seed(failed: MemoryFailedJobs, n: int, stats: Stats | None = None) -> list[str]:
    """Record ``n`` failed jobs ``job-0`` … oldest first; returns their ids newest first."""
    for i in range(n):
        if stats is not None:
            stats.on_pushed("emails")
            stats.on_failed("emails")
        failed.record(Job(id=f"job-{i}", name="SendWelcomeEmail", attempts=3), "emails", "boom")
    return [f"job-{i}" for i in reversed(range(n))]


def listed_ids(page_html: str, base: str = "/queues/") -> list[str]:
    """Ids of the rows of a failed page, from their Retry form actions."""
    prefix = f"{base}failed/"
    out = []
    for action in ACTION_RE.findall(page_html):
        if action == f"{base}failed":
            continue
        assert action.startswith(prefix), action
        out.append(unquote(html.unescape(action[len(prefix) :])))
    return out


def pager_links(page_html: str) -> list[str]:
    """Texts of the pager's links and spans, in order ([] when there is no pager)."""
    m = re.search(r'<nav class="pager".*?</nav>', page_html, re.S)
    if m is None:
        return []
    return [t.strip() for t in re.findall(r">([^<>]+)</(?:a|span)>", m.group(0))]


def origin(client: TestClient[Any, Any]) -> str:
    return f"http://{client.host}:{client.port}"


async def post_form(client: DashboardClient, path: str, token: str | None, **fields: str) -> Any:
    data = dict(fields)
    if token is not None:
        data["csrf_token"] = token
    return await client.post(path, data=data, allow_redirects=False)


# -- the reference example ---------------------------------------------------------------------


async def test_reference_example(dashboard_client: MakeDashboard) -> None:
    stats, failed = Stats(), MemoryFailedJobs(None)
    for jid in ("job-1", "job-2"):
        job = Job(id=jid, name="SendWelcomeEmail", attempts=3)
        stats.on_pushed("emails")
        stats.on_failed("emails")
        failed.record(job, "emails", RuntimeError("smtp: connection refused"))
    client = await dashboard_client(new_inspector(stats, failed))

    resp = await client.get("/queues/")
    assert resp.status == 200
    text = await resp.text()
    assert "Queue Overview" in text
    assert "emails" in text

    resp = await client.get("/queues/api/stats")
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    data = await resp.json()
    assert [q["queue"] for q in data["queues"]] == ["emails"]
    assert data["queues"][0]["failed"] == 2
    assert data["totals"]["failed"] == 2

    assert len(await new_inspector(stats, failed).failed(1)) == 2


async def test_api_stats_uses_queue_stat_field_names(dashboard_client: MakeDashboard) -> None:
    stats = Stats()
    stats.on_pushed("b")
    stats.on_pushed("a")
    stats.on_processed("a")
    client = await dashboard_client(new_inspector(stats, None))
    data = await (await client.get("/queues/api/stats")).json()
    assert timeless(data) == timeless(stats.snapshot().to_dict())
    assert set(data["totals"]) == {
        "queue",
        "pushed",
        "processed",
        "failed",
        "retried",
        "pending",
        "throughput",
        "active",
        "runtime",
        "wait",
    }
    assert set(data["totals"]["runtime"]) == {"count", "p50", "p90", "p95", "p99", "max"}
    assert [q["queue"] for q in data["queues"]] == ["a", "b"]


# -- overview ----------------------------------------------------------------------------------


async def test_overview_rows_totals_and_refresh(dashboard_client: MakeDashboard) -> None:
    stats = Stats()
    for _ in range(3):
        stats.on_pushed("emails")
    stats.on_processed("emails")
    stats.on_failed("emails")
    stats.on_retried("emails")
    stats.on_pushed("reports")
    client = await dashboard_client(new_inspector(stats, None))
    text = await (await client.get("/queues/")).text()
    rows = re.findall(r"<tr>\s*<td class=\"queue\">(.*?)</td>(.*?)</tr>", text, re.S)
    cells = {q: re.findall(r'<td class="num[^"]*">([^<]*)</td>', rest) for q, rest in rows}
    # pushed, processed, failed, retried, pending, jobs/s
    assert cells["emails"][:5] == ["3", "1", "1", "1", "1"]
    assert cells["reports"][:5] == ["1", "0", "0", "0", "1"]
    totals = re.search(r'<tr class="totals">(.*?)</tr>', text, re.S)
    assert totals is not None
    assert re.findall(r'<td class="num">([^<]*)</td>', totals.group(1))[:5] == [
        "4",
        "1",
        "1",
        "1",
        "2",
    ]
    assert '<meta http-equiv="refresh"' in text
    # scripts only from the dashboard's static files (the CSP allows nothing else)
    for tag in re.findall(r"<script\b[^>]*>", text):
        assert re.fullmatch(r'<script src="/queues/static/[^"]+">', tag), tag


async def test_overview_empty_state(dashboard_client: MakeDashboard) -> None:
    client = await dashboard_client(new_inspector(None, None))
    text = await (await client.get("/queues/")).text()
    assert "No queues have reported yet." in text


async def test_overview_rate_from_sampler_and_fallback(dashboard_client: MakeDashboard) -> None:
    """The overview shows jobs/s, like /api/stats' throughput and ``qdash-mp stats``."""
    now = [1_000.0]
    stats = Stats(window=10, clock=lambda: now[0])
    insp = new_inspector(stats, None)
    clock = [0.0]
    sampler = Sampler(insp, interval=3600, clock=lambda: clock[0])
    stats.on_pushed("fast")
    stats.on_pushed("slow")
    for _ in range(5):
        stats.on_processed("slow")
    now[0] += 5  # 5 jobs in the 5 completed seconds since the Stats started: 1 job/s

    client = await dashboard_client(insp, sampler=sampler)

    def rate(text: str, queue: str) -> str:
        m = re.search(
            rf'<td class="queue">{queue}</td>.*?<td class="num">([^<]*)</td>\s*</tr>', text, re.S
        )
        assert m is not None
        return m.group(1)

    # the column says its unit, the same unit as QueueStat.throughput
    text = await (await client.get("/queues/")).text()
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", text)
    assert headers[6] == "Jobs/s", headers
    assert "Jobs/min" not in text
    # no two readings yet: the inspector's throughput (jobs/s), as /api/stats reports it
    api = await (await client.get("/queues/api/stats")).json()
    slow = next(q for q in api["queues"] if q["queue"] == "slow")
    assert rate(text, "slow") == f"{slow['throughput']:.2f}" == "1.00"

    # two readings a minute apart, 120 processed in between: 2 jobs/s (Sampler.rate: 120/min)
    await sampler.sample()
    for _ in range(120):
        stats.on_processed("fast")
    clock[0] += 60
    await sampler.sample()
    assert sampler.rate("fast") == 120.0
    text = await (await client.get("/queues/")).text()
    assert rate(text, "fast") == "2.00"
    assert rate(text, "slow") == "0.00"
    totals = re.search(r'<tr class="totals">(.*?)</tr>', text, re.S)
    assert totals is not None
    assert re.findall(r'<td class="num">([^<]*)</td>', totals.group(1))[-1] == "2.00"


async def test_app_starts_and_stops_its_sampler(aiohttp_client: Any) -> None:
    def sampler_tasks() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "qdash_mp.sampler"]

    app = create_app(new_inspector(Stats(), None))
    assert app[DASHBOARD].sampler.inspector is not None
    client = await aiohttp_client(app)
    assert len(sampler_tasks()) == 1
    await client.close()
    assert sampler_tasks() == []


# -- failed list and pagination ----------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 50, 51, 101])
async def test_failed_pages_html(dashboard_client: MakeDashboard, n: int) -> None:
    failed = MemoryFailedJobs(None)
    newest_first = seed(failed, n)
    client = await dashboard_client(new_inspector(None, failed))
    last = max(1, -(-n // PAGE_SIZE))
    for page in range(1, last + 1):
        resp = await client.get(f"/queues/failed?page={page}")
        assert resp.status == 200
        text = await resp.text()
        expected = newest_first[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        assert listed_ids(text) == expected
        links = pager_links(text)
        if last == 1:
            assert links == []
        else:
            numbers = [str(p) for p in range(1, last + 1)]
            assert links == [PREV, *numbers, NEXT]
            if page > 1:
                assert f'rel="prev" href="{_page_url(page - 1)}' in text
            else:
                assert 'rel="prev"' not in text
            if page < last:
                # pager links keep the page's snapshot: the pages do not shift
                assert f'rel="next" href="/queues/failed?page={page + 1}&amp;snapshot=' in text
            else:
                assert 'rel="next"' not in text
            for p in range(1, last + 1):
                if p != page:
                    assert f'href="{_page_url(p)}' in text
    if n == 0:
        assert "No failed jobs." in text
        assert "Flush all" not in text


def _page_url(page: int) -> str:
    """The start of a pager link: it carries the page's snapshot (the pages do not shift)."""
    return "/queues/failed?snapshot=" if page == 1 else f"/queues/failed?page={page}&amp;snapshot="


@pytest.mark.parametrize("n", [0, 1, 50, 51, 101])
async def test_failed_pages_json(dashboard_client: MakeDashboard, n: int) -> None:
    failed = MemoryFailedJobs(None)
    newest_first = seed(failed, n)
    client = await dashboard_client(new_inspector(None, failed))
    last = max(1, -(-n // PAGE_SIZE))
    for page in range(1, last + 2):
        resp = await client.get(f"/queues/api/failed?page={page}")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        data = await resp.json()
        assert data["page"] == page
        assert data["page_size"] == PAGE_SIZE
        assert data["total"] == n
        assert data["pages"] == last
        expected = newest_first[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        assert [j["id"] for j in data["jobs"]] == expected
    if n:
        row = (await (await client.get("/queues/api/failed")).json())["jobs"][0]
        view = (await new_inspector(None, failed).failed(1))[0]
        assert row == view.to_dict()
        assert set(row) == set(JobView.__dataclass_fields__)


async def test_page_beyond_the_end(dashboard_client: MakeDashboard) -> None:
    failed = MemoryFailedJobs(None)
    newest_first = seed(failed, 51)
    client = await dashboard_client(new_inspector(None, failed))
    for page in ("3", "99", "99999999999999999999999999"):
        resp = await client.get(f"/queues/failed?page={page}")
        assert resp.status == 200
        text = await resp.text()
        assert listed_ids(text) == newest_first[50:]
        assert "showing the last page, 2" in text
        data = await (await client.get(f"/queues/api/failed?page={page}")).json()
        assert data["jobs"] == []
        assert data["total"] == 51
        assert data["pages"] == 2


@pytest.mark.parametrize(
    "page", ["abc", "0", "-1", "1.5", "", " 1", "1e3", "٣", "+2", "0x10", "00"]
)
async def test_bad_page_values_are_400(dashboard_client: MakeDashboard, page: str) -> None:
    failed = MemoryFailedJobs(None)
    seed(failed, 3)
    client = await dashboard_client(new_inspector(None, failed))
    resp = await client.get("/queues/failed", params={"page": page})
    assert resp.status == 400
    assert "page must be a whole number" in await resp.text()
    resp = await client.get("/queues/api/failed", params={"page": page})
    assert resp.status == 400
    assert "page must be a whole number" in (await resp.json())["error"]


def test_parse_page_and_page_numbers() -> None:
    assert parse_page(None) == 1
    assert parse_page("007") == 7
    assert parse_page("9" * 40) == parse_page("9" * 5000) > 10**15
    for bad in ("", "0", "-1", "x", "1.0", "²"):
        with pytest.raises(ValueError, match="whole number"):
            parse_page(bad)
    assert page_numbers(1, 1) == [1]
    assert page_numbers(1, 3) == [1, 2, 3]
    assert page_numbers(10, 20) == [1, None, 8, 9, 10, 11, 12, None, 20]
    assert page_numbers(3, 20) == [1, 2, 3, 4, 5, None, 20]


async def test_many_pages_pager_is_windowed(dashboard_client: MakeDashboard) -> None:
    failed = MemoryFailedJobs(None)
    seed(failed, PAGE_SIZE * 12)
    client = await dashboard_client(new_inspector(None, failed))
    text = await (await client.get("/queues/failed?page=6")).text()
    assert pager_links(text) == [PREV, "1", "…", "4", "5", "6", "7", "8", "…", "12", NEXT]


# -- an inspector without the optional extras --------------------------------------------------


class PlainInspector:
    """An Inspector with only the protocol methods (no failed_count / failed_job)."""

    def __init__(self, inner: LocalInspector) -> None:
        self._inner = inner

    async def stats(self) -> StatsView:
        return await self._inner.stats()

    async def pending(self, queue: str, page: int) -> list[JobView]:
        return await self._inner.pending(queue, page)

    async def failed(self, page: int) -> list[JobView]:
        return await self._inner.failed(page)

    async def retry(self, id: str) -> None:
        await self._inner.retry(id)

    async def forget(self, id: str) -> None:
        await self._inner.forget(id)

    async def flush_failed(self) -> int:
        return await self._inner.flush_failed()


async def test_plain_inspector_degrades_gracefully(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> None:
    failed = MemoryFailedJobs(None)
    newest_first = seed(failed, 51)
    client = await dashboard_client(PlainInspector(new_inspector(None, failed)))

    text = await (await client.get("/queues/failed")).text()
    assert listed_ids(text) == newest_first[:50]
    assert pager_links(text) == [PREV, "1", NEXT]
    assert 'href="/queues/failed/job-50"' not in text  # no detail links
    text = await (await client.get("/queues/failed?page=2")).text()
    assert listed_ids(text) == ["job-0"]
    assert pager_links(text) == [PREV, "1", "2", NEXT]
    assert 'rel="next"' not in text
    text = await (await client.get("/queues/failed?page=9")).text()
    assert listed_ids(text) == []
    assert "Page 9 is empty" in text

    data = await (await client.get("/queues/api/failed?page=2")).json()
    assert (data["total"], data["pages"], [j["id"] for j in data["jobs"]]) == (
        None,
        None,
        ["job-0"],
    )
    resp = await client.get("/queues/failed/job-0")
    assert resp.status == 404
    assert "does not provide job details" in await resp.text()
    assert (await client.get("/queues/api/failed/job-0")).status == 404

    token = await page_token(client, "/queues/failed")
    resp = await post_form(client, "/queues/failed/job-0/forget", token)
    assert resp.status == 303
    assert len(failed) == 50


# -- job detail --------------------------------------------------------------------------------


async def test_job_detail_page_and_json(dashboard_client: MakeDashboard) -> None:
    failed = MemoryFailedJobs(None)
    try:
        raise ConnectionError("smtp: connection refused")
    except ConnectionError as exc:
        failed.record(
            Job(
                id="a/b é",
                name="SendWelcomeEmail",
                attempts=4,
                payload={"to": "ann@example.com", "raw": b"\x00\xff", "n": [1, 2]},
                enqueued_at=1700000000.5,
            ),
            "emails",
            exc,
        )
    client = await dashboard_client(new_inspector(None, failed))
    url = "/queues/failed/" + quote("a/b é", safe="")
    assert url == "/queues/failed/a%2Fb%20%C3%A9"
    text = await (await client.get("/queues/failed")).text()
    assert f'href="{url}"' in text

    resp = await client.get(url)
    assert resp.status == 200
    text = await resp.text()
    assert "SendWelcomeEmail" in text
    assert "a/b é" in text
    assert "ConnectionError: smtp: connection refused" in text
    assert "Traceback (most recent call last)" in text
    assert "&#34;to&#34;: &#34;ann@example.com&#34;" in text  # pretty JSON, escaped
    assert "<dt>Attempts</dt><dd>4</dd>" in text
    assert "<dt>Enqueued at</dt><dd>2023-11-14 22:13:20 UTC</dd>" in text
    assert f'action="{url}/forget"' in text

    data = await (await client.get("/queues/api/" + url.removeprefix("/queues/"))).json()
    assert data["id"] == "a/b é"
    assert data["name"] == "SendWelcomeEmail"
    assert data["attempts"] == 4
    assert data["error"] == "ConnectionError: smtp: connection refused"
    assert data["payload"]["to"] == "ann@example.com"
    assert data["payload"]["n"] == [1, 2]
    assert "Traceback" in data["traceback"]
    assert data["enqueued_at"] == 1700000000.5

    for path in ("/queues/failed/nope", "/queues/api/failed/nope"):
        assert (await client.get(path)).status == 404


# -- CSRF --------------------------------------------------------------------------------------


async def _csrf_setup(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> tuple[DashboardClient, MemoryFailedJobs, str]:
    failed = MemoryFailedJobs(None)
    seed(failed, 3)
    client = await dashboard_client(new_inspector(None, failed))
    token = await page_token(client, "/queues/failed")
    return client, failed, token


async def test_csrf_cookie_attributes(dashboard_client: MakeDashboard) -> None:
    failed = MemoryFailedJobs(None)
    seed(failed, 1)
    client = await dashboard_client(new_inspector(None, failed))
    resp = await client.get("/queues/failed")
    cookie = resp.cookies[CSRF_COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/queues/"
    token = re.search(r'name="csrf_token" value="([^"]+)"', await resp.text())
    assert token is not None
    assert token.group(1) == cookie.value
    # a page rendered with a valid cookie keeps the same token
    again = await client.get("/queues/")
    assert again.cookies[CSRF_COOKIE].value == cookie.value
    # JSON endpoints set no cookies
    assert CSRF_COOKIE not in (await client.get("/queues/api/stats")).cookies


@pytest.mark.parametrize(
    "case",
    [
        "no token",
        "wrong token",
        "other app's token",
        "cookie without form field",
        "form field without cookie",
        "cross-origin Origin",
        "null Origin",
        "cross-site fetch",
        "header token mismatching cookie",
    ],
)
@pytest.mark.parametrize("action", ["retry", "forget", "flush"])
async def test_csrf_matrix_refuses(
    dashboard_client: MakeDashboard, page_token: PageToken, case: str, action: str
) -> None:
    client, failed, token = await _csrf_setup(dashboard_client, page_token)
    before = [f.id for f in failed.list()]
    path = "/queues/failed/flush" if action == "flush" else f"/queues/failed/job-1/{action}"
    foreign = new_token(new_secret())
    field: str | None = token
    cookie: str | None = token
    headers: dict[str, str] = {}
    if case == "no token":
        field = cookie = None
    elif case == "wrong token":
        field = cookie = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    elif case == "other app's token":
        field = cookie = foreign
    elif case == "cookie without form field":
        field = None
    elif case == "form field without cookie":
        cookie = None
    elif case == "cross-origin Origin":
        headers["Origin"] = "http://evil.example"
    elif case == "null Origin":
        headers["Origin"] = "null"
    elif case == "cross-site fetch":
        headers["Sec-Fetch-Site"] = "cross-site"
    elif case == "header token mismatching cookie":
        field = None
        headers.update(JSON)
        headers["X-CSRF-Token"] = foreign
    client.session.cookie_jar.clear()
    if cookie is not None:
        headers["Cookie"] = f"{CSRF_COOKIE}={cookie}"
    data = {"csrf_token": field} if field is not None else {}
    resp = await client.post(path, data=data, headers=headers, allow_redirects=False)
    assert resp.status == 403
    assert [f.id for f in failed.list()] == before
    if case == "no token":
        resp = await client.post(path, data=data, headers=JSON, allow_redirects=False)
        assert resp.status == 403
        assert "CSRF" in (await resp.json())["error"]


async def test_csrf_valid_token_html_and_json(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> None:
    client, failed, token = await _csrf_setup(dashboard_client, page_token)

    # HTML form, same-origin Origin header present: 303 back with a flash
    resp = await client.post(
        "/queues/failed/job-2/forget",
        data={"csrf_token": token, "page": "1"},
        headers={"Origin": origin(client)},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/queues/failed"
    assert [f.id for f in failed.list()] == ["job-1", "job-0"]
    text = await (await client.get(resp.headers["Location"])).text()
    assert 'class="flash flash-ok"' in text
    assert "Forgot job job-2." in text
    # the flash is shown once
    assert "Forgot job job-2." not in await (await client.get("/queues/failed")).text()

    # JSON client: header token + cookie
    resp = await client.post("/queues/failed/job-1/forget", headers={**JSON, "X-CSRF-Token": token})
    assert resp.status == 200
    assert await resp.json() == {"ok": True, "action": "forget", "id": "job-1"}
    resp = await client.post("/queues/failed/flush", headers={**JSON, "X-CSRF-Token": token})
    assert await resp.json() == {"ok": True, "action": "flush", "flushed": 1}
    assert len(failed) == 0


async def test_csrf_without_origin_the_token_decides(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> None:
    """No ``Origin``/``Sec-Fetch-Site`` (curl, a script): a valid cookie+token pair passes,
    anything less is 403; with the pair, a foreign ``Origin`` is still 403."""
    client, failed, token = await _csrf_setup(dashboard_client, page_token)
    assert "Origin" not in client.session.headers
    resp = await post_form(client, "/queues/failed/job-2/forget", token)  # form field + cookie
    assert resp.status == 303
    resp = await client.post("/queues/failed/job-1/forget", headers={**JSON, "X-CSRF-Token": token})
    assert resp.status == 200
    assert [f.id for f in failed.list()] == ["job-0"]
    resp = await client.post("/queues/failed/job-0/forget", headers=JSON)  # cookie alone
    assert resp.status == 403
    resp = await client.post(
        "/queues/failed/job-0/forget",
        headers={**JSON, "X-CSRF-Token": token, "Origin": "http://evil.example"},
    )
    assert resp.status == 403
    client.session.cookie_jar.clear()
    resp = await client.post("/queues/failed/job-0/forget", headers={**JSON, "X-CSRF-Token": token})
    assert resp.status == 403  # token alone, no cookie
    assert [f.id for f in failed.list()] == ["job-0"]


async def test_redirect_goes_back_to_the_page(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> None:
    failed = MemoryFailedJobs(None)
    seed(failed, 120)
    client = await dashboard_client(new_inspector(None, failed))
    token = await page_token(client, "/queues/failed?page=2")
    text = await (await client.get("/queues/failed?page=2")).text()
    assert 'name="page" value="2"' in text
    resp = await post_form(client, "/queues/failed/job-60/forget", token, page="2")
    assert resp.headers["Location"] == "/queues/failed?page=2"
    # a junk page field falls back to page 1 rather than failing
    resp = await post_form(client, "/queues/failed/job-61/forget", token, page="<x>")
    assert resp.status == 303
    assert resp.headers["Location"] == "/queues/failed"


async def test_tampered_flash_cookie_is_ignored(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> None:
    client, _failed, token = await _csrf_setup(dashboard_client, page_token)
    resp = await post_form(client, "/queues/failed/job-0/forget", token)
    flash = resp.cookies[FLASH_COOKIE].value
    data, _, mac = flash.rpartition(".")
    client.session.cookie_jar.clear()
    for forged in (f"{data}.{mac[::-1]}", "eyJ4Ijoie30.AAAA", "garbage", ""):
        resp = await client.get("/queues/failed", headers={"Cookie": f"{FLASH_COOKIE}={forged}"})
        assert resp.status == 200
        assert 'class="flash' not in await resp.text()


# -- actions -----------------------------------------------------------------------------------


async def test_retry_requeues_and_bumps_stats(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> None:
    requeued: list[Job] = []
    stats = Stats()
    failed = MemoryFailedJobs(requeued.append).with_stats(stats)
    seed(failed, 2, stats)
    client = await dashboard_client(new_inspector(stats, failed))
    token = await page_token(client, "/queues/failed")

    resp = await post_form(client, "/queues/failed/job-1/retry", token, page="1")
    assert resp.status == 303
    assert [j.id for j in requeued] == ["job-1"]
    assert requeued[0].name == "SendWelcomeEmail"
    assert [f.id for f in failed.list()] == ["job-0"]
    assert stats.snapshot().queues[0].retried == 1
    text = await (await client.get("/queues/failed")).text()
    assert "Retried job job-1." in text

    resp = await client.post("/queues/failed/job-0/retry", headers={**JSON, "X-CSRF-Token": token})
    assert await resp.json() == {"ok": True, "action": "retry", "id": "job-0"}
    assert len(failed) == 0
    assert (await (await client.get("/queues/api/stats")).json())["totals"]["retried"] == 2


async def test_retry_whose_requeue_raises_keeps_the_record(
    dashboard_client: MakeDashboard, page_token: PageToken, caplog: pytest.LogCaptureFixture
) -> None:
    def requeue(job: Job) -> None:
        raise ConnectionError("broker <down>")

    failed = MemoryFailedJobs(requeue)
    seed(failed, 1)
    client = await dashboard_client(new_inspector(None, failed))
    token = await page_token(client, "/queues/failed")

    resp = await client.post("/queues/failed/job-0/retry", headers={**JSON, "X-CSRF-Token": token})
    assert resp.status == 502
    assert (await resp.json()) == {
        "error": "Re-enqueue of job job-0 failed: ConnectionError: broker <down>"
    }
    assert [f.id for f in failed.list()] == ["job-0"]

    resp = await post_form(client, "/queues/failed/job-0/retry", token)
    assert resp.status == 303
    text = await (await client.get(resp.headers["Location"])).text()
    assert 'class="flash flash-error"' in text
    assert "Re-enqueue of job job-0 failed: ConnectionError: broker &lt;down&gt;" in text
    assert listed_ids(text) == ["job-0"]
    assert "re-enqueue of failed job 'job-0' raised" in caplog.text


async def test_retry_refused_is_409(dashboard_client: MakeDashboard, page_token: PageToken) -> None:
    def requeue(job: Job) -> None:
        raise RetryUnavailable(f"no worker can take queue {job.name!r}")

    failed = MemoryFailedJobs(requeue)
    seed(failed, 1)
    client = await dashboard_client(new_inspector(None, failed))
    token = await page_token(client, "/queues/failed")
    resp = await client.post("/queues/failed/job-0/retry", headers={**JSON, "X-CSRF-Token": token})
    assert resp.status == 409
    assert "no worker can take queue" in (await resp.json())["error"]
    assert len(failed) == 1


async def test_forget_only_retry_forget_and_flush(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> None:
    failed = MemoryFailedJobs(None)
    seed(failed, 4)
    client = await dashboard_client(new_inspector(None, failed))
    token = await page_token(client, "/queues/failed")

    assert (await post_form(client, "/queues/failed/job-3/retry", token)).status == 303
    assert (await post_form(client, "/queues/failed/job-0/forget", token)).status == 303
    assert [f.id for f in failed.list()] == ["job-2", "job-1"]

    text = await (await client.get("/queues/failed")).text()
    assert "<details" in text
    assert "Flush all" in text
    assert 'action="/queues/failed/flush"' in text
    resp = await post_form(client, "/queues/failed/flush", token)
    assert resp.status == 303
    assert len(failed) == 0
    text = await (await client.get(resp.headers["Location"])).text()
    assert "Flushed 2 failed jobs." in text
    assert "No failed jobs." in text


@pytest.mark.parametrize("action", ["retry", "forget"])
async def test_unknown_id_is_404(
    dashboard_client: MakeDashboard, page_token: PageToken, action: str
) -> None:
    client, failed, token = await _csrf_setup(dashboard_client, page_token)
    resp = await post_form(client, f"/queues/failed/nope/{action}", token)
    assert resp.status == 404
    assert "No failed job with id &#39;nope&#39;" in await resp.text()
    resp = await client.post(
        f"/queues/failed/nope/{action}", headers={**JSON, "X-CSRF-Token": token}
    )
    assert resp.status == 404
    assert (await resp.json()) == {"error": "No failed job with id 'nope'."}
    assert len(failed) == 3


HOSTILE_IDS = ["a/b", "é<ü>", "100%", "a?b#c", " sp ", "flush", "x/retry", "%2F", "日本"]


async def test_odd_ids_work_end_to_end(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> None:
    failed = MemoryFailedJobs(None)
    for jid in [*HOSTILE_IDS, ".", ".."]:
        failed.record(Job(id=jid, name="J"), "q", "e")
    client = await dashboard_client(new_inspector(None, failed))
    token = await page_token(client, "/queues/failed")
    text = await (await client.get("/queues/failed")).text()
    assert sorted(listed_ids(text)) == sorted(HOSTILE_IDS)  # "." and ".." have no buttons
    for jid in HOSTILE_IDS:
        detail = await client.get("/queues/failed/" + quote(jid, safe=""))
        assert detail.status == 200, jid
        assert html.escape(jid) in await detail.text()
    for jid in HOSTILE_IDS[:5]:
        assert (
            await post_form(client, f"/queues/failed/{quote(jid, safe='')}/retry", token)
        ).status == 303
    for jid in HOSTILE_IDS[5:]:
        assert (
            await post_form(client, f"/queues/failed/{quote(jid, safe='')}/forget", token)
        ).status == 303
    assert sorted(f.id for f in failed.list()) == [".", ".."]


# -- XSS ---------------------------------------------------------------------------------------


def assert_escaped(text: str) -> None:
    assert "<script>alert(1)</script>" not in text
    assert '"onmouseover="' not in text
    assert XSS_ESCAPED in text


async def test_hostile_job_data_is_escaped_everywhere(
    dashboard_client: MakeDashboard, page_token: PageToken
) -> None:
    stats = Stats()
    stats.on_pushed(XSS)
    stats.on_failed(XSS)
    failed = MemoryFailedJobs(lambda job: (_ for _ in ()).throw(RuntimeError(XSS)))
    failed.record(Job(id=XSS, name=XSS, attempts=1, payload={XSS: XSS}), XSS, RuntimeError(XSS))
    client = await dashboard_client(new_inspector(stats, failed))
    quoted = quote(XSS, safe="")

    pages = {
        "overview": await client.get("/queues/"),
        "failed": await client.get("/queues/failed"),
        "detail": await client.get(f"/queues/failed/{quoted}"),
        "404": await client.get(f"/queues/failed/{quoted}x"),
    }
    for name, resp in pages.items():
        assert resp.headers["Content-Security-Policy"] == CSP, name
        assert_escaped(await resp.text())
    assert resp.status == 404

    token = await page_token(client, "/queues/failed")
    resp = await post_form(client, f"/queues/failed/{quoted}/retry", token)  # requeue raises
    assert resp.status == 303
    flashed = await (await client.get(resp.headers["Location"])).text()
    assert 'class="flash flash-error"' in flashed
    assert_escaped(flashed.split('class="flash flash-error"')[1].split("</div>")[0])
    resp = await post_form(client, f"/queues/failed/{quoted}/forget", token)
    flashed = await (await client.get(resp.headers["Location"])).text()
    assert_escaped(flashed.split('class="flash flash-ok"')[1].split("</div>")[0])

    data = await (await client.get("/queues/api/stats")).json()
    assert data["queues"][0]["queue"] == XSS  # JSON carries the data verbatim
    assert (await client.get("/queues/api/stats")).headers["X-Content-Type-Options"] == "nosniff"


async def test_security_headers_on_every_response(dashboard_client: MakeDashboard) -> None:
    client = await dashboard_client(new_inspector(None, None))
    paths = [
        ("GET", "/queues/"),
        ("GET", "/queues/failed"),
        ("GET", "/queues/api/stats"),
        ("GET", "/queues/api/failed"),
        ("GET", "/queues/static/qdash.css"),
        ("GET", "/queues/nope"),
        ("GET", "/queues/failed?page=x"),
        ("POST", "/queues/failed/flush"),
        ("PUT", "/queues/"),
    ]
    for method, path in paths:
        resp = await client.request(method, path, allow_redirects=False)
        assert resp.headers["Content-Security-Policy"] == CSP, path
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
        assert resp.headers["Referrer-Policy"] == "same-origin", path
    assert "script-src 'self';" in CSP
    assert "unsafe" not in CSP
    assert "default-src 'none'" in CSP


# -- mounting under a prefix -------------------------------------------------------------------


async def test_mounted_under_a_prefix_end_to_end(dashboard_client: MakeDashboard) -> None:
    requeued: list[Job] = []
    failed = MemoryFailedJobs(requeued.append)
    seed(failed, 2)
    client = await dashboard_client(new_inspector(Stats(), failed), prefix="/ops")

    resp = await client.get("/ops/queues/")
    assert resp.status == 200
    text = await resp.text()
    urls = re.findall(r'(?:href|action)="([^"]+)"', text)
    assert urls
    assert all(u.startswith("/ops/queues/") for u in urls), urls
    assert 'href="/ops/queues/static/qdash.css"' in text
    assert resp.cookies[CSRF_COOKIE]["path"] == "/ops/queues/"
    assert (await client.get("/ops/queues/static/qdash.css")).status == 200
    assert (await client.get("/queues/")).status == 404

    page = await client.get("/ops/queues/failed")
    text = await page.text()
    urls = re.findall(r'(?:href|action)="([^"]+)"', text)
    assert all(u.startswith("/ops/queues/") for u in urls), urls
    token = re.search(r'name="csrf_token" value="([^"]+)"', text)
    action = re.search(r'action="(/ops/queues/failed/job-1/retry)"', text)
    assert token is not None
    assert action is not None
    resp = await client.post(
        action.group(1), data={"csrf_token": token.group(1), "page": "1"}, allow_redirects=False
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/ops/queues/failed"
    assert resp.cookies[FLASH_COOKIE]["path"] == "/ops/queues/"
    followed = await client.get(resp.headers["Location"])
    text = await followed.text()
    assert "Retried job job-1." in text
    assert listed_ids(text, base="/ops/queues/") == ["job-0"]
    assert [j.id for j in requeued] == ["job-1"]
    assert (await client.get("/ops/queues")).headers.get("Location") is None  # followed
    resp = await client.get("/ops/queues", allow_redirects=False)
    assert resp.headers["Location"] == "/ops/queues/"
    assert (await client.get("/ops/queues/nope")).status == 404


# -- hostile HTTP ------------------------------------------------------------------------------


async def test_wrong_methods_are_405(dashboard_client: MakeDashboard) -> None:
    failed = MemoryFailedJobs(None)
    seed(failed, 1)
    client = await dashboard_client(new_inspector(None, failed))
    cases = [
        ("POST", "/queues/"),
        ("DELETE", "/queues/failed"),
        ("PUT", "/queues/failed/job-0/retry"),
        ("GET", "/queues/failed/job-0/retry"),
        ("GET", "/queues/failed/job-0/forget"),
        ("POST", "/queues/api/stats"),
        ("POST", "/queues/api/failed"),
        ("POST", "/queues/static/qdash.css"),
    ]
    for method, path in cases:
        resp = await client.request(method, path)
        assert resp.status == 405, (method, path)
        assert "Allow" in resp.headers
    assert len(failed) == 1


async def test_huge_body_is_413(dashboard_client: MakeDashboard, page_token: PageToken) -> None:
    for prefix in (None, "/ops"):
        failed = MemoryFailedJobs(None)
        seed(failed, 1)
        client = await dashboard_client(new_inspector(None, failed), prefix=prefix)
        base = prefix or ""
        token = await page_token(client, f"{base}/queues/failed")
        big = {"csrf_token": token, "pad": "x" * (MAX_BODY + 1)}
        resp = await client.post(f"{base}/queues/failed/job-0/forget", data=big)
        assert resp.status == 413

        async def chunks() -> Any:
            for _ in range(MAX_BODY // 1024 + 2):
                yield b"a=" + b"x" * 1022

        resp = await client.post(
            f"{base}/queues/failed/flush",
            data=chunks(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert resp.status == 413
        assert len(failed) == 1


async def test_no_500_for_odd_input(dashboard_client: MakeDashboard, page_token: PageToken) -> None:
    failed = MemoryFailedJobs(None)
    seed(failed, 2)
    client = await dashboard_client(new_inspector(None, failed))
    token = await page_token(client, "/queues/failed")
    gets = [
        "/queues/failed?page=%00",
        "/queues/failed?page=1&page=x",
        "/queues/failed?page=" + "9" * 5000,
        "/queues/api/failed?page=" + "1" * 100,
        "/queues/failed/%FF%FE",
        "/queues/failed/%00",
        "/queues/failed/" + "x" * 4000,
        "/queues/api/failed/%3Cscript%3E",
        "/queues/static/../../pyproject.toml",
        "/queues/static/%2e%2e/web.py",
        "/queues/static/nope.css",
        "/queues/failed/job-0?page=-1",
        "/queues//failed",
        "/nope",
    ]
    for path in gets:
        resp = await client.get(path)
        assert resp.status < 500, path
    assert (await client.get("/queues/failed/%FF%FE")).status == 404

    posts: list[tuple[str, Any, dict[str, str]]] = [
        (
            "/queues/failed/job-0/forget",
            b"\xff\xfe=\xff",
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),
        (
            "/queues/failed/job-0/forget",
            "&".join(f"f{i}=1" for i in range(500)),
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),
        (
            "/queues/failed/job-0/forget",
            b"--x\r\n",
            {"Content-Type": "multipart/form-data; boundary=x"},
        ),
        ("/queues/failed/job-0/forget", b"{", {"Content-Type": "application/json"}),
        ("/queues/failed/job-0/forget", f"csrf_token={token}", {"Content-Type": "text/plain"}),
        (
            "/queues/failed/job-0/retry",
            f"csrf_token={token}é",
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),
        ("/queues/failed/job-0/retry", "", {"X-CSRF-Token": "é" * 87}),
        ("/queues/failed/flush", "", {"Origin": "http://[::1"}),
        ("/queues/failed/flush", "", {"Origin": "é://"}),
    ]
    for path, body, headers in posts:
        resp = await client.post(path, data=body, headers=headers)
        assert 400 <= resp.status < 500, (path, body, headers, resp.status)
    assert len(failed) == 2


# -- state keys --------------------------------------------------------------------------------


def test_each_app_has_its_own_secret_and_state() -> None:
    insp = new_inspector(None, None)
    a, b = create_app(insp), create_app(insp)
    assert a[DASHBOARD].inspector is insp
    assert a[DASHBOARD].secret != b[DASHBOARD].secret
    assert len(a[DASHBOARD].secret) >= 32
    assert isinstance(a, web.Application)


async def test_dashboard_json_is_not_html_sniffable(dashboard_client: MakeDashboard) -> None:
    failed = MemoryFailedJobs(None)
    failed.record(Job(id="x", name=XSS), "q", XSS)
    client = await dashboard_client(new_inspector(None, failed))
    resp = await client.get("/queues/api/failed")
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(await resp.text())["jobs"][0]["name"] == XSS
