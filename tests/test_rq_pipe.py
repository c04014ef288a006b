"""The RQ worker's pipe to its reporter: the record bytes, and the reporter process's life
(real forks and pipes; RQ itself is not needed here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qdash_mp.errors import ProtocolError
from qdash_mp.integrations.rq_pipe import (
    MAX_BODY,
    End,
    Pipe,
    Records,
    Start,
    decode,
    encode_end,
    encode_start,
    read_records,
)

WAIT = 20.0

# 3.12+ warns at a fork while other threads run (another test's may linger); the forks here
# are the reporter's, which is what this module tests.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def hexdump(data: bytes) -> str:
    return data.hex(" ")


def test_end_record_bytes_match_the_table() -> None:
    # u32 body length 28 | "E" | f64 measured 0.5 | f64 RQ's runtime 0.25 | u32 2 "ab"
    # | u32 1 "q"
    assert hexdump(encode_end("ab", "q", 0.5, 0.25)) == (
        "1c 00 00 00 45 00 00 00 00 00 00 e0 3f 00 00 00 00 00 00 d0 3f"
        " 02 00 00 00 61 62 01 00 00 00 71"
    )
    # not said finished by the horse: a NaN (f8 7f), the reporter asks Redis
    assert hexdump(encode_end("ab", "q", 0.5, None))[39:62] == "00 00 00 00 00 00 f8 7f"
    assert decode(encode_end("ab", "q", 0.5, None)[4:]) == End("ab", "q", 0.5, None)


def test_start_record_bytes_match_the_table() -> None:
    # u32 body length 47 | "S" | f64 enqueued | i64 -retries_left | i64 number_of_retries
    # | u32 attempts | u32 2 "ab" | u32 1 "q" | u32 3 "t.f"
    data = encode_start("ab", "q", "t.f", 2, 1764700000.5, (-3, 1))
    assert hexdump(data) == (
        "2f 00 00 00 53 00 00 20 d8 cb 4b da 41 fd ff ff ff ff ff ff ff 01 00 00 00 00 00 00"
        " 00 02 00 00 00 02 00 00 00 61 62 01 00 00 00 71 03 00 00 00 74 2e 66"
    )
    # enqueued_at unknown: a NaN (f8 7f)
    assert hexdump(encode_start("ab", "q", "t.f", 1, None, (0, 0)))[15:38] == (
        "00 00 00 00 00 00 f8 7f"
    )


def test_records_round_trip_whatever_the_chunks() -> None:
    records: list[Start | End] = [
        Start("j1", "default", "tasks.add", 1, 1764700000.25, (0, 0)),
        End("j1", "default", 0.0125, 0.01),
        Start("j-é", "q2", "m.f\u00e9", 3, None, (-1, 2)),
        End("j-é", "q2", 1.5, None),
    ]
    data = b"".join(
        encode_start(r.job_id, r.queue, r.name, r.attempts, r.enqueued_at, r.retries_before)
        if isinstance(r, Start)
        else encode_end(r.job_id, r.queue, r.measured, r.runtime)
        for r in records
    )
    for size in (1, 3, 7, len(data)):
        parser = Records()
        got = [rec for i in range(0, len(data), size) for rec in parser.feed(data[i : i + size])]
        assert got == records


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"X" + bytes(8), "not an RQ record"),
        (b"E" + bytes(11), "not an RQ record"),
        (b"E" + bytes(16) + b"\x05\x00\x00\x00ab", "past its end"),
        (b"E" + bytes(16) + b"\x01\x00\x00\x00a", "cut short"),
        (b"E" + bytes(16) + b"\x01\x00\x00\x00a\x01\x00\x00\x00bZZ", "after its last field"),
        (b"E" + bytes(16) + b"\x01\x00\x00\x00\xff\x01\x00\x00\x00b", "not UTF-8"),
    ],
)
def test_a_bad_body_raises_saying_what_is_wrong(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode(body)


def test_an_oversized_length_raises_before_waiting_for_the_bytes() -> None:
    parser = Records()
    with pytest.raises(ProtocolError, match="at most"):
        list(parser.feed((MAX_BODY + 1).to_bytes(4, "little")))


def test_garbage_stops_reporting_but_the_pipe_is_still_drained() -> None:
    """A writer never blocks on a reporter that met bytes it cannot read."""
    read_fd, write_fd = os.pipe()
    handled: list[object] = []
    good = encode_end("a", "q", 0.1, 0.05)
    pid = os.fork()
    if pid == 0:  # the writer: more than a pipe's buffer after the garbage
        os.close(read_fd)
        try:
            os.write(write_fd, good)
            os.write(write_fd, b"\x09\x00\x00\x00garbage!!")
            for _ in range(3000):
                os.write(write_fd, good * 10)
        finally:
            os._exit(0)
    os.close(write_fd)
    read_records(read_fd, handled.append)  # returns at EOF: the writer finished
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert handled == [End("a", "q", 0.1, 0.05)]


def _reads(pause: float, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[object]]:
    """How many reads ``read_records`` made of 40 records written 10 ms apart."""
    reads = []
    real_read = os.read

    def counted(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", counted)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: a record every 10 ms, as jobs end
        code = 1
        try:
            os.close(read_fd)
            for i in range(40):
                os.write(write_fd, encode_end(f"j{i}", "q", 0.01, 0.01))
                time.sleep(0.01)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    handled: list[object] = []
    try:
        read_records(read_fd, handled.append, pause)
    finally:
        monkeypatch.undo()
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return len(reads), handled


def test_a_pause_reads_records_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a pause, records written while the reporter sleeps are read together (a wake-up
    per pause, not per record), and every record still arrives, in order."""
    expected = [End(f"j{i}", "q", 0.01, 0.01) for i in range(40)]
    batched, handled = _reads(0.15, monkeypatch)
    assert handled == expected
    eager, handled = _reads(0.0, monkeypatch)
    assert handled == expected
    assert batched <= 6  # ~0.4 s of writes in 0.15 s pauses, and the read seeing EOF
    assert eager >= 20  # woken by (nearly) every write


def _serve_to(path: Path) -> object:
    """A reporter that appends each record it reads to ``path`` (one line each)."""

    def serve(read_fd: int) -> None:
        with path.open("a") as out:

            def handle(record: Start | End) -> None:
                out.write(f"{os.getpid()} {record.job_id}\n")
                out.flush()

            read_records(read_fd, handle)
            out.write(f"{os.getpid()} closed\n")

    return serve


def _lines(path: Path, n: int) -> list[str]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.01)
    raise AssertionError(f"{n} lines expected in {path}, got {path.read_text()!r}")


def _started(out: Path) -> tuple[Pipe, int]:
    """A pipe whose reporter writes what it reads to ``out``, started; and its pid."""
    pipe = Pipe(_serve_to(out))  # type: ignore[arg-type]
    pipe.start()
    assert pipe.pid is not None
    return pipe, pipe.pid


def test_pipe_feeds_its_reporter_and_stop_waits_for_it(tmp_path: Path) -> None:
    out = tmp_path / "records"
    pipe, reporter = _started(out)
    for i in range(3):
        pipe.send(encode_end(f"j{i}", "q", 0.0, 0.0))
    assert pipe.stop(WAIT)
    lines = out.read_text().splitlines()
    assert lines == [f"{reporter} j0", f"{reporter} j1", f"{reporter} j2", f"{reporter} closed"]
    with pytest.raises(ChildProcessError):
        os.waitpid(reporter, os.WNOHANG)  # reaped by stop: no zombie left


def test_a_killed_reporter_is_replaced_at_the_next_record(tmp_path: Path) -> None:
    out = tmp_path / "records"
    pipe, first = _started(out)
    pipe.send(encode_end("before", "q", 0.0, None))
    _lines(out, 1)
    os.kill(first, signal.SIGKILL)
    os.waitpid(first, 0)
    pipe.send(encode_end("after", "q", 0.0, None))  # EPIPE: a new reporter, the record resent
    second = pipe.pid
    assert second not in (None, first)
    assert pipe.stop(WAIT)
    assert out.read_text().splitlines() == [
        f"{first} before",
        f"{second} after",
        f"{second} closed",
    ]


def test_the_reporter_ignores_sigterm_and_leaves_when_the_worker_is_gone(
    tmp_path: Path,
) -> None:
    """Ctrl-C or SIGTERM to the process group must not lose the reporter's counts: it
    leaves when the pipe closes (here: its worker was SIGKILLed)."""
    out = tmp_path / "records"
    code = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_rq_pipe import _serve_to
from pathlib import Path
from qdash_mp.integrations.rq_pipe import Pipe, encode_end
pipe = Pipe(_serve_to(Path({str(out)!r})))
pipe.start()
pipe.send(encode_end("j", "q", 0.0, 0.0))
print(pipe.pid, flush=True)
time.sleep(60)
"""
    worker = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert worker.stdout is not None
        reporter = int(worker.stdout.readline())
        _lines(out, 1)
        os.killpg(worker.pid, signal.SIGTERM)  # the worker dies; the reporter stays
        worker.wait(WAIT)
        lines = _lines(out, 2)
        assert lines == [f"{reporter} j", f"{reporter} closed"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the worker, and a reporter left
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(WAIT)
        if worker.stdout is not None:
            worker.stdout.close()
