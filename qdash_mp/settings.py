"""Settings of the collector daemon, as one dataclass, plus the defaults clients share.

The CLI only parses arguments into ``CollectorSettings``; everything else reads the dataclass.
Nothing here reads the environment at import time: ``default_socket_path()`` does, when called.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qdash_mp.access_settings import AccessSettings
from qdash_mp.errors import ConfigError

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_HTTP",
    "MAX_SOCKET_PATH",
    "SOCKET_ENV",
    "CollectorSettings",
    "default_socket_path",
    "parse_http",
]

DEFAULT_DATA_DIR = Path("qdash-data")
DEFAULT_HTTP = ("127.0.0.1", 8700)
SOCKET_ENV = "QDASH_SOCKET"
SOCKET_NAME = "collector.sock"
STATE_NAME = "collector.json"
MAX_SOCKET_PATH = 107
"""Longest Unix socket path in bytes (``sun_path`` is 108 bytes with its NUL on Linux)."""


def default_socket_path() -> Path:
    """``$QDASH_SOCKET`` if set, else the collector's default ``./qdash-data/collector.sock``."""
    env = os.environ.get(SOCKET_ENV)
    return Path(env) if env else DEFAULT_DATA_DIR / SOCKET_NAME


def parse_http(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0 picks a free one) → ``(host, port)``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--http expects HOST:PORT, e.g. 127.0.0.1:8700, not {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--http port must be a number, not {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--http port must be between 0 and 65535, not {port}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


@dataclass(frozen=True, slots=True)
class CollectorSettings:
    """Everything the collector daemon is configured with.

    ``socket_path`` defaults to ``<data_dir>/collector.sock``; ``shm_name`` to a name derived
    from the absolute data dir, so a restarted collector finds its segment again. Failed jobs
    are kept up to ``max_failed_jobs`` and ``max_failed_age`` seconds (oldest pruned first,
    counted and logged); every ``maintenance_interval`` seconds the collector applies the age
    limit and compacts the journal when dead records dominate. A partial frame must complete
    within ``frame_deadline`` seconds, and partial frames of all connections together may hold
    at most ``partial_frame_budget`` bytes (over it, the connection holding most is closed).
    Every ``tick_interval`` seconds the lifecycle tick feeds the rolling windows and the
    history; a disconnected worker stays listed as gone for ``worker_retention`` seconds.
    ``clock`` (Unix seconds) dates workers, windows and history points (tests speed it up).
    """

    data_dir: Path = DEFAULT_DATA_DIR
    socket_path: Path | None = None
    http_host: str = DEFAULT_HTTP[0]
    http_port: int = DEFAULT_HTTP[1]
    http_enabled: bool = True
    socket_mode: int = 0o600
    allow_uids: frozenset[int] = field(default_factory=frozenset)
    allow_gids: frozenset[int] = field(default_factory=frozenset)
    requeue: str | None = None
    shm_name: str | None = None
    salvage: bool = False
    max_failed_jobs: int = 1_000_000
    max_failed_age: float = 30 * 86400.0
    maintenance_interval: float = 30.0
    frame_deadline: float = 10.0
    partial_frame_budget: int = 64 * 1024 * 1024
    access: AccessSettings = field(default_factory=AccessSettings)
    tick_interval: float = 1.0
    worker_retention: float = 600.0
    clock: Callable[[], float] = field(default=time.time, compare=False, repr=False)
    # The Redis hub (qdash_mp.hub, ``--hub`` / ``--host-name``): off unless ``hub_url``.
    hub_url: str | None = None
    hub_host: str | None = None
    """Host name published under; ``None``: this machine's hostname."""
    hub_interval: float = 1.0

    @property
    def socket(self) -> Path:
        """The Unix socket path the collector listens on."""
        return self.socket_path if self.socket_path is not None else self.data_dir / SOCKET_NAME

    @property
    def state_file(self) -> Path:
        """``<data_dir>/collector.json``, written once the collector is ready."""
        return self.data_dir / STATE_NAME

    @property
    def counters_file(self) -> Path:
        """``<data_dir>/counters.snapshot``: counters saved at a clean stop, restored at start."""
        return self.data_dir / "counters.snapshot"

    @property
    def shm(self) -> str:
        """The shared-memory segment name (no leading slash)."""
        if self.shm_name:
            return self.shm_name
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:16]
        return f"qdash_mp_{digest}"
