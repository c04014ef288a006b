"""The RQ worker's side of its reporter: the records it writes, and the pipe and process.

Why a reporter process: ``docs/integrations.md`` (RQ). The worker keeps no client; around
each job it writes two records to a pipe read by its reporter (``rq_reporter``), forked
once when the worker starts. This module is what the worker itself imports, so it imports
only the standard library: every module, type and object the worker holds shifts what each
work horse, forked per job, then writes and copies (measured: the client's modules cost
~2-3 % of a no-op job without reporting anything, the reports about as much again).

Records, little-endian; the pipe carries ``u32 length`` then a body of that many bytes:

=======  ======  ================================================================
offset   size    START body (``S``)
=======  ======  ================================================================
0        1       ``53`` ("S")
1        8       f64 ``enqueued_at`` (Unix seconds; NaN: not known)
9        8       i64 ``-retries_left`` before the run
17       8       i64 ``number_of_retries`` before the run
25       4       u32 attempts (runs so far, this one included)
29       4+n     u32 length, then the job id (UTF-8); then the queue, then the
                 function name, the same way
=======  ======  ================================================================

=======  ======  ================================================================
offset   size    END body (``E``)
=======  ======  ================================================================
0        1       ``45`` ("E")
1        8       f64 seconds the worker measured around the run
9        8       f64 RQ's runtime of a job the horse said *finished*; NaN: it did
                 not say so (failed, retried, a horse that died), ask Redis
17       4+n     u32 length, then the job id (UTF-8); then the queue, the same way
=======  ======  ================================================================

``encode_end("ab", "q", 0.5, 0.25)`` is ``1c 00 00 00 | 45 00 00 00 00 00 00 e0 3f 00 00 00
00 00 00 d0 3f 02 00 00 00 61 62 01 00 00 00 71`` (checked by tests). A body over
``MAX_BODY`` or that does not parse exactly raises ``ProtocolError``.

Writes block while the pipe is full (1 MiB asked for): a count is never dropped, and a
reporter that stalls is waiting on Redis, which stalls RQ as well. The reporter reads in
batches (``read_records``'s ``pause``), so a worker's writes wake it at most once a pause,
not twice a job. A reporter found dead is replaced at the next record (the records it had
read and not yet handed to its client are lost, as a client's unsent counts are when its
process dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

log = logging.getLogger("qdash_mp.integrations.rq_pipe")

MAX_BODY = 1 << 20
"""Largest record body read (a job id, queue and function name of a MiB in all)."""

PIPE_SIZE = 1 << 20
"""Bytes of pipe buffer asked for (Linux ``F_SETPIPE_SZ``; the default maximum)."""

STOP_WAIT = 10.0
"""Seconds the worker waits at shutdown for its reporter to flush and leave."""

_LEN = struct.Struct("<I")
_START = struct.Struct("<cdqqI")
_END = struct.Struct("<cdd")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Start(NamedTuple):
    """A job the worker is about to run."""

    job_id: str
    queue: str
    name: str
    attempts: int
    enqueued_at: float | None
    retries_before: tuple[int, int]


class End(NamedTuple):
    """A job whose run ended (its horse exited, however)."""

    job_id: str
    queue: str
    measured: float
    runtime: float | None
    """RQ's runtime if the horse said the job finished; None: ask Redis."""


def _text(*values: str) -> bytes:
    out = b""
    for value in values:
        data = value.encode("utf-8", "surrogatepass")
        out += _LEN.pack(len(data)) + data
    return out


def encode_start(
    job_id: str,
    queue: str,
    name: str,
    attempts: int,
    enqueued_at: float | None,
    retries_before: tuple[int, int],
) -> bytes:
    head = _START.pack(
        b"S",
        math.nan if enqueued_at is None else enqueued_at,
        retries_before[0],
        retries_before[1],
        attempts,
    )
    body = head + _text(job_id, queue, name)
    return _LEN.pack(len(body)) + body


def encode_end(job_id: str, queue: str, measured: float, runtime: float | None) -> bytes:
    finished = math.nan if runtime is None else runtime
    body = _END.pack(b"E", measured, finished) + _text(job_id, queue)
    return _LEN.pack(len(body)) + body


def _texts(body: bytes, at: int, n: int) -> list[str]:
    from qdash_mp.errors import ProtocolError

    out = []
    for _ in range(n):
        if at + 4 > len(body):
            raise ProtocolError(f"RQ record cut short at byte {at} of {len(body)}")
        (size,) = _LEN.unpack_from(body, at)
        at += 4
        if at + size > len(body):
            raise ProtocolError(f"RQ record: a text of {size} bytes past its end")
        try:
            out.append(body[at : at + size].decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"RQ record: a text that is not UTF-8: {exc}") from None
        at += size
    if at != len(body):
        raise ProtocolError(f"RQ record: {len(body) - at} bytes after its last field")
    return out


def decode(body: bytes) -> Start | End:
    """One record body; ``ProtocolError`` says what is wrong with it."""
    from qdash_mp.errors import ProtocolError

    kind = body[:1]
    if kind == b"S" and len(body) >= _START.size:
        _, enqueued, left, tries, attempts = _START.unpack_from(body)
        job_id, queue, name = _texts(body, _START.size, 3)
        when = None if math.isnan(enqueued) else float(enqueued)
        return Start(job_id, queue, name, attempts, when, (left, tries))
    if kind == b"E" and len(body) >= _END.size:
        _, measured, runtime = _END.unpack_from(body)
        job_id, queue = _texts(body, _END.size, 2)
        finished = None if math.isnan(runtime) else float(runtime)
        return End(job_id, queue, float(measured), finished)
    raise ProtocolError(f"not an RQ record: {body[:16].hex(' ')}")


class Records:
    """Records out of the pipe's bytes as they arrive (pure: no I/O)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Start | End]:
        """The records completed by ``data``; ``ProtocolError`` on bytes that are not."""
        from qdash_mp.errors import ProtocolError

        buf = self._buf
        buf += data
        at = 0
        try:
            while len(buf) - at >= 4:
                (size,) = _LEN.unpack_from(buf, at)
                if size > MAX_BODY:
                    raise ProtocolError(f"RQ record of {size} bytes (at most {MAX_BODY})")
                if len(buf) - at - 4 < size:
                    break
                yield decode(bytes(buf[at + 4 : at + 4 + size]))
                at += 4 + size
        finally:
            del buf[:at]


_CHUNK = 65536


def read_records(read_fd: int, handle: Callable[[Start | End], object], pause: float = 0.0) -> None:
    """Hand every record of the pipe to ``handle`` until the pipe is closed.

    After a read that emptied the pipe it sleeps ``pause`` seconds, so records written
    meanwhile are read together: on a CPU it shares with the worker, a reporter woken by
    every write costs two context switches a job (measured: as much as it saved).

    A record ``handle`` fails on is logged and skipped. Bytes that are not records (only
    code running in the worker or a horse could write them) end the reporting, logged; the
    pipe is still drained, so the worker never blocks on it.
    """
    from qdash_mp.errors import ProtocolError

    records = Records()
    broken = False
    while data := os.read(read_fd, _CHUNK):
        if not broken:
            try:
                for record in records.feed(data):
                    try:
                        handle(record)
                    except Exception:
                        log.exception("qdash_mp: could not report RQ record %r", record)
            except ProtocolError as exc:
                log.error("qdash_mp: the RQ reporter stops reporting: %s", exc)
                broken = True
        if pause > 0 and len(data) < _CHUNK:
            time.sleep(pause)  # the pipe was emptied: let the next records gather


class Pipe:
    """The worker's end: its reporter process, and the pipe written to it.

    ``serve(read_fd)`` runs in the forked reporter and returns when the pipe is closed.
    """

    def __init__(self, serve: Callable[[int], None]) -> None:
        self._serve = serve
        self._fd: int | None = None
        self.pid: int | None = None

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):  # an older kernel, a lower limit: the default
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        pid = os.fork()
        if pid == 0:  # the reporter
            code = 1
            try:
                os.close(write_fd)
                # Ctrl-C in a terminal reaches the whole process group: the reporter leaves
                # when the pipe closes, after the worker, with everything flushed.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                self._serve(read_fd)
                code = 0
            except BaseException:  # a forked child must not unwind into RQ's loop
                log.exception("qdash_mp: the RQ reporter failed")
            finally:
                os._exit(code)
        os.close(read_fd)
        self._fd, self.pid = write_fd, pid
        log.debug("qdash_mp: RQ reporter started (pid %d)", pid)

    def send(self, record: bytes) -> None:
        """Write ``record`` (blocking while the pipe is full); a dead reporter is replaced."""
        for _ in range(2):
            if self._fd is None:
                self.start()
            fd = self._fd
            assert fd is not None
            try:
                view = memoryview(record)
                while view:
                    view = view[os.write(fd, view) :]
                return
            except BrokenPipeError:
                log.warning("qdash_mp: the RQ reporter (pid %s) is gone; starting one", self.pid)
                self._close()
        log.error("qdash_mp: no RQ reporter took a record; a job is not counted")

    def leave(self) -> None:
        """In a child forked by the worker (a horse): close its copy of the pipe's end, so
        the reporter sees the pipe close when the worker dies, not when a long job ends.
        The object is left as it is (no write to a page shared with the worker)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def _close(self) -> int | None:
        pid, self.pid = self.pid, None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if pid is not None:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return None  # it had exited: reaped
        return pid

    def stop(self, timeout: float = STOP_WAIT) -> bool:
        """Close the pipe; wait at most ``timeout`` s for the reporter to flush and exit."""
        pid = self._close()
        if pid is None:
            return True
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return True
            except ChildProcessError:
                return True  # reaped elsewhere
            if time.monotonic() >= deadline:
                log.warning("qdash_mp: the RQ reporter (pid %d) is still flushing; left", pid)
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
