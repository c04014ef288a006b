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
