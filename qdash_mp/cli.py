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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        "--duration", type=float, default=None, help="stop after this many seconds"
    )
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from qdash_mp.demo import run_embedded

    host, port = parse_http(args.http)

    def ready(url: str) -> None:
        print(f"qdash_mp demo: dashboard at {url}  (Ctrl-C to stop)", flush=True)

    asyncio.run(run_embedded(host, port, workers=args.workers, duration=args.duration, ready=ready))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qdash-mp`` and ``python -m qdash_mp``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return _run_demo(args)
    except KeyboardInterrupt:
        return 0
    except QdashError as exc:
        print(f"qdash-mp: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2
