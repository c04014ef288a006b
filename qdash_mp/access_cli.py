"""The command line of access control and operations, kept out of ``qdash_mp.cli``.

``add_access_arguments(collector_parser)`` adds the collector's flags (``--read-only``,
``--auth-token-file``, ``--basic-auth-file``, ``--auth-proxy-header``, ``--trusted-proxy``,
``--allowed-host``, ``--insecure-no-auth``, ``--metrics-public``); ``access_settings(args, host,
http_enabled)`` turns them into ``AccessSettings`` (reading and checking the secrets files, and
refusing a non-loopback ``--http`` without auth). ``add_logging_arguments`` /
``configure_logging`` do ``--log-format json|text``. ``add_access_commands`` adds
``hash-password`` and ``check``; ``run_access_command`` runs them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from qdash_mp.access_settings import (
    ACTIONS,
    AccessSettings,
    is_loopback,
    load_token_file,
    load_users_file,
    parse_actions,
)
from qdash_mp.errors import ConfigError, QdashError

__all__ = [
    "ACCESS_COMMANDS",
    "JsonFormatter",
    "access_settings",
    "add_access_arguments",
    "add_access_commands",
    "add_logging_arguments",
    "configure_logging",
    "run_access_command",
]

ACCESS_COMMANDS = ("hash-password", "check")


def add_access_arguments(col: argparse.ArgumentParser) -> None:
    """The collector's access-control flags (see ``docs/exposing.md``)."""
    g = col.add_argument_group("access control (docs/exposing.md)")
    g.add_argument("--read-only", action="store_true", help="no retry/forget/flush for anyone")
    g.add_argument(
        "--auth-token-file", type=Path, metavar="PATH", help="bearer token (mode 600 file)"
    )
    g.add_argument(
        "--basic-auth-file",
        type=Path,
        metavar="PATH",
        help="users, one 'name:hash[:actions]' a line (qdash-mp hash-password); mode 600",
    )
    g.add_argument(
        "--auth-proxy-header",
        metavar="NAME",
        help="user name header set by a --trusted-proxy (e.g. X-Forwarded-User)",
    )
    g.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="reverse proxy whose X-Forwarded-* and auth header count (repeatable)",
    )
    g.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="host name the dashboard answers to, besides localhost and the bound address",
    )
    g.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback --http without authentication (anyone who reaches it)",
    )
    g.add_argument("--metrics-public", action="store_true", help="/metrics without auth")


def access_settings(args: argparse.Namespace, host: str, http_enabled: bool) -> AccessSettings:
    """``AccessSettings`` from parsed flags; ``ConfigError`` (one line) when unsafe or bad."""
    from qdash_mp.web.proxy import TrustedProxies

    TrustedProxies(args.trusted_proxy)  # the CIDRs parse, or a one-line error now
    token = load_token_file(args.auth_token_file) if args.auth_token_file else None
    users = load_users_file(args.basic_auth_file) if args.basic_auth_file else ()
    if args.auth_proxy_header and not args.trusted_proxy:
        raise ConfigError("--auth-proxy-header needs --trusted-proxy CIDR (who may set it)")
    settings = AccessSettings(
        read_only=args.read_only,
        token=token,
        users=users,
        proxy_header=args.auth_proxy_header,
        trusted_proxies=tuple(args.trusted_proxy),
        allowed_hosts=tuple(args.allowed_host),
        insecure_no_auth=args.insecure_no_auth,
        metrics_public=args.metrics_public,
    )
    unsafe = http_enabled and not is_loopback(host) and not settings.auth_enabled
    if unsafe and not args.insecure_no_auth:
        raise ConfigError(
            f"--http {host or 'on every interface'} is reachable from other machines and no "
            "authentication is set: add --auth-token-file PATH (or --basic-auth-file, "
            "--auth-proxy-header), or --insecure-no-auth"
        )
    return settings


# -- logging -----------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines (default text)"
    )


def configure_logging(args: argparse.Namespace) -> None:
    """Root logging from ``--log-level`` and ``--log-format``."""
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        raise ConfigError(
            f"--log-level must be DEBUG, INFO, WARNING or ERROR, not {args.log_level!r}"
        )
    handler = logging.StreamHandler()
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


# -- commands ----------------------------------------------------------------------------


def add_access_commands(sub: Any) -> None:
    """``hash-password`` and ``check`` subcommands on the ``qdash-mp`` subparsers."""
    hp = sub.add_parser(
        "hash-password", help="print a --basic-auth-file line (password read from stdin)"
    )
    hp.add_argument("user", help="user name (letters, digits, ._@-)")
    hp.add_argument(
        "--actions",
        default=",".join(ACTIONS),
        help="what the user may do, some of view,retry,forget,flush (default all)",
    )
    hp.add_argument("--scheme", choices=("scrypt", "pbkdf2_sha256"), default="scrypt")
    ck = sub.add_parser("check", help="health probe: exit 0 when the collector answers")
    ck.add_argument("--data-dir", type=Path, default=Path("qdash-data"), metavar="DIR")
    ck.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise ConfigError("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _hash_password(args: argparse.Namespace) -> int:
    from qdash_mp.web.passwords import hash_password

    actions = parse_actions(args.actions, "--actions")
    if not args.user or ":" in args.user:
        raise ConfigError("the user name must not be empty or contain ':'")
    password = _read_password()
    if len(password) < 8:
        raise ConfigError("use a password of at least 8 characters")
    suffix = (
        "" if actions == frozenset(ACTIONS) else ":" + ",".join(a for a in ACTIONS if a in actions)
    )
    print(f"{args.user}:{hash_password(password, args.scheme)}{suffix}")
    return 0


def _check(args: argparse.Namespace) -> int:
    state_file = args.data_dir / "collector.json"
    try:
        state = json.loads(state_file.read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        print(f"qdash-mp check: no collector state in {state_file}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        print(f"qdash-mp check: collector pid {pid} is gone", file=sys.stderr)
        return 1
    except PermissionError:
        pass  # alive, another user's
    http = state.get("http")
    if not http:
        print(f"ok: collector pid {pid} runs (no HTTP: journal not checked)")
        return 0
    url = f"{http}/queues/api/health"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as reply:  # noqa: S310 (our URL)
            body = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        print(f"qdash-mp check: {url} answered {exc.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"qdash-mp check: {url} did not answer: {exc}", file=sys.stderr)
        return 1
    if body.get("ok") is not True:
        print(f"qdash-mp check: unhealthy: {body}", file=sys.stderr)
        return 1
    print(f"ok: collector pid {pid} answers; journal sound ({body.get('failed_jobs')} failed jobs)")
    return 0


def run_access_command(args: argparse.Namespace) -> int:
    """Run ``hash-password`` or ``check``; ``QdashError`` for the CLI's one-line errors."""
    if args.command == "hash-password":
        return _hash_password(args)
    if args.command == "check":
        return _check(args)
    raise QdashError(f"not an access command: {args.command}")
