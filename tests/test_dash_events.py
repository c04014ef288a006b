"""``GET /queues/api/events``: one computation per interval for every viewer, identical bytes
to all, heartbeats, ``Last-Event-ID`` resume, and a slow viewer dropped (not buffered)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from qdash_mp import Job, MemoryFailedJobs, Stats, create_app, new_inspector
from qdash_mp.web.events import EVENTS, EventHub

TIMEOUT = 10.0


async def make(aiohttp_client: Any, *, queues: int = 1) -> tuple[Any, Stats, MemoryFailedJobs]:
    stats = Stats()
    failed = MemoryFailedJobs(requeue=lambda job: None).with_stats(stats)
    for i in range(queues):
        stats.on_pushed(f"q{i}")
    failed.record(Job(id="j0", name="send", payload={}), "q0", "boom")
    app = create_app(new_inspector(stats, failed))
    hub = app[EVENTS]
    hub.interval = 0.02
    return await aiohttp_client(app), stats, failed


def hub_of(client: Any) -> EventHub:
    return client.app[EVENTS]


async def read_frame(resp: Any) -> bytes:
    """The next frame (through its blank line), as the raw bytes sent."""
    lines = []
    while True:
        line = await asyncio.wait_for(resp.content.readline(), TIMEOUT)
        assert line, "stream ended"
        lines.append(line)
        if line == b"\n":
            return b"".join(lines)


def fields(raw: bytes) -> dict[str, str]:
    out = {}
    for line in raw.decode().splitlines():
        if line and not line.startswith(":"):
            key, _, value = line.partition(": ")
            out[key] = value
    return out


async def test_viewers_get_identical_bytes_from_one_computation(aiohttp_client: Any) -> None:
    client, stats, _ = await make(aiohttp_client)
    hub = hub_of(client)
    viewers = [await client.get("/queues/api/events") for _ in range(20)]
    for resp in viewers:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-store"
        assert await read_frame(resp) == b"retry: 3000\n\n"
        first = {fields(await read_frame(resp))["event"] for _ in range(2)}
        assert first == {"stats", "failed"}
    assert hub.viewers == 20
    before = hub.computations
    got: list[list[bytes]] = [[] for _ in viewers]
    for _ in range(5):  # five changes, each seen by every viewer
        stats.on_pushed("q0")
        for i, resp in enumerate(viewers):
            got[i].append(await read_frame(resp))
    assert all(g == got[0] for g in got)  # the same encoded bytes, in the same order
    assert {fields(f)["event"] for f in got[0]} == {"stats"}
    ids = [fields(f)["id"] for f in got[0]]
    assert len(set(ids)) == 5
    pushed = [json.loads(fields(f)["data"])["totals"]["pushed"] for f in got[0]]
    assert pushed == [2, 3, 4, 5, 6]
    # once per interval, not once per viewer: 20 viewers x 5 updates would be >= 100
    assert 5 <= hub.computations - before < 40
    for resp in viewers:
        resp.close()


async def test_idle_hub_computes_nothing_and_sends_heartbeats(aiohttp_client: Any) -> None:
    client, _, _ = await make(aiohttp_client)
    hub = hub_of(client)
    await asyncio.sleep(0.1)
    assert hub.computations == 0  # nobody listens
    hub.heartbeat = 0.05
    resp = await client.get("/queues/api/events")
    for _ in range(3):
        await read_frame(resp)  # retry, stats, failed
    assert await read_frame(resp) == b": hb\n\n"  # nothing changed: only a heartbeat
    resp.close()


async def test_failed_event_and_resume(aiohttp_client: Any) -> None:
    client, _, failed = await make(aiohttp_client)
    body = await (await client.get("/queues/api/events?once=1")).read()
    frames = body.split(b"\n\n")
    by_event = {fields(f)["event"]: fields(f) for f in frames if b"event:" in f}
    assert json.loads(by_event["failed"]["data"]) == {"count": 1, "newest": ["j0"]}
    newest = max((by_event[k]["id"] for k in by_event), key=lambda i: int(i.split("-")[1]))
    # up to date: nothing missed, nothing sent
    resp = await client.get("/queues/api/events?once=1", headers={"Last-Event-ID": newest})
    assert await resp.read() == b"retry: 3000\n\n"
    # behind (a failure since): the current state at once, under new ids
    failed.record(Job(id="j1", name="send", payload={}), "q0", "boom")
    live = await client.get("/queues/api/events")  # wakes the producer
    for _ in range(3):
        await read_frame(live)
    for _ in range(int(TIMEOUT / 0.02)):
        resp = await client.get("/queues/api/events?once=1", headers={"Last-Event-ID": newest})
        body = await resp.read()
        if b'"count":2' in body:
            break
        await asyncio.sleep(0.02)
    assert b'"newest":["j1","j0"]' in body
    assert b"event: stats" in body  # the whole state, not just what changed
    # another hub's id (a restarted server): the full state
    resp = await client.get("/queues/api/events?once=1", headers={"Last-Event-ID": "0000-1"})
    assert (await resp.read()).count(b"event: ") == 2
    live.close()


async def test_slow_viewer_is_dropped_not_buffered(aiohttp_client: Any) -> None:
    client, stats, _ = await make(aiohttp_client, queues=1500)  # ~400 kB frames
    hub = hub_of(client)
    hub.queue_size = 2
    fast = await client.get("/queues/api/events")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((client.host, client.port))
    slow.sendall(f"GET /queues/api/events HTTP/1.1\r\nHost: {client.host}\r\n\r\n".encode())
    try:
        for _ in range(int(TIMEOUT / 0.01)):
            if hub.dropped:
                break
            stats.on_pushed("q0")
            await read_frame(fast)
        assert hub.dropped == 1
        assert hub.viewers == 1  # the fast one stays
        stats.on_pushed("q0")
        while fields(await read_frame(fast)).get("event") != "stats":
            pass
        slow.settimeout(TIMEOUT)
        received = 0
        try:
            while chunk := slow.recv(1 << 20):  # the server closed it
                received += len(chunk)
        except ConnectionResetError:
            pass  # aborted: the unsent rest is thrown away
        assert received < 32 * (1 << 20)  # kernel buffers at most, not every frame
    finally:
        slow.close()
        fast.close()


async def test_server_shutdown_does_not_wait_for_open_event_streams() -> None:
    """A collector stopping with a browser's event stream open stops at once: the hub ends
    every stream on shutdown (it used to wait for aiohttp's 60 s shutdown timeout, since the
    hub's own cleanup runs only after the server has finished its requests)."""
    import shutil

    from qdash_testing.collector import short_dir

    from qdash_mp.collector import Collector
    from qdash_mp.settings import CollectorSettings

    d = short_dir()
    collector = Collector(CollectorSettings(data_dir=d, http_port=0))
    await collector.start()
    try:
        reader, writer = await asyncio.open_connection(*collector.http_url[7:].split(":"))
        writer.write(b"GET /queues/api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert b"200 OK" in head
        await asyncio.wait_for(reader.readuntil(b"event: stats"), TIMEOUT)
        await asyncio.wait_for(collector.stop(), TIMEOUT)
        writer.close()
    finally:
        await collector.stop()
        shutil.rmtree(d, ignore_errors=True)
