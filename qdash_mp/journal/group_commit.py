"""``GroupCommit``: many asyncio tasks share one ``Journal.commit`` (one write, one fsync)."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

from qdash_mp.errors import JournalError
from qdash_mp.journal.store import Journal

__all__ = ["GroupCommit"]


class GroupCommit:
    """Lets many asyncio tasks share one ``Journal.commit`` (one write, one fsync).

    ``await group.commit()`` returns once everything staged before the call is durable (and
    visible), or raises the ``JournalError`` of the commit that should have covered it.
    Callers that arrive in the same event-loop pass -- or within ``window`` seconds, if
    set -- share one commit; the write and fsync run in a worker thread so the loop keeps
    serving, and commits do not overlap: callers arriving during one form the next.
    """

    def __init__(self, journal: Journal, *, window: float = 0.0) -> None:
        self._journal = journal
        self._window = window
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdash-journal")
        self._next: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.commits = 0
        """Commits run so far."""

    async def commit(self) -> None:
        """Wait until everything staged before this call is durable."""
        if self._closed:
            raise JournalError("the group commit is closed")
        fut = self._next
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = self._next = loop.create_future()
            fut.add_done_callback(_consume)
            if self._runner is None or self._runner.done():
                self._runner = loop.create_task(self._run())
        await asyncio.shield(fut)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next is not None:
            if self._window > 0:
                await asyncio.sleep(self._window)
            else:
                await asyncio.sleep(0)  # one loop pass: let this pass's callers join
            fut, self._next = self._next, None
            try:
                await loop.run_in_executor(self._executor, self._journal.commit)
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every waiter of this commit
                fut.set_exception(exc)
            else:
                fut.set_result(None)
            self.commits += 1

    async def close(self) -> None:
        """Finish the commits callers wait for, then stop the worker thread."""
        self._closed = True
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._executor.shutdown(wait=True)


def _consume(fut: asyncio.Future[None]) -> None:
    """Mark a shared commit's exception as retrieved even if every waiter went away."""
    if not fut.cancelled():
        fut.exception()
