"""Shared machinery of the benchmark suite: rows, paired statistics, servers, worker processes.

Every benchmark module (``bench_*.py``) has two halves: ``run(cfg) -> list[Row]``, called by
``run.py`` in the orchestrating process, and worker roles (``python bench_x.py ROLE JSON``)
that the orchestrator starts as subprocesses. Workers talk to the orchestrator with one JSON
object per line on stdout: ``{"ready": ...}`` once set up, then (after the orchestrator sends
``go`` on stdin) ``{"result": ...}``. Timestamps that cross processes are
``time.monotonic_ns()`` (CLOCK_MONOTONIC is system-wide on Linux).

Resources (temp dirs, collectors, redis servers, worker processes) are registered on an
``ExitStack`` that ``run.py`` unwinds whatever happens, so a failed or interrupted run leaves
no process, server, directory or ``/dev/shm`` segment behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

_T0 = time.monotonic()


class BenchError(RuntimeError):
    """A benchmark run that is wrong (not merely slow): inexact counts, failed flush..."""


class Skip(Exception):
    """A peer that cannot run here; the message says why (it becomes a skipped row)."""


# ---------------------------------------------------------------------- progress


def progress(msg: str) -> None:
    """One progress line on stderr, with the seconds since the run started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    quick: bool
    keep: bool = False  # keep temp dirs (for debugging a failed run)


# ---------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table and of ``latest.json``.

    ``samples`` are the per-repeat (or per-round, per-request) values; ``value`` is their
    median. ``ratios`` are the per-repeat ratios ``value / reference value`` of the same
    repeat (paired), ``ratio`` their median. ``more_ratios`` holds paired ratios to further
    reference rows (reference name -> per-repeat ratios), e.g. a second durable peer.
    """

    bench: str
    subject: str
    metric: str
    unit: str
    samples: list[float] = field(default_factory=list)
    producers: int | None = None
    reference: str | None = None
    ratios: list[float] = field(default_factory=list)
    skipped: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    more_ratios: dict[str, list[float]] = field(default_factory=dict)

    @property
    def value(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    def ratio_to(self, reference: str | None) -> float | None:
        """The median paired ratio to ``reference`` (None: the row's own reference)."""
        if reference is None or reference == self.reference:
            return self.ratio
        ratios = self.more_ratios.get(reference)
        return statistics.median(ratios) if ratios else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bench": self.bench,
            "subject": self.subject,
            "metric": self.metric,
            "value": _round(self.value),
            "unit": self.unit,
        }
        if self.skipped is not None:
            out["skipped"] = self.skipped
        if self.samples:
            out["min"] = _round(min(self.samples))
            out["max"] = _round(max(self.samples))
            out["repeats"] = len(self.samples)
        if self.producers is not None:
            out["producers"] = self.producers
        if self.reference is not None:
            out["reference"] = self.reference
            out["ratio"] = _round(self.ratio)
            if self.ratios:
                out["ratio_min"] = _round(min(self.ratios))
                out["ratio_max"] = _round(max(self.ratios))
        if self.more_ratios:
            out["ratios_vs"] = {
                ref: {
                    "ratio": _round(statistics.median(rs)),
                    "ratio_min": _round(min(rs)),
                    "ratio_max": _round(max(rs)),
                }
                for ref, rs in self.more_ratios.items()
                if rs
            }
        if self.note:
            out["note"] = self.note
        out.update(self.extra)
        if self.samples:
            out["samples"] = [_round(x) for x in self.samples]
        return out


def _round(x: float | None) -> float | None:
    if x is None:
        return None
    if x == 0 or not (abs(x) < 1e15):
        return x
    digits = 4 - int(f"{abs(x):e}".split("e")[1])
    return round(x, max(0, digits))


def skipped_row(bench: str, subject: str, metric: str, unit: str, reason: str, **kw: Any) -> Row:
    progress(f"{bench}: {subject} skipped: {reason}")
    return Row(bench, subject, metric, unit, skipped=reason, **kw)


def paired_ratios(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per-repeat ratios (both lists are in repeat order and of the same length)."""
    return [v / r for v, r in zip(values, reference, strict=True) if r]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


# ---------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A goal printed as met / not met; ``field`` is "value" or "ratio".

    A "ratio" target compares with the row's own reference, or with ``reference`` (one of
    the row's ``more_ratios``) when given.
    """

    bench: str
    subject: str
    metric: str
    op: str  # "<=" or ">="
    threshold: float
    text: str
    field: str = "value"
    producers: int | None = None
    reference: str | None = None

    def check(self, rows: Iterable[Row]) -> tuple[str, float | None]:
        for row in rows:
            if (row.bench, row.subject, row.metric, row.producers) != (
                self.bench,
                self.subject,
                self.metric,
                self.producers,
            ):
                continue
            if row.skipped is not None:
                return "not measured", None
            got = row.value if self.field == "value" else row.ratio_to(self.reference)
            if got is None:
                return "not measured", None
            ok = got <= self.threshold if self.op == "<=" else got >= self.threshold
            return ("met" if ok else "NOT MET"), got
        return "not measured", None


# ---------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "cpus": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_mb"] = int(line.split()[1]) // 1024
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    versions: dict[str, str] = {}
    for dist in ("qdash_mp", "msgpack", "aiohttp", "prometheus_client", "statsd", "redis"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    import sqlite3

    versions["sqlite"] = sqlite3.sqlite_version
    server = shutil.which("redis-server")
    if server:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [server, "--version"], check=False, capture_output=True, text=True, timeout=5
            ).stdout
            versions["redis-server"] = next(
                (w[2:] for w in out.split() if w.startswith("v=")), out.strip()
            )
    info["versions"] = versions
    return info


# ---------------------------------------------------------------------- resources


def short_dir(stack: contextlib.ExitStack, cfg: Config, prefix: str) -> Path:
    """A fresh directory with a short path under /tmp, removed when ``stack`` unwinds."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if not cfg.keep:
        stack.callback(shutil.rmtree, path, True)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int | None:
    """SIGTERM the process (by its pid), then SIGKILL if it does not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def start_hub(stack: contextlib.ExitStack, redis_url: str) -> str:
    """A real ``qdash-mp hub`` on ``redis_url`` (a free port), stopped with ``stack``; its
    dashboard's base URL."""
    hub = subprocess.Popen(
        [sys.executable, "-m", "qdash_mp", "hub", "--redis", redis_url, "--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    stack.callback(stop_process, hub)
    assert hub.stdout is not None
    line = hub.stdout.readline()
    if "dashboard at" not in line:
        raise BenchError(f"hub did not start: {line!r}")
    return line.rsplit(" ", 1)[1].strip()


class Collector:
    """A real ``qdash-mp collector`` process on its own data dir."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.state: dict[str, Any] = {}
        self.log_path = data_dir / "collector.log"

    @property
    def socket(self) -> str:
        return str(self.state["socket"])

    @property
    def http(self) -> str:
        return str(self.state["http"])

    @property
    def shm(self) -> str:
        return str(self.state["shm"])

    def start(self, timeout: float = 60.0) -> float:
        """Start it and wait for ``collector.json``; returns seconds from spawn to ready."""
        state_file = self.data_dir / "collector.json"
        state_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qdash_mp",
                    "collector",
                    "--data-dir",
                    str(self.data_dir),
                    "--http",
                    "127.0.0.1:0",
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"collector exited with {proc.returncode}:\n{self.logs()}")
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                return False
            if state.get("pid") != proc.pid:
                return False
            self.state = state
            return True

        wait_for(ready, timeout, "the collector to be ready", interval=0.002)
        return time.monotonic() - t0

    def logs(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (a clean stop removes the shared-memory segment); check that it did."""
        if self.proc is None:
            return
        code = stop_process(self.proc)
        shm = self.state.get("shm")
        left = sorted(Path("/dev/shm").glob(f"{shm}*")) if shm else []
        for seg in left:
            seg.unlink(missing_ok=True)
        if code != 0:
            progress(f"collector exited with {code}; log tail:\n{self.logs()}")
        if left:
            progress(f"collector left shared memory behind (removed): {[p.name for p in left]}")
        self.proc = None


def start_collector(
    stack: contextlib.ExitStack, data_dir: Path, *args: str
) -> tuple[Collector, float]:
    c = Collector(data_dir, *args)
    stack.callback(c.stop)
    took = c.start()
    return c, took


class RedisServer:
    """A private ``redis-server`` on a free loopback port, in its own temp dir."""

    def __init__(self, directory: Path, *, aof_always: bool = False) -> None:
        self.dir = directory
        self.aof_always = aof_always
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise Skip("redis-server is not installed (apt-get install redis-server)")
        try:
            import redis
        except ImportError:
            raise Skip("python package redis is not installed (pip install '.[bench]')") from None
        self.port = free_port()
        argv = [
            server,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        if self.aof_always:
            argv += [
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--auto-aof-rewrite-percentage",
                "0",  # no background rewrite (a fork) in the middle of a timed run
            ]
        else:
            argv += ["--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = self.proc
        r = redis.Redis(host="127.0.0.1", port=self.port)

        def up() -> bool:
            if proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise Skip(f"redis-server exited with {proc.returncode}: {log}")
            try:
                return bool(r.ping())
            except redis.exceptions.ConnectionError:
                return False

        try:
            wait_for(up, 20, "redis-server to answer PING")
        finally:
            r.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def start_redis(
    stack: contextlib.ExitStack, cfg: Config, *, aof_always: bool = False
) -> RedisServer:
    """Start a private redis-server (``Skip`` if it cannot run here)."""
    server = RedisServer(short_dir(stack, cfg, "qdr"), aof_always=aof_always)
    stack.callback(server.stop)
    server.start()
    return server


# ---------------------------------------------------------------------- worker processes


class Worker:
    """A benchmark worker subprocess: ``python <module> ROLE JSON``, JSON lines on stdout."""

    def __init__(
        self, module: str, role: str, params: dict[str, Any], env: dict[str, str] | None = None
    ) -> None:
        self.role = role
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / module), role, json.dumps(params)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=str(BENCH_DIR),
        )

    def read(self, timeout: float = 300.0) -> dict[str, Any]:
        """The next JSON message; raises if the worker died or said ``error``."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the worker always answers or exits
        if not line:
            code = self.proc.wait(timeout=timeout)
            raise BenchError(f"worker {self.role} exited with {code} before answering")
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            raise BenchError(f"worker {self.role}: {msg['error']}")
        return msg

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def workers(
    module: str, role: str, params: Sequence[dict[str, Any]], env: dict[str, str] | None = None
) -> Iterator[list[Worker]]:
    """Start one worker per ``params`` and wait until each is ready; always reaped.

    On an error the workers are killed; otherwise their stdin is closed and they are waited.
    """
    started: list[Worker] = []
    ok = False
    try:
        for p in params:
            started.append(Worker(module, role, p, env))
        for w in started:
            w.read()  # {"ready": ...}
        yield started
        ok = True
    finally:
        for w in started:
            if not ok:
                stop_process(w.proc, timeout=5)
            w.close()


def go_all(ws: Sequence[Worker]) -> int:
    """Release every worker; returns the ``monotonic_ns`` just before the first ``go``."""
    t0 = time.monotonic_ns()
    for w in ws:
        w.go()
    return t0


# --- worker side ------------------------------------------------------------------------------


def worker_main(roles: dict[str, Callable[[dict[str, Any]], None]]) -> None:
    """Entry point of a ``bench_*.py`` module run as a worker."""
    role, params = sys.argv[1], json.loads(sys.argv[2])
    try:
        roles[role](params)
    except Exception as exc:
        import traceback

        traceback.print_exc(file=sys.stderr)
        say(error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)


def say(**msg: Any) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def wait_go() -> None:
    """Block until the orchestrator says go; EOF (the orchestrator gave up) ends the worker."""
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)


def sleep_until_ns(t: int) -> None:
    while True:
        left = t - time.monotonic_ns()
        if left <= 0:
            return
        time.sleep(left / 1e9 if left > 200_000 else 0)


def rss_bytes() -> int:
    """Resident set size of this process (from /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (utime + stime).

    From ``/proc/<pid>/stat`` fields 14 and 15, in clock ticks: 10 ms resolution at the
    usual 100 Hz. The command name (field 2) may hold spaces or parentheses, so the fields
    are counted from its closing parenthesis.
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_fine(pid: int) -> float | None:
    """CPU seconds used so far by the live threads of ``pid``, to the nanosecond.

    The sum of the first field of ``/proc/<pid>/task/<tid>/schedstat`` (time on a CPU, ns)
    over its threads; None where the kernel has no schedstat. A thread that exits between
    two readings drops out of the sum (the collector's threads live as long as it does):
    ``cpu_seconds`` (whole process, 10 ms ticks) is the cross-check.
    """
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:
            continue  # the thread exited meanwhile
        except (OSError, ValueError, IndexError):
            return None
    return total / 1e9
