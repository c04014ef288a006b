"""Access-control settings of the collector's dashboard, and the secrets files they read.

Stdlib only and light (``qdash_mp.settings`` imports it, and worker processes import that).
The CLI turns its flags into ``AccessSettings`` through ``qdash_mp.web.access_cli``; the web
layer turns ``AccessSettings`` into checks (``qdash_mp.web.access``).

Secrets never come from the command line (``ps`` shows it to every local user): a token file
holds one token on its first line (at least 16 characters); a basic-auth file holds one user a
line, ``name:hash[:actions]`` (``qdash-mp hash-password NAME`` writes one; ``actions`` is a
comma list of ``view,retry,forget,flush``, default all; ``#`` starts a comment). Either file is
refused when its group or others may read or write it (``chmod 600`` fixes that).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from qdash_mp.errors import ConfigError

__all__ = [
    "ACTIONS",
    "AccessSettings",
    "User",
    "is_loopback",
    "load_token_file",
    "load_users_file",
    "parse_actions",
    "read_secret_file",
]

ACTIONS = ("view", "retry", "forget", "flush")
"""What a user may be allowed to do; ``view`` covers every page and GET route."""

MIN_TOKEN = 16
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")


@dataclass(frozen=True, slots=True)
class User:
    """One ``--basic-auth-file`` line: the hash (as written) and the actions allowed."""

    name: str
    hash: str = field(repr=False)
    actions: frozenset[str]


@dataclass(frozen=True, slots=True)
class AccessSettings:
    """Who may use the dashboard, and how it is reached (see ``docs/exposing.md``)."""

    read_only: bool = False
    token: str | None = field(default=None, repr=False)
    users: tuple[User, ...] = ()
    proxy_header: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    insecure_no_auth: bool = False
    metrics_public: bool = False
    session_ttl: float = 12 * 3600.0

    @property
    def auth_enabled(self) -> bool:
        """Whether any way of authenticating is configured."""
        return bool(self.token or self.users or self.proxy_header)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only reaches this machine (``localhost`` or a loopback IP)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def read_secret_file(path: Path, flag: str) -> str:
    """The text of a secrets file, refused if missing or readable by group/others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # the mode of what was opened, not of what the name points to later
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{flag} {path}: not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{flag} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read "
                f"it; run: chmod 600 {path}"
            )
        with os.fdopen(fd, "r", encoding="utf-8", closefd=False) as f:
            return f.read(1024 * 1024)
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not UTF-8 text") from None
    finally:
        os.close(fd)


def load_token_file(path: Path) -> str:
    """The bearer token on the first line of ``path`` (``--auth-token-file``)."""
    lines = read_secret_file(path, "--auth-token-file").splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN or not token.isascii() or not token.isprintable():
        raise ConfigError(
            f"--auth-token-file {path}: the first line must be a token of at least "
            f"{MIN_TOKEN} printable ASCII characters (e.g. from: openssl rand -hex 32)"
        )
    return token


def parse_actions(text: str, where: str) -> frozenset[str]:
    """``view,retry`` -> the set; ``ConfigError`` naming ``where`` for an unknown action."""
    actions = frozenset(a.strip() for a in text.split(",") if a.strip())
    unknown = actions - set(ACTIONS)
    if unknown or not actions:
        raise ConfigError(f"{where}: actions must be some of {','.join(ACTIONS)}, not {text!r}")
    return actions


def load_users_file(path: Path) -> tuple[User, ...]:
    """The users of a ``--basic-auth-file`` (``name:hash[:actions]`` lines)."""
    from qdash_mp.web.passwords import parse_hash

    users: dict[str, User] = {}
    text = read_secret_file(path, "--basic-auth-file")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--basic-auth-file {path} line {number}"
        name, _, rest = line.partition(":")
        hash_text, _, actions_text = rest.partition(":")
        if not name or not set(name) <= _USER_CHARS:
            raise ConfigError(f"{where}: user names use letters, digits and ._@- only")
        try:
            parse_hash(hash_text)
        except ValueError as exc:
            raise ConfigError(
                f"{where}: {exc}; write lines with: qdash-mp hash-password {name}"
            ) from None
        actions = parse_actions(actions_text, where) if actions_text else frozenset(ACTIONS)
        if name in users:
            raise ConfigError(f"{where}: user {name!r} appears twice")
        users[name] = User(name, hash_text, actions)
    if not users:
        raise ConfigError(f"--basic-auth-file {path}: no users in it")
    return tuple(users.values())
