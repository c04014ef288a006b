#!/usr/bin/env python3
"""Fetch the dashboard's vendored front-end files from the npm registry and verify them.

The dashboard ships htmx 2, its SSE extension and uPlot as plain files under
``qdash_mp/static/vendor/`` (no CDN, no build step). ``qdash_mp/static/vendor/NOTICE`` names
each package, its pinned version, licence and npm integrity, and lists the sha256 of every
vendored file (``sha256  file`` lines, like ``sha256sum``); ``tests/test_dash_vendor.py``
checks the files against it.

    python scripts/vendor_frontend.py            # re-fetch with `npm pack`, verify, rewrite files
    python scripts/vendor_frontend.py --check    # offline: the files match NOTICE
    python scripts/vendor_frontend.py --update   # after changing PACKAGES: new NOTICE hashes

Without ``--update`` a fetched file whose sha256 differs from NOTICE is an error (nothing is
written): a version is pinned, so its bytes never change. ``npm pack`` itself checks each
tarball against the registry's integrity, and the script against the integrity pinned here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "qdash_mp" / "static" / "vendor"
NOTICE = VENDOR / "NOTICE"
LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    license: str
    integrity: str
    home: str
    files: dict[str, str]  # path in the npm tarball (under package/) -> vendored file name


PACKAGES = [
    Package(
        "htmx.org",
        "2.0.11",
        "0BSD",
        "sha512-Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA==",
        "https://htmx.org/",
        {"dist/htmx.min.js": "htmx.min.js", "LICENSE": "htmx.LICENSE"},
    ),
    Package(
        "htmx-ext-sse",
        "2.2.4",
        "0BSD",
        "sha512-LJmxVhykyflBWgh5PvbRidcyuqMHlgfajmmzumvKctv9puvsufeH6OaejSMZTNTnEI8O2wXXn4ZZtBdpEMqmEQ==",
        "https://htmx.org/extensions/sse/",
        {"dist/sse.min.js": "htmx-ext-sse.min.js", "LICENSE": "htmx-ext-sse.LICENSE"},
    ),
    Package(
        "uplot",
        "1.6.32",
        "MIT",
        "sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==",
        "https://github.com/leeoniya/uPlot",
        {
            "dist/uPlot.iife.min.js": "uPlot.iife.min.js",
            "dist/uPlot.min.css": "uPlot.min.css",
            "LICENSE": "uPlot.LICENSE",
        },
    ),
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def notice_hashes(text: str) -> dict[str, str]:
    """``{file name: sha256}`` from a NOTICE text."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            found[m.group(2)] = m.group(1)
    return found


def fetch(pkg: Package, workdir: Path) -> dict[str, bytes]:
    """The package's vendored files, from ``npm pack name@version``."""
    out = subprocess.run(  # noqa: S603  (fixed arguments: npm and a pinned name@version)
        ["npm", "pack", f"{pkg.name}@{pkg.version}", "--json", "--pack-destination", str(workdir)],  # noqa: S607
        check=True,
        capture_output=True,
        text=True,
        cwd=workdir,
    ).stdout
    info = json.loads(out)[0]
    if info["integrity"] != pkg.integrity:
        raise SystemExit(f"{pkg.name}@{pkg.version}: integrity {info['integrity']} != pinned")
    tgz = (workdir / info["filename"]).read_bytes()
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        for src, dest in pkg.files.items():
            member = tar.extractfile(f"package/{src}")
            if member is None:
                raise SystemExit(f"{pkg.name}@{pkg.version}: no {src} in the tarball")
            files[dest] = member.read()
    return files


def render_notice(hashes: dict[str, str]) -> str:
    out = [
        "Third-party front-end files vendored into qdash_mp/static/vendor/",
        "(fetched from the npm registry by scripts/vendor_frontend.py; no CDN, no build step).",
        "qdash_mp itself is MIT-licensed; these files keep their own licences, whose full",
        "texts are the *.LICENSE files beside them.",
        "",
    ]
    for pkg in PACKAGES:
        license_file = pkg.files["LICENSE"]
        out += [
            f"{pkg.name} {pkg.version}",
            f"  license:   {pkg.license} (see {license_file})",
            f"  home:      {pkg.home}",
            f"  npm:       https://www.npmjs.com/package/{pkg.name}/v/{pkg.version}",
            f"  integrity: {pkg.integrity}",
            "",
        ]
    out.append("sha256 of every vendored file:")
    out += [f"{h}  {name}" for name, h in sorted(hashes.items())]
    return "\n".join(out) + "\n"


def check() -> list[str]:
    """Differences between the vendored files and NOTICE (empty when all match)."""
    expected = notice_hashes(NOTICE.read_text())
    wanted = {d for p in PACKAGES for d in p.files.values()}
    problems = []
    if set(expected) != wanted:
        problems.append(f"NOTICE lists {sorted(expected)}, the packages give {sorted(wanted)}")
    for name, h in sorted(expected.items()):
        path = VENDOR / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path.read_bytes()) != h:
            problems.append(f"{name}: sha256 differs from NOTICE")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="verify the files offline")
    mode.add_argument("--update", action="store_true", help="accept new hashes (version bump)")
    args = ap.parse_args()
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    fetched: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="qdash-vendor-") as tmp:
        for pkg in PACKAGES:
            fetched.update(fetch(pkg, Path(tmp)))
    hashes = {name: sha256(data) for name, data in fetched.items()}
    if not args.update and NOTICE.exists():
        old = notice_hashes(NOTICE.read_text())
        bad = sorted(n for n in hashes if old.get(n) != hashes[n])
        if bad:
            print(f"sha256 differs from NOTICE (use --update on a version bump): {bad}")
            return 1
    VENDOR.mkdir(parents=True, exist_ok=True)
    for name, data in fetched.items():
        (VENDOR / name).write_bytes(data)
    NOTICE.write_text(render_notice(hashes))
    print(f"{len(fetched)} files in {VENDOR.relative_to(ROOT)} verified; NOTICE written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
