"""Behind a real TLS reverse proxy: Debian's nginx runs the ``location`` block of
``docs/exposing.md`` in front of a real collector (``--trusted-proxy 127.0.0.1/32``), and a
browser-like client signs in, follows links, gets ``Secure`` cookies scoped to the prefix and
presses a button with its real ``Origin``. Also: the systemd unit example verifies."""

from __future__ import annotations

import http.cookiejar
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qdash_testing.collector import CollectorProc, short_dir, wait_for
from qdash_testing.http import csrf_token_in

from qdash_mp import Client, Job
from qdash_mp.audit import FileAuditLog

DOCS = Path(__file__).resolve().parents[1] / "docs"
TOKEN = "nginx-test-token-0123456789"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
OPENSSL = shutil.which("openssl")


def location_block() -> str:
    """The nginx ``location`` block documented in docs/exposing.md."""
    text = (DOCS / "exposing.md").read_text()
    m = re.search(r"# qdash-location-begin\n(.*?)\n\s*# qdash-location-end", text, re.S)
    assert m is not None, "docs/exposing.md lost its marked nginx location block"
    return m.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def proxied() -> Iterator[tuple[str, CollectorProc, ssl.SSLContext]]:
    if NGINX is None or OPENSSL is None:
        pytest.skip("nginx or openssl missing (apt-get install nginx; .ci/run does)")
    data = short_dir("qngx")
    token = data / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    collector = CollectorProc(
        data, args=("--auth-token-file", str(token), "--trusted-proxy", "127.0.0.1/32")
    )
    tmp = short_dir("qngxc")
    tmp.chmod(0o755)  # nginx workers may run as another user
    proc = None
    try:
        collector.start()
        upstream = collector.http.removeprefix("http://")
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run(
            [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        port = free_port()
        block = location_block().replace("127.0.0.1:8700", upstream)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir(mode=0o777)
            (tmp / sub).chmod(0o777)
        conf = tmp / "nginx.conf"
        conf.write_text(
            f"""
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name 127.0.0.1;
        ssl_certificate {cert};
        ssl_certificate_key {key};
{block}
    }}
}}
"""
        )
        proc = subprocess.Popen(
            [NGINX, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # -e: errors go to the log file
        )

        def listening() -> bool:
            if proc is not None and proc.poll() is not None:
                err = (tmp / "error.log").read_text(errors="replace")
                raise AssertionError(f"nginx exited {proc.returncode}: {err}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                return False
            return True

        wait_for(listening, 30, "nginx to listen", interval=0.05)
        context = ssl.create_default_context(cafile=str(cert))
        yield f"https://127.0.0.1:{port}", collector, context
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        collector.cleanup()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def test_dashboard_through_nginx_with_tls_and_a_prefix(
    proxied: tuple[str, CollectorProc, ssl.SSLContext],
) -> None:
    base, collector, context = proxied
    with Client(collector.socket) as client:
        for i in range(2):
            client.on_failed("emails", Job(id=f"n{i}", name="send"), "boom")
        assert client.flush(timeout=30)
    jar = http.cookiejar.CookieJar()
    https = urllib.request.HTTPSHandler(context=context)
    cookies = urllib.request.HTTPCookieProcessor(jar)
    browser = urllib.request.build_opener(https, cookies)
    raw = urllib.request.build_opener(https, cookies, NoRedirect)

    # Not signed in: the redirect to the login form carries the proxy's prefix.
    with pytest.raises(urllib.error.HTTPError) as info:
        raw.open(base + "/ops/queues/failed", timeout=30)
    assert info.value.code == 303
    assert info.value.headers["Location"] == "/ops/queues/login?next=/ops/queues/failed"
    info.value.close()
    with browser.open(base + "/ops/queues/login?next=/ops/queues/failed", timeout=30) as r:
        login = r.read().decode()
    assert 'action="/ops/queues/login"' in login
    form = {"csrf_token": csrf_token_in(login), "token": TOKEN, "next": "/ops/queues/failed"}
    post = urllib.request.Request(
        base + "/ops/queues/login",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Origin": base},
    )
    with browser.open(post, timeout=30) as r:
        assert r.url == base + "/ops/queues/failed"
        page = r.read().decode()
    assert 'href="/ops/queues/static/qdash.css"' in page
    assert 'action="/ops/queues/failed/n0/forget"' in page
    by_name = {c.name: c for c in jar}
    for name in ("qdash_session", "qdash_csrf"):
        assert by_name[name].secure, name
        assert by_name[name].path == "/ops/queues/", name
    with browser.open(base + "/ops/queues/static/qdash.css", timeout=30) as r:
        assert r.status == 200

    # The button, as a browser sends it behind TLS: Origin https://host:port. Works.
    forget = urllib.request.Request(
        base + "/ops/queues/failed/n0/forget",
        data=urllib.parse.urlencode({"csrf_token": csrf_token_in(page)}).encode(),
        headers={"Origin": base, "Accept": "application/json"},
    )
    with browser.open(forget, timeout=30) as r:
        assert json.loads(r.read()) == {"ok": True, "action": "forget", "id": "n0"}
    # A foreign Origin through the same proxy is refused.
    evil = urllib.request.Request(
        base + "/ops/queues/failed/n1/forget",
        data=urllib.parse.urlencode({"csrf_token": csrf_token_in(page)}).encode(),
        headers={"Origin": "https://evil.example", "Accept": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        browser.open(evil, timeout=30)
    assert refused.value.code == 403
    refused.value.close()
    with browser.open(base + "/ops/queues/api/failed", timeout=30) as r:
        assert [j["id"] for j in json.loads(r.read())["jobs"]] == ["n1"]

    # /metrics with the bearer token, through the proxy.
    scrape = urllib.request.Request(
        base + "/ops/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with browser.open(scrape, timeout=30) as r:
        assert b'qdash_jobs_failed_total{queue="emails"} 2.0' in r.read()

    log = FileAuditLog(collector.data_dir / "audit.log")
    (entry,) = log.page(0, 10)
    log.close()
    assert (entry.who, entry.remote, entry.action, entry.ids) == (
        "token",
        "127.0.0.1",
        "forget",
        ("n0",),
    )


def test_systemd_unit_example_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    exe = shutil.which("qdash-mp") or str(Path(__import__("sys").executable).with_name("qdash-mp"))
    if not Path(exe).exists():
        pytest.skip("the qdash-mp console script is not installed")
    unit = (DOCS / "qdash-mp.service").read_text().replace("/usr/local/bin/qdash-mp", exe)
    path = tmp_path / "qdash-mp.service"
    path.write_text(unit)
    started = time.monotonic()
    done = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if "Failed to" in done.stderr and "bus" in done.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    assert "Unknown" not in done.stderr, done.stderr
    assert "ignoring" not in done.stderr, done.stderr
    assert time.monotonic() - started < 120
