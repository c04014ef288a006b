"""Clients and the process around them: close at exit, start over in a forked child.

Clients are closed (and so flushed, waiting at most ``_EXIT_WAIT`` s in all) at interpreter
exit via ``atexit``, and in ``multiprocessing`` children -- which leave through ``os._exit``
and skip ``atexit`` -- via a ``multiprocessing.util.Finalize``. After ``os.fork()`` every
live client of the child starts over as a new client (``_after_fork_in_child``).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, Protocol

__all__ = ["forget", "track"]

log = logging.getLogger("qdash_mp.client.process")

_EXIT_WAIT = 2.0
"""Seconds all clients together may wait for acknowledgements at interpreter exit."""


class _Tracked(Protocol):
    def close(self, timeout: float | None = ...) -> bool: ...

    def _after_fork_in_child(self) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()
_hooks_installed = False
_mp_watched = False
_hooks_lock = threading.Lock()


class _Token:
    """A weak-referenceable key for ``multiprocessing.util.register_after_fork``."""


_MP_TOKEN = _Token()


def track(client: _Tracked) -> None:
    """Close ``client`` at exit and reset it after a fork (hooks installed on first use)."""
    _install_process_hooks()
    _live.add(client)


def forget(client: _Tracked) -> None:
    """``client`` is closed: nothing to do for it at exit any more."""
    _live.discard(client)


def _install_process_hooks() -> None:
    """Once per interpreter (inherited by forks): atexit close, fork reset, mp finalizer."""
    global _hooks_installed  # noqa: PLW0603 -- once-per-interpreter registration
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(_close_all_at_exit)
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _watch_multiprocessing(direct=True)


def _watch_multiprocessing(*, direct: bool) -> None:
    """Close clients when a ``multiprocessing`` child exits (it skips ``atexit``).

    Only if ``multiprocessing`` is already imported (it is never imported here). A forked
    ``multiprocessing`` child clears its finalizers in ``Process._bootstrap`` and then runs
    the after-fork registry, which (inherited from the parent) installs ours again.
    """
    global _mp_watched  # noqa: PLW0603 -- once per interpreter, inherited by forks
    mp_util: Any = sys.modules.get("multiprocessing.util")
    if mp_util is None or _mp_watched:
        return
    _mp_watched = True
    mp_util.register_after_fork(_MP_TOKEN, _install_mp_finalizer)
    if direct:
        _install_mp_finalizer(_MP_TOKEN)


def _install_mp_finalizer(_token: object) -> None:
    mp_util: Any = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        mp_util.Finalize(None, _close_all_at_exit, exitpriority=100)


def _after_fork_in_child() -> None:
    global _hooks_lock  # noqa: PLW0603 -- the parent's lock may have been held at fork
    _hooks_lock = threading.Lock()
    for client in list(_live):
        try:
            client._after_fork_in_child()
        except Exception:
            log.exception("qdash_mp client: could not reset a client after fork")
    _watch_multiprocessing(direct=False)


def _close_all_at_exit() -> None:
    deadline = time.monotonic() + _EXIT_WAIT
    for client in list(_live):
        try:
            client.close(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("qdash_mp client: close at exit failed")
