"""``GET /queues/api/events``: one Server-Sent Events stream, computed once, fanned out to all.

Why one producer: 1,000 open dashboards must not mean 1,000 computations. ``EventHub`` (one
per app, ``app[EVENTS]``) runs a single task that, once per ``interval`` and only while
somebody listens, computes the ``stats`` event (the ``/queues/api/stats`` document) and the
``failed`` event (``{"count", "newest"}``), encodes each frame once, and puts the *same*
bytes into every subscriber's bounded queue. An event whose data did not change is not sent
again; after ``heartbeat`` seconds without a frame a comment keeps proxies from timing out.

Frames (text/event-stream, UTF-8)::

    id: <epoch>-<seq>\\n          epoch: 8 hex chars, random per hub; seq: 1, 2, ...
    event: stats | failed\\n
    data: <one line of JSON>\\n
    \\n
    : hb\\n\\n                     heartbeat comment

Resume: a client reconnecting with ``Last-Event-ID`` gets the current state at once (every
event kind, with the ids it was sent under) unless that id is the newest one of this hub — then
it missed nothing. A viewer whose queue is full (``queue_size`` frames not yet written: a slow
or stalled reader) is dropped and its connection closed; nothing is buffered without bound.
``?once=1`` answers the current state and closes (scripts, probes). On server shutdown every
stream ends at once (``on_shutdown``), so a stopping collector never waits for its viewers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from qdash_mp.inspector import Inspector

__all__ = ["EVENTS", "OPENAPI_PATHS", "EventHub", "add_events_route", "events_context"]

log = logging.getLogger("qdash_mp.web.events")

NEWEST = 10
"""How many of the newest failed ids the ``failed`` event carries."""

HEARTBEAT = b": hb\n\n"


@dataclass(eq=False)
class _Subscriber:
    queue: asyncio.Queue[bytes | None]
    transport: asyncio.BaseTransport | None
    dropped: bool = False


@dataclass(eq=False)
class EventHub:
    """The single producer of an app's event stream and its subscribers (see the docstring)."""

    inspector: Inspector
    interval: float = 1.0
    heartbeat: float = 15.0
    queue_size: int = 16
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    computations: int = 0
    """How many times the events were computed (tests and benchmarks count them)."""
    dropped: int = 0
    """How many slow viewers were dropped."""
    _seq: int = 0
    _current: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # kind: (data, frame)
    _subs: set[_Subscriber] = field(default_factory=set)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _computed_at: float = float("-inf")
    _sent_at: float = 0.0
    _task: asyncio.Task[None] | None = None

    @property
    def viewers(self) -> int:
        return len(self._subs)

    @property
    def last_id(self) -> str:
        return f"{self.epoch}-{self._seq}"

    # -- producer ----------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._sent_at = loop.time()
        self._task = loop.create_task(self._run(), name="qdash-events")

    def end_streams(self) -> None:
        """End every open stream now (its handler returns): the server is shutting down."""
        for sub in list(self._subs):
            self._drop(sub, closing=False)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sub in list(self._subs):
            self._drop(sub, closing=False)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._subs:
                self._wake.clear()
                await self._wake.wait()  # idle: compute nothing while nobody listens
                self._sent_at = loop.time()  # a newcomer just got the state
            try:
                frames = await self.refresh()
            except Exception:
                log.exception("computing the dashboard events failed")
                frames = []
            now = loop.time()
            if frames:
                for data in frames:
                    self._fan_out(data)
                self._sent_at = now
            elif now - self._sent_at >= self.heartbeat:
                self._fan_out(HEARTBEAT)
                self._sent_at = now
            await asyncio.sleep(self.interval)

    async def refresh(self, *, max_age: float = 0.0) -> list[bytes]:
        """Compute the events (unless done less than ``max_age`` s ago); the changed frames."""
        async with self._lock:
            if time.monotonic() - self._computed_at < max_age:
                return []
            self.computations += 1
            view = await self.inspector.stats()
            stats = json.dumps(view.to_dict(), separators=(",", ":")).encode()
            count_of = getattr(self.inspector, "failed_count", None)
            jobs = await self.inspector.failed(1)
            count = await count_of() if count_of is not None else len(jobs)
            failed = json.dumps(
                {"count": count, "newest": [j.id for j in jobs[:NEWEST]]}, separators=(",", ":")
            ).encode()
            self._computed_at = time.monotonic()
            return [f for f in (self._set("stats", stats), self._set("failed", failed)) if f]

    def _set(self, kind: str, data: bytes) -> bytes | None:
        old = self._current.get(kind)
        if old is not None and old[0] == data:
            return None
        self._seq += 1
        encoded = b"id: %s\nevent: %s\ndata: %s\n\n" % (
            self.last_id.encode(),
            kind.encode(),
            data,
        )
        self._current[kind] = (data, encoded)
        return encoded

    def _fan_out(self, data: bytes) -> None:
        for sub in list(self._subs):
            try:
                sub.queue.put_nowait(data)
            except asyncio.QueueFull:
                self._drop(sub, closing=True)

    def _drop(self, sub: _Subscriber, *, closing: bool) -> None:
        """Forget ``sub``; its handler wakes on ``None`` (or its blocked write fails)."""
        self._subs.discard(sub)
        if closing:
            self.dropped += 1
            log.info("dropped a slow event-stream viewer (%d frames behind)", self.queue_size)
            if isinstance(sub.transport, asyncio.WriteTransport):
                # abort, not close: close() would wait to flush to the reader that is not
                # reading; a write blocked on its socket raises now.
                sub.transport.abort()
        sub.dropped = True
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)

    # -- subscribers -------------------------------------------------------------------------

    async def subscribe(self, last_event_id: str | None, transport: Any) -> tuple[Any, list[bytes]]:
        """A new subscriber and what to send it first (the current state, if it missed any)."""
        if not self._current:
            # Nobody listened yet: compute now (shared with any viewer arriving meanwhile).
            for data in await self.refresh(max_age=self.interval):
                self._fan_out(data)
        sub = _Subscriber(asyncio.Queue(self.queue_size), transport)
        self._subs.add(sub)
        self._wake.set()
        if last_event_id == self.last_id:
            return sub, []
        return sub, [encoded for _, encoded in self._current.values()]

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._subs.discard(sub)


EVENTS = web.AppKey("qdash_mp.events", EventHub)
"""The app's ``EventHub``."""


async def _end_streams(app: web.Application) -> None:
    """``on_shutdown``: aiohttp waits for running handlers (60 s) before the app's cleanup, so
    the open streams must end here, not in ``stop``."""
    app[EVENTS].end_streams()


async def events_context(app: web.Application) -> AsyncIterator[None]:
    """Run the app's hub for its lifetime (``cleanup_ctx``)."""
    hub = app[EVENTS]
    hub.start()
    yield
    await hub.stop()


async def _events(request: web.Request) -> web.StreamResponse:
    hub = request.app[EVENTS]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "X-Accel-Buffering": "no"}
    )
    once = request.query.get("once") not in (None, "", "0")
    sub, first = await hub.subscribe(request.headers.get("Last-Event-ID"), request.transport)
    try:
        await response.prepare(request)
        await response.write(b"retry: 3000\n\n" + b"".join(first))
        if once:
            return response
        while True:
            data = await sub.queue.get()
            if data is None:
                break
            await response.write(data)
    except (ConnectionResetError, ConnectionError):
        pass  # the viewer left, or was dropped as too slow
    finally:
        hub.unsubscribe(sub)
    return response


def add_events_route(app: web.Application, inspector: Inspector) -> EventHub:
    """``GET /queues/api/events`` on ``app``, with its hub running for the app's lifetime."""
    hub = EventHub(inspector)
    app[EVENTS] = hub
    app.cleanup_ctx.append(events_context)
    app.on_shutdown.append(_end_streams)
    app.router.add_get("/queues/api/events", _events, name="qdash.api.events")
    return hub


OPENAPI_PATHS: dict[str, Any] = {
    "/queues/api/events": {
        "get": {
            "summary": "Live updates as Server-Sent Events: `stats` (the /queues/api/stats "
            "document) and `failed` ({count, newest ids}), computed once per second for all "
            "viewers; heartbeat comments; Last-Event-ID resumes with the current state",
            "parameters": [
                {
                    "name": "once",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["0", "1"]},
                },
                {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {}},
            ],
            "responses": {
                "200": {
                    "description": "the event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "401": {"description": "no or wrong credentials"},
                "403": {"description": "not allowed"},
            },
        }
    }
}
