"""Bulk actions on failed jobs: reading their request, and running them with progress.

``POST /queues/failed/retry`` and ``/queues/failed/forget`` take a form (``ids`` repeated) or
JSON (``{"ids": [...]}``), or the list's filter keys plus ``snapshot`` (the token of the page
the operator saw, ``qdash_mp.web.snapshot``). The ids acted on are fixed when the request
arrives: the given ids whose stored record is not newer than the snapshot, or the ids matching
the filter recorded before it. Later failures are never touched.

A ``BulkTask`` then works through them in the background, one chunk at a time, counting
``done`` / ``skipped`` (gone meanwhile) / ``failed`` (a requeue that raised): the status is
``GET /queues/failed/bulk/{task}`` (HTML, refreshes itself) and ``/queues/api/bulk/{task}``.
Forget commits a chunk of removals with one fsync; retry goes job by job through the same
exactly-once retry as the single button. Interrupted (``kill -9``), every job is either done
once (its removal durable) or untouched; see ``docs/web.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import parse_qsl

from aiohttp import web

from qdash_mp.errors import NotFound, RetryError
from qdash_mp.inspector import FailedQueries
from qdash_mp.web.guard import MAX_BODY

__all__ = ["BULK_CHUNK", "BulkRunner", "BulkTask", "read_bulk_body"]

log = logging.getLogger("qdash_mp.web.bulk")

BULK_CHUNK: Final = 500
"""Ids per chunk (one commit for forget); progress moves chunk by chunk."""
MAX_IDS: Final = 10_000
"""Most explicit ``ids`` one request may name (a filter has no such limit)."""
_KEEP_TASKS: Final = 50
_MAX_RUNNING: Final = 2

Action = Literal["retry", "forget"]


async def read_bulk_body(request: web.Request) -> dict[str, Any]:
    """The body as ``{key: str, "ids": [str, ...]}`` (form or JSON); 413 / 400 if junk."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY, request.content_length)
    body = await request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY, len(body))
    out: dict[str, Any] = {}
    ids: list[str] = []
    if request.content_type == "application/json":
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            raise web.HTTPBadRequest(text="the body is not JSON") from None
        if not isinstance(doc, dict):
            raise web.HTTPBadRequest(text="the JSON body must be an object")
        raw_ids = doc.pop("ids", [])
        if not isinstance(raw_ids, list) or not all(isinstance(i, str) for i in raw_ids):
            raise web.HTTPBadRequest(text="ids must be a list of strings")
        ids = raw_ids
        for key, raw in doc.items():
            value = raw
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                value = str(raw)  # JSON clients may send times as numbers
            if not isinstance(value, str):
                raise web.HTTPBadRequest(text=f"{key} must be a string")
            out[key] = value
    elif request.content_type == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(
                body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_IDS + 20
            )
        except ValueError:
            raise web.HTTPBadRequest(text="unreadable form body") from None
        for key, value in pairs:
            if key == "ids":
                ids.append(value)
            else:
                out.setdefault(key, value)
    if len(ids) > MAX_IDS:
        raise web.HTTPBadRequest(text=f"at most {MAX_IDS} ids per request; use a filter")
    out["ids"] = list(dict.fromkeys(ids))  # once each, in the order given
    return out


@dataclass(eq=False)
class BulkTask:
    """One bulk action in progress (or done)."""

    id: str
    action: Action
    total: int
    who: str
    filter: dict[str, Any] | None
    started: float = field(default_factory=time.time)
    done: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    finished: float | None = None
    state: Literal["running", "done", "cancelled"] = "running"
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.id,
            "action": self.action,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "errors": self.errors[:10],
            "filter": self.filter,
            "started": self.started,
            "finished": self.finished,
        }

    @property
    def message(self) -> str:
        verb = "Retried" if self.action == "retry" else "Forgot"
        text = f"{verb} {self.done:,} of {self.total:,} failed job{'s' if self.total != 1 else ''}"
        extra = []
        if self.skipped:
            extra.append(f"{self.skipped:,} gone meanwhile")
        if self.failed:
            extra.append(f"{self.failed:,} could not be retried: {self.errors[0]}")
        return text + (f" ({'; '.join(extra)})" if extra else "") + "."


class BulkRunner:
    """The app's bulk tasks: at most ``_MAX_RUNNING`` at once, the last ``_KEEP_TASKS`` kept."""

    def __init__(self) -> None:
        self.tasks: dict[str, BulkTask] = {}
        self._ids = itertools.count(1)

    def running(self) -> int:
        return sum(1 for t in self.tasks.values() if t.state == "running")

    def start(
        self,
        insp: FailedQueries,
        retry: Callable[[str], Awaitable[None]],
        action: Action,
        ids: list[str],
        who: str,
        flt: dict[str, Any] | None,
        on_done: Callable[[BulkTask], Awaitable[None]],
    ) -> BulkTask:
        if self.running() >= _MAX_RUNNING:
            raise web.HTTPTooManyRequests(text="two bulk actions are running; wait for one to end")
        task = BulkTask(f"{int(time.time())}-{next(self._ids)}", action, len(ids), who, flt)
        self.tasks[task.id] = task
        while len(self.tasks) > _KEEP_TASKS:
            oldest = next(iter(self.tasks))
            if self.tasks[oldest].state == "running":
                break
            del self.tasks[oldest]
        task.task = asyncio.get_running_loop().create_task(
            self._run(task, insp, retry, ids, on_done)
        )
        return task

    async def _run(
        self,
        task: BulkTask,
        insp: FailedQueries,
        retry: Callable[[str], Awaitable[None]],
        ids: list[str],
        on_done: Callable[[BulkTask], Awaitable[None]],
    ) -> None:
        try:
            for start in range(0, len(ids), BULK_CHUNK):
                chunk = ids[start : start + BULK_CHUNK]
                if task.action == "forget":
                    n = await insp.forget_many(chunk)
                    task.done += n
                    task.skipped += len(chunk) - n
                    continue
                for id in chunk:
                    try:
                        await retry(id)
                    except NotFound:
                        task.skipped += 1
                    except RetryError as exc:
                        task.failed += 1
                        if len(task.errors) < 10:
                            task.errors.append(str(exc))
                    except Exception as exc:  # noqa: BLE001 - a requeue raised: the record stays
                        log.warning("bulk retry of %r: re-enqueue raised %r", id, exc)
                        task.failed += 1
                        if len(task.errors) < 10:
                            task.errors.append(f"{type(exc).__name__}: {exc}")
                    else:
                        task.done += 1
            task.state = "done"
        except asyncio.CancelledError:
            task.state = "cancelled"
            raise
        finally:
            task.finished = time.time()
            try:
                await asyncio.shield(on_done(task))
            except Exception:  # the audit log says why itself
                log.exception("recording bulk task %s failed", task.id)

    async def close(self) -> None:
        for t in self.tasks.values():
            if t.task is not None and not t.task.done():
                t.task.cancel()
        for t in list(self.tasks.values()):
            if t.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t.task
