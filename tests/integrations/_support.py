"""Helpers of the integrations suite: worker processes, bounded waits, dashboard reads."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qdash_testing.collector import wait_for
from qdash_testing.http import DashboardSession

from qdash_mp.models import FailedJob, QueueStat
from qdash_mp.testing import CollectorThread

HERE = Path(__file__).resolve().parent
T = TypeVar("T")

WAIT = 60.0
"""Upper bound of every wait on a worker (a loaded 2-core CI machine)."""


def wait_until(predicate: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    return wait_for(predicate, timeout, what, interval=0.05)


@dataclass
class Env:
    redis_url: str
    collector: CollectorThread
    tmp: Path
    queue: str
    marks: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    grace: dict[int, float] = field(default_factory=dict)

    @classmethod
    def make(cls, redis_url: str, collector: CollectorThread, tmp: Path, test: str) -> Env:
        slug = re.sub(r"[^a-z0-9]+", "-", test.lower()).strip("-")[:40]
        marks = tmp / "marks"
        marks.mkdir()
        return cls(redis_url, collector, tmp, f"it-{slug}-{uuid.uuid4().hex[:6]}", marks)

    def environ(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            IT_REDIS_URL=self.redis_url,
            IT_QUEUE=self.queue,
            IT_MARKS=str(self.marks),
            QDASH_SOCKET=self.collector.socket_path,
            PYTHONPATH=os.pathsep.join([str(HERE / "apps"), env.get("PYTHONPATH", "")]),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def spawn(
        self, argv: Sequence[str], log: str, grace: float = 30.0, **extra: str
    ) -> subprocess.Popen[bytes]:
        """Start a worker (its own process group) logging to ``tmp/<log>.log``.

        ``grace``: seconds it gets to stop on SIGTERM before its group is SIGKILLed.
        """
        out = (self.tmp / f"{log}.log").open("wb")
        proc = subprocess.Popen(
            list(argv),
            cwd=HERE / "apps",
            env=self.environ(**extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.procs.append(proc)
        self.grace[proc.pid] = grace
        return proc

    def run(self, argv: Sequence[str], timeout: float = WAIT, **extra: str) -> str:
        """Run a producer to completion; its output, or an AssertionError with it."""
        done = subprocess.run(
            list(argv),
            cwd=HERE / "apps",
            env=self.environ(**extra),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        text = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{text}"
        return text

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        """Stop a worker we started (its group, by id) and wait; SIGKILL after its grace."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(self.grace.get(proc.pid, 30.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)

    # -- what the dashboard shows -------------------------------------------------------------

    def stat(self, queue: str | None = None) -> QueueStat | None:
        return self.collector.stats().queue(queue or self.queue)

    def counts(self, queue: str | None = None) -> tuple[int, int, int, int]:
        """``(pushed, processed, failed, retried)`` of the queue (zeros before its first event)."""
        s = self.stat(queue)
        return (0, 0, 0, 0) if s is None else (s.pushed, s.processed, s.failed, s.retried)

    def wait_counts(
        self, expected: tuple[int, int, int, int], queue: str | None = None, timeout: float = WAIT
    ) -> None:
        """Wait for the exact counts, then check they stay there (nothing counted twice)."""
        try:
            wait_until(lambda: self.counts(queue) == expected, f"counts {expected}", timeout)
        except AssertionError:
            raise AssertionError(
                f"counts of {queue or self.queue}: {self.counts(queue)} != {expected} "
                f"(pushed, processed, failed, retried)\n{self.all_logs()}"
            ) from None
        time.sleep(0.3)
        assert self.counts(queue) == expected

    def failed(self, queue: str | None = None) -> list[FailedJob]:
        q = queue or self.queue
        return [self.collector.failed_job(v.id) for v in self.collector.failed() if v.queue == q]

    def retry(self, job_id: str) -> Any:
        """Retry through the dashboard's HTTP POST, as a browser does (CSRF cookie + token)."""
        session = DashboardSession(self.collector.url)
        status, body = session.post(f"/queues/failed/{job_id}/retry")
        assert status == 200, (status, body)
        return body

    def wait_mark(self, name: str, timeout: float = WAIT) -> Path:
        path = self.marks / name
        wait_until(path.exists, f"mark {name}\n{self.all_logs()}", timeout)
        return path

    def all_logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log")
        )
