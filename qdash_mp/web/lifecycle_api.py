"""The lifecycle JSON routes: history, workers, a queue's pending and recent tracked jobs.

Relative to the mount point (added by ``create_app`` through ``add_routes``)::

    GET /queues/api/history?queue=Q&resolution=minute|hour
        {"queue", "resolution", "points": [{"t", "pushed", "processed", "failed",
         "runtime": {"count", "p50", "p90", "p95", "p99", "max"}}], "windows": {...}}
    GET /queues/api/workers                  {"workers": [WorkerView...]}
    GET /queues/api/queues/{queue}/pending?page=N   {"queue", "page", "page_size", "jobs"}
    GET /queues/api/queues/{queue}/recent?page=N    (same shape; rows are TrackedJob dicts)

The inspector provides them through optional methods (``history``, ``workers``, ``recent``,
``windows``; ``pending`` is in the protocol); an inspector without one answers the empty
document (``[]`` lists, ``{}`` windows). A missing ``queue``, a ``resolution`` other than
``minute``/``hour`` or a bad ``page`` is a 400 ``{"error": reason}``; an unknown queue is an
empty list (200).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from qdash_mp.models import PAGE_SIZE
from qdash_mp.web.paging import parse_page

__all__ = ["OPENAPI_PATHS", "OPENAPI_SCHEMAS", "RESOLUTIONS", "add_routes"]

RESOLUTIONS = ("minute", "hour")

# -- the OpenAPI part of these routes (merged into qdash_mp.web.openapi.OPENAPI) -------------

_NUM = {"type": "number"}
_NNUM = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}


def _obj(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(props), "properties": props}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _get(summary: str, ok: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    def body(schema: dict[str, Any], what: str) -> dict[str, Any]:
        return {"description": what, "content": {"application/json": {"schema": schema}}}

    return {
        "get": {
            "summary": summary,
            "parameters": params,
            "responses": {"200": body(_ref(ok), "ok"), "400": body(_ref("Error"), "bad input")},
        }
    }


_SUMMARY = _obj({"count": _INT, **{k: _NNUM for k in ("p50", "p90", "p95", "p99", "max")}})
_PAIR = _obj({"runtime": _ref("LatencySummary"), "wait": _ref("LatencySummary")})
OPENAPI_SCHEMAS: dict[str, Any] = {
    "LatencySummary": _SUMMARY,
    "HistoryPoint": _obj(
        {"t": _NUM, "pushed": _INT, "processed": _INT, "failed": _INT, "runtime": _SUMMARY}
    ),
    "History": _obj(
        {
            "queue": _STR,
            "resolution": {"enum": list(RESOLUTIONS)},
            "points": {"type": "array", "items": _ref("HistoryPoint")},
            "windows": {"type": "object", "additionalProperties": _PAIR},
        }
    ),
    "ActiveJob": _obj({"queue": _STR, "id": _STR, "name": _STR, "started_at": _NUM}),
    "Worker": _obj(
        {
            "id": _STR,
            "pid": _INT,
            "host": _STR,
            "name": _STR,
            "queues": {"type": "array", "items": _STR},
            "connected_at": _NUM,
            "last_seen": _NUM,
            "active": {"type": "array", "items": _ref("ActiveJob")},
            "state": {"enum": ["connected", "gone"]},
            "can_requeue": {"type": "boolean"},
        }
    ),
    "Workers": _obj({"workers": {"type": "array", "items": _ref("Worker")}}),
    "TrackedJob": _obj(
        {
            "id": _STR,
            "queue": _STR,
            "name": _STR,
            "state": {"enum": ["pending", "active", "processed", "failed"]},
            "enqueued_at": _NNUM,
            "started_at": _NNUM,
            "finished_at": _NNUM,
            "runtime": _NNUM,
        }
    ),
    "TrackedPage": _obj(
        {
            "queue": _STR,
            "page": {"type": "integer", "minimum": 1},
            "page_size": _INT,
            "jobs": {"type": "array", "items": _ref("TrackedJob")},
        }
    ),
}
_PAGE = {"name": "page", "in": "query", "required": False, "schema": {"type": "integer"}}
_QUEUE = {"name": "queue", "in": "path", "required": True, "schema": _STR}
OPENAPI_PATHS: dict[str, Any] = {
    "/queues/api/history": _get(
        "A queue's history (per minute 24 h, per hour 30 days) and rolling windows",
        "History",
        [
            {"name": "queue", "in": "query", "required": True, "schema": _STR},
            {"name": "resolution", "in": "query", "schema": {"enum": list(RESOLUTIONS)}},
        ],
    ),
    "/queues/api/workers": _get("Connected and recently gone workers", "Workers", []),
    "/queues/api/queues/{queue}/pending": _get(
        "Tracked jobs pushed and not started, oldest first", "TrackedPage", [_QUEUE, _PAGE]
    ),
    "/queues/api/queues/{queue}/recent": _get(
        "Tracked jobs finished, newest first", "TrackedPage", [_QUEUE, _PAGE]
    ),
}


def _bad(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=400)


def _rows(items: Any) -> list[Any]:
    return [i.to_dict() if hasattr(i, "to_dict") else i for i in items]


class _Api:
    def __init__(self, inspector: Any) -> None:
        self.inspector = inspector

    async def history(self, request: web.Request) -> web.Response:
        queue = request.query.get("queue")
        if not queue:
            return _bad("queue is required: ?queue=NAME")
        resolution = request.query.get("resolution", "minute")
        if resolution not in RESOLUTIONS:
            return _bad(f"resolution must be 'minute' or 'hour', not {resolution!r}")
        ins = self.inspector
        points = await ins.history(queue, resolution) if hasattr(ins, "history") else []
        windows = await ins.windows(queue) if hasattr(ins, "windows") else {}
        body = {"queue": queue, "resolution": resolution, "points": points, "windows": windows}
        return web.json_response(body)

    async def workers(self, request: web.Request) -> web.Response:
        ins = self.inspector
        workers = await ins.workers() if hasattr(ins, "workers") else []
        return web.json_response({"workers": _rows(workers)})

    async def _jobs(self, request: web.Request, method: str) -> web.Response:
        try:
            page = parse_page(request.query.get("page"))
        except ValueError as exc:
            return _bad(str(exc))
        queue = request.match_info["queue"]
        fn = getattr(self.inspector, method, None)
        jobs = await fn(queue, page) if fn is not None else []
        body = {"queue": queue, "page": page, "page_size": PAGE_SIZE, "jobs": _rows(jobs)}
        return web.json_response(body)

    async def pending(self, request: web.Request) -> web.Response:
        return await self._jobs(request, "pending")

    async def recent(self, request: web.Request) -> web.Response:
        return await self._jobs(request, "recent")


def add_routes(router: web.UrlDispatcher, inspector: Any) -> None:
    """Add the lifecycle routes for ``inspector`` to a dashboard app's router."""
    api = _Api(inspector)
    router.add_get("/queues/api/history", api.history, name="qdash.api.history")
    router.add_get("/queues/api/workers", api.workers, name="qdash.api.workers")
    q = "/queues/api/queues/{queue}"
    router.add_get(q + "/pending", api.pending, name="qdash.api.pending")
    router.add_get(q + "/recent", api.recent, name="qdash.api.recent")
