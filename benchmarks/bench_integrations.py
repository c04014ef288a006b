"""integrations: what qdash_mp's adapters add to a real worker's per-task cost.

For each library (Celery, RQ, Dramatiq, arq, Huey, taskiq) the library's real worker runs
no-op tasks from a private redis-server, without qdash_mp (``<lib>_plain``) and with its
adapter (``<lib>_qdash``) reporting to a real collector; for Celery also with Celery's own
task events on (``-E``, what Flower needs; ``celery_events``), and for RQ with the adapter's
code imported by the worker but not reporting (``rq_import``: RQ forks a horse per job, and
what the parent has loaded costs in every fork). Every task stamps Redis
(SETNX first, SET last, INCR n: one pipelined round trip, the same in every mode), and a
round's per-task cost is ``(last - first) / (N - 1)``: worker start-up is never inside it.
After each block the collector's shared stats must show exactly as many processed tasks on the
qdash worker's queue as it ran (else the run fails): an adapter that reports nothing would
otherwise measure as free.

Sliced rounds. Each mode has a worker (and a producer process), *stopped* (SIGSTOP to its
process group) while idle. A round: every mode's worker gets N tasks (enqueued while it is
stopped); then the workers run in turns of 30 ms (``QDASH_BENCH_SLICE``, ``TURN``; SIGCONT,
sleep, SIGSTOP), one at a time, until each has run its N. A mode's cost a task is the CPU its
worker's process group used in the round, plus what redis-server used during its turns, plus
(the qdash mode) what the collector used beyond its idle rate (``_collector_idle``, measured
per block with every worker stopped, and reported as the ``<lib>_collector idle_cpu`` row: a
cost per second of running a collector, not per task), over N. Why turns: on a shared VM the
speed of a CPU wanders by +-20 % within a tenth of a second (a fixed loop timed in 0.5 ms
chunks: the correlation of two chunks falls from 0.66 at 5 ms apart to 0.13 at 150 ms), so
two modes run one after the other for 0.5 s each (``QDASH_BENCH_SLICE=0``, the earlier
method) met different machines: the per-round ratios of identical code spread by +-15 %
there, and by +-3 % in 10 ms turns. Why 30 ms, not 10: each turn parks and wakes every
thread of the worker, a cost charged per thread that no real worker pays (``TURN``). The
adapter's sender ticks on wall time, which passes while its worker is stopped: with k
modes a worker runs one turn in k, so its batch interval is set to k x 1 s
(``$QDASH_FLUSH_INTERVAL``), and its batches come as often per task as under steady load
(the turns' own overhead, ~10 % of the wall time, leaves it charged slightly more).

One CPU. redis-server, the collector, the workers and the producers all run on the lowest
CPU of the benchmark's affinity (the harness, which only polls, on the others;
``QDASH_BENCH_PIN=0`` turns this off). On this 2-vCPU VM a cross-CPU wake-up costs more than
a Huey task and where the scheduler puts each process changes from round to round: unpinned,
rounds of identical code differed by +-20 %. On one CPU they agree to ~1 %, and wall time
is the sum of every process's CPU: what the sender thread and the collector cost cannot hide
on an idle second core (the conservative reading).

Blocks of fresh workers. A process keeps its memory layout for life, and two processes
running identical code differed by up to +-2 % for as long as they lived; so the rounds are
split into blocks (full 10, quick 2), each with new workers and producers. Within a block
every process runs with the same ``PYTHONHASHSEED`` and the same random memory layout
(``LAYOUT``), both drawn from the block's number (so every run draws the same ten): they
differ from block to block, not between the modes a block compares. N is sized in the
first block to ~0.5 s of the plain worker's CPU (quick 0.15 s). A row's ratio is
the median of the per-round ratios ``qdash / plain``; the quartiles and min-max of those
ratios are in the row's ``extra``. ``QDASH_BENCH_AA=1`` is an A/A control (no adapter in
either mode).

Also per round: CPU seconds of the worker's process group and the collector per task
(``cpu_per_task`` rows, same pairing). Rounds: full 30, quick 8; ``QDASH_BENCH_TASKS`` fixes
N, ``QDASH_BENCH_ROUNDS`` / ``QDASH_BENCH_BLOCKS`` set rounds and blocks, and
``QDASH_BENCH_LIBS=arq,rq`` runs only those libraries. Workers run one task at a time where
the library allows it (prefork -c 1, one process and thread, -w 1; arq and taskiq keep their
async defaults). The app modules are written to a temporary directory at run time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import (
    BenchError,
    Config,
    Row,
    Skip,
    cpu_seconds_fine,
    paired_ratios,
    percentile,
    progress,
    short_dir,
    skipped_row,
    start_collector,
    start_redis,
    wait_for,
)

BENCH = "integrations"
UNIT = "us/task"
REPORT_WAIT = 30.0
"""Seconds the collector's count may take to reach the tasks a qdash worker ran."""

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

LAYOUT = """
# sitecustomize of the benchmark's workers and producers: a random memory layout per block
import os
_seed = int(os.environ.get("BENCH_LAYOUT") or 0)
if _seed:
    import random
    _rng = random.Random(_seed)
    _kept = []
    for _i in range(_rng.randrange(400)):
        _t = type(f"_Layout{_i}", (), {"m": lambda self: None})
        _t().m  # looked up: the type takes a version tag
        _kept.append(_t)
    _kept.append([bytearray(_rng.randrange(8, 1024)) for _ in range(_rng.randrange(4000))])
"""
"""``sitecustomize.py`` in the app directory: every process of a block (workers, horses,
producers, all modes) starts with the same random set of types and objects, a new one each
block. The layout of a process (which pages its objects share; which of CPython's type
attribute cache slots its hot methods collide in) moved RQ's per-job cost by up to +-4 %
between processes of identical code, and consistently so for a given import set: the
adapter's own modules changed it by as much as they cost. So each block draws a layout, as
Stabilizer does (Curtsinger & Berger, ASPLOS 2013), and the medians are over those draws.
``QDASH_BENCH_LAYOUT=0`` turns it off."""

RQ_IMPORT_ONLY = """
import qdash_mp.integrations.rq  # the adapter's code loaded in the parent; nothing reports
from rq import Worker
class ImportOnly(Worker):
    pass
"""
"""``bapp_rq_import``: the worker class of ``rq_import`` (apart from ``bapp_rq``, which every
horse imports for the job function and must stay plain)."""

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
        argv = [str(bin_dir / "rq"), "worker", "--url", redis_url]  # kept: no --burst
        if mode == "qdash":
            argv += ["--worker-class", "qdash_mp.integrations.rq.Worker"]
        elif mode == "import":
            argv += ["--worker-class", "bapp_rq_import.ImportOnly"]
        return [*argv, "--logging_level", "WARNING", queue]
    if lib == "dramatiq":
        return [str(bin_dir / "dramatiq"), "bapp_dramatiq", "-p", "1", "-t", "1", "-Q", queue]
    if lib == "arq":
        return [str(bin_dir / "arq"), "bapp_arq.WorkerSettings"]
    if lib == "huey":
        return [str(bin_dir / "huey_consumer"), "bapp_huey.huey", "-w", "1", "-k", "thread"]
    return [str(bin_dir / "taskiq"), "worker", "bapp_taskiq:broker", "--workers", "1"]


def _control() -> bool:
    """``QDASH_BENCH_AA=1``: an A/A control, the qdash mode runs without the adapter too, so
    its ratio shows what the method reads for no difference at all."""
    return os.environ.get("QDASH_BENCH_AA") == "1"


def _modes(lib: str) -> list[str]:
    extra = {"celery": ["events"], "rq": ["import"]}.get(lib, [])
    return ["plain", "qdash", *extra]


PRODUCER = """
import sys
import bapp_{lib} as m
for line in sys.stdin:
    m.produce(int(line))
    print("ok", flush=True)
"""


class _Mode:
    """One mode of one library: its worker (stopped while idle) and its producer."""

    def __init__(
        self,
        app_dir: Path,
        lib: str,
        mode: str,
        redis_url: str,
        socket: str,
        timeout: float,
        seed: int,
    ) -> None:
        import redis

        self.lib, self.mode, self.timeout, self.app_dir = lib, mode, timeout, app_dir
        queue = f"b-{lib}-{uuid.uuid4().hex[:8]}"
        self.queue = queue
        self.ran = 0
        """Tasks this worker ran (warm-up rounds included): what the collector must count."""
        self.key = f"bench:{queue}"
        env = dict(os.environ)
        env.update(
            BENCH_REDIS=redis_url,
            BENCH_QUEUE=queue,
            BENCH_KEY=self.key,
            BENCH_QDASH="1" if mode == "qdash" and not _control() else "0",
            QDASH_SOCKET=socket,
            PYTHONPATH=str(app_dir),
            PYTHONHASHSEED=str(seed),
            BENCH_LAYOUT=str(seed if os.environ.get("QDASH_BENCH_LAYOUT") != "0" else 0),
        )
        if _slice():
            from qdash_mp.integrations._common import FLUSH_ENV

            env[FLUSH_ENV] = str(_stretched_interval(lib))
        self.redis = redis.Redis.from_url(redis_url)
        self.producer = subprocess.Popen(
            [sys.executable, "-c", PRODUCER.format(lib=lib)],
            cwd=app_dir,
            env={**env, "BENCH_QDASH": "0"},  # the producer side is not what is timed
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.log_path = app_dir / f"{lib}-{mode}.log"
        with self.log_path.open("ab") as log:
            self.worker = subprocess.Popen(
                _worker_argv(lib, mode, queue, redis_url),
                cwd=app_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _signal(self, sig: int) -> None:
        """``sig`` to the worker's process group, and to its children in groups of their own:
        RQ's work horse calls ``setsid``. A horse that took a group's SIGSTOP while it moved
        to its own session stayed stopped, and its worker waited for it forever (seen once
        in ~10 sliced RQ rounds, where the worker is stopped and continued every 10 ms)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.pid, sig)
        for child in _descendants(self.worker.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)

    def round(self, n: int, collector_pid: int) -> tuple[float, float]:
        """Run ``n`` tasks (enqueued while the worker is stopped): (wall seconds per task,
        CPU seconds per task of the worker's processes and the collector)."""
        r, key = self.redis, self.key
        self.prepare(n)
        cpu0 = _group_cpu(self.worker.pid) + (cpu_seconds_fine(collector_pid) or 0.0)
        self._signal(signal.SIGCONT)
        try:
            wait_for(
                lambda: int(r.get(key + ":n") or 0) >= n or self.worker.poll() is not None,
                self.timeout,
                f"{self.lib}/{self.mode} to run {n} tasks",
            )
        finally:
            self._signal(signal.SIGSTOP)
        cpu1 = _group_cpu(self.worker.pid) + (cpu_seconds_fine(collector_pid) or 0.0)
        done = int(r.get(key + ":n") or 0)
        if done != n:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"{self.lib}/{self.mode}: {done} of {n} tasks ran; log:\n{tail}")
        self.ran += n
        first, last = float(r.get(key + ":first") or 0), float(r.get(key + ":last") or 0)
        return (last - first) / (n - 1), (cpu1 - cpu0) / n

    def prepare(self, n: int) -> None:
        """Stop the worker, reset its stamps and enqueue ``n`` tasks (a sliced round's start)."""
        r, key = self.redis, self.key
        self._signal(signal.SIGSTOP)
        r.delete(key + ":first", key + ":last", key + ":n")
        assert self.producer.stdin is not None
        assert self.producer.stdout is not None
        self.producer.stdin.write(f"{n}\n")
        self.producer.stdin.flush()
        if self.producer.stdout.readline().strip() != "ok":
            raise BenchError(f"{self.lib}/{self.mode}: the producer failed")

    def done(self) -> int:
        """Tasks run since ``prepare``."""
        return int(self.redis.get(self.key + ":n") or 0)

    def check_reported(self, reader: Any) -> None:
        """(qdash mode) The collector counted every task this worker ran, exactly: an adapter
        that silently reported nothing would otherwise look free. The worker runs meanwhile
        (its sender ships what the last round counted), then is stopped again."""

        def processed() -> int:
            for q in reader.snapshot().queues:
                if q.queue == self.queue:
                    return int(q.processed)
            return 0

        self._signal(signal.SIGCONT)
        try:
            with contextlib.suppress(BenchError):  # timed out: said below, with the counts
                wait_for(lambda: processed() >= self.ran, REPORT_WAIT, "the collector's count")
        finally:
            self._signal(signal.SIGSTOP)
        if processed() != self.ran:
            raise BenchError(
                f"{self.lib}/{self.mode}: the collector counted {processed()} processed of the "
                f"{self.ran} tasks the worker ran: the adapter does not report (exactly)"
            )

    def close(self) -> None:
        if self.worker.poll() is None:
            self._signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
            self._signal(signal.SIGTERM)
            try:
                self.worker.wait(10)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.worker.wait(10)
        if self.producer.stdin is not None:
            self.producer.stdin.close()
        try:
            self.producer.wait(10)
        except subprocess.TimeoutExpired:
            self.producer.kill()
            self.producer.wait(10)
        if self.producer.stdout is not None:
            self.producer.stdout.close()
        self.redis.close()


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (``/proc/<pid>/task/<pid>/children``, walked down)."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 10_000:  # bounded: a pid list, not a tree walk gone wrong
        parent = todo.pop()
        try:
            text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
        except OSError:
            continue
        kids = [int(x) for x in text.split()]
        found += kids
        todo += kids
    return found


def _group_cpu(pgid: int) -> float:
    """CPU seconds of process group ``pgid`` so far: its live processes' threads (schedstat,
    ns; ticks where there is none) plus the children they reaped (cutime + cstime, ticks:
    RQ's work horses, one per job)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) != pgid:  # field 5, pgrp
            continue
        fine = cpu_seconds_fine(int(entry))
        own = (int(fields[11]) + int(fields[12])) / tick
        total += (own if fine is None else fine) + (int(fields[13]) + int(fields[14])) / tick
    return total


class _Sizes:
    """Tasks a round (None: what the plain worker runs in ``seconds``), rounds, blocks."""

    def __init__(self, cfg: Config) -> None:
        rounds, blocks, self.seconds = (8, 2, 0.15) if cfg.quick else (30, 10, 0.5)
        fixed = os.environ.get("QDASH_BENCH_TASKS")
        self.fixed = max(int(fixed), 20) if fixed else None
        self.rounds = max(int(os.environ.get("QDASH_BENCH_ROUNDS") or rounds), 1)
        self.blocks = min(max(int(os.environ.get("QDASH_BENCH_BLOCKS") or blocks), 1), self.rounds)

    def per_block(self, block: int) -> int:
        """Rounds in block ``block`` (they add up to ``rounds``)."""
        return self.rounds // self.blocks + (block < self.rounds % self.blocks)


@contextlib.contextmanager
def _on_cpu(cpu: int | None) -> Iterator[None]:
    """Processes started inside run on ``cpu`` (children inherit the affinity at fork)."""
    if cpu is None:
        yield
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


@contextlib.contextmanager
def _bench_cpu() -> Iterator[int | None]:
    """The one CPU every process of the benchmark runs on (``QDASH_BENCH_PIN=0``: None).

    Meanwhile the harness itself runs on the other CPUs (if there are any), so its polling
    does not land on the measured one; its affinity is restored on the way out.
    """
    if os.environ.get("QDASH_BENCH_PIN", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    mine = os.sched_getaffinity(0)
    cpus = sorted(mine)
    try:
        os.sched_setaffinity(0, set(cpus[1:]) if len(cpus) > 1 else {cpus[0]})
    except OSError as exc:  # a sandbox that forbids it: measure unpinned, and say so
        progress(f"{BENCH}: cannot pin to one CPU ({exc}); not pinned")
        yield None
        return
    try:
        yield cpus[0]
    finally:
        os.sched_setaffinity(0, mine)


def _spread(ratios: list[float]) -> dict[str, float]:
    """Quartiles and min-max of per-round ratios (nearest rank)."""
    if not ratios:
        return {}
    ordered = sorted(ratios)
    return {
        "ratio_q1": round(percentile(ordered, 25), 4),
        "ratio_q3": round(percentile(ordered, 75), 4),
        "ratio_min": round(ordered[0], 4),
        "ratio_max": round(ordered[-1], 4),
    }


def _vs_plain(lib: str, mode: str, samples: dict[str, list[float]], note: str) -> Row:
    """The per-task row of an extra mode (``celery_events``, ``rq_import``), against plain."""
    ratios = paired_ratios(samples[mode], samples["plain"])
    return Row(
        BENCH,
        f"{lib}_{mode}",
        "per_task",
        UNIT,
        samples=samples[mode],
        reference=f"{lib}_plain",
        ratios=ratios,
        note=note,
        extra=_spread(ratios),
    )


def _stretched_interval(lib: str) -> float:
    """The adapter's batch interval in a sliced run: ``FLUSH_INTERVAL`` times the modes, as
    a worker runs one turn in that many, and its sender ticks on wall time."""
    from qdash_mp.integrations._common import FLUSH_INTERVAL

    return FLUSH_INTERVAL * len(_modes(lib))


TURN = 0.03
"""Seconds a turn (10 ms until 2026-12-03 evening). Every turn stops and continues the worker,
and each of its threads is parked and woken, ~30-40 us of CPU a thread a turn on this VM,
charged to its mode. Measured per thread (schedstat) in Dramatiq workers, which run ~3 tasks
in a 10 ms turn: an adapter whose hooks do nothing but whose sender thread idles was charged
12.9 us a task for that thread in 10 ms turns (1.5 %) and 7-9 us in 20-30 ms ones; Dramatiq's
own idle threads paid the same. Two
Dramatiq-only runs back to back: 1.041 in 10 ms turns, 1.027 in 30 ms; an A/A control in
30 ms turns read 1.008 (quartiles 0.991-1.011), as tight as in 10 ms."""


def _slice() -> float:
    """Seconds a turn in a sliced round (0: the earlier whole-round method)."""
    return max(float(os.environ.get("QDASH_BENCH_SLICE") or TURN), 0.0)


def _sliced_round(
    modes: list[_Mode],
    n: int,
    redis_pid: int,
    collector_pid: int,
    timeout: float,
    idle: float = 0.0,
) -> dict[str, tuple[float, float]]:
    """One sliced round (the module's docstring): per mode, (CPU seconds a task of its
    worker group + its share of redis-server + the collector for the qdash mode, the same
    without redis). ``idle``: the collector's CPU seconds a second with every worker
    stopped, taken off its charge for the round's wall time (``_collector_idle``)."""

    def shared() -> tuple[float, float]:
        return cpu_seconds_fine(redis_pid) or 0.0, cpu_seconds_fine(collector_pid) or 0.0

    for m in modes:
        m.prepare(n)
    own = {m.mode: -_group_cpu(m.worker.pid) for m in modes}  # stopped: no CPU but in turns
    redis_cpu = dict.fromkeys(own, 0.0)
    collector_cpu = 0.0
    left = list(modes)
    started = time.monotonic()
    deadline = started + timeout
    last = shared()
    turn = _slice()
    while left:
        if time.monotonic() > deadline:
            stuck = ", ".join(f"{m.mode} ran {m.done()} of {n}" for m in left)
            tail = left[0].log_path.read_text(errors="replace")[-2000:]
            raise BenchError(
                f"{modes[0].lib}: a sliced round took over {timeout}s ({stuck}); log of "
                f"{left[0].mode}:\n{tail}"
            )
        for m in list(left):
            m._signal(signal.SIGCONT)
            time.sleep(turn)
            m._signal(signal.SIGSTOP)
            ran = m.done()  # its GET is served now, inside this turn
            now = shared()
            redis_cpu[m.mode] += now[0] - last[0]
            collector_cpu += now[1] - last[1]  # only the qdash worker reports: all of it
            last = now
            if ran >= n or m.worker.poll() is not None:
                left.remove(m)
    gross = collector_cpu
    collector_cpu = max(gross - idle * (time.monotonic() - started), 0.0)
    progress(
        f"{BENCH}: the collector's CPU: {collector_cpu / n * 1e6:.1f} us/task (the qdash "
        f"mode's; {gross / n * 1e6:.1f} with its idle CPU)"
    )
    out = {}
    for m in modes:
        ran = m.done()
        if ran != n:
            tail = m.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"{m.lib}/{m.mode}: {ran} of {n} tasks ran; log:\n{tail}")
        m.ran += n
        mine = own[m.mode] + _group_cpu(m.worker.pid)
        if m.mode == "qdash":
            mine += collector_cpu
        out[m.mode] = ((mine + redis_cpu[m.mode]) / n, mine / n)
    return out


IDLE_SECONDS = 2.0
"""Seconds over which the collector's idle CPU is taken (every worker stopped)."""


def _collector_idle(collector_pid: int, seconds: float) -> float:
    """The collector's CPU seconds a second while every worker of the block is stopped:
    what it spends on its own (ticks, history, heartbeats of connected clients) whether
    workers report or not. A cost per second of running a collector, not per task: charged
    to the qdash mode, it would grow with the wall time a round of turns takes (a Dramatiq
    worker idles ~3/4 of each turn in its own waits) and with the number of modes. It is
    reported as a row of its own and taken off (``QDASH_BENCH_IDLE=0``: kept in)."""
    if os.environ.get("QDASH_BENCH_IDLE") == "0":
        return 0.0
    before = cpu_seconds_fine(collector_pid) or 0.0
    t0 = time.monotonic()
    time.sleep(seconds)
    return ((cpu_seconds_fine(collector_pid) or 0.0) - before) / (time.monotonic() - t0)


def _unit_cost(mode: _Mode, redis_pid: int, collector_pid: int, timeout: float) -> float:
    """Seconds a task of ``mode`` in a 50-task round: CPU when sliced, else wall (which
    would size a Dramatiq round by its idle waits: 3.7 ms a task against 0.25 ms of CPU)."""
    if _slice():
        return _sliced_round([mode], 50, redis_pid, collector_pid, timeout)[mode.mode][0]
    return mode.round(50, collector_pid)[0]


def _order(names: list[str], rnd: int) -> list[str]:
    """The modes' order in round ``rnd``: rotated one step a round, so each mode is first
    equally often, except that two modes simply alternate (rotating two would run one mode
    twice in a row at every round boundary: A B | B A | A B)."""
    if len(names) <= 2:
        return list(names)
    k = rnd % len(names)
    return names[k:] + names[:k]


def _measure(
    app_dir: Path,
    lib: str,
    sizes: _Sizes,
    redis_url: str,
    redis_pid: int,
    collector: Any,
    timeout: float,
    cpu: int | None,
) -> tuple[int, dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Per-round us per task (CPU, or wall with ``QDASH_BENCH_SLICE=0``) and CPU us per task
    (without redis) of every mode of ``lib``, rounds interleaved, in blocks of fresh workers;
    the tasks a round (fixed, or sized in the first block); the collector's idle CPU in
    ms a second, per block (sliced rounds).
    After each block the qdash worker's tasks must all be in the collector's counts."""
    from qdash_mp.shm import SharedStatsReader

    socket, pid = collector.socket, collector.proc.pid

    reader = SharedStatsReader(collector.shm)
    try:
        return _measure_blocks(
            app_dir, lib, sizes, redis_url, redis_pid, socket, pid, reader, timeout, cpu
        )
    finally:
        reader.close()


def _measure_blocks(
    app_dir: Path,
    lib: str,
    sizes: _Sizes,
    redis_url: str,
    redis_pid: int,
    socket: str,
    pid: int,
    reader: Any,
    timeout: float,
    cpu: int | None,
) -> tuple[int, dict[str, list[float]], dict[str, list[float]], list[float]]:
    samples: dict[str, list[float]] = {m: [] for m in _modes(lib)}
    cpu_us: dict[str, list[float]] = {m: [] for m in _modes(lib)}
    idle_ms: list[float] = []
    n = sizes.fixed or 0
    for block in range(sizes.blocks):
        with contextlib.ExitStack() as stack:
            modes: dict[str, _Mode] = {}
            for m in _modes(lib):
                with _on_cpu(cpu):
                    modes[m] = _Mode(app_dir, lib, m, redis_url, socket, timeout, block + 1)
                stack.callback(modes[m].close)
            # Unmeasured rounds first: start-up, imports, page cache and Redis warm up.
            for m in modes.values():
                m.round(50, pid)
            if not n:  # rounds of ~``seconds`` of the plain worker (its CPU, when sliced)
                per_task = min(
                    _unit_cost(modes["plain"], redis_pid, pid, timeout) for _ in range(2)
                )
                n = max(50, min(20_000, round(sizes.seconds / max(per_task, 1e-6))))
                progress(f"{BENCH}: {lib}: {n} tasks a round ({per_task * 1e6:.0f} us/task)")
            names = list(modes)
            idle = 0.0
            if _slice():  # every worker is stopped between rounds
                idle = _collector_idle(pid, IDLE_SECONDS / 2 if sizes.rounds < 30 else IDLE_SECONDS)
                idle_ms.append(idle * 1e3)
            for rnd in range(sizes.per_block(block)):
                order = [modes[x] for x in _order(names, rnd)]
                if _slice():
                    got = _sliced_round(order, n, redis_pid, pid, timeout, idle)
                else:
                    got = {m.mode: m.round(n, pid) for m in order}
                for name, (per_task, cpu_task) in got.items():
                    samples[name].append(per_task * 1e6)
                    cpu_us[name].append(cpu_task * 1e6)
                progress(
                    f"{BENCH}: {lib} block {block + 1} round {rnd + 1} (us/task): "
                    + ", ".join(
                        f"{k} {v[0] * 1e6:.0f} (CPU {v[1] * 1e6:.0f})" for k, v in got.items()
                    )
                )
            if not _control():
                modes["qdash"].check_reported(reader)
    return n, samples, cpu_us, idle_ms


def run(cfg: Config) -> list[Row]:
    with _bench_cpu() as cpu:
        return _run(cfg, cpu)


def _run(cfg: Config, cpu: int | None) -> list[Row]:
    sizes = _Sizes(cfg)
    rounds = sizes.rounds
    timeout = 120.0 if cfg.quick else 600.0
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        try:
            with _on_cpu(cpu):
                server = start_redis(stack, cfg)
        except Skip as why:
            return [skipped_row(BENCH, lib, "per_task", UNIT, str(why)) for lib in APPS]
        redis_url = f"redis://127.0.0.1:{server.port}/0"
        with _on_cpu(cpu):
            collector, _ = start_collector(stack, short_dir(stack, cfg, "qdi"), "--no-http")
        app_dir = short_dir(stack, cfg, "qdapps")
        (app_dir / "bcommon.py").write_text(COMMON)
        (app_dir / "sitecustomize.py").write_text(LAYOUT)
        for lib, source in APPS.items():
            (app_dir / f"bapp_{lib}.py").write_text(source)
        (app_dir / "bapp_rq_import.py").write_text(RQ_IMPORT_ONLY)
        only = [x for x in os.environ.get("QDASH_BENCH_LIBS", "").split(",") if x]
        where = f"one CPU ({cpu})" if cpu is not None else "not pinned"
        progress(
            f"{BENCH}: {rounds} interleaved rounds per mode in {sizes.blocks} blocks of "
            f"fresh workers, {where}{' (A/A control: no adapter in any mode)' * _control()}"
        )
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
            assert server.proc is not None
            n, samples, cpu_us, idle_ms = _measure(
                app_dir, lib, sizes, redis_url, server.proc.pid, collector, timeout, cpu
            )
            note = (
                f"{rounds} rounds of {n} no-op tasks, {sizes.blocks} blocks of fresh workers, "
                f"{where}; ratio: median of rounds"
                + ("; A/A CONTROL: no adapter in either mode" if _control() else "")
            )
            plain = Row(BENCH, f"{lib}_plain", "per_task", UNIT, samples=samples["plain"])
            ratios = paired_ratios(samples["qdash"], samples["plain"])
            qdash = Row(
                BENCH,
                f"{lib}_qdash",
                "per_task",
                UNIT,
                samples=samples["qdash"],
                reference=f"{lib}_plain",
                ratios=ratios,
                note=note,
                extra={
                    "tasks_per_round": n,
                    "rounds": rounds,
                    "blocks": sizes.blocks,
                    "cpu_pinned": -1 if cpu is None else cpu,
                    **_spread(ratios),
                },
            )
            rows += [plain, qdash]
            cpu_ratios = paired_ratios(cpu_us["qdash"], cpu_us["plain"])
            rows.append(Row(BENCH, f"{lib}_plain", "cpu_per_task", UNIT, samples=cpu_us["plain"]))
            rows.append(
                Row(
                    BENCH,
                    f"{lib}_qdash",
                    "cpu_per_task",
                    UNIT,
                    samples=cpu_us["qdash"],
                    reference=f"{lib}_plain",
                    ratios=cpu_ratios,
                    note="CPU of the worker's processes + the collector, per task",
                    extra=_spread(cpu_ratios),
                )
            )
            if idle_ms:
                rows.append(
                    Row(
                        BENCH,
                        f"{lib}_collector",
                        "idle_cpu",
                        "ms/s",
                        samples=idle_ms,
                        note="the collector's CPU a second with every worker stopped, per "
                        "block: not charged to the qdash mode (QDASH_BENCH_IDLE=0 charges it)",
                    )
                )
            if "events" in samples:
                vs_events = paired_ratios(samples["qdash"], samples["events"])
                qdash.more_ratios["celery_events"] = vs_events
                qdash.extra.update({f"vs_events_{k}": v for k, v in _spread(vs_events).items()})
                rows.append(
                    _vs_plain(
                        lib, "events", samples, "celery worker -E (task events, what Flower needs)"
                    )
                )
            if "import" in samples:
                note = "rq worker with the adapter's modules imported, not reporting"
                rows.append(_vs_plain(lib, "import", samples, note))
    if not cfg.keep:
        shutil.rmtree(app_dir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    t0 = time.monotonic()
    for row in run(Config(quick=quick)):
        ratio = f"  x{row.ratio:.3f}" if row.ratio is not None else ""
        more = "".join(f"  vs {k}: x{v:.3f}" for k in row.more_ratios if (v := row.ratio_to(k)))
        q = row.extra.get("ratio_q1"), row.extra.get("ratio_q3")
        spread = f"  (quartiles {q[0]:.3f}-{q[1]:.3f})" if None not in q else ""
        print(
            f"{row.subject:16} {row.metric:12} {row.value or 0:9.1f} {row.unit}{ratio}"
            f"{spread}{more}  {row.skipped or ''}"
        )
    print(f"({time.monotonic() - t0:.0f}s)")
