"""The client spool: nothing counted or failed is lost while the collector is away.

Two layers here (the pure byte format is in ``test_spool_format.py``): spool files on disk
(``qdash_mp.client.spool``: locks, takeover, torn tails), and the whole path end to end with
real collector processes and real worker processes: a worker fails jobs while the collector
is down and exits, a later client with the same spool directory delivers everything exactly
once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qdash_testing.collector import CollectorProc, run_worker, short_dir, wait_for
from qdash_testing.forking import fork_quietly

from qdash_mp import Client, Job
from qdash_mp.client import SpoolFile, adopt_orphans
from qdash_mp.client.spool_format import (
    decode_header,
    encode_header,
    encode_record,
    scan,
)
from qdash_mp.wire import (
    Ack,
    Batch,
    FrameDecoder,
    Hello,
    Welcome,
    encode,
)

WAIT = 30.0


# --------------------------------------------------------------------------- helpers


def batch_frame(seq: int, counters: dict[str, tuple[int, int, int, int]] | None = None) -> bytes:
    return encode(Batch(seq=seq, counters=counters or {"q": (seq, 0, 0, 0)}))


def spool_bytes(client_id: str, seqs: range) -> bytes:
    return encode_header(client_id) + b"".join(encode_record(s, batch_frame(s)) for s in seqs)


def decode_frame(frame: bytes) -> Batch:
    msgs = FrameDecoder().feed(frame)
    assert len(msgs) == 1
    assert isinstance(msgs[0], Batch)
    return msgs[0]


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.spool"))


def batches_in(path: Path) -> list[Batch]:
    """The batches a (possibly torn) spool file would replay."""
    data = path.read_bytes()
    result = scan(data)
    return [decode_frame(data[r.offset : r.end]) for r in result.records]


# --------------------------------------------------------------------------- files


@pytest.fixture
def spool_dir() -> Iterator[Path]:
    path = short_dir("qsp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_held_file_is_not_taken_over_and_a_released_one_is(spool_dir: Path) -> None:
    owner = SpoolFile.create(spool_dir, "owner-1", tag=0)
    owner.append([(1, batch_frame(1)), (2, batch_frame(2))])
    assert adopt_orphans(spool_dir) == []  # flock: another open file, even in this process
    assert owner.path.exists()
    owner.release()
    [taken] = adopt_orphans(spool_dir)
    try:
        assert taken.client_id == "owner-1"
        assert [seq for seq, _ in taken.frames(0)] == [1, 2]
        assert [frame for _, frame in taken.frames(1)] == [batch_frame(2)]
        assert adopt_orphans(spool_dir) == []  # now we hold it
        assert taken.pending() == 2
        taken.ack(1)
        assert taken.pending() == 1
        taken.remove()
        assert spool_files(spool_dir) == []
    finally:
        taken.release()


def test_takeover_cuts_a_torn_tail_and_logs_it(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = SpoolFile.create(spool_dir, "torn")
    spool.append([(s, batch_frame(s)) for s in range(1, 4)])
    spool.release()
    size = spool.path.stat().st_size
    with spool.path.open("r+b") as f:
        f.truncate(size - 5)
    with caplog.at_level(logging.WARNING, logger="qdash_mp.client"):
        [taken] = adopt_orphans(spool_dir)
    try:
        assert [seq for seq, _ in taken.frames(0)] == [1, 2]
        assert any("torn or corrupt tail" in r.message for r in caplog.records)
        assert spool.path.stat().st_size == scan(spool.path.read_bytes()).end
        # The cut file can be appended to again after the last whole batch.
        taken.append([(3, batch_frame(3))])
        assert scan(spool.path.read_bytes()).last_seq == 3
    finally:
        taken.release()


def test_files_without_a_valid_header_or_batch_are_set_aside_or_removed(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (spool_dir / "bad.spool").write_bytes(b"not a spool at all")
    (spool_dir / "empty.spool").write_bytes(encode_header("empty"))
    stale = spool_dir / ".x.1.abcd.spool.new"
    stale.write_bytes(encode_header("x"))
    fresh = spool_dir / ".y.1.abcd.spool.new"
    fresh.write_bytes(encode_header("y"))
    old = time.time() - 3600
    os.utime(stale, (old, old))
    with caplog.at_level(logging.INFO, logger="qdash_mp.client"):
        assert adopt_orphans(spool_dir) == []
    assert (spool_dir / "bad.spool.corrupt").exists()
    assert not (spool_dir / "empty.spool").exists()
    assert not stale.exists()
    assert fresh.exists()  # maybe a create in progress
    assert any("cannot be replayed" in r.message for r in caplog.records)


def test_a_reused_client_id_gets_its_own_file(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = SpoolFile.create(spool_dir, "same")
    with caplog.at_level(logging.WARNING, logger="qdash_mp.client"):
        second = SpoolFile.create(spool_dir, "same")
    try:
        assert first.path != second.path
        assert {p.name for p in spool_files(spool_dir)} == {"same.spool", "same~1.spool"}
        assert any("already exists" in r.message for r in caplog.records)
    finally:
        first.release()
        second.release()


def test_odd_client_ids_get_safe_file_names(spool_dir: Path) -> None:
    spool = SpoolFile.create(spool_dir, "../../etc/passwd é")
    try:
        assert spool.path.parent == spool_dir
        assert spool.path.name.startswith("id-")
        assert decode_header(spool.path.read_bytes())[0] == "../../etc/passwd é"
    finally:
        spool.release()


# --------------------------------------------------------------------------- end to end


# data_dir, collector_proc and client_factory are the shared fixtures (qdash_testing.fixtures);
# these are their names here.
@pytest.fixture
def collector(collector_proc: CollectorProc) -> CollectorProc:
    """A collector that is *not* started yet: tests start it when they want it up."""
    return collector_proc


@pytest.fixture
def clients(client_factory: Callable[..., Client]) -> Callable[..., Client]:
    return client_factory


def get_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def totals(c: CollectorProc) -> dict[str, int]:
    stats = get_json(c.http + "/queues/api/stats")
    return {k: stats["totals"][k] for k in ("pushed", "processed", "failed", "retried")}


def failed_ids(c: CollectorProc) -> list[str]:
    """Every failed job id the collector lists (duplicates kept)."""
    first = get_json(c.http + "/queues/api/failed?page=1")
    ids = [j["id"] for j in first["jobs"]]
    for page in range(2, first["pages"] + 1):
        ids += [j["id"] for j in get_json(c.http + f"/queues/api/failed?page={page}")["jobs"]]
    assert len(ids) == first["total"]
    return ids


def spool_worker(socket_path: str, spool: Path, **kw: Any) -> dict[str, Any]:
    """Run a worker that closes without flushing (the collector is down) and spools."""
    worker = run_worker(socket_path, spool_dir=str(spool), no_flush=True, **kw)
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert report["closed"] is False
    return report


def replayed(client: Client, spool: Path) -> bool:
    return client.spool_pending() == 0 and not spool_files(spool)


@pytest.mark.slow
def test_worker_spools_5000_failed_jobs_and_a_later_client_delivers_them(
    collector: CollectorProc, spool_dir: Path, clients: Callable[..., Client]
) -> None:
    report = spool_worker(
        collector.socket, spool_dir, pushed=7_000, processed=1_500, failed=5_000, id_prefix="w"
    )
    assert report["spool_pending"] > 0
    [path] = spool_files(spool_dir)
    assert path.name == report["client_id"] + ".spool"

    collector.start()
    client = clients(collector.socket, spool_dir=spool_dir)
    wait_for(lambda: replayed(client, spool_dir), WAIT, "the spool to be replayed")

    assert totals(collector) == {"pushed": 7_000, "processed": 1_500, "failed": 5_000, "retried": 0}
    ids = failed_ids(collector)
    assert sorted(ids) == sorted(f"w-{i}" for i in range(5_000))
    assert client.flush(WAIT)  # the replaying client itself had nothing to say


@pytest.mark.slow
def test_past_the_memory_bound_nothing_is_dropped(
    collector: CollectorProc, spool_dir: Path, clients: Callable[..., Client]
) -> None:
    bound = 50
    client = clients(
        collector.socket, spool_dir=spool_dir, max_pending_failed=bound, max_batch_failed=40
    )
    for i in range(1_000):
        client.on_processed("q")
        client.on_failed("q", Job(id=f"m-{i}", name="t", payload={"i": i}), "boom")
    # The sender moved the backlog to disk; memory holds less than the bound again. (Jobs
    # leave memory when they are batched, just before the write: wait for the file too.)

    def spooled_ids() -> list[str]:
        files = spool_files(spool_dir)
        return [job_id for f in files for b in batches_in(f) for _data, job_id, _at in b.failed]

    wait_for(
        lambda: (
            len(client._failed_jobs) < bound
            and client.spool_pending() > 0
            and len(spooled_ids()) >= 1_000 - bound
        ),
        WAIT,
        "the backlog to be spooled",
    )
    assert client.dropped_failed == 0
    [path] = spool_files(spool_dir)
    spooled = [job_id for b in batches_in(path) for _data, job_id, _at in b.failed]
    assert len(spooled) >= 1_000 - bound
    assert spooled == [f"m-{i}" for i in range(len(spooled))]  # in order

    spooled_as = client.client_id
    collector.start()
    for i in range(1_000, 1_010):  # the client goes on while its spool is replayed
        client.on_failed("q", Job(id=f"m-{i}", name="t"), "boom")
    assert client.flush(WAIT)
    assert client.spool_pending() == 0
    assert spool_files(spool_dir) == []
    assert client.client_id != spooled_as  # new batches went out under a new id
    assert totals(collector) == {"pushed": 0, "processed": 1_000, "failed": 1_010, "retried": 0}
    assert sorted(failed_ids(collector)) == sorted(f"m-{i}" for i in range(1_010))


@pytest.mark.slow
def test_a_torn_spool_replays_its_whole_records(
    collector: CollectorProc,
    spool_dir: Path,
    clients: Callable[..., Client],
    caplog: pytest.LogCaptureFixture,
) -> None:
    spool_worker(collector.socket, spool_dir, pushed=300, failed=2_500, id_prefix="t")
    [path] = spool_files(spool_dir)
    whole = batches_in(path)
    assert len(whole) == 3
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 7)  # a crash in the middle of the last append
    kept = batches_in(path)
    assert len(kept) == 2
    expect_ids = [job_id for b in kept for _data, job_id, _at in b.failed]
    expect = [sum(b.counters.get("q", (0, 0, 0, 0))[k] for b in kept) for k in range(4)]

    collector.start()
    with caplog.at_level(logging.WARNING, logger="qdash_mp.client"):
        client = clients(collector.socket, spool_dir=spool_dir)
        wait_for(lambda: replayed(client, spool_dir), WAIT, "the spool to be replayed")
    cuts = [r for r in caplog.records if "torn or corrupt tail" in r.message]
    assert len(cuts) == 1
    assert path.name in cuts[0].getMessage()

    assert totals(collector) == dict(
        zip(("pushed", "processed", "failed", "retried"), expect, strict=True)
    )
    assert sorted(failed_ids(collector)) == sorted(expect_ids)
    assert len(expect_ids) == 2_000


def send_raw(socket_path: str, client_id: str, frames: list[bytes]) -> int:
    """HELLO as ``client_id``, send ``frames``, wait for the ACK of the last; its seq."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(socket_path)
    decoder = FrameDecoder()
    try:
        sock.sendall(encode(Hello(client_id=client_id, pid=os.getpid(), host="test")))
        msgs: list[Any] = []
        while not msgs:
            msgs = decoder.feed(sock.recv(65536))
        assert isinstance(msgs[0], Welcome)
        sock.sendall(b"".join(frames))
        want = decode_frame(frames[-1]).seq
        acked = 0
        while acked < want:
            for msg in decoder.feed(sock.recv(65536)):
                assert isinstance(msg, Ack)
                acked = max(acked, msg.seq)
        return acked
    finally:
        sock.close()


@pytest.mark.slow
def test_replay_after_the_collector_applied_part_of_it_duplicates_nothing(
    collector: CollectorProc, spool_dir: Path, clients: Callable[..., Client]
) -> None:
    report = spool_worker(
        collector.socket,
        spool_dir,
        pushed=1_000,
        processed=900,
        failed=1_000,
        max_batch_failed=100,
        id_prefix="p",
    )
    [path] = spool_files(spool_dir)
    data = path.read_bytes()
    records = scan(data).records
    assert len(records) == 10
    collector.start()
    # The collector got the first 4 batches (and the client never heard the ACK).
    assert (
        send_raw(
            collector.socket, report["client_id"], [data[r.offset : r.end] for r in records[:4]]
        )
        == 4
    )

    client = clients(collector.socket, spool_dir=spool_dir)
    wait_for(lambda: replayed(client, spool_dir), WAIT, "the spool to be replayed")
    assert totals(collector) == {"pushed": 1_000, "processed": 900, "failed": 1_000, "retried": 0}
    ids = failed_ids(collector)
    assert len(ids) == len(set(ids)) == 1_000

    # Replaying the very same file again (a crash before the delete) changes nothing.
    path.write_bytes(data)
    other = clients(collector.socket, spool_dir=spool_dir)
    wait_for(lambda: replayed(other, spool_dir), WAIT, "the second replay")
    assert totals(collector) == {"pushed": 1_000, "processed": 900, "failed": 1_000, "retried": 0}
    assert len(failed_ids(collector)) == 1_000


@pytest.mark.slow
def test_collector_killed_during_a_replay_loses_and_doubles_nothing(
    collector: CollectorProc, spool_dir: Path, clients: Callable[..., Client]
) -> None:
    spool_worker(
        collector.socket,
        spool_dir,
        pushed=20_000,
        processed=20_000,
        failed=8_000,
        max_batch_failed=50,
        id_prefix="k",
    )
    collector.start()
    client = clients(collector.socket, spool_dir=spool_dir, max_unacked=4)
    wait_for(lambda: 0 < client.spool_pending() < 160, WAIT, "the replay to be under way")
    collector.kill()
    collector.start()
    wait_for(lambda: replayed(client, spool_dir), WAIT, "the spool to be replayed")
    assert totals(collector) == {
        "pushed": 20_000,
        "processed": 20_000,
        "failed": 8_000,
        "retried": 0,
    }
    ids = failed_ids(collector)
    assert len(ids) == len(set(ids)) == 8_000


@pytest.mark.slow
def test_a_file_held_by_a_live_client_is_not_taken(
    collector: CollectorProc, spool_dir: Path, clients: Callable[..., Client]
) -> None:
    first = spool_worker(collector.socket, spool_dir, failed=100, id_prefix="a")
    live = clients(collector.socket, spool_dir=spool_dir, max_pending_failed=10)
    wait_for(lambda: live.spool_pending() == 1, WAIT, "the live client to take the orphan")
    for i in range(100):
        live.on_failed("q", Job(id=f"l-{i}", name="t"), "boom")
    own = spool_dir / f"{live.client_id}.spool"
    wait_for(own.exists, WAIT, "the live client's own spool")
    second = spool_worker(collector.socket, spool_dir, failed=100, id_prefix="b")

    # A client started now takes the new orphan (one batch), and neither file the live
    # client holds: the one it took over, nor its own.
    other = clients(collector.socket, spool_dir=spool_dir)
    wait_for(lambda: other.spool_pending() > 0, WAIT, "the new orphan to be taken over")
    assert other.spool_pending() == 1
    assert live.spool_pending() > 1
    held = {f"{first['client_id']}.spool", own.name}
    assert held <= {p.name for p in spool_files(spool_dir)}
    assert f"{second['client_id']}.spool" in {p.name for p in spool_files(spool_dir)}

    collector.start()
    assert live.flush(WAIT)  # its own spool is replayed
    wait_for(lambda: replayed(live, spool_dir) and replayed(other, spool_dir), WAIT, "replays")
    assert totals(collector)["failed"] == 300
    expect = [f"{p}-{i}" for p in ("a", "l", "b") for i in range(100)]
    assert sorted(failed_ids(collector)) == sorted(expect)


@pytest.mark.slow
def test_a_spool_disk_that_fails_loses_nothing_that_fits_in_memory(
    collector: CollectorProc, spool_dir: Path
) -> None:
    worker = run_worker(
        collector.socket,
        spool_dir=str(spool_dir),
        failed=300,
        processed=50,
        max_pending_failed=10,
        max_batch_failed=10,
        fsize_limit=4000,  # room for the header and a few batches, then EFBIG
        chunks=30,  # 10 failures at a time, each spooled before the next
        pause=0.02,
        until_spool_fails=True,
        announce=True,
        id_prefix="d",
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "calls done"
        [path] = spool_files(spool_dir)
        on_disk = batches_in(path)
        assert on_disk  # some batches made it before the disk "filled up"
        assert scan(path.read_bytes()).problem is None  # the failed append was cut back
        collector.start()
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0, out
        assert json.loads(out.strip().splitlines()[-1])["flushed"] is True
    finally:
        worker.kill()
    assert spool_files(spool_dir) == []
    assert totals(collector) == {"pushed": 0, "processed": 50, "failed": 300, "retried": 0}
    assert sorted(failed_ids(collector)) == sorted(f"d-{i}" for i in range(300))


@pytest.mark.slow
def test_a_forked_child_neither_takes_nor_releases_the_parents_spool(
    collector: CollectorProc, spool_dir: Path, clients: Callable[..., Client]
) -> None:
    client = clients(collector.socket, spool_dir=spool_dir, max_pending_failed=10)
    for i in range(50):
        client.on_failed("q", Job(id=f"f-{i}", name="t"), "boom")
    own = spool_dir / f"{client.client_id}.spool"
    wait_for(own.exists, WAIT, "the parent's spool")
    pid = fork_quietly()
    if pid == 0:  # child: its copies of the parent's files are closed at fork
        code = 1
        try:
            code = 0 if adopt_orphans(spool_dir) == [] and client.spool_pending() == 0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert adopt_orphans(spool_dir) == []  # the child's exit did not release the lock
    assert own.exists()
    collector.start()
    assert client.flush(WAIT)
    assert totals(collector)["failed"] == 50
    assert sorted(failed_ids(collector)) == sorted(f"f-{i}" for i in range(50))


@pytest.mark.slow
def test_a_process_that_exits_without_closing_spools_at_exit(
    collector: CollectorProc, spool_dir: Path, clients: Callable[..., Client]
) -> None:
    script = (
        "import sys\n"
        "from qdash_mp import Client, Job\n"
        "c = Client(sys.argv[1], spool_dir=sys.argv[2])\n"
        "for i in range(20):\n"
        "    c.on_processed('q')\n"
        "    c.on_failed('q', Job(id=f'x-{i}', name='t'), 'boom')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, collector.socket, str(spool_dir)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    [path] = spool_files(spool_dir)
    assert sum(len(b.failed) for b in batches_in(path)) == 20
    collector.start()
    client = clients(collector.socket, spool_dir=spool_dir)
    wait_for(lambda: replayed(client, spool_dir), WAIT, "the spool to be replayed")
    assert totals(collector) == {"pushed": 0, "processed": 20, "failed": 20, "retried": 0}


@pytest.mark.slow
def test_a_spool_the_collector_refuses_is_set_aside_and_the_others_still_go(
    collector: CollectorProc,
    spool_dir: Path,
    clients: Callable[..., Client],
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector.start()
    assert send_raw(collector.socket, "gappy", [batch_frame(1)]) == 1
    # Batches 2..4 of "gappy" are nowhere: its spool cannot follow what the collector has.
    bad = SpoolFile.create(spool_dir, "gappy")
    bad.append([(5, batch_frame(5)), (6, batch_frame(6))])
    bad.release()
    good = SpoolFile.create(spool_dir, "fine")
    good.append([(1, batch_frame(1, {"ok": (3, 0, 0, 0)}))])
    good.release()
    with caplog.at_level(logging.ERROR, logger="qdash_mp.client"):
        client = clients(collector.socket, spool_dir=spool_dir)
        wait_for(lambda: replayed(client, spool_dir), WAIT, "both files to be handled")
    assert (spool_dir / "gappy.spool.rejected").exists()
    refused = [r.getMessage() for r in caplog.records if "refuses" in r.message]
    assert len(refused) == 1
    assert "sequence" in refused[0]
    assert totals(collector)["pushed"] == 1 + 3
