"""``qdash-mp hub --redis URL [--http HOST:PORT]``: the parser and the runner, kept out of
``qdash_mp.cli`` (which only registers them).

Same access-control flags as the collector (``qdash_mp.access_cli``): a non-loopback
``--http`` without authentication is refused (exit 2) unless ``--insecure-no-auth``.
``redis`` (the ``qdash_mp[hub]`` extra) is imported only when the hub runs.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from qdash_mp.access_cli import access_settings, add_access_arguments
from qdash_mp.errors import ConfigError
from qdash_mp.hub.merge import STALE_AFTER
from qdash_mp.settings import parse_http

__all__ = ["DEFAULT_HUB_HTTP", "add_hub_command", "run_hub"]

DEFAULT_HUB_HTTP = "127.0.0.1:8710"


def add_hub_command(sub: Any) -> None:
    """The ``hub`` subcommand on ``qdash-mp``'s subparsers."""
    hub = sub.add_parser("hub", help="serve one dashboard over every host publishing to Redis")
    hub.add_argument(
        "--redis", required=True, metavar="URL", help="the hub's Redis, redis://HOST:PORT/DB"
    )
    hub.add_argument(
        "--http",
        default=DEFAULT_HUB_HTTP,
        metavar="HOST:PORT",
        help="dashboard address (default %(default)s; port 0 picks a free one)",
    )
    hub.add_argument(
        "--hub-prefix", default="qdash:", metavar="PREFIX", help="key prefix (default qdash:)"
    )
    hub.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER,
        metavar="SECONDS",
        help="show a host as stale after this long without a publish (default %(default)g)",
    )
    add_access_arguments(hub)


def run_hub(args: argparse.Namespace) -> int:
    """Run the hub in the foreground until SIGTERM/SIGINT; 0 on a clean stop."""
    try:
        import redis.asyncio  # noqa: F401  (the extra is there, or say how to get it)
    except ImportError:
        raise ConfigError("qdash-mp hub needs redis-py: pip install 'qdash_mp[hub]'") from None
    from qdash_mp.hub.app import HubSettings, serve_hub

    if not str(args.redis).startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"--redis must be a redis://, rediss:// or unix:// URL, not {args.redis!r}"
        )
    host, port = parse_http(args.http)
    if not args.stale_after > 0:
        raise ConfigError(f"--stale-after must be above 0, not {args.stale_after}")

    def ready(url: str) -> None:
        print(f"qdash-mp hub: dashboard at {url}", flush=True)

    settings = HubSettings(
        redis_url=args.redis,
        http_host=host,
        http_port=port,
        prefix=args.hub_prefix,
        stale_after=args.stale_after,
        access=access_settings(args, host, True),
        ready=ready,
    )
    try:
        asyncio.run(serve_hub(settings))
    except OSError as exc:
        raise ConfigError(f"cannot serve on {args.http}: {exc.strerror or exc}") from None
    return 0
