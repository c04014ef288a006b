"""Access control, attack by attack: DNS rebinding, login brute force, sessions, read-only,
per-user actions, the embedded ``authorize`` hook, reverse-proxy headers, secrets files,
the safe default for non-loopback ``--http``, and the CLI around them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from qdash_testing.collector import CollectorProc, short_dir
from qdash_testing.http import csrf_token_in
from test_access_matrix import FULL, TOKEN, USERS

from qdash_mp import Job, MemoryFailedJobs, Stats, create_app, new_inspector
from qdash_mp.access_cli import JsonFormatter
from qdash_mp.access_settings import (
    AccessSettings,
    User,
    is_loopback,
    load_token_file,
    load_users_file,
)
from qdash_mp.errors import ConfigError
from qdash_mp.web.app import ACCESS
from qdash_mp.web.auth import SESSION_COOKIE, Authenticator
from qdash_mp.web.authz import Identity
from qdash_mp.web.hosts import HostAllowlist, host_name
from qdash_mp.web.passwords import hash_password, parse_hash, verify
from qdash_mp.web.proxy import TrustedProxies, forwarded

IDS = ("j1", "j2")


def store() -> tuple[Any, MemoryFailedJobs, list[Job]]:
    requeued: list[Job] = []
    stats = Stats()
    failed = MemoryFailedJobs(requeue=requeued.append).with_stats(stats)
    for id in IDS:
        failed.record(Job(id=id, name="task", payload={"card": "4111-" + id}), "q", "boom")
    return new_inspector(stats, failed), failed, requeued


# -- DNS rebinding -------------------------------------------------------------------------


async def test_dns_rebinding_attack_is_refused(aiohttp_client: Any) -> None:
    """The issue's attack: a page on evil.example (rebound to 127.0.0.1) reads payloads, takes
    a CSRF token and flushes. Every step now answers 421 and nothing is flushed."""
    inspector, failed, _ = store()
    client = await aiohttp_client(create_app(inspector))
    evil = {"Host": "evil.example", "Origin": "http://evil.example"}
    payloads = await client.get("/queues/api/failed/j1", headers={"Host": "evil.example"})
    assert payloads.status == 421
    assert "4111" not in await payloads.text()
    page = await client.get("/queues/failed", headers={"Host": "evil.example"})
    assert page.status == 421
    assert "csrf_token" not in await page.text()
    # Even holding a real token (from a legitimate page), the rebound origin cannot flush.
    token = csrf_token_in(await (await client.get("/queues/failed")).text())
    flush = await client.post("/queues/failed/flush", data={"csrf_token": token}, headers=evil)
    assert flush.status == 421
    assert {j.id for j in failed.list()} == set(IDS)
    # The loopback names keep working; --allowed-host adds names.
    assert (await client.get("/queues/", headers={"Host": "localhost:8700"})).status == 200
    assert (await client.get("/queues/", headers={"Host": "[::1]:8700"})).status == 200


async def test_allowed_hosts_add_names_and_star_turns_the_check_off(aiohttp_client: Any) -> None:
    inspector, _, _ = store()
    client = await aiohttp_client(create_app(inspector, allowed_hosts=["dash.example.com"]))
    assert (await client.get("/queues/", headers={"Host": "dash.example.com"})).status == 200
    assert (await client.get("/queues/", headers={"Host": "DASH.example.com."})).status == 200
    assert (await client.get("/queues/", headers={"Host": "other.example"})).status == 421
    open_client = await aiohttp_client(create_app(store()[0], allowed_hosts=["*"]))
    assert (await open_client.get("/queues/", headers={"Host": "other.example"})).status == 200


def test_host_names() -> None:
    hosts = HostAllowlist(["Dash.Example"])
    assert hosts.allows("dash.example:443")
    assert hosts.allows("127.0.0.1:1")
    assert not hosts.allows("127.0.0.1.evil.example")
    assert not hosts.allows("evil.example@127.0.0.1")
    assert not hosts.allows("")
    assert host_name("[::1]:80") == "::1"
    assert host_name("a:b") is None
    assert hosts.allows_origin("https://dash.example")
    assert not hosts.allows_origin("null")
    assert not hosts.allows_origin("ftp://dash.example")


# -- authentication ------------------------------------------------------------------------


def token_app(**kw: Any) -> Any:
    inspector, failed, _ = store()
    app = create_app(inspector, access=AccessSettings(token=TOKEN, users=USERS), **kw)
    return app, failed


async def test_login_brute_force_is_rate_limited(aiohttp_client: Any) -> None:
    app, _ = token_app()
    client = await aiohttp_client(app)
    token = csrf_token_in(await (await client.get("/queues/login")).text())
    statuses = []
    for i in range(7):
        resp = await client.post(
            "/queues/login",
            data={"csrf_token": token, "token": f"guess-{i}"},
            allow_redirects=False,
        )
        statuses.append(resp.status)
    assert statuses == [401] * 5 + [429] * 2
    assert int(resp.headers["Retry-After"]) > 0
    # While blocked, even the right token is refused: guessing cannot be sped up.
    right = await client.post(
        "/queues/login", data={"csrf_token": token, "token": TOKEN}, allow_redirects=False
    )
    assert right.status == 429
    assert SESSION_COOKIE not in right.cookies
    # The same limit covers API credentials (bearer / basic), per client address.
    api = [
        (await client.get("/queues/api/stats", headers={"Authorization": "Bearer x" * 3})).status
        for _ in range(2)
    ]
    assert api == [429, 429]


async def test_bearer_guessing_is_rate_limited(aiohttp_client: Any) -> None:
    app, _ = token_app()
    client = await aiohttp_client(app)
    bad = {"Authorization": "Bearer wrong-token-wrong"}
    statuses = [(await client.get("/queues/api/stats", headers=bad)).status for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    good = await client.get("/queues/api/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status == 429


async def test_login_session_and_logout(aiohttp_client: Any) -> None:
    app, failed = token_app()
    client = await aiohttp_client(app)
    first = await client.get("/queues/failed", allow_redirects=False)
    assert first.status == 303
    assert first.headers["Location"] == "/queues/login?next=/queues/failed"
    form = await client.get(first.headers["Location"])
    token = csrf_token_in(await form.text())
    ok = await client.post(
        "/queues/login",
        data={"csrf_token": token, "token": TOKEN, "next": "/queues/failed"},
        allow_redirects=False,
    )
    assert ok.status == 303
    assert ok.headers["Location"] == "/queues/failed"
    cookie = ok.cookies[SESSION_COOKIE]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Lax"
    assert cookie["path"] == "/queues/"
    page = await client.get("/queues/failed")
    assert page.status == 200
    html = await page.text()
    assert "Log out" in html
    assert "Retry" in html
    # A session is a browser credential: its POSTs still need the CSRF token.
    no_csrf = await client.post("/queues/failed/j1/forget", headers={"Accept": "application/json"})
    assert no_csrf.status == 403
    out = await client.post(
        "/queues/logout", data={"csrf_token": csrf_token_in(html)}, allow_redirects=False
    )
    assert out.status == 303
    again = await client.get("/queues/failed", allow_redirects=False)
    assert again.status == 303
    assert {j.id for j in failed.list()} == set(IDS)


async def test_login_with_a_user_password_and_open_redirect_refused(aiohttp_client: Any) -> None:
    app, _ = token_app()
    client = await aiohttp_client(app)
    token = csrf_token_in(await (await client.get("/queues/login")).text())
    ok = await client.post(
        "/queues/login",
        data={
            "csrf_token": token,
            "user": "viewer",
            "password": "viewer-pass",
            "next": "https://evil.example/",
        },
        allow_redirects=False,
    )
    assert ok.status == 303
    assert ok.headers["Location"] == "/queues/"  # never off-site
    html = await (await client.get("/queues/failed")).text()
    assert "viewer" in html
    assert "Retry</button>" not in html  # a view-only user sees no buttons
    assert "Forget</button>" not in html
    assert "Flush all" not in html


def test_session_expiry_and_tampering() -> None:
    auth = Authenticator(b"k" * 32, token=TOKEN, users=USERS, session_ttl=60)
    value = auth.new_session(Identity("token", "token"), now=1000.0)
    assert auth.session(value, now=1059.0) is not None
    assert auth.session(value, now=1060.0) is None  # expired
    data, _, mac = value.rpartition(".")
    assert auth.session(data.replace("~token~", "~basic~") + "." + mac, now=1001.0) is None
    other = Authenticator(b"x" * 32, token=TOKEN, session_ttl=60)
    assert other.session(value, now=1001.0) is None  # another app's (or a restarted one's)
    # A user removed from the file loses their session.
    viewer = auth.new_session(Identity("viewer", "basic", frozenset({"view"})), now=1000.0)
    assert auth.session(viewer, now=1001.0) == Identity("viewer", "session", frozenset({"view"}))
    fewer = Authenticator(b"k" * 32, token=TOKEN, users=USERS[:1], session_ttl=60)
    assert fewer.session(viewer, now=1001.0) is None


def test_passwords() -> None:
    for scheme in ("scrypt", "pbkdf2_sha256"):
        line = hash_password("correct horse", scheme)
        assert ":" not in line
        h = parse_hash(line)
        assert verify("correct horse", h)
        assert not verify("correct hors", h)
    for bad in ("", "md5$x", "scrypt$3$8$1$AAAA$AAAA", "pbkdf2_sha256$10$AAAAAAAAAAA$AAAA"):
        with pytest.raises(ValueError):  # noqa: PT011 (message varies by what is wrong)
            parse_hash(bad)


# -- authorization -------------------------------------------------------------------------


async def test_read_only_hides_buttons_and_refuses_mutations(aiohttp_client: Any) -> None:
    inspector, failed, requeued = store()
    client = await aiohttp_client(create_app(inspector, read_only=True))
    page = await client.get("/queues/failed")
    html = await page.text()
    assert "Retry</button>" not in html
    assert "Forget</button>" not in html
    assert "Flush all" not in html
    assert "read-only" in html
    assert "csrf_token" not in html  # no forms at all
    token = page.cookies["qdash_csrf"].value  # a valid token anyway: the refusal is read-only's
    for path in ("/queues/failed/j1/retry", "/queues/failed/j1/forget", "/queues/failed/flush"):
        resp = await client.post(
            path, data={"csrf_token": token}, headers={"Accept": "application/json"}
        )
        assert resp.status == 403, path
        assert (await resp.json())["error"] == "this dashboard is read-only"
    assert {j.id for j in failed.list()} == set(IDS)
    assert requeued == []


async def test_embedded_authorize_hook(aiohttp_client: Any) -> None:
    inspector, failed, _ = store()
    seen: list[str] = []

    async def authorize(request: Any, action: str) -> bool:
        seen.append(action)
        return request.headers.get("X-Role") == "ops" or action in ("view", "forget")

    client = await aiohttp_client(create_app(inspector, authorize=authorize))
    html = await (await client.get("/queues/failed")).text()
    assert "Forget</button>" in html
    assert "Retry</button>" not in html
    token = csrf_token_in(html)
    flush = await client.post(
        "/queues/failed/flush", data={"csrf_token": token}, headers={"Accept": "application/json"}
    )
    assert flush.status == 403
    assert len(failed) == 2
    forget = await client.post(
        "/queues/failed/j1/forget",
        data={"csrf_token": token},
        headers={"Accept": "application/json"},
    )
    assert forget.status == 200
    ops = await client.post(
        "/queues/failed/flush",
        data={"csrf_token": token},
        headers={"Accept": "application/json", "X-Role": "ops"},
    )
    assert ops.status == 200
    assert len(failed) == 0
    assert {"view", "retry", "forget", "flush"} <= set(seen)
    entries = client.app[ACCESS].audit.page(0, 10)
    assert [(e.action, e.count, e.ids) for e in entries] == [
        ("flush", 1, ()),
        ("forget", 1, ("j1",)),
    ]


async def test_bearer_token_needs_no_csrf_but_basic_does(aiohttp_client: Any) -> None:
    app, failed = token_app()
    client = await aiohttp_client(app)
    json_accept = {"Accept": "application/json"}
    bearer = await client.post(
        "/queues/failed/j1/forget", headers={**json_accept, "Authorization": f"Bearer {TOKEN}"}
    )
    assert bearer.status == 200
    assert [j.id for j in failed.list()] == ["j2"]
    # Browsers re-send basic credentials by themselves: those POSTs keep the CSRF check.
    with_basic = await client.post("/queues/failed/j2/forget", headers={**json_accept, **FULL})
    assert with_basic.status == 403
    assert [j.id for j in failed.list()] == ["j2"]


# -- reverse proxies -----------------------------------------------------------------------


async def test_forwarded_headers_from_a_trusted_proxy(aiohttp_client: Any) -> None:
    inspector, _, _ = store()
    settings = AccessSettings(
        trusted_proxies=("127.0.0.1/32",),
        allowed_hosts=("dash.example.com",),
        proxy_header="X-Forwarded-User",
    )
    client = await aiohttp_client(create_app(inspector, access=settings))
    via = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "dash.example.com",
        "X-Forwarded-Prefix": "/ops",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-User": "alice",
    }
    page = await client.get("/queues/failed", headers=via)
    assert page.status == 200
    html = await page.text()
    assert 'href="/ops/queues/static/qdash.css"' in html
    assert 'action="/ops/queues/failed/flush"' in html
    assert "alice" in html
    cookie = page.cookies["qdash_csrf"]
    assert cookie["secure"]
    assert cookie["path"] == "/ops/queues/"
    # Behind TLS the browser's Origin is https://dash.example.com: the button works. (The
    # browser sends the Secure, /ops/-scoped cookie back; this plain-HTTP client is told to.)
    resp = await client.post(
        "/queues/failed/j1/forget",
        data={"csrf_token": csrf_token_in(html)},
        headers={
            **via,
            "Origin": "https://dash.example.com",
            "Accept": "application/json",
            "Cookie": f"qdash_csrf={cookie.value}",
        },
    )
    assert resp.status == 200
    entry = client.app[ACCESS].audit.page(0, 1)[0]
    assert (entry.who, entry.remote) == ("alice", "203.0.113.9")


async def test_forwarded_headers_from_anyone_else_are_ignored(aiohttp_client: Any) -> None:
    inspector, _, _ = store()
    settings = AccessSettings(trusted_proxies=("10.0.0.0/8",))
    client = await aiohttp_client(create_app(inspector, access=settings))
    page = await client.get(
        "/queues/failed",
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/ops"},
    )
    html = await page.text()
    assert 'href="/queues/static/qdash.css"' in html
    assert not page.cookies["qdash_csrf"]["secure"]
    spoof = await client.get("/queues/", headers={"X-Forwarded-Host": "evil.example"})
    assert spoof.status == 200  # ignored, not trusted: the real Host decides


def test_forwarded_parsing() -> None:
    proxies = TrustedProxies(["127.0.0.1/32", "10.0.0.0/8"])
    hdr = {"X-Forwarded-For": "1.2.3.4, 6.6.6.6, 10.1.1.1", "X-Forwarded-Prefix": "/a/../b"}
    f = forwarded(hdr, "127.0.0.1", "http", "h", proxies)
    assert f.remote == "6.6.6.6"  # rightmost hop not ours; 1.2.3.4 could be forged
    assert f.prefix == ""  # dot segments are refused
    assert forwarded(hdr, "192.0.2.1", "http", "h", proxies).via_proxy is False
    assert proxies.trusts("::ffff:127.0.0.1")
    with pytest.raises(ConfigError):
        TrustedProxies(["not-a-cidr"])


# -- secrets files and start-up ------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_secrets_files_with_loose_modes_are_refused(tmp_path: Path, mode: int) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    users = tmp_path / "users"
    users.write_text(f"admin:{hash_password('admin-pass', 'pbkdf2_sha256')}\n")
    for path in (token, users):
        path.chmod(mode)
    with pytest.raises(ConfigError, match=r"chmod 600"):
        load_token_file(token)
    with pytest.raises(ConfigError, match=r"lets other users read it"):
        load_users_file(users)
    for path in (token, users):
        path.chmod(0o600)
    assert load_token_file(token) == TOKEN
    assert load_users_file(users)[0].name == "admin"


def test_bad_secrets_content(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        load_token_file(short)
    users = tmp_path / "users"
    users.write_text("bob:plaintext\n")
    users.chmod(0o600)
    with pytest.raises(ConfigError, match="hash-password bob"):
        load_users_file(users)


def qdash(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qdash_mp", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
    )


def test_cli_refuses_loose_token_file_in_one_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    data = tmp_path / "data"
    done = qdash("collector", "--data-dir", str(data), "--auth-token-file", str(token))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "chmod 600" in lines[0]
    assert not data.exists()  # nothing left behind


def test_cli_refuses_non_loopback_http_without_auth(tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = qdash("collector", "--data-dir", str(data), "--http", "0.0.0.0:0")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--auth-token-file" in lines[0]
    assert "--insecure-no-auth" in lines[0]
    assert not data.exists()
    assert is_loopback("127.0.0.2")
    assert is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("dash.example.com")


def test_hash_password_cli_writes_a_usable_line(tmp_path: Path) -> None:
    done = qdash("hash-password", "carol", "--actions", "view,retry", stdin="s3cret-pass\n")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    users = tmp_path / "users"
    users.write_text(line + "\n")
    users.chmod(0o600)
    (user,) = load_users_file(users)
    assert user == User("carol", user.hash, frozenset({"view", "retry"}))
    assert verify("s3cret-pass", parse_hash(user.hash))
    short = qdash("hash-password", "carol", stdin="short\n")
    assert short.returncode == 2


def test_json_log_lines() -> None:
    record = logging.LogRecord("qdash_mp.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "qdash_mp.x"
    assert doc["message"] == "a b"
    assert doc["time"].endswith("Z")


def test_check_command_without_a_collector(tmp_path: Path) -> None:
    done = qdash("check", "--data-dir", str(tmp_path))
    assert done.returncode == 1
    assert "no collector state" in done.stderr


def test_check_command_against_a_running_collector(running_collector: Any) -> None:
    done = qdash("--log-format", "json", "check", "--data-dir", str(running_collector.data_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: collector pid")
    assert "journal sound (0 failed jobs)" in done.stdout
    running_collector.kill()
    gone = qdash("check", "--data-dir", str(running_collector.data_dir))
    assert gone.returncode == 1
    assert "is gone" in gone.stderr


def _status(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        err.close()
        return int(err.code)


@pytest.mark.slow
def test_real_collector_refuses_rebound_host_and_honours_allowed_host() -> None:
    data = short_dir("qreb")
    proc = CollectorProc(data, args=("--allowed-host", "dash.lan"))
    try:
        proc.start()
        port = proc.http.rsplit(":", 1)[1]
        url = proc.http + "/queues/api/failed"
        assert _status(url, f"evil.example:{port}") == 421
        assert _status(url, f"dash.lan:{port}") == 200
        assert _status(url, f"localhost:{port}") == 200
        assert _status(url, f"127.0.0.1:{port}") == 200
    finally:
        proc.cleanup()


async def test_audit_page_shows_actions_escaped(aiohttp_client: Any) -> None:
    inspector, failed, _ = store()
    failed.record(Job(id="<i>evil</i>", name="t"), "q", "boom")
    client = await aiohttp_client(create_app(inspector))
    token = csrf_token_in(await (await client.get("/queues/failed")).text())
    resp = await client.post(
        "/queues/failed/%3Ci%3Eevil%3C%2Fi%3E/forget",
        data={"csrf_token": token},
        headers={"Accept": "application/json"},
    )
    assert resp.status == 200
    page = await client.get("/queues/audit")
    html = await page.text()
    assert page.status == 200
    assert "&lt;i&gt;evil&lt;/i&gt;" in html
    assert "<i>evil" not in html
    assert "anonymous" in html
    api = await (await client.get("/queues/api/audit?page=1")).json()
    assert api["entries"][0]["ids"] == ["<i>evil</i>"]
    assert (await client.get("/queues/api/audit?page=0")).status == 400
