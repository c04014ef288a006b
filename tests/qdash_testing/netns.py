"""Network namespaces for the hub tests: "hosts" on this machine that reach Redis only over a
link the test can cut.

``Lab`` creates namespaces ``qhub-<pid>-<k>``, each with a veth pair to the root namespace
on its own private /30 (``10.<a>.<k>.0/30``: root side ``.1``, namespace side ``.2``; ``<a>``
derived from the pid so concurrent runs do not clash), loopback up inside. A test runs
processes inside with ``Netns.popen`` (``ip netns exec``), cuts and restores the link with
``Netns.cut`` / ``Netns.restore`` (``ip link set <root side> down|up``: packets are dropped,
no RST, exactly what a broken network looks like to TCP). ``Lab.close`` kills every process
left in its namespaces and deletes them (the veth pairs go with them); the fixture calls it
also when the test fails. Leftovers of a run that was ``kill -9``'d (namespaces whose pid is
gone) are removed by the next ``Lab``.

``RedisServer`` runs a real ``redis-server`` (root namespace, bound to loopback and to the
lab's root-side addresses, or inside a namespace) that a test can stop and restart on the
same port.

``unavailable()`` says why namespaces cannot be made here (not root, no ``ip``, no netns
support), or ``None``; tests skip with that reason. CI runs as root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Lab", "Netns", "RedisServer", "free_port", "unavailable"]

PREFIX = "qhub-"
_TIMEOUT = 10.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, check=check, timeout=_TIMEOUT
    )


def unavailable() -> str | None:
    """Why network namespaces cannot be created here, or ``None`` when they can."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to create network namespaces"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the hub tests as root)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split()]


def _delete_ns(name: str) -> None:
    """Kill whatever still runs in ``name`` and delete it (bounded waits)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _ns_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5.0
        while _ns_pids(name) and time.monotonic() < deadline:
            time.sleep(0.05)
    _ip("netns", "del", name, check=False)


def remove_leftovers() -> None:
    """Delete ``qhub-<pid>-*`` namespaces of test runs that are gone."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)-\d+", name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_ns(name)


@dataclass
class Netns:
    """One namespace with a veth pair to the root namespace (see the module docstring)."""

    name: str
    root_if: str
    ns_if: str
    root_ip: str
    ns_ip: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace (tracked: killed by ``Lab.close``)."""
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 30.0) -> str:
        """Run ``argv`` inside the namespace to completion; its stdout (raises on failure)."""
        done = subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"{argv} in {self.name} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def cut(self) -> None:
        """Take the link to the root namespace down: packets to and from it are lost."""
        _ip("link", "set", self.root_if, "down")

    def restore(self) -> None:
        """Bring the link back up and wait until both ends report it up (operstate UP)."""
        _ip("link", "set", self.root_if, "up")
        deadline = time.monotonic() + _TIMEOUT
        while not (self._up(()) and self._up(("-n", self.name))):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: the link did not come back up")
            time.sleep(0.02)

    def _up(self, where: tuple[str, ...]) -> bool:
        dev = self.root_if if not where else self.ns_if
        out = _ip(*where, "-br", "link", "show", dev, check=False).stdout.split()
        return len(out) >= 2 and out[1] == "UP"


class Lab:
    """``n`` namespaces, each linked to the root namespace; ``close()`` removes them all."""

    def __init__(self, n: int) -> None:
        remove_leftovers()
        pid = os.getpid()
        a = 100 + pid % 150  # 10.100.x.x .. 10.249.x.x: private, per run
        tag = pid % 100000
        self.spaces: list[Netns] = []
        try:
            for k in range(n):
                ns = Netns(
                    name=f"{PREFIX}{pid}-{k}",
                    root_if=f"qh{tag}r{k}",
                    ns_if=f"qh{tag}n{k}",
                    root_ip=f"10.{a}.{k}.1",
                    ns_ip=f"10.{a}.{k}.2",
                )
                self._make(ns)
        except BaseException:
            self.close()
            raise

    def _make(self, ns: Netns) -> None:
        _ip("netns", "add", ns.name)
        self.spaces.append(ns)  # so close() removes it even if the rest fails
        _ip("link", "add", ns.root_if, "type", "veth", "peer", "name", ns.ns_if)
        _ip("link", "set", ns.ns_if, "netns", ns.name)
        _ip("addr", "add", f"{ns.root_ip}/30", "dev", ns.root_if)
        _ip("link", "set", ns.root_if, "up")
        inside = ("-n", ns.name)
        _ip(*inside, "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_if)
        _ip(*inside, "link", "set", ns.ns_if, "up")
        _ip(*inside, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill the processes started in the namespaces, delete namespaces and links."""
        for ns in self.spaces:
            for proc in ns.procs:
                if proc.poll() is None:
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            _delete_ns(ns.name)
            _ip("link", "del", ns.root_if, check=False)  # gone with the namespace, normally
        self.spaces = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RedisServer:
    """A ``redis-server`` on ``port`` bound to ``binds``, started/stopped/restarted by tests.

    ``persist=False`` (default) keeps nothing on disk: a restart comes back empty, the
    hardest case for the publishers (they must republish everything). ``netns`` runs it
    inside that namespace instead of the root one.
    """

    dir: Path
    binds: tuple[str, ...] = ("127.0.0.1",)
    port: int = 0
    persist: bool = False
    netns: Netns | None = None
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()

    def url(self, host: str | None = None, db: int = 0) -> str:
        return f"redis://{host or self.binds[0]}:{self.port}/{db}"

    def start(self) -> RedisServer:
        save = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else []
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            *self.binds,
            "--save",
            "",
            "--appendonly",
            "no",
            *save,
            "--dir",
            str(self.dir),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]
        log = (self.dir / "redis.log").open("ab")
        if self.netns is not None:
            self.proc = self.netns.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        else:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + _TIMEOUT
        while not self.ping():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer: {self.logs()}")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        if self.netns is not None:
            return True  # the root namespace cannot reach inside; a client retries anyway
        try:
            with socket.create_connection((self.binds[0], self.port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def logs(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM and wait (a clean shutdown; bounded)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=_TIMEOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=_TIMEOUT)

    def restart(self) -> None:
        self.stop()
        self.start()
