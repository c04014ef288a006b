"""The failed-job pages and routes: the filtered list, its JSON, a job's page, flush, bulk.

Routes (names for ``web.authz``)::

    GET  /queues/failed?queue=&name=&q=&after=&before=&page=&snapshot=   qdash.failed
    GET  /queues/api/failed?...same...&since=                            qdash.api.failed
    GET  /queues/failed/{id}                                              qdash.job
    POST /queues/failed/flush        (snapshot: only what the page counted) qdash.flush
    POST /queues/failed/retry        ids=... | filter + snapshot          qdash.bulk.retry
    POST /queues/failed/forget       ids=... | filter + snapshot          qdash.bulk.forget
    GET  /queues/failed/bulk/{task}, /queues/api/bulk/{task}              progress

Filters are ``qdash_mp.failed_filter`` (400 with the reason when invalid); snapshots are
``qdash_mp.web.snapshot`` tokens. The list is taken at a snapshot and its pager links carry
it, so pages do not shift while failures arrive; ``static/failed.js`` shows "N new" from the
``failed`` SSE event by asking ``/api/failed?since=<snapshot>`` for the count. Inspectors
without ``FailedQueries`` get the plain unfiltered list.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlencode

from aiohttp import web

from qdash_mp.audit import AuditEntry
from qdash_mp.errors import NotFound
from qdash_mp.failed_filter import FailedFilter, FilterError, parse_filter
from qdash_mp.inspector import FailedPage, FailedQueries
from qdash_mp.models import PAGE_SIZE
from qdash_mp.web import csrf, snapshot
from qdash_mp.web.authz import current
from qdash_mp.web.bulk import BulkRunner, BulkTask, read_bulk_body
from qdash_mp.web.display import pretty
from qdash_mp.web.guard import guarded_form, wants_json
from qdash_mp.web.paging import last_page, page_numbers, parse_back_page

if TYPE_CHECKING:
    from qdash_mp.web.views import Dashboard

__all__ = ["FailedViews", "add_failed_routes"]

_WAIT_INLINE = 2.0
"""A bulk action that ends within this many seconds answers with its result directly."""


class FailedViews:
    """Handlers of the failed-job routes (see the module docstring)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.d = dashboard
        self.bulk = BulkRunner()

    # -- helpers -----------------------------------------------------------------------------

    @property
    def queries(self) -> FailedQueries | None:
        insp = self.d.inspector
        return insp if isinstance(insp, FailedQueries) else None

    @staticmethod
    def _filter(params: Any) -> FailedFilter:
        try:
            return parse_filter(params)
        except FilterError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None

    def _snapshot(self, token: str | None, what: str = "snapshot") -> int | None:
        q = self.queries
        if not token or q is None:
            return None
        try:
            return snapshot.verify(self.d.secret, q.failed_epoch, token)
        except snapshot.SnapshotError as exc:
            raise web.HTTPBadRequest(text=f"{what}: {exc}") from None

    def _token(self, hw: int) -> str:
        q = self.queries
        return "" if q is None else snapshot.sign(self.d.secret, q.failed_epoch, hw)

    def _list_url(self, flt: FailedFilter, page: int = 1, token: str = "") -> str:
        params = flt.to_query()
        if page > 1:
            params["page"] = str(page)
        if token:
            params["snapshot"] = token
        base = self.d.urls().failed()
        return f"{base}?{urlencode(params)}" if params else base

    async def _query(
        self, flt: FailedFilter, page: int, hw: int | None, since: int | None = None
    ) -> FailedPage | None:
        q = self.queries
        if q is None:
            return None
        return await q.failed_query(flt, page, snapshot=hw, since=since)

    # -- pages -------------------------------------------------------------------------------

    async def failed_list(self, request: web.Request) -> web.Response:
        requested = self.d._page(request)
        flt = self._filter(request.query)
        hw = self._snapshot(request.query.get("snapshot"))
        result = await self._query(flt, requested, hw)
        if result is None:  # a plain Inspector: the unfiltered list
            if not flt.empty:
                raise web.HTTPBadRequest(text="this inspector cannot filter failed jobs")
            return await self._plain_list(request, requested)
        total = result.total
        last = last_page(total)
        page = min(requested, last)
        if page != requested:
            result = await self._query(flt, page, hw)
            assert result is not None
        token = self._token(result.snapshot)
        notice = None
        if page != requested:
            notice = f"There is no page {requested}; showing the last page, {page}."
        q = self.queries
        assert q is not None
        queues = sorted({j.queue for j in result.rows})
        retryable = {name: q.can_retry(name) for name in queues}
        return self.d.render(
            request,
            "failed.html",
            active="failed",
            jobs=result.rows,
            page=page,
            numbers=page_numbers(page, last),
            has_prev=page > 1,
            has_next=page < last,
            notice=notice,
            failed_total=await self.d._failed_total(),
            matching=total,
            details=self.d.details is not None,
            flt=flt,
            filter_fields=flt.to_query(),
            snapshot=token,
            page_url=lambda n: self._list_url(flt, n, token),
            clear_url=self.d.urls().failed(),
            fresh_url=self._list_url(flt),
            retryable=retryable,
            bulk=True,
            api_since=f"{self.d.urls().api_failed}?{urlencode({**flt.to_query(), 'since': token})}",
        )

    async def _plain_list(self, request: web.Request, requested: int) -> web.Response:
        page, jobs, total, last = await self.d._failed_page(requested)
        notice = None
        if page != requested:
            notice = f"There is no page {requested}; showing the last page, {page}."
        elif not jobs and page > 1:
            notice = f"Page {page} is empty; the list is shorter than that."
        if last is not None:
            numbers = page_numbers(page, last)
            has_next = page < last
        else:
            numbers = page_numbers(page, page) if jobs else []
            has_next = len(jobs) >= PAGE_SIZE
        return self.d.render(
            request,
            "failed.html",
            active="failed",
            jobs=jobs,
            page=page,
            numbers=numbers,
            has_prev=page > 1,
            has_next=has_next,
            notice=notice,
            failed_total=total,
            matching=total,
            details=self.d.details is not None,
            flt=FailedFilter(),
            filter_fields={},
            snapshot="",
            page_url=self.d.urls().failed,
            clear_url=self.d.urls().failed(),
            fresh_url=self.d.urls().failed(),
            retryable=None,
            bulk=False,
            api_since="",
        )

    async def job_page(self, request: web.Request) -> web.Response:
        back = parse_back_page(request.query.get("page"))
        job = await self.d._job(request)
        q = self.queries
        history = await q.failed_history(job.id) if q is not None else []
        can_retry = q.can_retry(job.queue) if q is not None else True
        payload_text = pretty(job.job.payload)
        return self.d.render(
            request,
            "job.html",
            active="failed",
            job=job,
            payload=payload_text,
            page=back,
            history=history,
            retryable={job.queue: can_retry},
            failed_total=await self.d._failed_total(),
        )

    # -- JSON --------------------------------------------------------------------------------

    async def api_failed(self, request: web.Request) -> web.Response:
        page = self.d._page(request)
        flt = self._filter(request.query)
        hw = self._snapshot(request.query.get("snapshot"))
        since = self._snapshot(request.query.get("since"), "since")
        result = await self._query(flt, page, hw, since)
        if result is None:
            if not flt.empty:
                raise web.HTTPBadRequest(text="this inspector cannot filter failed jobs")
            return await self._plain_api(page)
        last = last_page(result.total)
        rows = [] if page > last else result.rows
        response = web.json_response(
            {
                "page": page,
                "page_size": PAGE_SIZE,
                "total": result.total,
                "pages": last,
                "filter": flt.to_dict(),
                "jobs": [j.to_dict() for j in rows],
            }
        )
        response.headers["X-Total-Count"] = str(result.total)
        response.headers["X-Qdash-Snapshot"] = self._token(result.snapshot)
        return response

    async def _plain_api(self, page: int) -> web.Response:
        total = await self.d._failed_total()
        last = last_page(total) if total is not None else None
        beyond = last is not None and page > last
        jobs = [] if beyond else await self.d.inspector.failed(page)
        response = web.json_response(
            {
                "page": page,
                "page_size": PAGE_SIZE,
                "total": total,
                "pages": last,
                "filter": {},
                "jobs": [j.to_dict() for j in jobs],
            }
        )
        if total is not None:
            response.headers["X-Total-Count"] = str(total)
        return response

    async def api_bulk(self, request: web.Request) -> web.Response:
        return web.json_response(self._task(request).to_dict())

    def _task(self, request: web.Request) -> BulkTask:
        task = self.bulk.tasks.get(request.match_info["task"])
        if task is None:
            raise web.HTTPNotFound(text="no such bulk action (they are kept for a while only)")
        return task

    async def bulk_page(self, request: web.Request) -> web.Response:
        task = self._task(request)
        return self.d.render(
            request,
            "bulk.html",
            active="failed",
            task=task,
            back_url=request.query.get("back") if _local(request.query.get("back")) else None,
            failed_total=await self.d._failed_total(),
        )

    # -- actions -----------------------------------------------------------------------------

    async def flush(self, request: web.Request) -> web.Response:
        form = await guarded_form(request, self.d.secret)
        hw = self._snapshot(form.get("snapshot"))
        q = self.queries
        if hw is not None and q is not None:
            n = await q.flush_before(hw)
        else:
            n = await self.d.inspector.flush_failed()
        plural = "" if n == 1 else "s"
        return self.d._done(
            request, 1, f"Flushed {n} failed job{plural}.", data={"action": "flush", "flushed": n}
        )

    async def bulk_retry(self, request: web.Request) -> web.Response:
        return await self._bulk(request, "retry")

    async def bulk_forget(self, request: web.Request) -> web.Response:
        return await self._bulk(request, "forget")

    async def _bulk(self, request: web.Request, action: Literal["retry", "forget"]) -> web.Response:
        body = await read_bulk_body(request)
        if not current().csrf_exempt:
            problem = csrf.check_request(request, self.d.secret, body)
            if problem is not None:
                raise web.HTTPForbidden(text=problem)
        q = self.queries
        if q is None:
            raise web.HTTPNotFound(text="this inspector has no bulk actions")
        ids: list[str] = body["ids"]
        if body.get("scope") == "selected" and not ids:  # "Retry selected" with none checked
            raise web.HTTPBadRequest(text="no job selected: tick the jobs to act on first")
        flt = self._filter(body)
        token = body.get("snapshot") or ""
        hw = self._snapshot(token)
        if ids:
            if hw is not None:  # a job that failed again since the page was shown: not it
                seqs = [await q.failed_seq(i) for i in ids]
                ids = [i for i, s in zip(ids, seqs, strict=True) if s is not None and s < hw]
            audit_filter = None
        else:
            if hw is None:
                raise web.HTTPBadRequest(
                    text="give ids, or the filter with the snapshot of the page you looked at"
                )
            ids = await q.failed_ids(flt, hw)
            audit_filter = {**flt.to_dict(), "snapshot": hw}
        if action == "retry":
            queues = {j.queue for j in await self._queues_of(q, ids[:PAGE_SIZE])}
            dead = sorted(name for name in queues if not q.can_retry(name))
            if dead and len(dead) == len(queues):
                raise web.HTTPConflict(
                    text=f"no requeue route for queue {dead[0]!r}: start a worker with "
                    "Client(requeue=...) or the collector with --requeue"
                )
        identity = current().identity
        who = identity.user if identity is not None else "anonymous"
        access = current()
        access.audit.update(filter=audit_filter, count=len(ids))
        if audit_filter is None:
            access.audit["ids"] = ids[:PAGE_SIZE]
        task = self.bulk.start(
            q, self.d.inspector.retry, action, ids, who, audit_filter, self._audit_done(request)
        )
        assert task.task is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task.task), _WAIT_INLINE)
        back = self._list_url(flt)
        if task.state != "running":
            access.audit.update(count=task.done, message=task.message)
            if wants_json(request):
                return web.json_response(
                    {"ok": True, "action": action, **task.to_dict(), "count": task.done}
                )
            return self.d._done(
                request, 1, task.message, status=200 if not task.failed else 409, location=back
            )
        access.audit.update(message=f"started bulk {action} of {task.total} job(s): task {task.id}")
        status_url = f"{self.d.urls().base}failed/bulk/{task.id}"
        if wants_json(request):
            body_json = {
                "ok": True,
                **task.to_dict(),
                "status": f"{self.d.urls().base}api/bulk/{task.id}",
            }
            return web.json_response(body_json, status=202)
        raise web.HTTPSeeOther(f"{status_url}?{urlencode({'back': back})}")

    @staticmethod
    async def _queues_of(q: FailedQueries, ids: list[str]) -> list[Any]:
        insp: Any = q
        out = []
        for id in ids:
            try:
                out.append(await insp.failed_job(id))
            except (NotFound, AttributeError):
                continue
        return out

    def _audit_done(self, request: web.Request) -> Any:
        from qdash_mp.web.app import ACCESS  # the app module imports this one

        audit = request.app[ACCESS].audit
        remote = request.remote or "?"

        async def record(task: BulkTask) -> None:
            if task.finished is not None and task.finished - task.started < _WAIT_INLINE:
                return  # answered inline: the request's own audit entry has the result
            await audit.append(
                AuditEntry(
                    t=time.time(),
                    who=task.who,
                    remote=remote,
                    action=task.action,
                    filter=task.filter,
                    count=task.done,
                    result=f"bulk task {task.id} {task.state}: {task.message}",
                    status=200 if task.state == "done" else 500,
                )
            )

        return record


def _local(url: str | None) -> bool:
    return bool(url) and url.startswith("/") and not url.startswith("//")  # type: ignore[union-attr]


def add_failed_routes(router: web.UrlDispatcher, dashboard: Dashboard) -> FailedViews:
    """Register the failed-job routes (see the module docstring)."""
    v = FailedViews(dashboard)
    router.add_get("/queues/failed", v.failed_list, name="qdash.failed")
    router.add_post("/queues/failed/flush", v.flush, name="qdash.flush")
    router.add_post("/queues/failed/retry", v.bulk_retry, name="qdash.bulk.retry")
    router.add_post("/queues/failed/forget", v.bulk_forget, name="qdash.bulk.forget")
    router.add_get("/queues/failed/bulk/{task}", v.bulk_page, name="qdash.bulk.status")
    router.add_get("/queues/failed/{id}", v.job_page, name="qdash.job")
    router.add_get("/queues/api/failed", v.api_failed, name="qdash.api.failed")
    router.add_get("/queues/api/bulk/{task}", v.api_bulk, name="qdash.api.bulk")
    return v
