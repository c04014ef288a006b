"""``Client``'s options: checked, and turned into the sender's ``SenderConfig``.

Everything ``Client.__init__`` is given goes through ``sender_config`` (a ``ConfigError``
for a bad value); the hooks only keep what the hot path reads. No I/O but creating the
spool directory.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qdash_mp.client.record import utf8_ok
from qdash_mp.client.requeue import RequeueFn, requeue_list
from qdash_mp.errors import ConfigError
from qdash_mp.settings import default_socket_path
from qdash_mp.wire import MAX_CLIENT_ID, MAX_NAME

__all__ = ["SenderConfig", "default_name", "gil_disabled", "sender_config", "wake_every"]

_SPOOL_SLACK = 10_000
"""With a spool, hooks keep failed jobs up to ``max(2 * bound, bound + this)`` while the
sender thread moves them to disk; only past that (disk failing or far too slow) are details
dropped."""

_SOCKET_PATH_MAX = 107


@dataclass(frozen=True, slots=True)
class SenderConfig:
    """A client's checked settings (what a forked child's new sender starts from too)."""

    socket_path: str
    host: str
    requeue: RequeueFn | None
    requeue_queues: tuple[str, ...] | None
    flush_interval: float
    reconnect_max: float
    max_batch_failed: int
    max_pending_failed: int
    hard_pending: int
    max_unacked: int
    spool_dir: Path | None
    name: str = ""
    track: tuple[str, ...] | None = None


def gil_disabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is not None and not is_enabled()


def default_name() -> str:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    return f"{os.path.basename(argv0)}:{os.getpid()}"[:MAX_NAME]


def _track_spec(track_jobs: bool | Iterable[str]) -> tuple[str, ...] | None:
    if track_jobs is True:
        return ("*",)
    if track_jobs is False or track_jobs is None:
        return None
    if isinstance(track_jobs, str):
        raise ConfigError("track_jobs must be a bool or a list of queue names, not a str")
    queues = tuple(track_jobs)
    for q in queues:
        if not (isinstance(q, str) and 1 <= len(q) <= MAX_NAME and utf8_ok(q)):
            raise ConfigError(f"track_jobs: {q!r} is not a queue name")
    if not queues:
        return None
    return ("*",) if "*" in queues else queues


def sender_config(
    socket_path: str | os.PathLike[str] | None,
    *,
    client_id: str | None,
    requeue: RequeueFn | None,
    requeue_queues: Iterable[str] | None,
    flush_interval: float,
    max_batch_failed: int,
    reconnect_max: float,
    max_pending_failed: int,
    max_unacked: int,
    spool_dir: str | os.PathLike[str] | None,
    name: str | None,
    track_jobs: bool | Iterable[str],
) -> SenderConfig:
    """``Client``'s arguments checked (``ConfigError``), the spool directory made."""
    path = os.fspath(socket_path) if socket_path is not None else str(default_socket_path())
    if len(os.fsencode(path)) > _SOCKET_PATH_MAX:
        raise ConfigError(f"socket path is longer than {_SOCKET_PATH_MAX} bytes: {path!r}")
    if client_id is not None and not (
        isinstance(client_id, str) and 1 <= len(client_id) <= MAX_CLIENT_ID
    ):
        raise ConfigError(f"client_id must be a str of 1..{MAX_CLIENT_ID} characters")
    if not flush_interval > 0:
        raise ConfigError(f"flush_interval must be > 0, not {flush_interval}")
    if not reconnect_max > 0:
        raise ConfigError(f"reconnect_max must be > 0, not {reconnect_max}")
    for what, value in (
        ("max_batch_failed", max_batch_failed),
        ("max_pending_failed", max_pending_failed),
        ("max_unacked", max_unacked),
    ):
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{what} must be an int >= 1, not {value!r}")
    spool = None
    if spool_dir is not None:
        spool = Path(os.fspath(spool_dir)).absolute()
        try:
            spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use spool_dir {str(spool)!r}: {exc}") from None
    if name is not None and not (isinstance(name, str) and len(name) <= MAX_NAME):
        raise ConfigError(f"name must be a str of at most {MAX_NAME} characters")
    track = _track_spec(track_jobs)
    queues = requeue_list(requeue, requeue_queues)
    if spool is None:
        hard_pending = max_pending_failed
    else:
        hard_pending = max(2 * max_pending_failed, max_pending_failed + _SPOOL_SLACK)
    return SenderConfig(
        socket_path=path,
        host=socket.gethostname()[:MAX_NAME],
        requeue=requeue,
        requeue_queues=queues,
        flush_interval=float(flush_interval),
        reconnect_max=float(reconnect_max),
        max_batch_failed=max_batch_failed,
        max_pending_failed=max_pending_failed,
        hard_pending=hard_pending,
        max_unacked=max_unacked,
        spool_dir=spool,
        name=default_name() if name is None else name,
        track=track,
    )


def wake_every(config: SenderConfig) -> int:
    """Failed jobs after which a hook wakes the sender (a batch's worth, or a spool's)."""
    if config.spool_dir is None:
        return config.max_batch_failed
    return min(config.max_batch_failed, config.max_pending_failed)
