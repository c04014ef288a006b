"""The collector daemon end to end: real collector processes, real worker processes, real sockets.

Each test starts ``qdash-mp collector`` in its own short temp dir and talks to it the way
users do: ``Client`` hooks in worker processes, HTTP, ``qdash-mp stats --json``, and (for the
hostile cases) raw bytes on the socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from qdash_testing.collector import CollectorProc, run_module, run_worker, short_dir, wait_for
from qdash_testing.http import JSON_TYPE, DashboardSession
from qdash_testing.http import get_json as http_get_json

from qdash_mp.journal import Journal, RecordType, record_header
from qdash_mp.wire import (
    Batch,
    ErrorMsg,
    FrameDecoder,
    Hello,
    Welcome,
    encode,
    encode_batch,
    pack_failed_fields,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def collector(running_collector: CollectorProc) -> CollectorProc:
    """The shared ``running_collector`` (on the shared ``data_dir``), by this module's name."""
    return running_collector


def get_json(url: str) -> Any:
    return http_get_json(url, content_type=JSON_TYPE)


def qdash_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qdash_mp ARGS`` to completion, as a user would at a shell."""
    return subprocess.run(
        [sys.executable, "-m", "qdash_mp", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def cli_stats(data_dir: Path) -> Any:
    out = qdash_cli("stats", "--data-dir", str(data_dir), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def finish(worker: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    out, _ = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, out
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert result["flushed"] is True
    return result


def totals(c: CollectorProc) -> dict[str, int]:
    stats = get_json(c.http + "/queues/api/stats")
    return {k: stats["totals"][k] for k in ("pushed", "processed", "failed", "retried")}


def raw_exchange(path: str, data: bytes, *, timeout: float = 10) -> list[Any]:
    """Send ``data`` on a fresh connection and read until the collector closes it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
    decoder = FrameDecoder()
    msgs: list[Any] = []
    try:
        while chunk := sock.recv(65536):
            msgs.extend(decoder.feed(chunk))
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return msgs


def raw_exchange_frames(path: str, data: bytes) -> list[bytes]:
    """Like ``raw_exchange`` but returns the raw bytes received (for a forked child)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(data)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return chunks


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def hello(client_id: str = "raw-client", version: int = 1) -> bytes:
    """A HELLO of 6 elements: version 1's form (version 2 adds an info map)."""
    body = msgpack.packb([1, version, client_id, os.getpid(), "test", None])
    return frame(body)


def failed_batch(payload_raw: bytes) -> bytes:
    """HELLO, then a BATCH whose one failed job carries these payload bytes (unchecked)."""
    record = pack_failed_fields("j", "n", payload_raw, 0, None, "q", "e", "", 1.0)
    return hello() + encode_batch(1, {"q": (0, 0, 1, 0)}, [record])


# ---------------------------------------------------------------------------------------------


def test_four_processes_count_exactly(collector: CollectorProc, data_dir: Path) -> None:
    workers = [
        run_worker(
            collector.socket, pushed=200_000, processed=200_000, failed=100, id_prefix=f"w{i}"
        )
        for i in range(4)
    ]
    for w in workers:
        finish(w)

    assert totals(collector) == {
        "pushed": 800_000,
        "processed": 800_000,
        "failed": 400,
        "retried": 0,
    }
    from_shm = cli_stats(data_dir)
    assert from_shm["totals"]["pushed"] == 800_000
    assert from_shm["totals"]["processed"] == 800_000
    assert from_shm["totals"]["failed"] == 400
    page = get_json(collector.http + "/queues/api/failed?page=1")
    assert page["total"] == 400
    assert len(page["jobs"]) == 50
    ids = set()
    for n in range(1, 9):
        ids |= {j["id"] for j in get_json(collector.http + f"/queues/api/failed?page={n}")["jobs"]}
    assert len(ids) == 400


def test_sigkill_and_restart_loses_and_doubles_nothing(
    collector: CollectorProc, data_dir: Path
) -> None:
    workers = [
        run_worker(
            collector.socket,
            pushed=300_000,
            processed=300_000,
            failed=200,
            chunks=40,
            pause=0.05,
            id_prefix=f"k{i}",
            announce=True,
        )
        for i in range(2)
    ]
    for _ in range(3):
        time.sleep(0.3)  # let traffic flow, then crash the collector mid-stream
        collector.kill()
        collector.start()
    results = [finish(w) for w in workers]
    assert all(r["flushed"] for r in results)
    assert totals(collector) == {
        "pushed": 600_000,
        "processed": 600_000,
        "failed": 400,
        "retried": 0,
    }
    assert get_json(collector.http + "/queues/api/failed")["total"] == 400


def test_collector_absent_at_start_then_appearing(data_dir: Path) -> None:
    c = CollectorProc(data_dir)
    worker = run_worker(
        c.socket, pushed=10_000, processed=9_000, failed=7, announce=True, flush_timeout=60
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "calls done"
        c.start()
        finish(worker)
        assert totals(c) == {"pushed": 10_000, "processed": 9_000, "failed": 7, "retried": 0}
        assert get_json(c.http + "/queues/api/failed")["total"] == 7
    finally:
        worker.kill()
        c.cleanup()


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("garbage", b"\x00\x00\x00\x05hello", "protocol"),
        ("not an array", frame(msgpack.packb({"a": 1})), "protocol"),
        ("oversize header", struct.pack(">I", 2**31) + b"x" * 16, "protocol"),
        ("str32 claiming 4 GiB", frame(b"\x92\x01\xdb\xff\xff\xff\xff" + b"x" * 8), "protocol"),
        ("deep nesting", frame(b"\x91" * 100_000 + b"\xc0"), "protocol"),
        ("wrong version", hello(version=99), "version"),
        ("batch before hello", encode(Batch(seq=1, counters={"q": (1, 0, 0, 0)})), "handshake"),
        ("payload nesting bomb", failed_batch(b"\x91" * 100_000 + b"\xc0"), "protocol"),
        ("payload with an ext", failed_batch(b"\x91\xd6\xff\x00\x00\x00\x00"), "protocol"),
        ("payload str32 of 4 GiB", failed_batch(b"\xdb\xff\xff\xff\xff" + b"x" * 8), "protocol"),
        ("two objects in a payload", failed_batch(b"\xc0\xc0"), "protocol"),
    ],
)
def test_hostile_frames_close_only_that_connection(
    collector: CollectorProc, name: str, data: bytes, code: str
) -> None:
    good = run_worker(collector.socket, pushed=5_000, processed=5_000, chunks=5, pause=0.02)
    msgs = raw_exchange(collector.socket, data)
    errors = [m for m in msgs if isinstance(m, ErrorMsg)]
    assert errors, f"{name}: no ERROR frame before close, got {msgs!r}"
    assert errors[-1].code == code
    finish(good)
    assert totals(collector)["pushed"] == 5_000
    assert collector.proc is not None
    assert collector.proc.poll() is None
    wait_for(lambda: errors[-1].reason in collector.logs(), 5, "the reason in the log")


def test_truncated_frame_then_close_hurts_nothing(collector: CollectorProc) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(collector.socket)
    sock.sendall(hello())
    full = encode(Batch(seq=1, counters={"trunc": (5, 0, 0, 0)}))
    sock.sendall(full[: len(full) - 3])
    sock.close()
    good = run_worker(collector.socket, pushed=100)
    finish(good)
    t = get_json(collector.http + "/queues/api/stats")
    assert [q["queue"] for q in t["queues"]] == ["q"]
    assert t["totals"]["pushed"] == 100


def test_handshake_and_batch_over_a_raw_socket(collector: CollectorProc) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(collector.socket)
    decoder = FrameDecoder()

    def read_one() -> Any:
        while True:
            msgs = decoder.feed(sock.recv(65536))
            if msgs:
                assert len(msgs) == 1
                return msgs[0]

    sock.sendall(encode(Hello(client_id="raw-1", pid=os.getpid(), host="t")))
    assert read_one() == Welcome(last_seq=0)  # version 2: the collector's and the client's
    sock.sendall(encode(Batch(seq=1, counters={"raw": (3, 2, 1, 0)})))
    assert read_one().seq == 1
    sock.sendall(encode(Batch(seq=1, counters={"raw": (3, 2, 1, 0)})))  # a resend: dedup
    assert read_one().seq == 1
    sock.close()
    assert totals(collector) == {"pushed": 3, "processed": 2, "failed": 1, "retried": 0}
    # a reconnect learns how far the collector got
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(collector.socket)
    decoder = FrameDecoder()
    sock.sendall(encode(Hello(client_id="raw-1", pid=os.getpid(), host="t")))
    # 0: the journal vouches for no failed jobs of this client; a resend of seq 1 would
    # have its counters skipped
    assert read_one() == Welcome(last_seq=0)
    sock.sendall(encode(Batch(seq=1, counters={"raw": (3, 2, 1, 0)})))
    assert read_one().seq == 1
    assert totals(collector) == {"pushed": 3, "processed": 2, "failed": 1, "retried": 0}
    sock.sendall(encode(Batch(seq=3, counters={"raw": (1, 0, 0, 0)})))  # skips seq 2
    err = read_one()
    assert isinstance(err, ErrorMsg)
    assert err.code == "sequence"
    sock.close()
    # A client the collector has never seen (last_seq 0) may start at any seq: one that
    # still holds batches from before is not refused forever (docs/protocol.md).
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(collector.socket)
    decoder = FrameDecoder()
    sock.sendall(encode(Hello(client_id="raw-2", pid=os.getpid(), host="t")))
    assert read_one() == Welcome(last_seq=0)
    sock.sendall(encode(Batch(seq=7, counters={"raw": (1, 0, 0, 0)})))
    assert read_one().seq == 7
    sock.sendall(encode(Batch(seq=9, counters={"raw": (1, 0, 0, 0)})))  # now a gap
    err = read_one()
    assert isinstance(err, ErrorMsg)
    assert err.code == "sequence"
    sock.close()
    assert totals(collector)["pushed"] == 4


def test_failed_jobs_are_journaled_byte_for_byte_as_sent(
    collector: CollectorProc, data_dir: Path
) -> None:
    # A FAILED array packed the long way (attempts as uint64): re-encoding would change it.
    fields = [msgpack.packb(v) for v in ("raw-job", "task", b"\x92\x01\xa1x")]
    fields.append(b"\xcf" + (3).to_bytes(8, "big"))
    fields += [msgpack.packb(v) for v in (None, "mail", "ValueError: boom", "", 1_700_000_000.5)]
    record = b"\x99" + b"".join(fields)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(collector.socket)
    decoder = FrameDecoder()

    def read_one() -> Any:
        msgs: list[Any] = []
        while not msgs:
            data = sock.recv(65536)
            assert data, "the collector closed the connection"
            msgs = decoder.feed(data)
        assert len(msgs) == 1
        return msgs[0]

    sock.sendall(hello("bytes-client"))
    assert read_one() == Welcome(last_seq=0, version=1)
    sock.sendall(encode_batch(1, {"mail": (0, 0, 1, 0)}, [record]))
    assert read_one().seq == 1  # the ACK: the record is durable
    sock.close()
    journal = b"".join(p.read_bytes() for p in sorted((data_dir / "journal").glob("*.seg")))
    assert record_header(RecordType.FAILED, record) + record in journal
    job = get_json(collector.http + "/queues/api/failed/raw-job")
    assert (job["queue"], job["attempts"], job["payload"]) == ("mail", 3, [1, "x"])


def test_socket_is_owner_only(collector: CollectorProc) -> None:
    mode = os.stat(collector.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid")
def test_peer_with_another_uid_is_refused(data_dir: Path) -> None:
    c = CollectorProc(data_dir, args=("--socket-mode", "666")).start()
    try:
        os.chmod(data_dir, 0o755)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become "nobody", then knock
            try:
                os.close(read_end)
                os.setgid(65534)
                os.setuid(65534)
                with os.fdopen(write_end, "wb") as out:
                    out.write(b"".join(raw_exchange_frames(c.socket, hello())))
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as inp:
            answer = inp.read()
        os.waitpid(pid, 0)
        msgs = FrameDecoder().feed(answer)
        assert [type(m) for m in msgs] == [ErrorMsg]
        assert msgs[0].code == "refused"
        wait_for(lambda: "uid 65534 (gid 65534) is not allowed" in c.logs(), 5, "refusal log")
        # the owner still gets in
        finish(run_worker(c.socket, pushed=1))
    finally:
        c.cleanup()


def test_stale_socket_is_replaced(data_dir: Path) -> None:
    path = data_dir / "collector.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a killed collector leaves
    assert path.exists()
    c = CollectorProc(data_dir).start()
    try:
        finish(run_worker(c.socket, pushed=3))
        assert totals(c)["pushed"] == 3
    finally:
        c.cleanup()


def test_second_collector_on_a_live_socket_refuses_to_start(
    collector: CollectorProc, data_dir: Path
) -> None:
    other = short_dir()
    try:
        out = qdash_cli(
            "collector",
            "--data-dir",
            str(other),
            "--socket",
            collector.socket,
            "--http",
            "127.0.0.1:0",
        )
        assert out.returncode == 2
        assert "already listening" in out.stderr
        same_dir = qdash_cli("collector", "--data-dir", str(data_dir))
        assert same_dir.returncode == 2
        assert "another collector" in same_dir.stderr
        # the first one is untouched
        finish(run_worker(collector.socket, pushed=2))
        assert totals(collector)["pushed"] == 2
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_sigterm_stops_cleanly_and_counters_continue(
    collector: CollectorProc, data_dir: Path
) -> None:
    finish(run_worker(collector.socket, pushed=40, processed=30, failed=3))
    assert collector.stop() == 0
    assert not (data_dir / "collector.json").exists()
    assert not Path(collector.socket).exists()
    assert not list(Path("/dev/shm").glob(collector.shm + "*"))
    collector.start()
    assert totals(collector) == {"pushed": 40, "processed": 30, "failed": 3, "retried": 0}
    assert get_json(collector.http + "/queues/api/failed")["total"] == 3


def test_stats_cli_explains_a_missing_collector(data_dir: Path) -> None:
    out = qdash_cli("stats", "--data-dir", str(data_dir))
    assert out.returncode == 1  # not running: not an error of the command line
    assert "qdash-mp collector --data-dir" in out.stderr


def test_retry_goes_back_to_a_worker_and_leaves_the_journal(
    collector: CollectorProc, data_dir: Path
) -> None:
    requeued = data_dir / "requeued.txt"

    # no worker can requeue yet: 409 with a reason, and the record stays
    finish(run_worker(collector.socket, failed=3, id_prefix="r"))
    session = DashboardSession(collector.http)
    status, body = session.post("/queues/failed/r-1/retry")
    assert status == 409
    assert "requeue" in body["error"]
    assert get_json(collector.http + "/queues/api/failed")["total"] == 3

    assert session.post("/queues/failed/r-1/retry", "forged.token")[0] == 403

    worker = run_worker(collector.socket, requeue_file=requeued)
    try:
        assert worker.stdout is not None
        assert json.loads(worker.stdout.readline())["flushed"] is True
        status, body = session.post("/queues/failed/r-1/retry")
        assert (status, body["ok"]) == (200, True)
        assert requeued.read_text().split() == ["r-1"]
        page = get_json(collector.http + "/queues/api/failed")
        assert page["total"] == 2
        assert "r-1" not in {j["id"] for j in page["jobs"]}
        assert totals(collector)["retried"] == 1
        assert session.post("/queues/failed/r-1/retry")[0] == 404
    finally:
        worker.communicate(input="", timeout=30)


def test_sigkill_at_random_moments_loses_no_acknowledged_failed_job(data_dir: Path) -> None:
    """≥ 20 crashes while a worker keeps failing jobs: every acknowledged job is kept, once."""
    rng = random.Random(20261128)
    c = CollectorProc(data_dir).start()
    failer = run_module("qdash_testing.failer", socket=c.socket, group=25)
    lines: list[str] = []
    assert failer.stdout is not None
    out = failer.stdout
    reader = threading.Thread(target=lambda: lines.extend(iter(out.readline, "")))
    reader.start()
    try:
        for _ in range(22):
            time.sleep(rng.uniform(0.05, 0.3))
            c.kill()
            c.start()
        time.sleep(0.3)
    finally:
        assert failer.stdin is not None
        failer.stdin.close()
        failer.wait(timeout=120)
        reader.join(timeout=30)
        failer.stdout.close()
    acked = max(int(line.split()[1]) for line in lines if line.startswith("acked"))
    assert lines[-1].startswith("acked"), lines[-3:]  # the final flush got through too
    assert acked > 100
    assert c.stop() == 0
    journal = Journal.open(data_dir / "journal")
    try:
        ids = [row.id for row in journal.page(0, len(journal) + 1)]
    finally:
        journal.close()
    assert len(ids) == len(set(ids))  # exactly once
    assert set(ids) == {f"f-{i}" for i in range(acked)}
    c.cleanup()


def test_requeue_callable_loaded_into_the_daemon(data_dir: Path) -> None:
    """``--requeue module:function``: retries go to it; if it raises, 502 and the job stays."""
    out = data_dir / "requeued-by-daemon.txt"
    c = CollectorProc(
        data_dir,
        args=("--requeue", "qdash_testing.requeue:append"),
        env={"QDASH_TEST_REQUEUE_FILE": str(out)},
    ).start()
    try:
        finish(run_worker(c.socket, failed=2, id_prefix="ok"))
        finish(run_worker(c.socket, failed=1, id_prefix="refuse"))
        session = DashboardSession(c.http)

        def retry(job_id: str) -> tuple[int, Any]:
            return session.post(f"/queues/failed/{job_id}/retry")

        assert retry("ok-1")[0] == 200
        assert out.read_text().split() == ["ok-1"]
        status, body = retry("refuse-0")
        assert status == 502
        assert "broker refused refuse-0" in body["error"]
        ids = {j["id"] for j in get_json(c.http + "/queues/api/failed")["jobs"]}
        assert ids == {"ok-0", "refuse-0"}
        assert totals(c)["retried"] == 1
    finally:
        c.cleanup()


def test_bad_requeue_spec_is_a_clear_error(data_dir: Path) -> None:
    out = qdash_cli("collector", "--data-dir", str(data_dir), "--requeue", "no_such_module_xyz:fn")
    assert out.returncode == 2
    assert "--requeue: cannot import 'no_such_module_xyz'" in out.stderr
