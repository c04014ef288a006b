"""Prometheus ``/metrics``: the exposition of counters, gauges and exact latency histograms,
checked by ``promtool check metrics`` (Debian's ``prometheus``), and served by a real collector
behind its auth (or public with ``--metrics-public``)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest
from qdash_testing.collector import CollectorProc, short_dir

from qdash_mp import Client, Job
from qdash_mp.histogram import NBUCKETS, count_values, cumulative_at_octaves
from qdash_mp.metrics import CONTENT_TYPE, Health, Latency, render
from qdash_mp.models import QueueStat, StatsView

TOKEN = "metrics-test-token-0123456789"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing (apt-get install prometheus; .ci/run does)"
)


def promtool_check(text: bytes) -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert not done.stdout.strip(), done.stdout.decode()  # no lint complaints either


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of every sample called ``name``."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(\{{[^}}]*\}})? (\S+)", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def view() -> StatsView:
    queues = [
        QueueStat("emails", pushed=10, processed=7, failed=2, retried=1, pending=1),
        QueueStat('odd "queue"\\', pushed=1, pending=1),
    ]
    return StatsView(queues, QueueStat("total", 11, 7, 2, 1, 2))


def test_histogram_buckets_are_exact_sums_of_ours() -> None:
    runtimes = [0.00001, 0.003, 0.003, 0.02, 0.5, 0.5, 1.0, 7.0, 5000.0]
    counts = [0] * NBUCKETS
    count_values(counts, runtimes)
    total = sum(runtimes)

    def source(stat: QueueStat, kind: str) -> Latency | None:
        if stat.queue != "emails":
            return None
        return Latency(counts, total) if kind == "runtime" else Latency({5: 3})

    text = render(view(), None, source).decode()
    buckets = samples(text, "qdash_job_runtime_seconds_bucket")
    expected = cumulative_at_octaves(counts)
    assert len(buckets) == len(expected) == 28
    for le, n in expected:
        key = "+Inf" if math.isinf(le) else repr(le)
        assert buckets[f'{{le="{key}",queue="emails"}}'] == n
    # spot checks against the raw values: Prometheus' le counts values <= le
    assert buckets['{le="0.00390625",queue="emails"}'] == 3  # 1e-5 (underflow), 0.003 x2
    assert buckets['{le="1.0",queue="emails"}'] == 6  # 1.0 sits on an edge: counted above it
    assert buckets['{le="+Inf",queue="emails"}'] == len(runtimes)
    assert samples(text, "qdash_job_runtime_seconds_count") == {'{queue="emails"}': 9}
    assert samples(text, "qdash_job_runtime_seconds_sum") == {'{queue="emails"}': total}
    # wait: no known sum -> buckets only; the queue without data has no series at all
    assert samples(text, "qdash_job_wait_seconds_bucket")['{le="+Inf",queue="emails"}'] == 3
    assert "qdash_job_wait_seconds_sum" not in text
    assert "odd" not in "".join(k for k in buckets)


def test_counters_gauges_and_health() -> None:
    health = Health(
        connected_clients=3,
        batches_total=41,
        fsync_count=5,
        fsync_seconds=0.25,
        errors={"bad_frame": 2, "handshake": 1},
        failed_jobs_stored=2,
        journal_bytes=4096,
        audit_entries=1,
    )
    text = render(view(), health).decode()
    assert samples(text, "qdash_jobs_pushed_total") == {
        '{queue="emails"}': 10,
        '{queue="odd \\"queue\\"\\\\"}': 1,
    }
    assert samples(text, "qdash_jobs_failed_total")['{queue="emails"}'] == 2
    assert samples(text, "qdash_jobs_retried_total")['{queue="emails"}'] == 1
    assert samples(text, "qdash_jobs_pending")['{queue="emails"}'] == 1
    assert samples(text, "qdash_jobs_active")['{queue="emails"}'] == 0
    assert samples(text, "qdash_failed_jobs_stored") == {"": 2}
    assert samples(text, "qdash_journal_bytes") == {"": 4096}
    assert samples(text, "qdash_collector_connected_clients") == {"": 3}
    assert samples(text, "qdash_collector_batches_total") == {"": 41}
    assert samples(text, "qdash_collector_fsync_seconds_count") == {"": 5}
    assert samples(text, "qdash_collector_errors_total") == {
        '{kind="bad_frame"}': 2,
        '{kind="handshake"}': 1,
    }
    assert samples(text, "qdash_collector_up") == {"": 1}


@needs_promtool
def test_promtool_accepts_the_exposition() -> None:
    counts = [0] * NBUCKETS
    count_values(counts, [0.01, 0.2, 3.0])
    text = render(
        view(),
        Health(connected_clients=1, errors={"x": 1}, fsync_count=1, fsync_seconds=0.1),
        lambda stat, kind: Latency(counts, 3.21),
    )
    promtool_check(text)
    promtool_check(render(StatsView(), None))  # empty: no queues yet


def _get(url: str, token: str | None = None) -> tuple[int, str, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def _collector(*args: str) -> Any:
    data = short_dir("qmet")
    token = data / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return CollectorProc(data, args=("--auth-token-file", str(token), *args))


@pytest.mark.slow
def test_collector_serves_metrics_behind_auth() -> None:
    proc = _collector()
    try:
        proc.start()
        with Client(proc.socket) as client:
            for _ in range(5):
                client.on_pushed("emails")
            client.on_failed("emails", Job(id="x1", name="t"), "boom")
            assert client.flush(timeout=30)
            live = _get(proc.http + "/metrics", TOKEN)[2].decode()
            assert samples(live, "qdash_collector_connected_clients") == {"": 1}
        status, _, _ = _get(proc.http + "/metrics")
        assert status == 401
        status, ctype, body = _get(proc.http + "/metrics", TOKEN)
        assert status == 200
        assert ctype == CONTENT_TYPE
        text = body.decode()
        assert samples(text, "qdash_jobs_pushed_total") == {'{queue="emails"}': 5}
        assert samples(text, "qdash_jobs_failed_total") == {'{queue="emails"}': 1}
        assert samples(text, "qdash_failed_jobs_stored") == {"": 1}
        assert samples(text, "qdash_collector_up") == {"": 1}
        if PROMTOOL is not None:
            promtool_check(body)
    finally:
        proc.cleanup()


@pytest.mark.slow
def test_metrics_public_flag() -> None:
    proc = _collector("--metrics-public")
    try:
        proc.start()
        status, _, body = _get(proc.http + "/metrics")
        assert status == 200
        assert b"qdash_collector_up 1.0" in body
        assert _get(proc.http + "/queues/api/stats")[0] == 401  # only /metrics is public
    finally:
        proc.cleanup()
