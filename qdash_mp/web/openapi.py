"""The OpenAPI 3.1 document of every JSON route, served at ``/queues/api/openapi.json``.

A static document (no reflection over handlers): the contract is written once, here, and
``tests/test_openapi.py`` validates real responses of every route against it. Paths are
relative to the dashboard's mount point (``servers`` is ``/``; a mounted app's clients prefix
them). New JSON routes add their path here and a case in the test.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from qdash_mp.web import events, lifecycle_api
from qdash_mp.web.hub_openapi import add_hub_docs

__all__ = ["OPENAPI", "add_openapi_route"]

_NUM = {"type": "number"}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_ERRORS = {
    "400": _json(_ref("Error"), "bad input (e.g. page)"),
    "401": _json(_ref("Error"), "no or wrong credentials"),
    "403": _json(_ref("Error"), "not allowed (read-only, user's actions, CSRF, cross-site)"),
    "429": _json(_ref("Error"), "too many failed credential attempts"),
}
_PAGE = {
    "name": "page",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1},
}
_ID = {"name": "id", "in": "path", "required": True, "schema": _STR}
_CSRF = {"name": "X-CSRF-Token", "in": "header", "required": False, "schema": _STR}
_POST_ERRORS = {
    **_ERRORS,
    "404": _json(_ref("Error"), "unknown id"),
    "409": _json(_ref("Error"), "retry refused (nobody can re-enqueue, or already in flight)"),
    "502": _json(_ref("Error"), "the re-enqueue raised; the record stays"),
}


def _action(summary: str, ok: dict[str, Any], *, with_id: bool) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary + " (answers JSON with Accept: application/json)",
            "parameters": [_ID, _CSRF] if with_id else [_CSRF],
            "responses": {"200": _json(ok, "done"), **_POST_ERRORS},
        }
    }


_FILTERS = [
    {"name": k, "in": "query", "required": False, "schema": _STR, "description": d}
    for k, d in (
        ("queue", "exact queue name"),
        ("name", "exact job name"),
        ("q", "case-insensitive substring of the error text"),
        ("after", "failed at or after: Unix seconds or ISO 8601"),
        ("before", "failed before: Unix seconds or ISO 8601"),
        ("snapshot", "X-Qdash-Snapshot token: only jobs failed before it"),
        ("since", "X-Qdash-Snapshot token: only jobs failed from it on"),
    )
]


def _bulk(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary + " (form or JSON; 202 with a status URL when it takes long)",
            "parameters": [_CSRF],
            "responses": {
                "200": _json(_ref("BulkTask"), "done"),
                "202": _json(_ref("BulkTask"), "running"),
                **_POST_ERRORS,
            },
        }
    }


_LATENCY = {
    "type": "object",
    "properties": {k: {"type": ["number", "null"]} for k in ("p50", "p90", "p95", "p99", "max")}
    | {"count": _INT},
}
_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": _STR}},
    "QueueStat": {
        "type": "object",
        "required": ["queue", "pushed", "processed", "failed", "retried", "pending", "throughput"],
        "properties": {
            "queue": _STR,
            "pushed": _INT,
            "processed": _INT,
            "failed": _INT,
            "retried": _INT,
            "pending": _INT,
            "throughput": _NUM,
            "active": _INT,
            "runtime": _LATENCY,
            "wait": _LATENCY,
        },
    },
    "Stats": {
        "type": "object",
        "required": ["queues", "totals"],
        "properties": {
            "queues": {"type": "array", "items": _ref("QueueStat")},
            "totals": _ref("QueueStat"),
        },
    },
    "JobView": {
        "type": "object",
        "required": ["id", "queue", "name", "error", "attempts", "failed_at"],
        "properties": {
            "id": _STR,
            "queue": _STR,
            "name": _STR,
            "error": _STR,
            "attempts": _INT,
            "failed_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "FailedPage": {
        "type": "object",
        "required": ["page", "page_size", "total", "pages", "jobs"],
        "properties": {
            "page": {"type": "integer", "minimum": 1},
            "page_size": {"type": "integer", "minimum": 1},
            "total": {"type": ["integer", "null"], "minimum": 0},
            "pages": {"type": ["integer", "null"], "minimum": 1},
            "filter": {"type": "object"},
            "jobs": {"type": "array", "items": _ref("JobView")},
        },
    },
    "BulkTask": {
        "type": "object",
        "required": ["task", "action", "state", "total", "done", "skipped", "failed"],
        "properties": {
            "ok": {"const": True},
            "task": _STR,
            "action": {"enum": ["retry", "forget"]},
            "state": {"enum": ["running", "done", "cancelled"]},
            "total": _INT,
            "done": _INT,
            "skipped": _INT,
            "failed": _INT,
            "count": _INT,
            "errors": {"type": "array", "items": _STR},
            "filter": {"type": ["object", "null"]},
            "started": {"type": "number"},
            "finished": {"type": ["number", "null"]},
            "status": _STR,
        },
    },
    "FailedJob": {
        "allOf": [_ref("JobView")],
        "type": "object",
        "required": ["payload", "traceback", "enqueued_at"],
        "properties": {
            "payload": {},
            "traceback": _NSTR,
            "enqueued_at": {"type": ["number", "null"]},
        },
    },
    "AuditEntry": {
        "type": "object",
        "required": ["t", "who", "remote", "action", "ids", "filter", "count", "result", "status"],
        "properties": {
            "t": _NUM,
            "who": _STR,
            "remote": _STR,
            "action": _STR,
            "ids": {"type": "array", "items": _STR},
            "filter": {"type": ["object", "null"]},
            "count": _INT,
            "result": _STR,
            "status": {"type": "integer"},
        },
    },
    "AuditPage": {
        "type": "object",
        "required": ["page", "page_size", "total", "pages", "entries"],
        "properties": {
            "page": {"type": "integer", "minimum": 1},
            "page_size": {"type": "integer", "minimum": 1},
            "total": _INT,
            "pages": {"type": "integer", "minimum": 1},
            "entries": {"type": "array", "items": _ref("AuditEntry")},
        },
    },
    "Health": {
        "type": "object",
        "required": ["ok"],
        "properties": {"ok": {"type": "boolean"}, "error": _STR},
    },
    "ActionDone": {
        "type": "object",
        "required": ["ok", "action"],
        "properties": {
            "ok": {"const": True},
            "action": {"enum": ["retry", "forget", "flush"]},
            "id": _STR,
            "flushed": _INT,
        },
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "qdash_mp dashboard API",
        "version": "1",
        "description": "JSON routes of the qdash_mp dashboard, relative to its mount point.",
    },
    "servers": [{"url": "/"}],
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "basic": {"type": "http", "scheme": "basic"},
            "session": {"type": "apiKey", "in": "cookie", "name": "qdash_session"},
        },
    },
    "security": [{}, {"bearer": []}, {"basic": []}, {"session": []}],
    "paths": {
        "/queues/api/stats": {
            "get": {
                "summary": "Per-queue counters and totals",
                "responses": {"200": _json(_ref("Stats"), "counters"), **_ERRORS},
            }
        },
        "/queues/api/failed": {
            "get": {
                "summary": "One page of failed jobs matching the filters (AND), newest first; "
                "headers X-Total-Count (jobs matching) and X-Qdash-Snapshot (token for bulk "
                "actions, snapshot=, since=)",
                "parameters": [_PAGE, *_FILTERS],
                "responses": {"200": _json(_ref("FailedPage"), "a page"), **_ERRORS},
            }
        },
        "/queues/api/failed/{id}": {
            "get": {
                "summary": "One failed job with payload and traceback",
                "parameters": [_ID],
                "responses": {
                    "200": _json(_ref("FailedJob"), "the job"),
                    "404": _json(_ref("Error"), "unknown id"),
                    **_ERRORS,
                },
            }
        },
        "/queues/api/audit": {
            "get": {
                "summary": "The audit log of operator actions, newest first",
                "parameters": [_PAGE],
                "responses": {"200": _json(_ref("AuditPage"), "a page"), **_ERRORS},
            }
        },
        "/queues/api/health": {
            "get": {
                "summary": "Liveness probe (public); 503 when the collector's journal is not sound",
                "security": [{}],
                "responses": {
                    "200": _json(_ref("Health"), "healthy"),
                    "503": _json(_ref("Health"), "unhealthy"),
                },
            }
        },
        "/queues/api/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_ERRORS},
            }
        },
        "/queues/failed/{id}/retry": _action(
            "Re-enqueue and drop", _ref("ActionDone"), with_id=True
        ),
        "/queues/failed/{id}/forget": _action("Drop", _ref("ActionDone"), with_id=True),
        "/queues/failed/flush": _action("Drop all", _ref("ActionDone"), with_id=False),
        "/queues/failed/retry": _bulk("Retry ids=[...] or the filter's jobs at snapshot"),
        "/queues/failed/forget": _bulk("Forget ids=[...] or the filter's jobs at snapshot"),
        "/queues/api/bulk/{task}": {
            "get": {
                "summary": "Progress of a bulk action",
                "parameters": [{"name": "task", "in": "path", "required": True, "schema": _STR}],
                "responses": {
                    "200": _json(_ref("BulkTask"), "the task"),
                    "404": _json(_ref("Error"), "unknown task"),
                    **_ERRORS,
                },
            }
        },
    },
}

OPENAPI["paths"].update(lifecycle_api.OPENAPI_PATHS)  # history, workers, pending, recent
OPENAPI["components"]["schemas"].update(lifecycle_api.OPENAPI_SCHEMAS)
OPENAPI["paths"].update(events.OPENAPI_PATHS)
add_hub_docs(OPENAPI)  # hub only: "hosts", ?host=, 202 queued (qdash_mp.hub)
_BODY = json.dumps(OPENAPI, indent=1).encode()


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json", charset="utf-8")


def add_openapi_route(app: web.Application) -> None:
    """``GET /queues/api/openapi.json`` on the dashboard ``app``."""
    app.router.add_get("/queues/api/openapi.json", _openapi, name="qdash.api.openapi")
