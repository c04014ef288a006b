"""``Client`` for free-threaded CPython: every hook under the client's lock.

Without the GIL, the hot path's unlocked ``next(counter)`` and dict updates could lose counts
(``docs/client.md``). ``Client()`` returns one of these by itself when the GIL is disabled.
"""

from __future__ import annotations

from qdash_mp.client.hooks import Client
from qdash_mp.models import Job

__all__ = ["_LockedClient"]


class _LockedClient(Client):
    """``Client`` for free-threaded CPython: unlocked read-modify-write could lose counts.

    ``Client()`` returns one of these by itself when the GIL is disabled. Every hook is
    ``Client``'s under the client's lock.
    """

    __slots__ = ()

    def on_pushed(self, queue: str, job: Job | None = None) -> None:
        with self._lock:
            Client.on_pushed(self, queue, job)

    def _started_at(self, queue: str, job: Job | None, wall: float | None, mono: float) -> None:
        with self._lock:  # on_started, and a RunLog's replay of it
            Client._started_at(self, queue, job, wall, mono)

    def on_processed(
        self, queue: str, job: Job | None = None, runtime: float | None = None
    ) -> None:
        with self._lock:
            Client.on_processed(self, queue, job, runtime)

    def on_retried(self, queue: str, job: Job | None = None) -> None:
        with self._lock:
            Client.on_retried(self, queue, job)

    def on_failed(
        self,
        queue: str,
        job: Job | None,
        error: BaseException | str,
        runtime: float | None = None,
    ) -> None:
        with self._lock:
            Client.on_failed(self, queue, job, error, runtime)
