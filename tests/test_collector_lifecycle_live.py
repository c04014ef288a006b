"""The collector's lifecycle data end to end: workers, active jobs, tracking, history, routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from qdash_testing.collector import reap, run_module, short_dir, wait_for
from qdash_testing.rawclient import RawClient

from qdash_mp import Client, Job
from qdash_mp.collector import Collector
from qdash_mp.inspector import new_inspector
from qdash_mp.settings import CollectorSettings
from qdash_mp.stats import Stats
from qdash_mp.web import create_app
from qdash_mp.web.openapi import OPENAPI
from qdash_mp.wire import Batch, encode

T0 = 1_700_000_040.0  # a minute boundary
TIMEOUT = 30.0


class Clock:
    def __init__(self, t: float = T0 + 1) -> None:
        self.t = t
        self.fail = False
        self.failures = 0

    def __call__(self) -> float:
        if self.fail:
            self.failures += 1
            raise ValueError("a clock that fails (a bug in a tick)")
        return self.t


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


async def get(url: str) -> tuple[int, Any]:
    return await asyncio.to_thread(_get, url)


def conforms(path: str, status: int, body: Any) -> None:
    """``body`` validates against the OpenAPI schema of ``path``'s GET ``status``."""
    op = OPENAPI["paths"][path]["get"]
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    Draft202012Validator({**OPENAPI, "$ref": "#/x", "x": schema}).validate(body)


async def until(predicate: Any, what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; bounded."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        got = predicate()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def collector_settings_kw(clock: Clock) -> dict[str, Any]:
    """The shared ``collector_settings`` with this module's clock."""
    return {"clock": clock}


# --------------------------------------------------------------------------- workers


async def test_workers_appear_show_their_job_and_go_gone(live_collector: Collector) -> None:
    sock = str(live_collector.settings.socket)
    proc = run_module(
        "qdash_testing.lifecycle", mode="worker", socket=sock, name="w-one", queue="mail"
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.strip() == "started"
        url = f"{live_collector.http_url}/queues/api/workers"
        status, body = await get(url)
        conforms("/queues/api/workers", status, body)
        (w,) = body["workers"]
        assert (w["pid"], w["host"], w["name"], w["state"]) == (
            proc.pid, socket.gethostname(), "w-one", "connected",
        )  # fmt: skip
        assert w["queues"] == ["mail"]
        assert [(j["queue"], j["id"], j["name"]) for j in w["active"]] == [
            ("mail", "w-one-1", "work")
        ]
        _, stats = await get(f"{live_collector.http_url}/queues/api/stats")
        assert stats["queues"][0]["active"] == 1
        assert stats["totals"]["active"] == 1
        proc.stdin.write("finish\n")
        proc.stdin.flush()
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "done"
        _, body = await get(url)
        assert body["workers"][0]["active"] == []
        proc.stdin.close()
        assert await asyncio.to_thread(proc.wait, TIMEOUT) == 0
        _, body = await get(url)
        (w,) = body["workers"]
        assert w["state"] == "gone"
    finally:
        reap(proc)


async def test_kill9_worker_mid_job_does_not_stay_active(
    live_collector: Collector, clock: Clock
) -> None:
    sock = str(live_collector.settings.socket)
    proc = run_module(
        "qdash_testing.lifecycle", mode="worker", socket=sock, name="doomed", queue="mail"
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "started"
        view = await live_collector.inspector.stats()
        assert view.totals.active == 1
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, TIMEOUT)

        async def gone() -> bool:
            ws = await live_collector.inspector.workers()
            return bool(ws) and ws[0].state == "gone"

        await until(gone, "the killed worker to be gone")
        view = await live_collector.inspector.stats()
        assert view.totals.active == 0
        assert view.queues[0].active == 0
        (w,) = await live_collector.inspector.workers()
        assert w.active == ()
        clock.t += live_collector.settings.worker_retention + 1
        await until(lambda: len(live_collector.lifecycle.workers) == 0, "the gone worker to expire")
    finally:
        reap(proc)


# --------------------------------------------------------------------------- tracking


async def test_tracking_pages_exact_for_a_small_run(live_collector: Collector) -> None:
    with Client(str(live_collector.settings.socket), track_jobs=True) as client:
        jobs = [Job(id=f"j{i}", name="send") for i in range(5)]
        for job in jobs:
            client.on_pushed("mail", job)
        for job in jobs[:2]:
            client.on_started("mail", job)
            client.on_processed("mail", job, runtime=0.25)
        client.on_started("mail", jobs[2])
        assert await asyncio.to_thread(client.flush, 10)
    base = f"{live_collector.http_url}/queues/api/queues/mail"
    status, body = await get(base + "/pending")
    assert status == 200
    conforms("/queues/api/queues/{queue}/pending", status, body)
    assert body["queue"] == "mail"
    assert body["page"] == 1
    assert [j["id"] for j in body["jobs"]] == ["j3", "j4"]
    assert body["jobs"][0]["state"] == "pending"
    status, body = await get(base + "/recent?page=1")
    conforms("/queues/api/queues/{queue}/recent", status, body)
    assert [(j["id"], j["state"], j["runtime"]) for j in body["jobs"]] == [
        ("j1", "processed", 0.25),
        ("j0", "processed", 0.25),
    ]
    assert (await get(base + "/recent?page=2"))[1]["jobs"] == []


async def test_tracking_is_bounded_for_a_large_run(live_collector: Collector) -> None:
    rc = await RawClient().connect(str(live_collector.settings.socket))
    try:
        t = live_collector.lifecycle.tracking
        events = tuple(("p", "big", f"j{i}", "n", float(i), None) for i in range(12_000))
        for seq, start in enumerate(range(0, 12_000, 4_000), 1):
            rc.send_raw(encode(Batch(seq=seq, events=events[start : start + 4_000])))
            assert await rc.ack() == seq
        assert t.counts("big") == (t.max_pending, 0)
        assert [j.id for j in t.pending("big", 0, 1)] == ["j2000"]
    finally:
        await rc.close()


# --------------------------------------------------------------------------- history


async def _push(sock: str, queue: str, n: int) -> None:
    with Client(sock) as client:
        for _ in range(n):
            client.on_pushed(queue)
        assert await asyncio.to_thread(client.flush, 10)


async def test_history_points_per_minute_survive_a_restart(
    collector_settings: CollectorSettings, clock: Clock
) -> None:
    c = Collector(collector_settings)
    await c.start()
    try:
        await _push(str(collector_settings.socket), "q", 3)
        await until(lambda: "q" in c.lifecycle.history.queues(), "the history to see q")  # type: ignore[union-attr]
        clock.t += 60
        pts = await until(lambda: c.inspector.history("q", "minute"), "a minute point")
        assert [(p["t"], p["pushed"]) for p in pts] == [(T0, 3)]
        await _push(str(collector_settings.socket), "q", 5)
        await asyncio.sleep(0.1)  # a few ticks inside the minute
        clock.t += 60

        async def two() -> bool:
            return len(await c.inspector.history("q", "minute")) == 2

        await until(two, "a second minute point")
    finally:
        await c.stop()
    again = Collector(collector_settings)
    await again.start()
    try:
        pts = await again.inspector.history("q", "minute")
        assert [(p["t"], p["pushed"]) for p in pts] == [(T0, 3), (T0 + 60, 5)]
        status, body = await get(f"{again.http_url}/queues/api/history?queue=q")
        assert status == 200
        conforms("/queues/api/history", status, body)
        assert body["queue"] == "q"
        assert body["resolution"] == "minute"
        assert body["points"] == pts
        _, hours = await get(f"{again.http_url}/queues/api/history?queue=q&resolution=hour")
        assert sum(p["pushed"] for p in hours["points"]) == 8
    finally:
        await again.stop()


def test_history_survives_a_collector_kill9() -> None:
    d = short_dir()
    (d / "clock").write_text(repr(T0 + 1))  # before any collector reads it
    procs: list[subprocess.Popen[str]] = []

    def set_clock(text: str) -> None:  # atomically: the collector reads it at any time
        (d / "clock.tmp").write_text(text)
        (d / "clock.tmp").replace(d / "clock")

    def start() -> tuple[str, str]:
        (d / "collector.json").unlink(missing_ok=True)
        procs.append(run_module("qdash_testing.lifecycle", mode="collector", data_dir=d))
        state = wait_for(
            lambda: (
                (d / "collector.json").exists() and json.loads((d / "collector.json").read_text())
            ),
            TIMEOUT,
            "the collector to be ready",
        )
        return state["socket"], state["http"]

    def points(http: str) -> list[dict[str, Any]]:
        return _get(f"{http}/queues/api/history?queue=q")[1]["points"]  # type: ignore[no-any-return]

    def push(sock: str, n: int) -> None:
        with Client(sock) as client:
            for _ in range(n):
                client.on_processed("q")
            assert client.flush(10)

    try:
        sock, http = start()
        push(sock, 4)
        wait_for(lambda: any((d / "history").glob("q-*.qh")), TIMEOUT, "the history file")
        set_clock(repr(T0 + 61))
        wait_for(lambda: points(http), TIMEOUT, "the first minute point")
        push(sock, 6)
        os.kill(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait(TIMEOUT)
        sock, http = start()
        assert [(p["t"], p["processed"]) for p in points(http)] == [(T0, 4)]

        def total() -> int:
            return sum(p["processed"] for p in points(http))

        # The first tick after the restart opens a minute; the minute closed after it
        # carries what came in meanwhile: the 6 counted before the kill.
        for k in range(10):
            set_clock(repr(T0 + 125 + 60 * k))
            with contextlib.suppress(AssertionError):
                wait_for(lambda: total() == 10, 3.0, "the 6 counted before the kill", 0.05)
                break
        assert sum(p["processed"] for p in points(http)) == 10  # nothing lost
    finally:
        for p in procs:
            reap(p)
        # The last collector is reaped with SIGKILL too: its segment is left, like a crash's.
        for seg in Path("/dev/shm").glob(CollectorSettings(data_dir=d).shm + "*"):
            seg.unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- routes


async def test_routes_json_shapes_and_400s(live_collector: Collector) -> None:
    base = f"{live_collector.http_url}/queues/api"
    for path, route, word in [
        ("/history", "/history", "queue"),
        ("/history?queue=q&resolution=day", "/history", "resolution"),
        ("/queues/q/pending?page=0", "/queues/{queue}/pending", "page"),
        ("/queues/q/recent?page=x", "/queues/{queue}/recent", "page"),
    ]:
        status, body = await get(base + path)
        assert status == 400, path
        assert word in body["error"]
        conforms("/queues/api" + route, status, body)
    assert await get(base + "/history?queue=nope") == (
        200,
        {"queue": "nope", "resolution": "minute", "points": [], "windows": _empty_windows()},
    )
    assert await get(base + "/workers") == (200, {"workers": []})
    for kind in ("pending", "recent"):
        assert await get(f"{base}/queues/nope/{kind}?page=2") == (
            200,
            {"queue": "nope", "page": 2, "page_size": 50, "jobs": []},
        )


def _empty_windows() -> dict[str, Any]:
    empty = {"count": 0, "p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    return {w: {"runtime": empty, "wait": empty} for w in ("1m", "5m", "1h")}


async def test_routes_work_embedded() -> None:
    stats = Stats(track_jobs=True)
    stats.on_pushed("mail", Job(id="a", name="n"))
    app = create_app(new_inspector(stats, None))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}/queues/api"
        status, body = await get(base + "/queues/mail/pending")
        assert status == 200
        assert [j["id"] for j in body["jobs"]] == ["a"]
        assert await get(base + "/workers") == (200, {"workers": []})
        status, body = await get(base + "/history?queue=mail")
        assert (status, body["points"]) == (200, [])
        assert (await get(base + "/history?queue=mail&resolution=week"))[0] == 400
    finally:
        await runner.cleanup()


async def test_a_broken_history_dir_leaves_the_collector_counting(
    collector_settings: CollectorSettings,
) -> None:
    history = collector_settings.data_dir / "history"
    history.mkdir(parents=True)
    (history / ("q-" + "0" * 32 + ".qh")).write_bytes(b"not a history file")
    c = Collector(collector_settings)
    await c.start()
    try:
        assert c.lifecycle.history is None
        await _push(str(collector_settings.socket), "q", 2)
        status, body = await get(f"{c.http_url}/queues/api/history?queue=q")
        assert (status, body["points"]) == (200, [])
        view = await c.inspector.stats()
        assert view.totals.pushed == 2
    finally:
        await c.stop()


async def test_a_tick_that_raises_does_not_stop_the_ticks(
    live_collector: Collector, clock: Clock
) -> None:
    clock.fail = True
    await until(lambda: clock.failures >= 2, "two failed ticks")
    clock.fail = False
    await _push(str(live_collector.settings.socket), "q", 3)
    history = live_collector.lifecycle.history
    assert history is not None
    await until(lambda: "q" in history.queues(), "a tick after the failures")
    clock.t += 60
    pts = await until(lambda: live_collector.inspector.history("q", "minute"), "a minute point")
    assert pts[0]["pushed"] == 3
