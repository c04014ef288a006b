"""The failed list's filters, snapshot tokens and bulk actions over HTTP (embedded store):
filters narrow the HTML and the JSON (X-Total-Count, X-Qdash-Snapshot), invalid ones get 400;
a bulk action on a filter acts on what matched at the snapshot and never on a job failing
after it; a forged snapshot is refused; the flush confirmed at N drops N; retry buttons show
only where a requeue route exists."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qdash_mp import Job, MemoryFailedJobs, new_inspector
from tests.qdash_testing.http import csrf_token_in

if TYPE_CHECKING:
    from conftest import MakeDashboard

JSON = {"Accept": "application/json"}


def seed(failed: MemoryFailedJobs) -> None:
    for i in range(30):
        queue = ("mail", "billing", "reports")[i % 3]
        failed.record(Job(id=f"j{i}", name="send" if i % 2 else "charge"), queue, f"Boom {i % 5}")


async def test_filters_narrow_the_json_and_the_page(dashboard_client: MakeDashboard) -> None:
    failed = MemoryFailedJobs(requeue=lambda job: None)
    seed(failed)
    client = await dashboard_client(new_inspector(None, failed))
    resp = await client.get("/queues/api/failed", params={"queue": "mail", "q": "BOOM 3"})
    assert resp.status == 200
    doc = await resp.json()
    want = [f"j{i}" for i in reversed(range(30)) if i % 3 == 0 and i % 5 == 3]
    assert [j["id"] for j in doc["jobs"]] == want
    assert resp.headers["X-Total-Count"] == str(len(want)) == str(doc["total"])
    assert resp.headers["X-Qdash-Snapshot"]
    page = await (await client.get("/queues/failed?queue=mail&name=send")).text()
    assert "Clear filter" in page
    assert 'value="mail"' in page
    assert f"({sum(1 for i in range(30) if i % 3 == 0 and i % 2)} matching)" in page
    for bad, why in (("after=soon", "after must be"), ("snapshot=abc", "malformed snapshot")):
        resp = await client.get(f"/queues/api/failed?{bad}")
        assert resp.status == 400
        assert why in (await resp.json())["error"]


async def test_bulk_forget_on_a_filter_spares_later_failures(
    dashboard_client: MakeDashboard,
) -> None:
    failed = MemoryFailedJobs(requeue=lambda job: None)
    seed(failed)
    client = await dashboard_client(new_inspector(None, failed))
    page = await client.get("/queues/failed?queue=billing")
    token = csrf_token_in(await page.text())
    resp = await client.get("/queues/api/failed?queue=billing")
    snap, shown = resp.headers["X-Qdash-Snapshot"], int(resp.headers["X-Total-Count"])
    # after the operator looked: a new billing failure, and a shown one failing again
    failed.record(Job(id="late", name="send"), "billing", "Boom late")
    failed.record(Job(id="j1", name="send"), "billing", "Boom again")
    forged = snap.rsplit(".", 2)
    forged = f"{forged[0]}.{int(forged[1]) + 5}.{forged[2]}"
    resp = await client.post(
        "/queues/failed/forget",
        data={"csrf_token": token, "queue": "billing", "snapshot": forged},
        headers=JSON,
    )
    assert resp.status == 400  # a widened snapshot does not verify
    resp = await client.post(
        "/queues/failed/forget",
        data={"csrf_token": token, "queue": "billing", "snapshot": snap},
        headers=JSON,
    )
    body = await resp.json()
    assert resp.status == 200, body
    assert body["count"] == shown - 1  # j1 failed again after the snapshot: not touched
    left = {f.id for f in failed.list() if f.queue == "billing"}
    assert left == {"late", "j1"}
    assert len(failed) == 30 - shown + 1 + 1


async def test_bulk_retry_selected_and_csrf(dashboard_client: MakeDashboard) -> None:
    requeued: list[str] = []
    failed = MemoryFailedJobs(requeue=lambda job: requeued.append(job.id))
    seed(failed)
    client = await dashboard_client(new_inspector(None, failed))
    refused = await client.post("/queues/failed/retry", data={"ids": "j1"}, headers=JSON)
    assert refused.status == 403
    assert requeued == []
    token = csrf_token_in(await (await client.get("/queues/failed")).text())
    resp = await client.post(
        "/queues/failed/retry",
        data=[("csrf_token", token), ("ids", "j1"), ("ids", "j2"), ("ids", "nope")],
        headers=JSON,
    )
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200
    assert body["count"] == 2
    assert body["skipped"] == 1
    assert sorted(requeued) == ["j1", "j2"]


async def test_flush_drops_what_the_confirm_counted(dashboard_client: MakeDashboard) -> None:
    failed = MemoryFailedJobs()
    seed(failed)
    client = await dashboard_client(new_inspector(None, failed))
    text = await (await client.get("/queues/failed")).text()
    assert "Yes, flush 30 failed jobs" in text
    assert "no requeue route" in text
    assert 'failed/j1/retry"' not in text
    token = csrf_token_in(text)
    snap = text.split('name="snapshot" value="', 1)[1].split('"', 1)[0]
    for i in range(3):
        failed.record(Job(id=f"new{i}", name="x"), "mail", "later")
    resp = await client.post(
        "/queues/failed/flush", data={"csrf_token": token, "snapshot": snap}, headers=JSON
    )
    assert (await resp.json())["flushed"] == 30
    assert sorted(f.id for f in failed.list()) == ["new0", "new1", "new2"]


async def test_selected_with_nothing_ticked_acts_on_nothing(
    dashboard_client: MakeDashboard,
) -> None:
    """The bulk bar's form carries the filter and snapshot too: "Retry selected" without a
    ticked row must not fall back to every matching job."""
    requeued: list[str] = []
    failed = MemoryFailedJobs(requeue=lambda job: requeued.append(job.id))
    seed(failed)
    client = await dashboard_client(new_inspector(None, failed))
    text = await (await client.get("/queues/failed?queue=mail")).text()
    token = csrf_token_in(text)
    snap = text.split('name="snapshot" value="', 1)[1].split('"', 1)[0]
    resp = await client.post(
        "/queues/failed/retry",
        data={"csrf_token": token, "snapshot": snap, "queue": "mail", "scope": "selected"},
        headers=JSON,
    )
    assert resp.status == 400
    assert "no job selected" in (await resp.json())["error"]
    assert requeued == []
    assert len(failed) == 30
