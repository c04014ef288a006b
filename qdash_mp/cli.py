"""The ``qdash-mp`` command line: a thin layer that parses arguments into settings.

Commands: ``collector`` (the daemon, foreground), ``demo`` (collector + simulated workers),
``stats`` (counters straight from shared memory). Errors print one line that says what to do
next and exit non-zero; no traceback for expected failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from qdash_mp.access_cli import (
    ACCESS_COMMANDS,
    access_settings,
    add_access_arguments,
    add_access_commands,
    add_logging_arguments,
    configure_logging,
    run_access_command,
)
from qdash_mp.errors import QdashError
from qdash_mp.settings import DEFAULT_DATA_DIR, DEFAULT_HTTP, CollectorSettings, parse_http

__all__ = ["build_parser", "main"]

log = logging.getLogger("qdash_mp.cli")


def build_parser() -> argparse.ArgumentParser:
    """The ``qdash-mp`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="qdash-mp",
        description="Operations dashboard for Python job queues.",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    add_logging_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
        type=int,
        default=1_000_000,
        metavar="N",
        help="keep at most N failed jobs; the oldest are pruned first (default %(default)s)",
    )
    col.add_argument(
        "--max-failed-age",
        type=float,
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
        type=lambda v: int(v, 8),
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
    )


def _run_collector(args: argparse.Namespace) -> int:
    from qdash_mp.collector import run

    run(_collector_settings(args))
    return 0


def _shm_name(data_dir: Path) -> str:
    """The stats segment of the collector using ``data_dir`` (its state file, else derived)."""
    state = CollectorSettings(data_dir=data_dir).state_file
    try:
        name = json.loads(state.read_text())["shm"]
    except (OSError, ValueError, KeyError, TypeError):
        return CollectorSettings(data_dir=data_dir).shm
    return str(name)


def _run_stats(args: argparse.Namespace) -> int:
    from qdash_mp.shm import SharedStatsReader, ShmMissing

    name = _shm_name(args.data_dir)
    try:
        reader = SharedStatsReader(name)
    except ShmMissing:
        raise QdashError(
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
    cols = ("pushed", "processed", "failed", "retried", "pending")
    print(f"{'queue':<{width}}  " + "  ".join(f"{c:>12}" for c in cols) + f"  {'jobs/s':>10}")
    for q in rows:
        nums = "  ".join(f"{getattr(q, c):>12}" for c in cols)
        print(f"{q.queue:<{width}}  {nums}  {q.throughput:>10.1f}")
    return 0


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
    except KeyboardInterrupt:
        return 0
    except QdashError as exc:
        print(f"qdash-mp: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2
