"""``/queues/api/openapi.json``: an OpenAPI 3.1 document that covers every JSON route, and that
real responses (successes and errors) validate against."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator
from qdash_testing.http import csrf_token_in

from qdash_mp import Job, MemoryFailedJobs, Stats, create_app, new_inspector
from qdash_mp.web.openapi import OPENAPI


def validate(doc: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    """Validate ``body`` against the documented schema of that response."""
    op = doc["paths"][path][method]
    assert str(status) in op["responses"], f"{method} {path} {status} is not documented"
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    Draft202012Validator.check_schema(schema)
    # $refs point into the document: validate with the document as the root resource.
    root = {**doc, **{"$ref": "#/x"}, "x": schema}
    Draft202012Validator(root).validate(body)


@pytest.fixture
async def client(aiohttp_client: Any) -> Any:
    stats = Stats()
    failed = MemoryFailedJobs(requeue=lambda job: None).with_stats(stats)
    stats.on_pushed("emails")
    for i in range(3):
        failed.record(Job(id=f"j{i}", name="send", payload={"to": i}), "emails", "boom")
    return await aiohttp_client(create_app(new_inspector(stats, failed)))


async def test_document_is_served_and_well_formed(client: Any) -> None:
    resp = await client.get("/queues/api/openapi.json")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    doc = await resp.json()
    assert doc == OPENAPI
    assert doc["openapi"].startswith("3.1")
    for name, schema in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema), name
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["responses"], (path, method)


async def test_every_json_route_is_documented(client: Any) -> None:
    documented = set(OPENAPI["paths"])
    routes = set()
    for resource in client.app.router.resources():
        path = resource.canonical
        if path.startswith("/queues/api/"):
            routes.add(path)
    assert routes <= documented, routes - documented
    for action in (
        "/queues/failed/{id}/retry",
        "/queues/failed/{id}/forget",
        "/queues/failed/flush",
    ):
        assert action in documented


async def test_real_responses_validate(client: Any) -> None:
    doc = OPENAPI
    cases: list[tuple[str, str, str]] = [
        ("/queues/api/stats", "/queues/api/stats", "get"),
        ("/queues/api/failed", "/queues/api/failed", "get"),
        ("/queues/api/failed?page=9", "/queues/api/failed", "get"),
        ("/queues/api/failed?page=x", "/queues/api/failed", "get"),
        ("/queues/api/failed/j1", "/queues/api/failed/{id}", "get"),
        ("/queues/api/failed/nope", "/queues/api/failed/{id}", "get"),
        ("/queues/api/health", "/queues/api/health", "get"),
        ("/queues/api/openapi.json", "/queues/api/openapi.json", "get"),
    ]
    statuses = set()
    for url, path, method in cases:
        resp = await client.get(url)
        statuses.add(resp.status)
        validate(doc, path, method, resp.status, await resp.json())
    assert statuses == {200, 400, 404}

    token = csrf_token_in(await (await client.get("/queues/failed")).text())
    posts = [
        ("/queues/failed/j1/retry", "/queues/failed/{id}/retry"),
        ("/queues/failed/j1/forget", "/queues/failed/{id}/forget"),  # retried: gone -> 404
        ("/queues/failed/j2/forget", "/queues/failed/{id}/forget"),
        ("/queues/failed/flush", "/queues/failed/flush"),
    ]
    seen = []
    for url, path in posts:
        resp = await client.post(
            url, data={"csrf_token": token}, headers={"Accept": "application/json"}
        )
        seen.append(resp.status)
        validate(doc, path, "post", resp.status, await resp.json())
    bad = await client.post(
        "/queues/failed/flush", data={"csrf_token": "x"}, headers={"Accept": "application/json"}
    )
    validate(doc, "/queues/failed/flush", "post", bad.status, await bad.json())
    assert seen == [200, 404, 200, 200]
    assert bad.status == 403

    audit = await client.get("/queues/api/audit")
    body = await audit.json()
    validate(doc, "/queues/api/audit", "get", audit.status, body)
    got = [(e["action"], e["status"], e["count"]) for e in body["entries"]]
    # every attempt that passed access control is logged, refused by CSRF or not
    assert got == [
        ("flush", 403, 0),
        ("flush", 200, 1),
        ("forget", 200, 1),
        ("forget", 404, 0),
        ("retry", 200, 1),
    ]
    assert "CSRF" in body["entries"][0]["result"]


async def test_validation_catches_a_wrong_body() -> None:
    with pytest.raises(Exception, match="is a required property"):
        validate(OPENAPI, "/queues/api/stats", "get", 200, {"queues": []})
