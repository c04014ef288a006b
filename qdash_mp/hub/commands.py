"""Hub commands on the host: ``retry`` / ``forget`` of a failed job, asked for from the hub.

The publish script hands the publisher the entries of ``cmd:{host}`` (``offer``); each runs
once per collector process through the collector's own actions (``Retries.retry`` with its
exactly-once claim, ``Retries.forget``). The outcome waits here (``acks``) until a publish
carries it together with the job's removal from the hub index: the result key, the stream
entry's deletion and the index change are one script call, so the hub never shows a result
for a job it still lists, nor drops a job whose requeue did not happen.

Outcomes::

    retry ok                 {"ok": true,  "already": false}   the job left the journal
    id not in the journal    {"ok": true,  "already": true}    done before (e.g. a retry that
                                                               ran before a crash) or forgotten
    no requeue route / the   {"ok": false, "error": "..."}     the job stays
    worker refused
    retry in progress        no result yet: the entry is offered again by the next publish
    (a dashboard retry of    (then it finds the id gone: "already")
    the same id)
    unreadable entry         {"ok": false, "error": "..."} when it has a usable req, else it
                             is only deleted (logged)

A crash between the requeue and the publish that acknowledges it leaves the entry in the
stream: the restarted collector runs it again, finds the id gone from the journal (the drop
was committed before the requeue was answered as done) and answers ``already``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qdash_mp.errors import HubCorrupt, NotFound, QdashError, RetryConflict
from qdash_mp.hub.format_failed import Command, Result, decode_command, encode_result

if TYPE_CHECKING:
    from qdash_mp.collector.daemon import Collector

__all__ = ["Ack", "Commands"]

log = logging.getLogger("qdash_mp.hub.commands")


@dataclass(frozen=True, slots=True)
class Ack:
    """A finished command, waiting for the publish that acknowledges it.

    ``req`` is ``None`` for an entry too broken to answer (only deleted); ``id`` is the job
    id whose index entry the same publish must refresh (``None`` then too).
    """

    entry: str
    req: str | None
    blob: bytes
    id: str | None


class Commands:
    """The hub commands of one collector process; see the module docstring."""

    def __init__(self, collector: Collector, clock: Callable[[], float]) -> None:
        self._c = collector
        self._clock = clock
        self._running: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, Ack] = {}
        self.executed = 0
        """Commands carried out by this process (retries and forgets that did something)."""

    def offer(self, entries: Sequence[tuple[str, dict[bytes, bytes]]]) -> None:
        """Start the stream entries not seen yet (``(entry id, fields)`` as XRANGE gives)."""
        for entry, fields in entries:
            if entry in self._running or entry in self._done:
                continue
            try:
                cmd = decode_command(fields)
            except HubCorrupt as exc:
                self._broken(entry, fields, exc)
                continue
            task = asyncio.get_running_loop().create_task(
                self._run(entry, cmd), name=f"qdash_mp.hub.command.{entry}"
            )
            self._running[entry] = task
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        for entry, t in list(self._running.items()):
            if t is task:
                del self._running[entry]

    def _broken(self, entry: str, fields: dict[bytes, bytes], exc: HubCorrupt) -> None:
        log.error("hub command %s is unreadable, dropped: %s", entry, exc)
        req = fields.get(b"req") if isinstance(fields, dict) else None
        text = req.decode(errors="replace") if isinstance(req, bytes) else ""
        if not 0 < len(text) <= 64 or ":" in text:
            self._done[entry] = Ack(entry, None, b"", None)
            return
        op = fields.get(b"op", b"")
        blob = encode_result(
            Result(
                ok=False,
                already=False,
                error=f"unreadable command: {exc}",
                op=op.decode(errors="replace") if op in (b"retry", b"forget") else "retry",
                id=fields.get(b"id", b"?").decode(errors="replace") or "?",
                at=self._clock(),
            )
        )
        self._done[entry] = Ack(entry, text, blob, None)

    async def _run(self, entry: str, cmd: Command) -> None:
        ok, already, error = True, False, None
        try:
            if cmd.op == "retry":
                await self._c.retries.retry(cmd.id)
            else:
                await self._c.retries.forget(cmd.id)
            self.executed += 1
        except NotFound:
            already = True
        except RetryConflict:
            return  # offered again by the next publish, once the other retry is over
        except QdashError as exc:
            ok, error = False, str(exc)
        except Exception as exc:  # a bug must answer, not leave the hub waiting forever
            log.exception("hub command %s (%s %r) failed", entry, cmd.op, cmd.id)
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if ok:
            log.info("hub %s of failed job %r done%s", cmd.op, cmd.id, " before" * already)
        else:
            log.warning("hub %s of failed job %r refused: %s", cmd.op, cmd.id, error)
        result = Result(ok, already, error, cmd.op, cmd.id, self._clock())
        self._done[entry] = Ack(entry, cmd.req, encode_result(result), cmd.id)

    def acks(self) -> list[Ack]:
        """Finished commands not acknowledged yet."""
        return list(self._done.values())

    def acknowledged(self, acks: Sequence[Ack]) -> None:
        """A publish carrying ``acks`` was applied."""
        for ack in acks:
            self._done.pop(ack.entry, None)

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        for task in list(self._running.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
