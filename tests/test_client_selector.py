"""The client's threads wait in ``poll``: stopping and continuing the process does not wake
them into Python (epoll would: EINTR, then a fight for the GIL with the busy threads)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qdash_mp.client.session import new_selector

CHILD = """
import threading, time
from qdash_mp.client import Client
client = Client({sock!r}, flush_interval=3600.0)  # nothing to send: it waits an hour
time.sleep(0.2)
(sender,) = [t for t in threading.enumerate() if t.name.startswith("qdash-client")]
print(sender.native_id, flush=True)
x = 0
while True:  # busy: this thread holds the GIL whenever it runs
    x += 1
"""

CYCLES = 40


def _switches(pid: int, tid: int) -> int:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])


def test_the_selector_is_poll() -> None:
    sel = new_selector()
    try:
        assert type(sel).__name__ == "PollSelector"
    finally:
        sel.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's epoll EINTR")
def test_stop_and_continue_do_not_wake_the_sender(tmp_path: Path) -> None:
    """Each stop and each continue parks and resumes the thread in the kernel (two switches
    a cycle); epoll's EINTR adds a wait for the GIL (~2.8 a cycle, measured)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(sock=str(tmp_path / "absent.sock"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        tid = int(child.stdout.readline())
        time.sleep(0.1)
        before = _switches(child.pid, tid)
        for _ in range(CYCLES):
            os.kill(child.pid, signal.SIGSTOP)
            time.sleep(0.005)
            os.kill(child.pid, signal.SIGCONT)
            time.sleep(0.005)
        woken = _switches(child.pid, tid) - before
        assert woken <= 2 * CYCLES + 4, f"{woken} switches in {CYCLES} stop/continue cycles"
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
