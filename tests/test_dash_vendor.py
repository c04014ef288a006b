"""The vendored front-end (htmx, htmx-ext-sse, uPlot): every file matches the sha256 its
NOTICE lists, every package's licence text ships beside it, and the app serves the files."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from qdash_mp import Stats, create_app, new_inspector

VENDOR = Path(__file__).resolve().parent.parent / "qdash_mp" / "static" / "vendor"
LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$", re.M)


def listed() -> dict[str, str]:
    return {name: h for h, name in LINE.findall((VENDOR / "NOTICE").read_text())}


def test_every_vendored_file_matches_its_notice_hash() -> None:
    hashes = listed()
    on_disk = {p.name for p in VENDOR.iterdir()} - {"NOTICE"}
    assert set(hashes) == on_disk, "a vendored file is missing from NOTICE, or vice versa"
    for name, h in hashes.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == h, name


def test_notice_names_versions_and_licences() -> None:
    text = (VENDOR / "NOTICE").read_text()
    for package, licence, licence_file in (
        ("htmx.org 2.", "0BSD", "htmx.LICENSE"),
        ("htmx-ext-sse 2.", "0BSD", "htmx-ext-sse.LICENSE"),
        ("uplot 1.", "MIT", "uPlot.LICENSE"),
    ):
        assert package in text
        assert f"{licence} (see {licence_file})" in text
        assert "Permission" in (VENDOR / licence_file).read_text()


async def test_the_app_serves_the_vendored_files(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(new_inspector(Stats(), None)))
    for name in ("htmx.min.js", "htmx-ext-sse.min.js", "uPlot.iife.min.js", "uPlot.min.css"):
        resp = await client.get(f"/queues/static/vendor/{name}")
        assert resp.status == 200, name
        assert await resp.read() == (VENDOR / name).read_bytes()
