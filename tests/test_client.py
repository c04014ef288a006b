"""The worker-side ``Client`` against a real Unix socket.

The server side here is a small test harness (``FakeCollector``) that speaks the protocol
with ``qdash_mp.wire`` and applies the dedup rule of ``docs/protocol.md``; integration
tests against the real collector daemon live elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
from qdash_testing.forking import fork_quietly

from qdash_mp.client import Client, _LockedClient
from qdash_mp.errors import ConfigError
from qdash_mp.models import Job
from qdash_mp.wire import (
    Ack,
    Batch,
    ErrorMsg,
    FailedRecord,
    FrameDecoder,
    Hello,
    Message,
    Requeue,
    RequeueResult,
    Welcome,
    encode,
    unpack_failed,
)

WAIT = 5.0
REPO = Path(__file__).resolve().parent.parent


class Conn:
    """One accepted connection of the fake collector."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.hello: Hello | None = None
        self.send_lock = threading.Lock()
        self.closed = False

    def send(self, msg: Message) -> None:
        with self.send_lock:
            if not self.closed:
                try:
                    self.sock.sendall(encode(msg))
                except OSError:
                    self.close()

    def close(self) -> None:
        with self.send_lock:
            if not self.closed:
                self.closed = True
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                self.sock.close()


class FakeCollector:
    """A thread-per-connection protocol peer that applies batches with seq dedup.

    ``welcome``: answer HELLO; ``acking``: ACK each batch at once (else call ``ack_now``);
    ``drop(n, batch)`` (n = 1-based count of batches received) may return ``"before"``
    (close without applying) or ``"after"`` (apply, close without ACK);
    ``refuse`` first connections get ERROR ``shutdown`` and are closed; ``stale_welcome``
    reports one batch less than applied, so the client resends it and dedup must drop it.
    """

    def __init__(
        self,
        path: str,
        *,
        welcome: bool = True,
        acking: bool = True,
        drop: Callable[[int, Batch], str | None] | None = None,
        refuse: int = 0,
        stale_welcome: bool = False,
    ) -> None:
        self.stale_welcome = stale_welcome
        self.path = path
        self.welcome = welcome
        self.acking = acking
        self.drop = drop
        self.refuse = refuse
        self.cond = threading.Condition()
        self.last_seq: dict[str, int] = {}
        self.totals: dict[str, list[int]] = {}
        self.failed: list[FailedRecord] = []
        self.hellos: list[Hello] = []
        self.received = 0  # batches received, duplicates included
        self.duplicates = 0
        self.drops = 0
        self.acks_sent = 0
        self.results: dict[int, RequeueResult] = {}
        self.conns: list[Conn] = []
        self.threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.stopping = False
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self.threads.append(accept)

    # -- server side

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            conn = Conn(sock)
            with self.cond:
                if self.stopping:
                    conn.close()
                    return
                self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: Conn) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                try:
                    data = conn.sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for msg in decoder.feed(data):
                    if not self._handle(conn, msg):
                        return
        finally:
            conn.close()
            with self.cond:
                self.cond.notify_all()

    def _handle(self, conn: Conn, msg: Message) -> bool:
        if isinstance(msg, Hello):
            with self.cond:
                self.hellos.append(msg)
                conn.hello = msg
                refuse = self.refuse > 0
                if refuse:
                    self.refuse -= 1
                last = self.last_seq.get(msg.client_id, 0)
                if self.stale_welcome:
                    last = max(0, last - 1)
                self.cond.notify_all()
            if refuse:
                conn.send(ErrorMsg(code="shutdown", reason="collector is stopping"))
                return False
            if self.welcome:
                conn.send(Welcome(last_seq=last))
            return True
        if isinstance(msg, Batch):
            assert conn.hello is not None
            cid = conn.hello.client_id
            with self.cond:
                self.received += 1
                plan = self.drop(self.received, msg) if self.drop else None
                if plan == "before":
                    self.drops += 1
                    self.cond.notify_all()
                    return False
                last = self.last_seq.get(cid, 0)
                if msg.seq <= last:
                    self.duplicates += 1
                elif msg.seq == last + 1:
                    self.last_seq[cid] = msg.seq
                    for q, row in msg.counters.items():
                        tot = self.totals.setdefault(q, [0, 0, 0, 0])
                        for i, n in enumerate(row):
                            tot[i] += n
                    self.failed.extend(unpack_failed(f[0]) for f in msg.failed)
                else:
                    raise AssertionError(f"gap: seq {msg.seq} after {last}")
                self.cond.notify_all()
                if plan == "after":
                    self.drops += 1
                    return False
                acking = self.acking
                if acking:
                    self.acks_sent += 1
            if acking:
                conn.send(Ack(seq=msg.seq))
            return True
        if isinstance(msg, RequeueResult):
            with self.cond:
                self.results[msg.request_id] = msg
                self.cond.notify_all()
            return True
        raise AssertionError(f"unexpected {msg!r}")

    # -- test side

    def ack_now(self) -> None:
        """One cumulative ACK per connection, for everything applied of its client."""
        with self.cond:
            conns = [(c, self.last_seq.get(c.hello.client_id, 0)) for c in self.conns if c.hello]
            self.acks_sent += len(conns)
        for conn, seq in conns:
            conn.send(Ack(seq=seq))

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def total(self, queue: str) -> list[int]:
        with self.cond:
            return list(self.totals.get(queue, [0, 0, 0, 0]))

    def requeue(self, request_id: int, failed: FailedRecord) -> RequeueResult:
        with self.cond:
            conn = next(c for c in reversed(self.conns) if c.hello and not c.closed)
        conn.send(Requeue(request_id=request_id, queue=failed.queue, failed=failed))
        assert self.wait(lambda: request_id in self.results)
        return self.results[request_id]

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            conns = list(self.conns)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self.listener.close()
        for conn in conns:
            conn.close()
        for t in self.threads:
            t.join(timeout=WAIT)
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="qdc", dir="/tmp")
    yield os.path.join(d, "c.sock")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def servers(sock_path: str) -> Iterator[Callable[..., FakeCollector]]:
    started: list[FakeCollector] = []

    def start(**kwargs: Any) -> FakeCollector:
        server = FakeCollector(sock_path, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def clients(sock_path: str) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(cls: type[Client] = Client, **kwargs: Any) -> Client:
        kwargs.setdefault("flush_interval", 0.02)
        kwargs.setdefault("reconnect_max", 0.2)
        client = cls(sock_path, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close(timeout=0.5)


def job(i: int | str, payload: Any = None) -> Job:
    return Job(id=f"job-{i}", name="task", payload=payload, attempts=1, enqueued_at=1.5)


# --------------------------------------------------------------------------- hooks


def test_hooks_never_raise_without_a_collector(clients: Callable[..., Client]) -> None:
    client = clients()
    assert not os.path.exists(client.socket_path)
    weird_job: Any = Job(id=5, name=None, payload=object(), attempts="x", enqueued_at="y")  # type: ignore[arg-type]
    calls: list[Callable[[], None]] = [
        lambda: client.on_pushed("q"),
        lambda: client.on_processed("q", job(1), runtime=0.5),
        lambda: client.on_retried("q"),
        lambda: client.on_failed("q", job(2), ValueError("boom")),
        lambda: client.on_pushed(None),  # type: ignore[arg-type]
        lambda: client.on_processed(123),  # type: ignore[arg-type]
        lambda: client.on_retried(["unhashable"]),  # type: ignore[arg-type]
        lambda: client.on_failed("", job(3), "empty queue name"),
        lambda: client.on_failed("q" * 300, job(4), "long queue name"),
        lambda: client.on_failed("q", weird_job, object()),  # type: ignore[arg-type]
        lambda: client.on_failed("q", object(), "not a job"),  # type: ignore[arg-type]
        lambda: client.on_failed("q", None, "no job"),
    ]
    for call in calls:
        call()
    assert client.flush(timeout=0.2) is False


def test_flush_with_nothing_reported_needs_no_collector(clients: Callable[..., Client]) -> None:
    client = clients()
    assert client.flush(timeout=WAIT) is True


def test_counts_are_exact_across_threads(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    client = clients(flush_interval=0.005)
    per_thread = 20_000
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            client.on_processed("shared")
            if i % 1000 == 0:
                client.on_pushed(f"new-{t}-{i // 1000}")  # new queues appear concurrently
            client.on_pushed("shared")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.flush(WAIT)
    assert server.total("shared") == [4 * per_thread, 4 * per_thread, 0, 0]
    assert server.total("new-3-19") == [1, 0, 0, 0]
    assert len(server.totals) == 1 + 4 * 20


def test_locked_hooks_count_exactly_too(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    """The free-threaded variant (``Client()`` picks it when the GIL is off), forced here."""
    server = servers()
    client = clients(_LockedClient)
    with Client(client.socket_path) as plain:
        assert type(plain) is Client  # this build has the GIL

    def work() -> None:
        for _ in range(5000):
            client.on_processed("q")
            client.on_failed("q", None, "e")
        client.on_pushed("q")
        client.on_retried("q")
        client.on_pushed(None)  # type: ignore[arg-type]

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.on_failed("q", job(1), "with details")
    assert client.flush(WAIT)
    assert server.total("q") == [3, 15_000, 15_001, 3]
    assert [f.job_id for f in server.failed] == ["job-1"]


# --------------------------------------------------------------------------- delivery


def test_failed_job_details_arrive_exactly(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    client = clients()
    payload = {"bytes": b"\x00\xff", "text": "naïve ☃", "n": [1, {"deep": 2**64 - 1}]}
    try:
        raise ValueError("boom")
    except ValueError as exc:
        error = exc
    before = time.time()
    client.on_failed("mail", job(7, payload), error)
    payload["text"] = "changed after the failure"
    client.on_failed("mail", job(8), "plain text error")
    client.on_failed("mail", None, "counted only")
    assert client.flush(WAIT)
    assert server.total("mail") == [0, 0, 3, 0]
    first, second = server.failed
    assert first.job() == Job(
        "job-7",
        "task",
        {"bytes": b"\x00\xff", "text": "naïve ☃", "n": [1, {"deep": 2**64 - 1}]},
        1,
        1.5,
    )
    assert first.error == "ValueError: boom"
    assert "Traceback" in first.traceback
    assert "raise ValueError" in first.traceback
    assert before <= first.failed_at <= time.time()
    assert first.to_failed_job().failed_at.tzinfo is UTC
    assert (second.error, second.traceback) == ("plain text error", "")


def test_odd_jobs_are_sanitised_not_lost(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    client = clients()
    odd: Any = Job(id=5, name=None, payload={"when": datetime.now(UTC)}, attempts=True)  # type: ignore[arg-type]
    client.on_failed("q", odd, "e")
    client.on_failed("q", job(2, b"x" * (9 * 1024 * 1024)), "huge payload")
    assert client.flush(WAIT)
    first, second = server.failed
    assert (first.job_id, first.name, first.attempts) == ("5", "", 0)
    assert "datetime" in first.payload
    assert "too big" in second.payload
    assert server.total("q")[2] == 2


def nested(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


def test_whatever_a_worker_passes_the_collector_takes(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    # Client.on_failed packs each FAILED array once, without the decoder's check: every
    # field must be valid by construction, or the collector would refuse the batch (and
    # the client resend it forever). These reach a strict decoder (FakeCollector's).
    server = servers()
    client = clients()
    odd: list[tuple[Any, BaseException | str]] = [
        (Job(id="\udcff", name="\udcff", payload="\udcff", attempts=2**70), "\udcff"),
        (Job(id="x" * 2000, name="n" * 2000, payload=nested(33)), ValueError("\udcff")),
        (Job(id=None, name=b"b", payload={(1, 2): 1}, attempts=1.5), RuntimeError()),  # type: ignore[arg-type]
        (Job(id="", name="many", payload=[0] * 1_000_001, attempts=-(2**64)), "e"),
        (Job(id="ext", name="n", payload=msgpack.ExtType(1, b"x")), "e"),
        (Job(id="big-int", name="n", payload=2**64), "e"),
        (Job(id="nan", name="n", enqueued_at=float("nan")), "e"),
        (Job(id="inf", name="n", enqueued_at=float("inf")), "e"),
        (Job(id="keys", name="n", payload={None: 1, 1.5: 2, b"k": (3,), True: nested(31)}), "e"),
    ]
    for j, error in odd:
        client.on_failed("q", j, error)
    assert client.flush(WAIT)
    got = {f.job_id: f for f in server.failed}
    assert len(server.failed) == len(odd)
    assert got["\\udcff"].error == "\\udcff"
    assert got["\\udcff"].name == "\\udcff"
    assert "not sent" in got["\\udcff"].payload
    assert got["\\udcff"].attempts == 0
    assert len(got["x" * 1024].name) == 1024
    assert "nests deeper than 32" in got["x" * 1024].payload
    by_name = {f.name: f for f in server.failed}
    assert len(by_name["b'b'"].job_id) == len(by_name["many"].job_id) == 32  # a new uuid4 hex
    assert "map key of type tuple" in by_name["b'b'"].payload
    assert by_name["b'b'"].error == "RuntimeError"
    assert "more than 1000000 items" in by_name["many"].payload
    assert by_name["many"].attempts == 0
    assert "ExtType" in got["ext"].payload
    assert "cannot be encoded" in got["big-int"].payload
    assert got["nan"].enqueued_at is got["inf"].enqueued_at is None
    assert got["keys"].payload == {None: 1, 1.5: 2, b"k": [3], True: nested(31)}
    assert server.total("q")[2] == len(odd)


def test_queue_names_utf8_cannot_encode_are_dropped(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    client = clients()
    client.on_pushed("bad \udcff")
    client.on_failed("bad \udcff", job(1), "e")
    client.on_pushed("good")
    assert client.flush(WAIT)
    assert server.total("good") == [1, 0, 0, 0]
    assert server.totals.keys() == {"good"}
    assert server.failed == []


def test_flush_is_true_only_after_the_ack(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers(acking=False)
    client = clients()
    client.on_processed("q")
    assert client.flush(timeout=0.3) is False
    assert server.total("q") == [0, 1, 0, 0]  # applied, not yet acknowledged
    server.ack_now()
    assert client.flush(timeout=WAIT) is True


def test_flush_times_out_when_nothing_answers(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers(welcome=False)
    client = clients()
    client.on_processed("q")
    start = time.monotonic()
    assert client.flush(timeout=0.3) is False
    assert 0.25 <= time.monotonic() - start < 2
    assert server.wait(lambda: len(server.hellos) >= 1)
    assert server.received == 0  # no batch before WELCOME


def test_ack_is_cumulative(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers(acking=False)
    client = clients()
    for i in range(3):
        client.on_processed("q")
        client.on_failed("q", job(i), "e")
        assert client.flush(timeout=0.05) is False  # each flush cuts a batch...
        assert server.wait(lambda n=i + 1: server.received == n)  # ...that arrives unacked
    server.ack_now()  # one ACK for seq 3 covers 1, 2 and 3
    assert client.flush(timeout=WAIT) is True
    assert server.acks_sent == 1
    assert server.received == 3
    assert server.total("q") == [0, 3, 3, 0]


def test_counts_are_exact_across_reconnects(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    def drop(n: int, batch: Batch) -> str | None:
        return {1: "after", 2: None, 0: "before"}[n % 3] if n < 40 else None

    server = servers(drop=drop, stale_welcome=True)
    client = clients(flush_interval=0.005, reconnect_max=0.05)
    expected = [0, 0, 0, 0]
    failed_ids = []
    for round_ in range(25):
        for i in range(round_ + 1):
            client.on_pushed("q")
            client.on_processed("q")
            expected[0] += 1
            expected[1] += 1
            if i % 4 == 0:
                client.on_failed("q", job(f"{round_}-{i}"), "e")
                expected[2] += 1
                failed_ids.append(f"job-{round_}-{i}")
        if round_ % 2:
            assert client.flush(WAIT)
    assert client.flush(WAIT)
    assert server.total("q") == expected
    assert sorted(f.job_id for f in server.failed) == sorted(failed_ids)  # no duplicates
    assert server.drops >= 10
    assert server.duplicates >= 5  # resends of applied-but-unacked batches were deduped
    assert len({h.client_id for h in server.hellos}) == 1


def test_collector_absent_at_start_then_appearing(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    client = clients(reconnect_max=5.0)  # flush must not wait out a long backoff
    for _ in range(100):
        client.on_processed("q")
    client.on_failed("q", job(1), "e")
    assert client.flush(timeout=0.3) is False  # several failed connects, backoff grows
    client.on_processed("q")
    server = servers()
    start = time.monotonic()
    assert client.flush(timeout=WAIT)
    assert time.monotonic() - start < 2.5
    assert server.total("q") == [0, 101, 1, 0]
    assert [f.job_id for f in server.failed] == ["job-1"]
    assert server.received == 1  # everything merged into one batch


def test_collector_restart_loses_nothing(
    sock_path: str, clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    first = servers()
    client = clients()
    client.on_processed("q")
    assert client.flush(WAIT)
    first.stop()
    client.on_processed("q")
    client.on_processed("q")
    assert client.flush(timeout=0.2) is False
    second = servers()
    second.last_seq = dict(first.last_seq)  # the restarted collector remembers its dedup table
    assert client.flush(WAIT)
    assert first.total("q")[1] + second.total("q")[1] == 3


def test_error_frame_makes_the_client_retry_later(
    clients: Callable[..., Client],
    servers: Callable[..., FakeCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = servers(refuse=2)
    client = clients(reconnect_max=0.05)
    with caplog.at_level(logging.WARNING, logger="qdash_mp.client"):
        client.on_processed("q")
        assert client.flush(WAIT)
    assert server.total("q") == [0, 1, 0, 0]
    assert len(server.hellos) == 3
    refused = [r for r in caplog.records if "refused the connection (shutdown)" in r.message]
    assert len(refused) == 1  # rate-limited


def test_unacked_batches_are_bounded(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers(acking=False)
    client = clients(flush_interval=0.005, max_unacked=2)
    for _ in range(10):
        client.on_processed("q")
        client.flush(timeout=0.03)
    assert server.wait(lambda: server.received == 2)
    assert not server.wait(lambda: server.received > 2, timeout=0.2)
    server.acking = True
    server.ack_now()
    assert client.flush(WAIT)
    assert server.total("q") == [0, 10, 0, 0]
    assert server.received == 3  # the rest went out merged


def test_pending_failed_jobs_are_bounded(
    clients: Callable[..., Client],
    servers: Callable[..., FakeCollector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = clients(max_pending_failed=3)
    with caplog.at_level(logging.WARNING, logger="qdash_mp.client"):
        for i in range(5):
            client.on_failed("q", job(i), "e")
    assert client.dropped_failed == 2
    dropped = [r for r in caplog.records if "details of newer failures are dropped" in r.message]
    assert len(dropped) == 1
    server = servers()
    assert client.flush(WAIT)
    assert server.total("q") == [0, 0, 5, 0]
    assert [f.job_id for f in server.failed] == ["job-0", "job-1", "job-2"]


def test_with_a_spool_dir_nothing_is_dropped_past_the_bound(
    clients: Callable[..., Client],
    servers: Callable[..., FakeCollector],
    sock_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spool = os.path.join(os.path.dirname(sock_path), "spool")
    client = clients(max_pending_failed=3, spool_dir=spool)
    first_id = client.client_id
    with caplog.at_level(logging.WARNING, logger="qdash_mp.client"):
        for i in range(50):
            client.on_failed("q", job(i), "e")
        deadline = time.monotonic() + WAIT
        while client.spool_pending() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert client.spool_pending() > 0
    assert os.listdir(spool) == [f"{first_id}.spool"]
    assert client.dropped_failed == 0
    assert not [r for r in caplog.records if "dropped" in r.message]
    server = servers()
    assert client.flush(WAIT)
    assert client.spool_pending() == 0
    assert os.listdir(spool) == []
    assert server.total("q") == [0, 0, 50, 0]
    assert sorted(f.job_id for f in server.failed) == sorted(f"job-{i}" for i in range(50))
    # The spooled batches went out under the old id, later ones under a new one.
    assert client.client_id != first_id
    assert first_id in {h.client_id for h in server.hellos}


def test_connect_failures_are_logged_rate_limited(
    clients: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="qdash_mp.client"):
        client = clients(reconnect_max=0.01)
        client.on_processed("q")
        assert client.flush(timeout=0.3) is False
    lines = [r for r in caplog.records if "cannot reach the collector" in r.message]
    assert len(lines) == 1


def test_many_failed_jobs_go_in_several_batches(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    client = clients(max_batch_failed=10)
    for i in range(95):
        client.on_failed("q", job(i, {"i": i}), "e")
    assert client.flush(WAIT)
    assert [f.payload["i"] for f in server.failed] == list(range(95))
    assert server.received >= 10


# --------------------------------------------------------------------------- requeue


def test_requeue_is_answered_ok_or_with_the_error(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    requeued: list[Job] = []

    def requeue(j: Job) -> None:
        if j.id == "job-bad":
            raise RuntimeError("broker down")
        requeued.append(j)

    clients(requeue=requeue, requeue_queues=["mail", "sms"])
    assert server.wait(lambda: len(server.hellos) == 1)  # connects at once: it can requeue
    assert server.hellos[0].requeue == ("mail", "sms")
    good = FailedRecord.from_job(job("good", {"x": [1]}), "mail", "e", failed_at=1.0)
    bad = FailedRecord.from_job(job("bad"), "mail", "e", failed_at=1.0)
    other = FailedRecord.from_job(job("other"), "push", "e", failed_at=1.0)
    assert server.requeue(1, good) == RequeueResult(request_id=1, ok=True, error="")
    assert requeued == [good.job()]
    assert server.requeue(2, bad) == RequeueResult(2, False, "RuntimeError: broker down")
    result = server.requeue(3, other)
    assert not result.ok
    assert "does not requeue 'push'" in result.error


def test_requeue_for_every_queue_is_sent_as_star(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    clients(requeue=lambda j: None)
    assert server.wait(lambda: len(server.hellos) == 1)
    assert server.hellos[0].requeue == ("*",)
    failed = FailedRecord.from_job(job(1), "any", "e", failed_at=1.0)
    assert server.requeue(9, failed).ok


def test_client_without_requeue_refuses_requests(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    client = clients()
    client.on_processed("q")
    assert client.flush(WAIT)
    assert server.hellos[0].requeue is None
    result = server.requeue(1, FailedRecord.from_job(job(1), "q", "e", failed_at=1.0))
    assert not result.ok
    assert "no requeue callback" in result.error


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"requeue_queues": ["q"]}, "needs a requeue callback"),
        ({"requeue": print, "requeue_queues": []}, "must not be empty"),
        ({"requeue": print, "requeue_queues": "q"}, "not a str"),
        ({"requeue": print, "requeue_queues": [""]}, "invalid queue name"),
        ({"requeue": 5}, "must be callable"),
        ({"client_id": ""}, "client_id"),
        ({"flush_interval": 0}, "flush_interval"),
        ({"max_unacked": 0}, "max_unacked"),
    ],
)
def test_bad_settings_are_config_errors(sock_path: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Client(sock_path, **kwargs)


def test_too_long_socket_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        Client("/tmp/" + "x" * 200)


def test_socket_path_defaults_to_the_environment(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QDASH_SOCKET", sock_path)
    with Client() as client:
        assert client.socket_path == sock_path
    monkeypatch.delenv("QDASH_SOCKET")
    with Client() as client:
        assert client.socket_path == os.path.join("qdash-data", "collector.sock")


# --------------------------------------------------------------------------- lifecycle


def test_close_flushes_and_is_idempotent(
    sock_path: str, servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    with Client(sock_path, flush_interval=10.0) as client:
        client.on_pushed("q")
        client.on_failed("q", job(1), "e")
    assert server.total("q") == [1, 0, 1, 0]
    assert client.close() is True
    client.on_pushed("q")  # after close: counted locally, never raises
    assert client.flush(timeout=0.1) is False
    assert client.close() is True


def test_close_without_a_collector_gives_up_at_once(sock_path: str) -> None:
    client = Client(sock_path, reconnect_max=5.0)
    client.on_pushed("q")
    start = time.monotonic()
    assert client.close(timeout=5.0) is False
    assert time.monotonic() - start < 2.0


def test_client_id_is_random_or_given(sock_path: str) -> None:
    with Client(sock_path) as a, Client(sock_path) as b, Client(sock_path, client_id="me") as c:
        assert a.client_id != b.client_id
        assert len(a.client_id) == 32
        assert c.client_id == "me"


def test_fork_counts_parent_and_child_exactly(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    client = clients(flush_interval=10.0)  # nothing leaves before a flush
    client.on_processed("q")
    assert client.flush(WAIT)
    for _ in range(3):
        client.on_processed("q")  # counted in the parent, not yet sent at fork time
    client.on_failed("q", job("parent"), "e")
    parent_id = client.client_id
    pid = fork_quietly()
    if pid == 0:  # child
        code = 1
        try:
            for _ in range(5):
                client.on_processed("q")
            client.on_failed("q", job("child"), "e")
            ok = client.flush(WAIT)
            code = 0 if ok and client.client_id != parent_id else 2
        finally:
            os._exit(code)
    for _ in range(7):
        client.on_processed("q")
    assert client.flush(WAIT)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert server.total("q") == [0, 1 + 3 + 5 + 7, 2, 0]
    assert sorted(f.job_id for f in server.failed) == ["job-child", "job-parent"]
    ids = {h.client_id for h in server.hellos}
    assert len(ids) == 2
    assert parent_id in ids
    assert client.client_id == parent_id


def test_multiprocessing_fork_children_flush_at_exit(
    clients: Callable[..., Client], servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    client = clients(flush_interval=10.0)
    ctx = multiprocessing.get_context("fork")

    def inherited() -> None:
        for _ in range(10):
            client.on_processed("inherited")

    def own() -> None:
        mine = Client(client.socket_path, flush_interval=10.0)
        for _ in range(4):
            mine.on_processed("own")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        procs = [ctx.Process(target=inherited), ctx.Process(target=own)]
        for p in procs:
            p.start()
    for p in procs:
        p.join(WAIT)
        assert p.exitcode == 0
    assert server.total("inherited") == [0, 10, 0, 0]
    assert server.total("own") == [0, 4, 0, 0]


def test_atexit_flushes_a_client_never_closed(
    sock_path: str, servers: Callable[..., FakeCollector]
) -> None:
    server = servers()
    script = textwrap.dedent(
        f"""
        from qdash_mp.client import Client
        from qdash_mp.models import Job
        c = Client({sock_path!r}, flush_interval=10.0)
        for _ in range(42):
            c.on_processed("exit")
        c.on_failed("exit", Job("j", "n", {{"k": [1, 2]}}), "late failure")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=REPO,
        timeout=30,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert server.total("exit") == [0, 42, 1, 0]
    assert [(f.job_id, f.payload) for f in server.failed] == [("j", {"k": [1, 2]})]


def test_protocol_error_from_the_collector_reconnects(
    sock_path: str, clients: Callable[..., Client]
) -> None:
    """A collector that sends garbage is dropped; the client comes back to a sane one."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    client = clients(reconnect_max=0.05)
    client.on_processed("q")
    listener.settimeout(WAIT)
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(b"\xff\xff\xff\xff")  # oversize header
        conn.settimeout(WAIT)
        assert conn.recv(65536) == b""  # the client hung up
    listener.close()
    os.unlink(sock_path)
    server = FakeCollector(sock_path)
    try:
        assert client.flush(WAIT)
        assert server.total("q") == [0, 1, 0, 0]
    finally:
        server.stop()
