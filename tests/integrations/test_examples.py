"""The examples under examples/ run as their READMEs say, against the real broker and collector.

Each worker is started from its example folder with the README's command, the producer is
run once, and the dashboard must show its 25 pushes and at least its 20 sure successes (the
example's ``flaky`` jobs fail or pass by the clock).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ._support import Env, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

WORKERS: dict[str, tuple[list[str], str]] = {
    "celery": (
        ["celery", "-A", "tasks", "worker", "-P", "prefork", "-c", "2", "-l", "warning"],
        "celery",
    ),
    "rq": (
        ["rq", "worker", "--url", "{redis}", "--worker-class", "qdash_mp.integrations.rq.Worker",
         "--queue-class", "qdash_mp.integrations.rq.Queue", "default"],
        "default",
    ),
    "dramatiq": (["dramatiq", "tasks", "--processes", "2", "--threads", "2"], "default"),
    "arq": (["arq", "tasks.WorkerSettings"], "arq:queue"),
    "huey": (["huey_consumer", "tasks.huey", "-w", "2", "-k", "thread"], "example"),
    "taskiq": (["taskiq", "worker", "tasks:broker", "--workers", "2"], "taskiq"),
}  # fmt: skip


@pytest.mark.parametrize("lib", sorted(WORKERS))
def test_example_runs(env: Env, lib: str) -> None:
    pytest.importorskip(lib)
    argv, queue = WORKERS[lib]
    folder = EXAMPLES / lib
    bin_dir = Path(sys.executable).parent
    argv = [str(bin_dir / argv[0]), *(a.format(redis=env.redis_url) for a in argv[1:])]
    pushed0, processed0, _, _ = env.counts(queue)
    log = (env.tmp / "worker.log").open("wb")
    worker = subprocess.Popen(
        argv, cwd=folder, env=env.environ(REDIS_URL=env.redis_url), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()
    env.procs.append(worker)
    env.grace[worker.pid] = 3.0
    try:
        done = subprocess.run(
            [sys.executable, "producer.py"], cwd=folder, env=env.environ(REDIS_URL=env.redis_url),
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        wait_until(
            lambda: (
                env.counts(queue)[0] - pushed0 == 25 and env.counts(queue)[1] - processed0 >= 20
            ),
            f"{lib} example: 25 pushed, 20 processed\n{env.all_logs()}",
        )
    finally:
        env.stop_all()
