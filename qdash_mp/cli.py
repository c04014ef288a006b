"""The ``qdash-mp`` command line: a thin layer that parses arguments into settings.

Commands: ``collector`` (the daemon, foreground), ``demo`` (collector + simulated workers),
``stats`` (counters straight from shared memory of a running collector). Errors -- bad flags
included -- print one line that says what to do next and exit 2; no traceback for expected
failures. ``stats`` with no collector running exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.handlers
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from qdash_mp import __version__
from qdash_mp.access_cli import (
    ACCESS_COMMANDS,
    access_settings,
    add_access_arguments,
    add_access_commands,
    add_logging_arguments,
    configure_logging,
    run_access_command,
)
from qdash_mp.errors import CollectorNotRunning, ConfigError, QdashError
from qdash_mp.hub.cli import add_hub_command, run_hub
from qdash_mp.settings import DEFAULT_DATA_DIR, DEFAULT_HTTP, CollectorSettings, parse_http

__all__ = ["build_parser", "main"]

log = logging.getLogger("qdash_mp.cli")


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit 2), not usage + error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _octal(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {value!r} (e.g. 660)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {value} is out of range (000-777)")
    return mode


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _hub_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise argparse.ArgumentTypeError(
            f"not a Redis URL: {value!r} (e.g. redis://127.0.0.1:6379/0)"
        )
    return value


def _host_name(value: str) -> str:
    from qdash_mp.hub.keys import check_host

    try:
        return check_host(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return x


def build_parser() -> argparse.ArgumentParser:
    """The ``qdash-mp`` argument parser."""
    parser = _Parser(
        prog="qdash-mp",
        description="Operations dashboard for Python job queues.",
    )
    parser.add_argument("--version", action="version", version=f"qdash-mp {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    add_logging_arguments(parser)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    add_access_commands(sub)

    col = sub.add_parser("collector", help="run the collector daemon in the foreground")
    col.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help="journal, socket and state file (default ./%(default)s)",
    )
    col.add_argument(
        "--socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="default <data-dir>/collector.sock",
    )
    col.add_argument(
        "--http",
        default=f"{DEFAULT_HTTP[0]}:{DEFAULT_HTTP[1]}",
        metavar="HOST:PORT",
        help="dashboard address (default %(default)s; port 0 picks a free one)",
    )
    col.add_argument("--no-http", action="store_true", help="do not serve the dashboard")
    col.add_argument(
        "--requeue",
        default=None,
        metavar="MODULE:FUNCTION",
        help="callable the daemon uses to re-enqueue retried jobs (instead of a worker's)",
    )
    col.add_argument(
        "--max-failed-jobs",
        type=_count,
        default=1_000_000,
        metavar="N",
        help="keep at most N failed jobs; the oldest are pruned first (default %(default)s)",
    )
    col.add_argument(
        "--max-failed-age",
        type=_positive,
        default=30.0,
        metavar="DAYS",
        help="prune failed jobs older than this many days (default %(default)g)",
    )
    col.add_argument(
        "--salvage",
        action="store_true",
        help="open a journal with corruption by keeping every record that verifies",
    )
    col.add_argument(
        "--socket-mode",
        type=_octal,
        default=0o600,
        metavar="OCTAL",
        help="permissions of the socket file (default 600: owner only)",
    )
    col.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="also accept clients running as this uid (repeatable)",
    )
    col.add_argument(
        "--allow-gid",
        type=int,
        action="append",
        default=[],
        metavar="GID",
        help="also accept clients whose primary gid is this (repeatable)",
    )
    add_access_arguments(col)
    # The Redis hub (qdash_mp.hub, docs/hub.md)
    col.add_argument(
        "--hub",
        type=_hub_url,
        default=None,
        metavar="redis://HOST:PORT/DB",
        help="also publish this host's counters, history, workers and failed jobs to Redis "
        "(needs the qdash_mp[hub] extra)",
    )
    col.add_argument(
        "--host-name",
        type=_host_name,
        default=None,
        metavar="NAME",
        help="the name this host publishes under (default: its hostname)",
    )

    st = sub.add_parser("stats", help="print the counters straight from shared memory")
    st.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR", help="the collector's"
    )
    st.add_argument("--json", action="store_true", help="print the /queues/api/stats JSON")

    demo = sub.add_parser(
        "demo", help="run a live dashboard over simulated traffic (collector + workers)"
    )
    demo.add_argument(
        "--http",
        default=f"{DEFAULT_HTTP[0]}:{DEFAULT_HTTP[1]}",
        metavar="HOST:PORT",
        help="where to serve the dashboard (default %(default)s; port 0 picks a free one)",
    )
    demo.add_argument(
        "--embedded",
        action="store_true",
        help="run everything in this one process instead of a collector and worker processes",
    )
    demo.add_argument("--workers", type=int, default=4, help="simulated workers (default 4)")
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the demo collector's data here (default: a temporary directory)",
    )
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    add_hub_command(sub)  # qdash-mp hub (qdash_mp.hub.cli)
    return parser


def _collector_settings(args: argparse.Namespace) -> CollectorSettings:
    host, port = parse_http(args.http)
    return CollectorSettings(
        data_dir=args.data_dir,
        socket_path=args.socket,
        http_host=host,
        http_port=port,
        http_enabled=not args.no_http,
        socket_mode=args.socket_mode,
        allow_uids=frozenset(args.allow_uid),
        allow_gids=frozenset(args.allow_gid),
        requeue=args.requeue,
        salvage=args.salvage,
        max_failed_jobs=args.max_failed_jobs,
        max_failed_age=args.max_failed_age * 86400.0,
        access=access_settings(args, host, not args.no_http),
        hub_url=args.hub,
        hub_host=args.host_name,
    )


def _run_collector(args: argparse.Namespace) -> int:
    from qdash_mp.collector import Collector, serve

    # What the start logs is held back until it succeeded: a failed start says one line (the
    # error, printed by ``main``), unless DEBUG was asked for.
    root = logging.getLogger()
    held = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    shown = list(root.handlers)
    for h in shown:
        root.removeHandler(h)
    held.setTarget(_Fanout(shown))
    root.addHandler(held)

    def ready(_collector: Collector) -> None:
        root.removeHandler(held)
        held.flush()
        for h in shown:
            root.addHandler(h)

    try:
        asyncio.run(serve(_collector_settings(args), ready=ready))
    finally:
        if held in root.handlers:
            root.removeHandler(held)
            if root.isEnabledFor(logging.DEBUG):
                held.flush()
            for h in shown:
                root.addHandler(h)
        held.setTarget(None)
        held.close()
    return 0


class _Fanout(logging.Handler):
    """Hands each record to several handlers (the ``MemoryHandler`` target)."""

    def __init__(self, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self._handlers = handlers

    def emit(self, record: logging.LogRecord) -> None:
        for h in self._handlers:
            if record.levelno >= h.level:
                h.handle(record)


def _running_shm(data_dir: Path) -> str:
    """The stats segment of the collector running on ``data_dir``; ``CollectorNotRunning`` if none.

    A segment outlives a crashed collector (it is how the next start recovers its counts),
    so its existence says nothing: the state file must name a live process.
    """
    state = CollectorSettings(data_dir=data_dir).state_file
    hint = f"start one with: qdash-mp collector --data-dir {data_dir}"
    try:
        data = json.loads(state.read_text())
        pid, name = int(data["pid"]), str(data["shm"])
    except FileNotFoundError:
        raise CollectorNotRunning(
            f"no collector is running for {data_dir} (no {state}); {hint}"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CollectorNotRunning(
            f"no collector is running for {data_dir} ({state}: {exc}); {hint}"
        ) from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise CollectorNotRunning(
            f"no collector is running for {data_dir} (pid {pid} in {state} is gone); {hint}"
        ) from None
    except PermissionError:
        pass  # alive, another user's
    return name


def _run_stats(args: argparse.Namespace) -> int:
    from qdash_mp.shm import SharedStatsReader, ShmMissing

    name = _running_shm(args.data_dir)
    try:
        reader = SharedStatsReader(name)
    except ShmMissing:
        raise CollectorNotRunning(
            f"no collector is running for {args.data_dir} (no shared stats {name!r}); "
            f"start one with: qdash-mp collector --data-dir {args.data_dir}"
        ) from None
    with reader:
        view = reader.snapshot()
    if args.json:
        print(json.dumps(view.to_dict(), indent=2))
        return 0
    rows = [*view.queues, view.totals]
    width = max([5, *(len(q.queue) for q in rows)])
    cols = ("pushed", "processed", "failed", "retried", "pending", "active")
    print(
        f"{'queue':<{width}}  "
        + "  ".join(f"{c:>12}" for c in cols)
        + f"  {'jobs/s':>10}  {'p50':>8}  {'p99':>8}"
    )
    for q in rows:
        nums = "  ".join(f"{getattr(q, c):>12}" for c in cols)
        p50, p99 = _duration(q.runtime.p50), _duration(q.runtime.p99)
        print(f"{q.queue:<{width}}  {nums}  {q.throughput:>10.1f}  {p50:>8}  {p99:>8}")
    return 0


def _duration(seconds: float | None) -> str:
    """A runtime percentile for the ``stats`` table: ``-`` when there is none."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def _run_demo(args: argparse.Namespace) -> int:
    from qdash_mp.demo import run_embedded, run_multiprocess

    host, port = parse_http(args.http)
    mode = "embedded, one process" if args.embedded else f"collector + {args.workers} workers"

    def ready(url: str) -> None:
        print(f"qdash_mp demo ({mode}): dashboard at {url}  (Ctrl-C to stop)", flush=True)

    if args.embedded:
        demo = run_embedded(host, port, workers=args.workers, duration=args.duration, ready=ready)
    else:
        demo = run_multiprocess(
            host,
            port,
            workers=args.workers,
            duration=args.duration,
            data_dir=args.data_dir,
            ready=ready,
        )
    asyncio.run(demo)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qdash-mp`` and ``python -m qdash_mp``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args)
        if args.command in ACCESS_COMMANDS:
            return run_access_command(args)
        if args.command == "collector":
            return _run_collector(args)
        if args.command == "stats":
            return _run_stats(args)
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "hub":
            return run_hub(args)
    except KeyboardInterrupt:
        return 0
    except QdashError as exc:
        print(f"qdash-mp: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, CollectorNotRunning) else 2
    parser.error(f"unknown command {args.command!r}")
    return 2
