"""Many hosts for real: collectors in separate network namespaces, one Redis, one hub.

Each "host" is a network namespace (``qdash_testing.netns``) with its own collector
(``--hub redis://<hub side of its own veth link>/0 --host-name hostN``) and worker processes
making real hook calls through ``Client``; Redis and the hub (``qdash-mp hub``) run in a
namespace of their own, the hub namespace, that the test process reaches over one more veth
link (the hub's HTTP at ``Lab.hub_ip``). Nothing runs or listens in the root namespace but
the test process (``Lab.assert_root_clean``), and every address anything talks to is inside
a namespace the test created. The tests check, to the unit:

* hub totals equal the sum of the hook calls of every host, and each host's row in the hub's
  ``/queues/api/stats`` equals that host's own dashboard (``/queues/api/stats`` inside its
  namespace);
* through faults -- Redis stopped and restarted empty, a collector ``kill -9``'d while
  publishing and restarted, the link between one namespace and Redis cut and restored --
  totals stay exact and no acknowledged failed job is missing from the hub;
* a retry from the hub runs on the owning host exactly once (the worker's requeue mark on
  disk), and an offline host's retry stays queued and runs once when the host is back.

The figures (counts, seconds to catch up) are printed (``-s``) and written to
``$QDASH_HUB_FIGURES`` when set. Skipped, with the reason, where namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qdash_testing.collector import _env_with_tests, short_dir, wait_for
from qdash_testing.http import DashboardSession, get_json
from qdash_testing.netns import HostNs, Lab, RedisServer, unavailable

from qdash_mp.settings import CollectorSettings

pytestmark = pytest.mark.slow

WHY = unavailable()
if WHY is not None:
    pytest.skip(WHY, allow_module_level=True)

CATCH_UP = 90.0
"""Bound on every wait for the hub to catch up (the publisher backs off to 30 s at most)."""

STALE = 5.0
"""The hub's --stale-after here (a cut host shows as stale quickly)."""

FETCH = (
    "import sys, urllib.request\n"
    "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
)
"""GET a URL from inside a namespace (the collectors' dashboards listen on its loopback)."""

WORKER = r"""
import json, sys, time
from qdash_mp import Client, Job
sock, queue, prefix, pushed, processed, failed, requeue_file = sys.argv[1:8]
requeue = None
if requeue_file != "-":
    def requeue(job):
        with open(requeue_file, "a") as f:
            f.write(job.id + "\n")
c = Client(sock, requeue=requeue, flush_interval=0.02)
now = time.time()
for i in range(int(pushed)):
    c.on_pushed(queue)
for i in range(int(processed)):
    c.on_processed(queue, runtime=0.001 * (1 + i % 250))
for i in range(int(failed)):
    job = Job(f"{prefix}{i}", "Task", {"i": i}, 1, now)
    c.on_failed(queue, job, RuntimeError(f"boom {i}"))
ok = c.flush(timeout=120)
print(json.dumps({"flushed": ok}), flush=True)
if requeue is not None:
    sys.stdin.read()  # serve requeues until the test closes stdin
c.close()
"""


@dataclass
class Host:
    """One namespace with its collector, and what its workers reported (the truth)."""

    name: str
    ns: HostNs
    data: Path
    redis_url: str
    proc: subprocess.Popen[bytes] | None = None
    http: str = ""
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    failed_ids: set[str] = field(default_factory=set)
    requeue_file: Path | None = None
    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return str(self.data / "collector.sock")

    def start(self) -> None:
        state = self.data / "collector.json"
        state.unlink(missing_ok=True)
        log = (self.data / "collector.log").open("ab")
        argv = [sys.executable, "-m", "qdash_mp", "collector", "--data-dir", str(self.data)]
        argv += ["--http", "127.0.0.1:0", "--hub", self.redis_url, "--host-name", self.name]
        self.proc = self.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env_with_tests())
        log.close()
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.name} collector exited: {self.logs()}")
            try:
                doc = json.loads(state.read_text())
            except (OSError, ValueError):
                return False
            if doc.get("pid") != proc.pid:
                return False
            self.http = str(doc["http"]).rstrip("/")
            return True

        wait_for(ready, 30, f"the collector of {self.name}")

    def logs(self) -> str:
        path = self.data / "collector.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        for w in self.servers:
            if w.stdin is not None:
                w.stdin.close()
            w.wait(timeout=30)
            if w.stdout is not None:
                w.stdout.close()
        self.servers = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def work(
        self, queue: str, pushed: int, processed: int, failed: int, *, prefix: str = "j"
    ) -> None:
        """Run a worker inside the namespace to completion (flushed: every call acknowledged)."""
        out = self.ns.run(
            [
                sys.executable,
                "-c",
                WORKER,
                self.socket,
                queue,
                prefix,
                str(pushed),
                str(processed),
                str(failed),
                "-",
            ],
            timeout=180,
        )
        assert json.loads(out.splitlines()[-1])["flushed"] is True
        self._count(queue, pushed, processed, failed, prefix)

    def serve_requeues(self, queue: str, failed: int, prefix: str) -> None:
        """A worker that fails ``failed`` jobs, then stays up to take requeues."""
        assert self.requeue_file is not None
        w = self.ns.popen(
            [
                sys.executable,
                "-c",
                WORKER,
                self.socket,
                queue,
                prefix,
                "0",
                "0",
                str(failed),
                str(self.requeue_file),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env_with_tests(),
        )
        assert w.stdout is not None
        assert json.loads(w.stdout.readline())["flushed"] is True
        self.servers.append(w)
        self._count(queue, 0, 0, failed, prefix)

    def _worker(self, queue: str, prefix: str) -> list[str]:
        return [sys.executable, "-c", WORKER, self.socket, queue, prefix]

    def _count(self, queue: str, pushed: int, processed: int, failed: int, prefix: str) -> None:
        c = self.calls.setdefault(queue, {"pushed": 0, "processed": 0, "failed": 0})
        c["pushed"] += pushed
        c["processed"] += processed
        c["failed"] += failed
        self.failed_ids |= {f"{prefix}{i}" for i in range(failed)}

    def own_stats(self) -> dict[str, Any]:
        """This host's own dashboard document (read from inside its namespace)."""
        doc: dict[str, Any] = json.loads(
            self.ns.run([sys.executable, "-c", FETCH, self.http + "/queues/api/stats"])
        )
        return doc


@dataclass
class World:
    lab: Lab
    redis: RedisServer
    hosts: list[Host]
    hub: subprocess.Popen[str]
    hub_url: str
    figures: dict[str, Any] = field(default_factory=dict)

    def restart_hub(self) -> None:
        self.hub.terminate()
        self.hub.wait(timeout=30)
        if self.hub.stdout is not None:
            self.hub.stdout.close()
        self.hub, self.hub_url = _hub_process(self.lab, self.redis.url())

    def hub_stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = get_json(self.hub_url + "/queues/api/stats")
        return doc

    def hub_failed_ids(self) -> set[str]:
        ids: set[str] = set()
        page = 1
        while True:
            doc = get_json(f"{self.hub_url}/queues/api/failed?page={page}")
            ids |= {j["id"] for j in doc["jobs"]}
            if not doc["pages"] or page >= doc["pages"]:
                return ids
            page += 1

    def expected_failed(self) -> set[str]:
        return {f"{i}@{h.name}" for h in self.hosts for i in h.failed_ids}

    def exact(self) -> tuple[bool, str]:
        """Whether the hub shows exactly the hook calls and failed jobs of every host."""
        doc = self.hub_stats()
        for h in self.hosts:
            row = doc.get("hosts", {}).get(h.name)
            if row is None:
                return False, f"{h.name} missing"
            for q, want in h.calls.items():
                got = row["queues"].get(q)
                if got is None or any(got[k] != v for k, v in want.items()):
                    return False, f"{h.name}/{q}: {got and {k: got[k] for k in want}} != {want}"
        for key in ("pushed", "processed", "failed"):
            want_total = sum(c[key] for h in self.hosts for c in h.calls.values())
            if doc["totals"][key] != want_total:
                return False, f"totals {key} {doc['totals'][key]} != {want_total}"
        missing = self.expected_failed() - self.hub_failed_ids()
        if missing:
            return False, f"{len(missing)} failed jobs missing, e.g. {sorted(missing)[:3]}"
        return True, ""

    def wait_exact(self, what: str) -> float:
        """Seconds until the hub is exact (bounded by ``CATCH_UP``); recorded as a figure."""
        t0 = time.monotonic()
        last = [""]

        def check() -> bool:
            ok, why = self.exact()
            last[0] = why
            return ok

        try:
            wait_for(check, CATCH_UP, f"the hub to be exact after {what}", interval=0.1)
        except AssertionError:
            logs = "\n".join(f"--- {h.name}\n{h.logs()}" for h in self.hosts)
            raise AssertionError(f"{what}: still not exact: {last[0]}\n{logs}") from None
        took = round(time.monotonic() - t0, 2)
        self.figures[what] = {
            "catch_up_s": took,
            "hook_calls": sum(sum(c.values()) for h in self.hosts for c in h.calls.values()),
            "failed_jobs": len(self.expected_failed()),
        }
        return took

    def rows_equal_own_dashboards(self) -> None:
        """Each host's hub row equals its own /queues/api/stats (counters and latencies)."""
        fields = ("pushed", "processed", "failed", "retried", "pending", "runtime", "wait")

        def same() -> bool:
            hub = self.hub_stats()["hosts"]
            for h in self.hosts:
                own = {q["queue"]: q for q in h.own_stats()["queues"]}
                row = hub[h.name]["queues"]
                if set(own) != set(row):
                    return False
                for q, stat in own.items():
                    if any(stat[f] != row[q][f] for f in fields):
                        return False
            return True

        wait_for(same, CATCH_UP, "hub rows equal to the hosts' own dashboards", interval=0.2)


def _hub_process(lab: Lab, redis_url: str) -> tuple[subprocess.Popen[str], str]:
    """``qdash-mp hub`` in the hub namespace, Redis on its loopback, HTTP on ``hub_ip``: the
    hub side of the test process's link (``--insecure-no-auth``: only the test's own root
    link reaches that address)."""
    hub = lab.hub.popen(
        [
            sys.executable,
            "-m",
            "qdash_mp",
            "hub",
            "--redis",
            redis_url,
            "--http",
            f"{lab.hub_ip}:0",
            "--insecure-no-auth",
            "--stale-after",
            str(STALE),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert hub.stdout is not None
    line = hub.stdout.readline()
    assert "dashboard at " in line, line
    url = line.rsplit(" ", 1)[1].strip().removesuffix("/queues/")
    return hub, url


@pytest.fixture
def world() -> Iterator[World]:
    lab = Lab(2)
    redis: RedisServer | None = None
    hub: subprocess.Popen[str] | None = None
    hosts: list[Host] = []
    dirs: list[Path] = []
    try:
        rdir = short_dir("qhr")
        dirs.append(rdir)
        # Redis in the hub namespace: its loopback (the hub) and each host link's hub side
        binds = ("127.0.0.1", *(ns.hub_ip for ns in lab.spaces))
        redis = RedisServer(rdir, binds=binds, netns=lab.hub).start()
        for k, ns in enumerate(lab.spaces):
            d = short_dir("qhh")
            dirs.append(d)
            host = Host(f"host{k}", ns, d, redis.url(ns.hub_ip))
            host.requeue_file = d / "requeued.txt"
            host.start()
            hosts.append(host)
        hub, url = _hub_process(lab, redis.url())
        lab.assert_root_clean()
        w = World(lab, redis, hosts, hub, url)
        try:
            yield w
        finally:
            hub = w.hub  # restart_hub() replaces it
        lab.assert_root_clean()
        _report(w.figures)
    finally:
        for h in hosts:
            with contextlib.suppress(Exception):
                h.stop()
        if hub is not None:
            hub.terminate()
            hub.wait(timeout=30)
            if hub.stdout is not None:
                hub.stdout.close()
        if redis is not None:
            redis.stop()
        lab.close()
        for h in hosts:
            for seg in Path("/dev/shm").glob(CollectorSettings(data_dir=h.data).shm + "*"):
                seg.unlink(missing_ok=True)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _report(figures: dict[str, Any]) -> None:
    if not figures:
        return
    print("\nhub figures:", json.dumps(figures, indent=1))
    out = os.environ.get("QDASH_HUB_FIGURES")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(figures) + "\n")


def test_totals_exact_and_rows_equal_through_faults(world: World) -> None:
    h0, h1 = world.hosts
    h0.work("mail", 3000, 2900, 40, prefix="m")
    h1.work("mail", 1000, 990, 10, prefix="m")
    h1.work("pdf", 500, 480, 15, prefix="p")
    world.wait_exact("start")
    world.rows_equal_own_dashboards()

    # Redis stopped mid-run (hosts keep counting locally) and restarted empty
    world.redis.stop()
    h0.work("mail", 700, 650, 25, prefix="m2-")
    h1.work("pdf", 300, 299, 5, prefix="p2-")
    world.redis.start()
    world.wait_exact("redis restarted empty")

    # a collector kill -9'd while publishing (its workers' unacknowledged calls are resent
    # by their clients, its journal keeps every acknowledged failure) and restarted
    busy = h0.ns.popen(
        [sys.executable, "-c", WORKER, h0.socket, "mail", "m3-", "60000", "60000", "200", "-"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)  # the publisher publishes ~once a second while the worker reports
    h0.kill9()
    h0.start()
    assert busy.stdout is not None
    assert json.loads(busy.stdout.readline())["flushed"] is True  # its client resent it all
    busy.wait(timeout=60)
    busy.stdout.close()
    h0._count("mail", 60000, 60000, 200, "m3-")
    h0.work("mail", 100, 90, 5, prefix="m4-")
    world.wait_exact("collector kill -9 and restart")

    # the link between host1's namespace and Redis cut, work on, restored
    h1.ns.cut()
    t_cut = time.monotonic()
    h1.work("pdf", 800, 780, 30, prefix="p3-")
    h0.work("mail", 200, 200, 0)
    wait_for(
        lambda: world.hub_stats()["hosts"]["host1"]["stale"],
        CATCH_UP,
        "host1 to show as stale while cut off",
        interval=0.2,
    )
    stale = world.hub_stats()
    assert stale["hosts"]["host1"]["totals"]["processed"] > 0  # last counts kept
    assert not stale["hosts"]["host0"]["stale"]  # the cut is host1's own link only
    world.figures["link cut"] = {"stale_after_s": round(time.monotonic() - t_cut, 2)}
    h1.ns.restore()
    world.wait_exact("link restored")
    world.rows_equal_own_dashboards()
    wait_for(
        lambda: not any(row["stale"] for row in world.hub_stats()["hosts"].values()),
        CATCH_UP,
        "every host to publish again (not stale)",
        interval=0.2,
    )

    # the hub keeps nothing of its own: a new hub process shows the same, at once
    world.restart_hub()
    world.wait_exact("hub restarted")


def test_retry_from_the_hub_runs_once_on_the_owning_host(world: World) -> None:
    h0, h1 = world.hosts
    # the same job ids on both hosts: only the owner may requeue
    h0.serve_requeues("mail", 3, "job-")
    h1.serve_requeues("mail", 3, "job-")
    world.wait_exact("failed jobs published")
    session = DashboardSession(world.hub_url)
    t0 = time.monotonic()
    status, body = session.post("/queues/failed/job-1@host1/retry")
    assert status == 200, body
    world.figures["retry round trip"] = {"seconds": round(time.monotonic() - t0, 2)}
    assert h1.requeue_file is not None
    assert h0.requeue_file is not None
    assert h1.requeue_file.read_text().split() == ["job-1"]
    assert not h0.requeue_file.exists()
    assert "job-1@host1" not in world.hub_failed_ids()
    assert "job-1@host0" in world.hub_failed_ids()
    own = h1.ns.run([sys.executable, "-c", FETCH, h1.http + "/queues/api/failed"])
    assert "job-1" not in {j["id"] for j in json.loads(own)["jobs"]}
    # retrying it again: gone from the hub, a 404; nothing runs twice
    status, body = session.post("/queues/failed/job-1@host1/retry")
    assert status == 404, body

    # an offline host: the retry is queued, visible, and runs once when the host is back
    h0.ns.cut()
    wait_for(
        lambda: world.hub_stats()["hosts"]["host0"]["stale"],
        CATCH_UP,
        "host0 to show as stale",
        interval=0.2,
    )
    assert not world.hub_stats()["hosts"]["host1"]["stale"]  # host0's own link only
    status, body = session.post("/queues/failed/job-2@host0/retry")
    assert status == 202, body
    assert body["queued"] is True
    assert body["host"] == "host0"
    assert world.hub_stats()["hosts"]["host0"]["queued"] == 1
    assert "job-2@host0" in world.hub_failed_ids()  # visible until it ran
    assert not h0.requeue_file.exists()
    t_back = time.monotonic()
    h0.ns.restore()
    wait_for(
        lambda: (
            "job-2@host0" not in world.hub_failed_ids()
            and world.hub_stats()["hosts"]["host0"]["queued"] == 0
        ),
        CATCH_UP,
        "the queued retry to run once host0 is back",
        interval=0.2,
    )
    world.figures["queued retry after restore"] = {"seconds": round(time.monotonic() - t_back, 2)}
    assert h0.requeue_file.read_text().split() == ["job-2"]
    assert h1.requeue_file.read_text().split() == ["job-1"]


LAB_FAILS = """
import sys
from qdash_testing.netns import Lab
with Lab(1) as lab:
    print(lab.spaces[0].name, lab.hub.name, lab.root_if, flush=True)
    lab.spaces[0].popen(["sleep", "600"])
    lab.hub.popen(["sleep", "600"])
    raise SystemExit(3)
"""

LAB_KILLED = """
import sys, time
from qdash_testing.netns import Lab
lab = Lab(1)
lab.spaces[0].popen(["sleep", "600"])
lab.hub.popen(["sleep", "600"])
print(lab.spaces[0].name, lab.hub.name, lab.root_if, flush=True)
time.sleep(600)
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.split()}


def _root_link_exists(dev: str) -> bool:
    done = subprocess.run(["ip", "link", "show", dev], capture_output=True, check=False)
    return done.returncode == 0


def test_namespaces_are_removed_on_failure_and_after_a_kill() -> None:
    """``Lab`` removes its namespaces (and what runs in them) when the code using it fails,
    and a ``Lab`` removes the leftovers of a run that was ``kill -9``'d."""
    done = subprocess.run(
        [sys.executable, "-c", LAB_FAILS],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env_with_tests(),
        check=False,
    )
    assert done.returncode == 3, done.stderr
    host_ns, hub_ns, root_if = done.stdout.split()
    assert not {host_ns, hub_ns} & _namespaces()
    assert not _root_link_exists(root_if)
    killed = subprocess.Popen(
        [sys.executable, "-c", LAB_KILLED],
        stdout=subprocess.PIPE,
        text=True,
        env=_env_with_tests(),
    )
    assert killed.stdout is not None
    host_ns, hub_ns, root_if = killed.stdout.readline().split()
    killed.kill()
    killed.wait(timeout=10)
    killed.stdout.close()
    # a kill -9 leaves them (and their sleeps) behind...
    assert {host_ns, hub_ns} <= _namespaces()
    assert _root_link_exists(root_if)
    # ...and something may still hold the hub namespace (here this fd; in a real run an
    # orphaned TCP socket of the killed Redis): deleting it does not delete its veth ends
    with open(f"/run/netns/{hub_ns}") as held, Lab(1):
        assert held.fileno() >= 0
        # ...the next Lab removes them all, the root side of the killed run's link included
        assert not {host_ns, hub_ns} & _namespaces()
        assert not _root_link_exists(root_if)
    assert not any(n.startswith(f"qhub-{killed.pid}-") for n in _namespaces())


def test_the_lab_refuses_a_listener_on_a_root_namespace_address() -> None:
    """``Lab.assert_root_clean`` catches this process listening on a non-loopback address of
    the root namespace (the wildcard, or the root side of the lab's link); loopback is fine."""
    with Lab(1) as lab:
        lab.assert_root_clean()
        for host in ("127.0.0.1", "0.0.0.0", lab.root_ip):
            with socket.socket() as s:
                s.bind((host, 0))
                s.listen()
                if host == "127.0.0.1":
                    lab.assert_root_clean()
                    continue
                with pytest.raises(AssertionError, match="non-loopback root-namespace"):
                    lab.assert_root_clean()
