"""``qdash-mp demo`` and the rest of the command line, run as a newcomer would run them."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from qdash_testing.collector import wait_for
from qdash_testing.http import get_json

from qdash_mp.cli import build_parser


@pytest.mark.slow
@pytest.mark.parametrize("embedded", [False, True])
def test_demo_serves_live_traffic_and_stops_cleanly(embedded: bool) -> None:
    argv = [sys.executable, "-m", "qdash_mp", "demo", "--http", "127.0.0.1:0", "--duration", "30"]
    if embedded:
        argv.append("--embedded")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"dashboard at (http://\S+/queues/)", line)
        assert match, line
        url = match.group(1)

        def busy() -> Any:
            stats = get_json(url + "api/stats")
            return (
                stats if stats["totals"]["processed"] > 50 and len(stats["queues"]) >= 3 else None
            )

        stats = wait_for(busy, 30, "simulated traffic")
        assert {q["queue"] for q in stats["queues"]} <= {"emails", "reports", "webhooks", "billing"}
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert "Queue Overview" in resp.read().decode()
    finally:
        proc.send_signal(2)  # Ctrl-C
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_parser_knows_every_command() -> None:
    parser = build_parser()
    args = parser.parse_args(["collector", "--data-dir", "d", "--http", "127.0.0.1:0"])
    assert (args.command, args.data_dir, args.http) == ("collector", Path("d"), "127.0.0.1:0")
    assert parser.parse_args(["stats", "--json"]).json is True
    assert parser.parse_args(["demo"]).embedded is False


@pytest.mark.parametrize("bad", ["nohost", "127.0.0.1:http", "127.0.0.1:70000", ":80"])
def test_bad_http_address_is_a_clear_error(bad: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qdash_mp",
            "collector",
            "--http",
            bad,
            "--data-dir",
            "/nonexistent/x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "--http" in out.stderr
    assert "Traceback" not in out.stderr
