"""Filters and snapshot-bounded bulk actions against a real collector process and a real
client: the filtered JSON matches what was sent; a bulk retry on a filter requeues exactly
the jobs that matched at the snapshot (not the ones failing after it); a kill -9 in the middle
of a bulk retry loses no job and requeues at most the one in flight twice; the job page shows
the retry history; without a requeue route the list shows no Retry buttons."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qdash_mp import Client, Job
from tests.qdash_testing.collector import CollectorProc, wait_for
from tests.qdash_testing.http import DashboardSession


def send(client: Client, jobs: list[tuple[str, str, str, str]]) -> None:
    for id, queue, name, error in jobs:
        client.on_failed(queue, Job(id=id, name=name, payload={"id": id}), error)
    assert client.flush(timeout=30)


def get(base: str, path: str, **params: str) -> tuple[Any, dict[str, str]]:
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read()), dict(resp.headers)


def post_json(s: DashboardSession, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        s.base + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Accept": "application/json",
            "Content-Type": "application/json",
            "X-CSRF-Token": s.token,
        },
    )
    try:
        with s.opener.open(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def live_ids(base: str) -> set[str]:
    doc, _ = get(base, "/queues/api/failed")
    ids: set[str] = set()
    for page in range(1, doc["pages"] + 1):
        ids |= {j["id"] for j in get(base, "/queues/api/failed", page=str(page))[0]["jobs"]}
    return ids


def batch(n: int, prefix: str = "j") -> list[tuple[str, str, str, str]]:
    return [
        (
            f"{prefix}{i}",
            ("mail", "billing")[i % 2],
            ("send", "charge", "render")[i % 3],
            ("TimeoutError: gateway timeout", "ValueError: bad")[i % 4 == 0] + f" {i}",
        )
        for i in range(n)
    ]


def test_bulk_retry_on_a_filter_requeues_exactly_the_matching_jobs(
    collector_proc: CollectorProc, client_factory: Callable[..., Client], tmp_path: Path
) -> None:
    requeued = tmp_path / "requeued"
    collector_proc.args = ("--requeue", "qdash_testing.requeue:append")
    collector_proc.env = {"QDASH_TEST_REQUEUE_FILE": str(requeued)}
    c = collector_proc.start()
    client = client_factory(c.socket)
    jobs = batch(120)
    send(client, jobs)
    match = [j[0] for j in jobs if j[1] == "mail" and "timeout" in j[3].lower()]
    doc, headers = get(c.http, "/queues/api/failed", queue="mail", q="GATEWAY")
    assert int(headers["X-Total-Count"]) == len(match) == doc["total"]
    assert {j["id"] for j in doc["jobs"]} <= set(match)
    snap = headers["X-Qdash-Snapshot"]
    send(client, [("late1", "mail", "send", "TimeoutError: gateway timeout late")])
    send(client, [(match[0], "mail", "send", "TimeoutError: gateway timeout again")])
    s = DashboardSession(c.http)
    status, body = post_json(
        s, "/queues/failed/retry", {"queue": "mail", "q": "gateway", "snapshot": snap}
    )
    assert status == 200, body
    assert body["count"] == len(match) - 1  # match[0] failed again after the snapshot
    done = requeued.read_text().split()
    assert sorted(done) == sorted(match[1:])
    left = live_ids(c.http)
    assert "late1" in left
    assert match[0] in left
    assert not left & set(match[1:])
    # the job page of a retried-then-failed-again job shows its earlier failure
    send(client, [(match[1], "mail", "send", "TimeoutError: third time")])
    with urllib.request.urlopen(f"{c.http}/queues/failed/{match[1]}", timeout=10) as resp:
        page = resp.read().decode()
    assert "Retry history" in page
    assert "gateway timeout" in page


def test_without_a_requeue_route_no_retry_buttons(
    running_collector: CollectorProc, client_factory: Callable[..., Client]
) -> None:
    client = client_factory(running_collector.socket)
    send(client, batch(3))
    with urllib.request.urlopen(running_collector.http + "/queues/failed", timeout=10) as resp:
        page = resp.read().decode()
    assert "no requeue route" in page
    assert '/retry" class="inline"' not in page
    requeuer = client_factory(running_collector.socket, requeue=lambda job: None)
    requeuer.on_pushed("mail")  # connects; registers requeue for every queue
    assert requeuer.flush(timeout=10)
    with urllib.request.urlopen(running_collector.http + "/queues/failed", timeout=10) as resp:
        page = resp.read().decode()
    assert "no requeue route" not in page


def test_kill_9_mid_bulk_retry_loses_nothing(
    collector_proc: CollectorProc, client_factory: Callable[..., Client], tmp_path: Path
) -> None:
    requeued = tmp_path / "requeued"
    collector_proc.args = ("--requeue", "qdash_testing.failed_requeue:slow_append")
    collector_proc.env = {"QDASH_TEST_REQUEUE_FILE": str(requeued)}
    c = collector_proc.start()
    client = client_factory(c.socket)
    jobs = batch(1500)
    send(client, jobs)
    client.close()
    _, headers = get(c.http, "/queues/api/failed")
    s = DashboardSession(c.http)
    status, body = post_json(s, "/queues/failed/retry", {"snapshot": headers["X-Qdash-Snapshot"]})
    assert status == 202, body  # too many to finish inline: a background task
    task = body["task"]
    wait_for(
        lambda: get(c.http, f"/queues/api/bulk/{task}")[0]["done"] >= 100,
        60,
        "the bulk retry to be under way",
    )
    c.kill()
    done = requeued.read_text().split()
    assert len(done) == len(set(done)), "a job was requeued twice"
    c.start()
    left = live_ids(c.http)
    all_ids = {j[0] for j in jobs}
    assert 100 <= len(done) < len(all_ids)
    assert set(done) | left == all_ids, "a job was lost"
    assert len(set(done) & left) <= 1, "more than the job in flight is both requeued and listed"
