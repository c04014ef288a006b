"""Run a real ``qdash-mp collector`` process for a test, and take it down afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qdash_mp.settings import CollectorSettings

START_TIMEOUT = 30.0

T = TypeVar("T")


def short_dir(prefix: str = "qd") -> Path:
    """A fresh directory under /tmp with a short path (Unix socket paths are ~107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Poll ``predicate()`` until it is truthy (another process is doing the work); its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class CollectorProc:
    """A collector daemon running in its own process, on ``data_dir``."""

    data_dir: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> str:
        return str(self.data_dir / "collector.sock")

    @property
    def http(self) -> str:
        return str(self.state["http"])

    @property
    def shm(self) -> str:
        return CollectorSettings(data_dir=self.data_dir).shm

    def start(self) -> CollectorProc:
        state_file = self.data_dir / "collector.json"
        state_file.unlink(missing_ok=True)
        self.log_path = self.data_dir / "collector.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qdash_mp",
                "collector",
                "--data-dir",
                str(self.data_dir),
                "--http",
                "127.0.0.1:0",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env_with_tests(self.env),
        )
        log.close()
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"collector exited with {proc.returncode}:\n{self.logs()}")
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                return False
            if state.get("pid") != proc.pid:
                return False
            self.state = state
            return True

        wait_for(ready, START_TIMEOUT, "the collector to be ready")
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        for seg in Path("/dev/shm").glob(self.shm + "*"):
            seg.unlink(missing_ok=True)


def run_worker(socket: str, **kw: Any) -> subprocess.Popen[str]:
    """Start ``qdash_testing.worker`` with ``--key value`` for each keyword (``True``: a flag)."""
    return run_module("qdash_testing.worker", socket=socket, **kw)


def run_module(module: str, **kw: Any) -> subprocess.Popen[str]:
    """Start ``python -m module`` with ``--key value`` for each keyword (``True``: a flag)."""
    argv = [sys.executable, "-m", module]
    for key, value in kw.items():
        flag = f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [flag, str(value)]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, env=_env_with_tests()
    )


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` if it still runs (a test failed half way), wait, close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def _env_with_tests(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with ``tests/`` importable (``qdash_testing``)."""
    env = dict(os.environ)
    tests_dir = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = tests_dir + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env
