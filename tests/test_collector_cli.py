"""The real ``qdash-mp`` CLI: start errors are one line, exit 2, and leave nothing behind.

Also ``--version``, and ``stats`` telling that no collector is running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qdash_testing.collector import CollectorProc, short_dir
from qdash_testing.mounts import mounted_tmpfs

from qdash_mp import __version__
from qdash_mp.settings import CollectorSettings

SHM = Path("/dev/shm")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qdash_mp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("qdash-mp"), lines
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_left(data_dir: Path) -> None:
    if data_dir.exists():
        assert sorted(os.listdir(data_dir)) == []
    assert not (SHM / CollectorSettings(data_dir=data_dir).shm).exists()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    d = short_dir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (SHM / CollectorSettings(data_dir=d).shm).unlink()


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"qdash-mp {__version__}"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["collector", "--max-failed-jobs", "many"], "--max-failed-jobs"),
        (["collector", "--max-failed-jobs", "0"], "at least 1"),
        (["collector", "--max-failed-age", "-3"], "above 0"),
        (["collector", "--socket-mode", "9x"], "octal"),
        (["collector", "--http", "nohostport"], "HOST:PORT"),
        (["collector", "--http", "127.0.0.1:99999"], "65535"),
        (["collector", "--bogus"], "--bogus"),
        (["nonsense"], "nonsense"),
        (["collector", "--requeue", "no_such_module_qd:fn"], "no_such_module_qd"),
    ],
)
def test_bad_flags_are_one_line(args: list[str], needle: str, data_dir: Path) -> None:
    r = cli(*args, "--data-dir", str(data_dir)) if args[0] == "collector" else cli(*args)
    assert_one_line_error(r, needle)
    assert_nothing_left(data_dir)


def test_port_in_use(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("collector", "--data-dir", str(data_dir), "--http", f"127.0.0.1:{port}")
    assert_one_line_error(r, "already in use", str(port))
    assert_nothing_left(data_dir)


def test_port_in_use_in_a_new_data_dir(data_dir: Path) -> None:
    fresh = data_dir / "new" / "dir"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("collector", "--data-dir", str(fresh), "--http", f"127.0.0.1:{port}")
    assert_one_line_error(r, "already in use")
    assert not (data_dir / "new").exists()  # the directories it made are gone too
    assert not (SHM / CollectorSettings(data_dir=fresh).shm).exists()


def test_socket_path_too_long(data_dir: Path) -> None:
    sock = data_dir / ("s" * 120 + ".sock")
    r = cli("collector", "--data-dir", str(data_dir), "--socket", str(sock), "--no-http")
    assert_one_line_error(r, "107 byte limit", f"{len(os.fsencode(sock))} bytes")
    assert_nothing_left(data_dir)


def test_data_dir_under_a_file(data_dir: Path) -> None:
    blocker = data_dir / "file"
    blocker.write_text("not a directory")
    r = cli("collector", "--data-dir", str(blocker / "sub"), "--no-http")
    assert_one_line_error(r, "Not a directory")
    assert sorted(os.listdir(data_dir)) == ["file"]


@pytest.fixture
def read_only_dir() -> Iterator[Path]:
    with mounted_tmpfs("ro,size=64k", "a read-only tmpfs") as d:
        yield d


def test_read_only_data_dir(read_only_dir: Path) -> None:
    r = cli("collector", "--data-dir", str(read_only_dir), "--no-http")
    assert_one_line_error(r, "not writable", "Read-only")
    assert_nothing_left(read_only_dir)


def test_second_collector_on_the_same_dir(data_dir: Path) -> None:
    first = CollectorProc(data_dir).start()
    try:
        r = cli("collector", "--data-dir", str(data_dir), "--http", "127.0.0.1:0")
        assert_one_line_error(r, "another collector")
        assert first.proc is not None
        assert first.proc.poll() is None
        assert (data_dir / "collector.sock").exists()  # the running one's files are untouched
    finally:
        first.cleanup()


def test_stats_without_a_collector(data_dir: Path) -> None:
    r = cli("stats", "--data-dir", str(data_dir))
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1
    assert "no collector is running" in r.stderr


def test_stats_after_a_crash_says_not_running(data_dir: Path) -> None:
    proc = CollectorProc(data_dir).start()
    try:
        ok = cli("stats", "--data-dir", str(data_dir))
        assert ok.returncode == 0, ok.stderr
        assert "pushed" in ok.stdout
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(30)
        # The segment survives a crash (it is how the next start recovers its counts) ...
        assert (SHM / proc.shm).exists()
        r = cli("stats", "--data-dir", str(data_dir))
        # ... but stats does not read a dead collector's numbers as if it were running.
        assert r.returncode == 1
        assert "no collector is running" in r.stderr
        assert "is gone" in r.stderr
    finally:
        proc.cleanup()
