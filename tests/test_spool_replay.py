"""The spool replayer in-process, through the session it shares with the live sender.

A scripted peer on a real Unix socket plays the collector: per connection it answers HELLO
with a chosen WELCOME (or ERROR), then ACKs batches or hangs up as told. End-to-end replays
against the real collector are in ``test_spool.py``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from qdash_testing.collector import short_dir, wait_for
from qdash_testing.peer import WAIT, Peer

from qdash_mp.client import Replayer, SpoolFile
from qdash_mp.wire import (
    Batch,
    ErrorCode,
    ErrorMsg,
    Hello,
    Message,
    Welcome,
    encode,
)


@pytest.fixture
def where() -> Iterator[Path]:
    path = short_dir("qrp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def frame(seq: int) -> bytes:
    return encode(Batch(seq=seq, counters={"q": (seq, 0, 0, 0)}))


def spool_of(directory: Path, client_id: str, seqs: range) -> Path:
    spool = SpoolFile.create(directory, client_id)
    spool.append([(s, frame(s)) for s in seqs])
    spool.release()  # an orphan now: the replayer adopts it
    return spool.path


def replay(directory: Path, sock: str) -> tuple[Replayer, list[SpoolFile]]:
    done: list[SpoolFile] = []
    replayer = Replayer(directory, sock, "test", window=4, reconnect_max=0.05, on_done=done.append)
    replayer.start()
    return replayer, done


def test_only_the_batches_welcome_does_not_cover_are_sent_then_the_file_goes(
    where: Path,
) -> None:
    path = spool_of(where, "spooled-id", range(1, 11))
    sock = str(where / "c.sock")
    peer = Peer(sock, lambda n, hello: Welcome(last_seq=4))
    replayer, done = replay(where, sock)
    try:
        wait_for(lambda: bool(done), WAIT, "the replay to finish")
        assert peer.received() == [[5, 6, 7, 8, 9, 10]]
        hello = peer.conns[0].hello
        assert hello is not None
        assert hello.client_id == "spooled-id"
        assert hello.requeue is None  # a replay connection never takes REQUEUE
        assert not path.exists()
        assert replayer.pending() == 0
    finally:
        replayer.stop(WAIT)
        peer.close()


def test_a_replay_cut_midway_resumes_after_what_was_acknowledged(where: Path) -> None:
    spool_of(where, "cut", range(1, 9))
    sock = str(where / "c.sock")

    def answer(n: int, hello: Hello) -> Message:
        # The second connection learns what the first one got applied (2 ACKed batches).
        return Welcome(last_seq=0 if n == 1 else 2)

    peer = Peer(sock, answer, hang_up_after=3)
    replayer, done = replay(where, sock)
    try:
        wait_for(lambda: bool(done), WAIT, "the replay to finish")
        first, second = peer.received()
        assert first[:3] == [1, 2, 3]
        assert second == [3, 4, 5, 6, 7, 8]  # batch 3 was never ACKed: sent again
    finally:
        replayer.stop(WAIT)
        peer.close()


def test_a_file_the_collector_refuses_is_set_aside_and_the_next_one_goes(where: Path) -> None:
    bad = spool_of(where, "gappy", range(5, 7))
    os.utime(bad, (1, 1))  # older: replayed first
    good = spool_of(where, "fine", range(1, 3))
    sock = str(where / "c.sock")

    def answer(n: int, hello: Hello) -> Message:
        if hello.client_id == "gappy":
            return ErrorMsg(code=ErrorCode.SEQUENCE, reason="batch 5 skips ahead of 1")
        return Welcome(last_seq=0)

    peer = Peer(sock, answer)
    replayer, done = replay(where, sock)
    try:
        wait_for(lambda: bool(done), WAIT, "the good file to be replayed")
        assert [s.client_id for s in done] == ["fine"]
        assert (where / "gappy.spool.rejected").exists()
        assert not bad.exists()
        assert not good.exists()
        assert peer.received()[-1] == [1, 2]
    finally:
        replayer.stop(WAIT)
        peer.close()


def test_an_unreachable_collector_is_retried_until_it_is_there(where: Path) -> None:
    spool_of(where, "later", range(1, 4))
    sock = str(where / "c.sock")
    replayer, done = replay(where, sock)
    try:
        wait_for(lambda: replayer.pending() == 3, WAIT, "the orphan to be adopted")
        peer = Peer(sock, lambda n, hello: Welcome(last_seq=0))
        try:
            wait_for(lambda: bool(done), WAIT, "the replay to finish")
            assert peer.received() == [[1, 2, 3]]
        finally:
            peer.close()
    finally:
        replayer.stop(WAIT)
