"""integrations: what qdash_mp's adapters add to a real worker's per-task cost.

For each library (Celery, RQ, Dramatiq, arq, Huey, taskiq) N no-op tasks are enqueued on a
private redis-server, then the library's real worker is started and drains them, once
without qdash_mp (``<lib>_plain``) and once with its adapter (``<lib>_qdash``) reporting to a
real collector; for Celery also with Celery's own task events on (``-E``, what Flower needs;
``celery_events``). Every task stamps Redis (SETNX first, SET last, INCR n: one pipelined
round trip, the same in every mode), and the per-task cost is ``(last - first) / (N - 1)``:
worker start-up is outside the window. The modes of a library take turns within a repeat
(after one unmeasured warm-up drain), and ratios are paired per repeat. Workers run one
task at a time where the library allows it (prefork -c 1, one process and thread, -w 1;
arq and taskiq keep their async defaults).

Rows: ``us/task`` per subject; ``<lib>_qdash`` has ratio to ``<lib>_plain`` (overhead =
ratio - 1); ``celery_qdash`` also has a paired ratio to ``celery_events``. The app modules
are written to a temporary directory at run time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from _common import (
    BenchError,
    Config,
    Row,
    Skip,
    paired_ratios,
    progress,
    short_dir,
    skipped_row,
    start_collector,
    start_redis,
    wait_for,
)

BENCH = "integrations"
UNIT = "us/task"

COMMON = """
import os, time
import redis
URL = os.environ["BENCH_REDIS"]
QUEUE = os.environ["BENCH_QUEUE"]
KEY = os.environ["BENCH_KEY"]
QDASH = os.environ.get("BENCH_QDASH") == "1"
_R = redis.Redis.from_url(URL)
def stamp():
    p = _R.pipeline(transaction=False)
    t = time.time()
    p.setnx(KEY + ":first", t)
    p.set(KEY + ":last", t)
    p.incr(KEY + ":n")
    p.execute()
"""

APPS: dict[str, str] = {
    "celery": """
from bcommon import QDASH, QUEUE, URL, stamp
from celery import Celery
app = Celery("bapp", broker=URL)
app.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False)
if QDASH:
    from qdash_mp.integrations.celery import install
    install(app)
@app.task(name="b.noop")
def noop():
    stamp()
def produce(n):
    for _ in range(n):
        noop.delay()
""",
    "rq": """
from bcommon import QUEUE, URL, stamp
def noop():
    stamp()
def produce(n):
    from redis import Redis
    from rq import Queue
    q = Queue(QUEUE, connection=Redis.from_url(URL))
    for _ in range(n):
        q.enqueue("bapp_rq.noop")
""",
    "dramatiq": """
from bcommon import QDASH, QUEUE, URL, stamp
import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries
broker = RedisBroker(url=URL)
if QDASH:
    from qdash_mp.integrations.dramatiq import QdashMiddleware
    broker.add_middleware(QdashMiddleware(), before=Retries)
dramatiq.set_broker(broker)
@dramatiq.actor(queue_name=QUEUE, actor_name="noop")
def noop():
    stamp()
def produce(n):
    for _ in range(n):
        noop.send()
""",
    "arq": """
import asyncio
from bcommon import QDASH, QUEUE, URL, stamp
from arq import create_pool
from arq.connections import RedisSettings
REDIS = RedisSettings.from_dsn(URL)
async def noop(ctx):
    stamp()
class WorkerSettings:
    functions = [noop]
    queue_name = QUEUE
    redis_settings = REDIS
    poll_delay = 0.05
if QDASH:
    from qdash_mp.integrations.arq import instrument
    instrument(WorkerSettings)
def produce(n):
    async def go():
        pool = await create_pool(REDIS, default_queue_name=QUEUE)
        for _ in range(n):
            await pool.enqueue_job("noop")
        await pool.aclose()
    asyncio.run(go())
""",
    "huey": """
from urllib.parse import urlparse
from bcommon import QDASH, QUEUE, URL, stamp
from huey import RedisHuey
_u = urlparse(URL)
huey = RedisHuey(QUEUE, host=_u.hostname, port=_u.port, results=False)
if QDASH:
    from qdash_mp.integrations.huey import install
    install(huey)
@huey.task()
def noop():
    stamp()
def produce(n):
    for _ in range(n):
        noop()
""",
    "taskiq": """
import asyncio
from bcommon import QDASH, QUEUE, URL, stamp
from taskiq_redis import ListQueueBroker
broker = ListQueueBroker(URL, queue_name=QUEUE)
if QDASH:
    from qdash_mp.integrations.taskiq import QdashMiddleware
    broker.add_middlewares(QdashMiddleware())
@broker.task(task_name="noop")
async def noop():
    stamp()
def produce(n):
    async def go():
        await broker.startup()
        for _ in range(n):
            await noop.kiq()
        await broker.shutdown()
    asyncio.run(go())
""",
}

IMPORTS = {
    "celery": "celery",
    "rq": "rq",
    "dramatiq": "dramatiq",
    "arq": "arq",
    "huey": "huey",
    "taskiq": "taskiq_redis",
}


def _worker_argv(lib: str, mode: str, queue: str, redis_url: str) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if lib == "celery":
        argv = [str(bin_dir / "celery"), "-A", "bapp_celery", "worker", "-P", "prefork"]
        argv += ["-c", "1", "-Q", queue, "-l", "warning", "--without-heartbeat"]
        argv += ["--without-gossip", "--without-mingle"]
        return [*argv, "-E"] if mode == "events" else argv
    if lib == "rq":
        argv = [str(bin_dir / "rq"), "worker", "--url", redis_url, "--burst"]
        if mode == "qdash":
            argv += ["--worker-class", "qdash_mp.integrations.rq.Worker"]
        return [*argv, "--logging_level", "WARNING", queue]
    if lib == "dramatiq":
        return [str(bin_dir / "dramatiq"), "bapp_dramatiq", "-p", "1", "-t", "1", "-Q", queue]
    if lib == "arq":
        return [str(bin_dir / "arq"), "bapp_arq.WorkerSettings"]
    if lib == "huey":
        return [str(bin_dir / "huey_consumer"), "bapp_huey.huey", "-w", "1", "-k", "thread"]
    return [str(bin_dir / "taskiq"), "worker", "bapp_taskiq:broker", "--workers", "1"]


def _modes(lib: str) -> list[str]:
    return ["plain", "qdash", "events"] if lib == "celery" else ["plain", "qdash"]


def _one(
    app_dir: Path, lib: str, mode: str, n: int, redis_url: str, socket: str, timeout: float
) -> float:
    """Drain ``n`` pre-enqueued no-op tasks with one worker; seconds per task."""
    import redis

    queue = f"b-{lib}-{uuid.uuid4().hex[:8]}"
    key = f"bench:{queue}"
    env = dict(os.environ)
    env.update(
        BENCH_REDIS=redis_url,
        BENCH_QUEUE=queue,
        BENCH_KEY=key,
        BENCH_QDASH="1" if mode == "qdash" else "0",
        QDASH_SOCKET=socket,
        PYTHONPATH=str(app_dir),
    )
    subprocess.run(
        [sys.executable, "-c", f"import bapp_{lib} as m; m.produce({n})"],
        cwd=app_dir,
        env={**env, "BENCH_QDASH": "0"},  # the producer side is not what is timed
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    log = (app_dir / f"{lib}-{mode}.log").open("ab")
    proc = subprocess.Popen(
        _worker_argv(lib, mode, queue, redis_url),
        cwd=app_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    r = redis.Redis.from_url(redis_url)
    try:
        wait_for(
            lambda: int(r.get(key + ":n") or 0) >= n or proc.poll() not in (None, 0),
            timeout,
            f"{lib}/{mode} to run {n} tasks",
        )
        done = int(r.get(key + ":n") or 0)
        if done != n:
            tail = (app_dir / f"{lib}-{mode}.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"{lib}/{mode}: {done} of {n} tasks ran; worker log:\n{tail}")
        first, last = float(r.get(key + ":first") or 0), float(r.get(key + ":last") or 0)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(10)
        r.close()
    return (last - first) / (n - 1)


def run(cfg: Config) -> list[Row]:
    n, repeats = (200, 2) if cfg.quick else (2000, 3)
    timeout = 120.0 if cfg.quick else 600.0
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        try:
            server = start_redis(stack, cfg)
        except Skip as why:
            return [skipped_row(BENCH, lib, "per_task", UNIT, str(why)) for lib in APPS]
        redis_url = f"redis://127.0.0.1:{server.port}/0"
        collector, _ = start_collector(stack, short_dir(stack, cfg, "qdi"), "--no-http")
        app_dir = short_dir(stack, cfg, "qdapps")
        (app_dir / "bcommon.py").write_text(COMMON)
        for lib, source in APPS.items():
            (app_dir / f"bapp_{lib}.py").write_text(source)
        only = [x for x in os.environ.get("QDASH_BENCH_LIBS", "").split(",") if x]
        for lib in APPS:
            if only and lib not in only:
                continue
            try:
                __import__(IMPORTS[lib])
            except ImportError:
                why = f"{IMPORTS[lib]} is not installed (pip install '.[integrations]')"
                rows += [
                    skipped_row(BENCH, f"{lib}_{m}", "per_task", UNIT, why) for m in _modes(lib)
                ]
                continue
            samples: dict[str, list[float]] = {m: [] for m in _modes(lib)}
            # One unmeasured drain first: imports, page cache and Redis warm up, so the
            # first measured mode is not the one that pays for it.
            _one(app_dir, lib, "plain", max(20, n // 4), redis_url, collector.socket, timeout)
            for rep in range(repeats):
                modes = _modes(lib)
                modes = modes[rep % len(modes) :] + modes[: rep % len(modes)]  # rotate order
                for mode in modes:
                    per_task = _one(app_dir, lib, mode, n, redis_url, collector.socket, timeout)
                    samples[mode].append(per_task * 1e6)
                    progress(f"{BENCH}: {lib}/{mode} rep {rep + 1}: {per_task * 1e6:.0f} us/task")
            plain = Row(BENCH, f"{lib}_plain", "per_task", UNIT, samples=samples["plain"])
            qdash = Row(
                BENCH,
                f"{lib}_qdash",
                "per_task",
                UNIT,
                samples=samples["qdash"],
                reference=f"{lib}_plain",
                ratios=paired_ratios(samples["qdash"], samples["plain"]),
                note=f"{n} no-op tasks, one worker",
            )
            rows += [plain, qdash]
            if "events" in samples:
                qdash.more_ratios["celery_events"] = paired_ratios(
                    samples["qdash"], samples["events"]
                )
                rows.append(
                    Row(
                        BENCH,
                        "celery_events",
                        "per_task",
                        UNIT,
                        samples=samples["events"],
                        reference="celery_plain",
                        ratios=paired_ratios(samples["events"], samples["plain"]),
                        note="celery worker -E (task events, what Flower needs)",
                    )
                )
    if not cfg.keep:
        shutil.rmtree(app_dir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    t0 = time.monotonic()
    for row in run(Config(quick=quick)):
        ratio = f"  x{row.ratio:.3f}" if row.ratio is not None else ""
        more = "".join(f"  vs {k}: x{v:.3f}" for k in row.more_ratios if (v := row.ratio_to(k)))
        print(
            f"{row.subject:16} {row.value or 0:9.1f} {row.unit}{ratio}{more}  {row.skipped or ''}"
        )
    print(f"({time.monotonic() - t0:.0f}s)")
