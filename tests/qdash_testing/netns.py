"""Network namespaces for the hub tests: "hosts" on this machine, and a "hub" namespace for
Redis and the hub, each host reaching Redis only over its own link the test can cut.

``Lab(n)`` creates, per run (``<pid>`` of the test process):

======================  =====================================================================
``qhub-<pid>-hub``      Redis and the hub run here (``Lab.hub``), loopback up
``qhub-<pid>-<k>``      host ``k`` (``Lab.spaces[k]``), loopback up
host link ``k``         veth ``qh<pid>h<k>`` (host ns, ``10.200.<k>.2/30``) <->
                        ``qh<pid>s<k>`` (hub ns, ``10.200.<k>.1/30``): created directly between
                        the two namespaces, it never exists in the root namespace
root link               veth ``qh<pid>r`` (root ns, ``Lab.root_ip``) <-> ``qh<pid>u`` (hub ns,
                        ``Lab.hub_ip``) on a /30 in ``10.64.0.0/10`` derived from the pid
                        (unique per live run): the only way from the test process to the hub's
                        HTTP; nothing listens on the root side
======================  =====================================================================

So every address a process talks to is inside a namespace the test created: a collector
talks to Redis at its link's hub side, the hub to Redis on the hub namespace's loopback, the
test process to the hub at ``Lab.hub_ip`` and to a collector's dashboard on the loopback of
its namespace (``Netns.run``). ``Lab.assert_root_clean`` checks that nothing of this test
listens on a non-loopback address of the root namespace and that the only lab address there
is ``root_ip``.

A test runs processes inside with ``Netns.popen`` (``ip netns exec``), cuts and restores one
host's link with ``HostNs.cut`` / ``HostNs.restore`` (``ip -n <hub ns> link set qh<pid>s<k>
down|up``: that host's packets are dropped, no RST, exactly what a broken network looks like
to TCP; the other hosts' links are untouched). ``Lab.close`` kills every process left in its
namespaces, deletes them and the root link; the fixture calls it also when the test fails.
Leftovers of a run that was ``kill -9``'d (namespaces and root link whose pid is gone) are
removed by the next ``Lab``.

``RedisServer`` runs a real ``redis-server`` (root namespace on loopback, or inside a
namespace) that a test can stop and restart on the same port.

``unavailable()`` says why namespaces cannot be made here (not root, no ``ip``, no netns
support), or ``None``; tests skip with that reason. CI runs as root.
"""

from __future__ import annotations

import contextlib
import ipaddress
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

__all__ = ["HostNs", "Lab", "Netns", "RedisServer", "free_port", "unavailable"]

PREFIX = "qhub-"
HUB = "hub"
_TIMEOUT = 10.0
_LEFTOVER = re.compile(rf"{PREFIX}(\d+)-(?:\d+|{HUB})")
_ROOT_LINK = re.compile(r"^\d+:\s+(qh(\d+)r)[@:]", re.M)


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
    """Delete the ``qhub-<pid>-*`` namespaces and the root links ``qh<pid>r`` of test runs
    that are gone.

    The root link is deleted by name: a deleted namespace lives on (and its veth ends with
    it) while a socket still refers to it, e.g. an orphaned TCP connection of a killed Redis
    retransmitting its FIN to a host that is gone, for minutes."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _LEFTOVER.fullmatch(name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_ns(name)
    for m in _ROOT_LINK.finditer(_ip("-o", "link", "show", check=False).stdout):
        if not _pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)


def _is_up(where: tuple[str, ...], dev: str) -> bool:
    out = _ip(*where, "-br", "link", "show", dev, check=False).stdout.split()
    return len(out) >= 2 and out[1] == "UP"


@dataclass
class Netns:
    """One namespace of a ``Lab``; processes started in it are tracked."""

    name: str
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


@dataclass
class HostNs(Netns):
    """A host namespace with its own veth link to the hub namespace (module docstring).

    ``ns_ip`` is the host's end, ``hub_ip`` the hub namespace's end (where it reaches Redis).
    """

    hub: str = ""
    ns_if: str = ""
    hub_if: str = ""
    ns_ip: str = ""
    hub_ip: str = ""

    def cut(self) -> None:
        """Take this host's link down at the hub end: its packets to and from Redis are lost
        (and only its: every host has its own link)."""
        _ip("-n", self.hub, "link", "set", self.hub_if, "down")

    def restore(self) -> None:
        """Bring the link back up and wait until both ends report it up (operstate UP)."""
        _ip("-n", self.hub, "link", "set", self.hub_if, "up")
        deadline = time.monotonic() + _TIMEOUT
        while not (_is_up(("-n", self.hub), self.hub_if) and _is_up(("-n", self.name), self.ns_if)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: the link did not come back up")
            time.sleep(0.02)


def _root_link_net(pid: int) -> ipaddress.IPv4Network:
    """A /30 in 10.64.0.0/10 of its own for every pid below 2**20 (pid_max is 2**22 at most;
    two live runs 2**20 pids apart are not a concern)."""
    base = int(ipaddress.IPv4Address("10.64.0.0")) + (pid % (1 << 20)) * 4
    return ipaddress.IPv4Network((base, 30))


def _descendants(pid: int) -> set[int]:
    """``pid`` and every live process below it (``/proc/<pid>/task/*/children``)."""
    seen = {pid}
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                    for kid in map(int, kids):
                        if kid not in seen:
                            seen.add(kid)
                            todo.append(kid)
    return seen


def _listen_host(local: str) -> str:
    host = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
    return "0.0.0.0" if host == "*" else host


class Lab:
    """A hub namespace and ``n`` host namespaces, each host linked to the hub namespace by its
    own veth pair, the hub namespace linked to the root one; ``close()`` removes them all."""

    def __init__(self, n: int) -> None:
        remove_leftovers()
        pid = os.getpid()
        tag = pid  # interface names: "qh" + at most 7 digits + 3 <= 15 bytes
        net = _root_link_net(pid)
        self.root_if = f"qh{tag}r"
        self.root_ip = str(net[1])
        self.hub_ip = str(net[2])
        self.hub = Netns(f"{PREFIX}{pid}-{HUB}")
        self.spaces: list[HostNs] = []
        self._made: list[Netns] = []
        try:
            self._make_hub(tag, net.prefixlen)
            for k in range(n):
                self._make_host(
                    HostNs(
                        name=f"{PREFIX}{pid}-{k}",
                        hub=self.hub.name,
                        ns_if=f"qh{tag}h{k}",
                        hub_if=f"qh{tag}s{k}",
                        ns_ip=f"10.200.{k}.2",
                        hub_ip=f"10.200.{k}.1",
                    )
                )
        except BaseException:
            self.close()
            raise

    def _make_hub(self, tag: int, prefixlen: int) -> None:
        _ip("netns", "add", self.hub.name)
        self._made.append(self.hub)  # so close() removes it even if the rest fails
        inside = ("-n", self.hub.name)
        _ip(*inside, "link", "set", "lo", "up")
        hub_if = f"qh{tag}u"
        _ip("link", "add", self.root_if, "type", "veth", "peer", "name", hub_if, "netns",
            self.hub.name)  # fmt: skip
        _ip("addr", "add", f"{self.root_ip}/{prefixlen}", "dev", self.root_if)
        _ip("link", "set", self.root_if, "up")
        _ip(*inside, "addr", "add", f"{self.hub_ip}/{prefixlen}", "dev", hub_if)
        _ip(*inside, "link", "set", hub_if, "up")

    def _make_host(self, ns: HostNs) -> None:
        _ip("netns", "add", ns.name)
        self._made.append(ns)
        self.spaces.append(ns)
        # both ends created inside their namespaces: the host links never touch the root one
        _ip("link", "add", ns.ns_if, "netns", ns.name, "type", "veth", "peer", "name",
            ns.hub_if, "netns", ns.hub)  # fmt: skip
        _ip("-n", ns.name, "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_if)
        _ip("-n", ns.name, "link", "set", ns.ns_if, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        _ip("-n", ns.hub, "addr", "add", f"{ns.hub_ip}/30", "dev", ns.hub_if)
        _ip("-n", ns.hub, "link", "set", ns.hub_if, "up")

    def assert_root_clean(self) -> None:
        """Nothing of this test (this process and its descendants still in the root
        namespace) listens on a non-loopback address of the root namespace, nothing listens
        on ``root_ip``, and ``root_ip`` is the only address of the lab there."""
        ours = _descendants(os.getpid())
        out = subprocess.run(
            ["ss", "-Htulnp"], capture_output=True, text=True, check=True, timeout=_TIMEOUT
        ).stdout
        bad = []
        for line in out.splitlines():
            cols = line.split()
            if len(cols) < 5:
                continue
            host = _listen_host(cols[4])
            pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            loopback = ipaddress.ip_address(host).is_loopback
            if host == self.root_ip or (pids & ours and not loopback):
                bad.append(line)
        assert not bad, f"listening on a non-loopback root-namespace address: {bad}"
        lab_nets = [ipaddress.ip_network(f"{ns.ns_ip}/30", strict=False) for ns in self.spaces]
        addrs = _ip("-o", "-4", "addr", "show").stdout
        for m in re.finditer(r"^\d+:\s+(\S+)\s+inet\s+([\d.]+)/", addrs, re.M):
            dev, addr = m.group(1), ipaddress.ip_address(m.group(2))
            if any(addr in net for net in lab_nets) or (
                dev.startswith(f"qh{os.getpid()}") and str(addr) != self.root_ip
            ):
                raise AssertionError(f"a lab address in the root namespace: {dev} {addr}")

    def close(self) -> None:
        """Kill the processes started in the namespaces, delete namespaces and links."""
        for ns in self._made:
            for proc in ns.procs:
                if proc.poll() is None:
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        for ns in reversed(self._made):  # hosts first, the hub namespace last
            _delete_ns(ns.name)
        _ip("link", "del", self.root_if, check=False)  # gone with the hub namespace, normally
        self._made = []
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
        if self.netns is not None:  # the root namespace cannot reach its loopback: ask inside
            argv = ["redis-cli", "-h", self.binds[0], "-p", str(self.port), "ping"]
            done = subprocess.run(
                self.netns.argv(argv), capture_output=True, text=True, timeout=_TIMEOUT, check=False
            )
            return done.stdout.strip() == "PONG"
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
