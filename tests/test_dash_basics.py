"""Dashboard basics of issue 10: the favicon, and error pages that never rotate a valid CSRF
token (a fresh browser's first Retry used to answer 403)."""

from __future__ import annotations

from typing import Any

from qdash_testing.http import csrf_token_in

from qdash_mp import Job, MemoryFailedJobs, Stats, create_app, new_inspector


async def make_client(aiohttp_client: Any) -> tuple[Any, list[Job]]:
    stats = Stats()
    requeued: list[Job] = []
    failed = MemoryFailedJobs(requeue=requeued.append).with_stats(stats)
    stats.on_pushed("emails")
    for i in range(3):
        failed.record(Job(id=f"j{i}", name="send", payload={"to": i}), "emails", "boom")
    return await aiohttp_client(create_app(new_inspector(stats, failed))), requeued


async def test_favicon_is_served_and_linked(aiohttp_client: Any) -> None:
    client, _ = await make_client(aiohttp_client)
    resp = await client.get("/favicon.ico")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "image/svg+xml"
    assert (await resp.read()).startswith(b"<svg")
    page = await (await client.get("/queues/")).text()
    assert 'rel="icon" href="/queues/static/favicon.svg"' in page
    assert (await client.get("/queues/static/favicon.svg")).status == 200


async def test_fresh_browser_first_retry_works(aiohttp_client: Any) -> None:
    """Fresh cookie jar: a page, then what a browser fetches next (favicon, a stray 404 inside
    and outside the dashboard), then Retry with the first page's token is accepted."""
    client, requeued = await make_client(aiohttp_client)
    client.session.cookie_jar.clear()
    page = await client.get("/queues/failed")
    token = csrf_token_in(await page.text())
    for path in ("/favicon.ico", "/nope.png", "/queues/nope", "/queues/failed/missing"):
        resp = await client.get(path)
        assert "qdash_csrf" not in resp.cookies, path
    resp = await client.post(
        "/queues/failed/j0/retry", data={"csrf_token": token}, allow_redirects=False
    )
    assert resp.status == 303
    assert len(requeued) == 1


async def test_error_page_issues_a_token_only_when_there_is_none(aiohttp_client: Any) -> None:
    client, _ = await make_client(aiohttp_client)
    client.session.cookie_jar.clear()
    resp = await client.get("/queues/failed/missing")
    assert resp.status == 404
    assert "qdash_csrf" in resp.cookies  # no cookie yet: its forms (log out) need one
    again = await client.get("/queues/failed/missing")
    assert "qdash_csrf" not in again.cookies


async def test_control_characters_are_shown_escaped(aiohttp_client: Any) -> None:
    stats = Stats()
    failed = MemoryFailedJobs(requeue=lambda job: None).with_stats(stats)
    evil = "gpj.\u202eexe\x00\u2066x\x1b[31m"
    stats.on_pushed("queue" + evil)
    job = Job(id="id" + evil, name="name" + evil, payload={"k": "payload" + evil})
    record = failed.record(job, "queue" + evil, "error" + evil)
    record.traceback = "trace" + evil
    client = await aiohttp_client(create_app(new_inspector(stats, failed)))
    from qdash_mp.web.urls import quote_id

    pages = [
        await (await client.get("/queues/failed")).text(),
        await (await client.get("/queues/failed/" + quote_id(job.id))).text(),
        await (await client.get("/queues/")).text(),
    ]
    for html in pages:
        for raw in ("\u202e", "\x00", "\u2066", "\x1b"):
            assert raw not in html
        assert "gpj.\\u202eexe" in html
    detail = pages[1]
    for what in ("id", "name", "payload", "error", "trace"):
        assert what + "gpj.\\u202eexe\\x00\\u2066x\\x1b[31m" in detail or (
            # the payload is JSON: its own escapes for C0, ours for the bidi ones
            what == "payload" and "payload" + "gpj.\\u202eexe\\u0000\\u2066x\\u001b[31m" in detail
        ), what


async def test_payload_that_is_a_json_document_is_pretty_printed(aiohttp_client: Any) -> None:
    stats = Stats()
    failed = MemoryFailedJobs(requeue=lambda job: None).with_stats(stats)
    failed.record(Job(id="j", name="n", payload='{"to": ["a@b"]}'), "q", "boom")
    client = await aiohttp_client(create_app(new_inspector(stats, failed)))
    html = await (await client.get("/queues/failed/j")).text()
    assert "{\n  &#34;to&#34;: [\n    &#34;a@b&#34;\n  ]\n}" in html


async def test_flush_reports_the_count_it_acted_on(aiohttp_client: Any) -> None:
    """The confirm counted 3; 2 more failed before the click: the flush drops the 3 it
    counted (the page's snapshot) and says so; the 2 later failures stay."""
    stats = Stats()
    failed = MemoryFailedJobs(requeue=lambda job: None).with_stats(stats)
    for i in range(3):
        failed.record(Job(id=f"a{i}", name="n", payload={}), "q", "boom")
    client = await aiohttp_client(create_app(new_inspector(stats, failed)))
    html = await (await client.get("/queues/failed")).text()
    assert "all 3 failed jobs" in html
    assert "Jobs that failed after this page was shown stay" in html
    token = csrf_token_in(html)
    snapshot = html.split('name="snapshot" value="', 1)[1].split('"', 1)[0]
    for i in range(2):
        failed.record(Job(id=f"b{i}", name="n", payload={}), "q", "boom")
    resp = await client.post(
        "/queues/failed/flush",
        data={"csrf_token": token, "snapshot": snapshot},
        allow_redirects=False,
    )
    assert resp.status == 303
    flashed = await (await client.get(resp.headers["Location"])).text()
    assert "Flushed 3 failed jobs." in flashed
    assert sorted(f.id for f in failed.list()) == ["b0", "b1"]
