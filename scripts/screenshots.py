#!/usr/bin/env python3
"""Screenshots of every dashboard page, light and dark, into ``docs/screenshots/``.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--settle 8]

Uses the browser tests' own code (``tests/qdash_testing``): a real collector daemon on a fresh
data dir with 30 days of seeded history, three worker processes running simulated jobs (some
fail; one is retried, so the audit log has an entry), and headless Chromium at 1280x800
(``prefers-reduced-motion`` so no highlight is caught mid-fade). The login page comes from a
second collector started with a token. PNGs are reduced to a 256-colour palette with Pillow
when it is installed (``pip install pillow``), otherwise saved as Chromium wrote them.
Needs chromium + chromedriver (see ``tests/qdash_testing/browser.py``).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from qdash_testing.browser import Browser, browser_missing, start_browser  # noqa: E402
from qdash_testing.collector import CollectorProc, short_dir, wait_for  # noqa: E402
from qdash_testing.http import DashboardSession  # noqa: E402
from qdash_testing.live import running_dashboard  # noqa: E402

WIDTH, HEIGHT = 1280, 800


def _save(b: Browser, path: Path) -> None:
    png = b.driver.get_screenshot_as_png()
    try:
        from PIL import Image
    except ImportError:
        path.write_bytes(png)
        return
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(path, optimize=True)


def _shoot(b: Browser, url: str, name: str, out: Path, *, charts: bool = False) -> None:
    for scheme in ("light", "dark"):
        b.driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia",
            {
                "features": [
                    {"name": "prefers-color-scheme", "value": scheme},
                    {"name": "prefers-reduced-motion", "value": "reduce"},
                ]
            },
        )
        b.get(url)
        if charts:
            b.wait(
                lambda: (
                    b.js("return document.querySelector('section.charts')?.dataset.state")
                    == "drawn"
                ),
                20,
                "the charts",
            )
        time.sleep(2.5)  # a few live updates (sparklines, counters)
        _save(b, out / f"{name}-{scheme}.png")
        problems = b.problems()
        if problems:
            print(f"{name} ({scheme}): {problems}", file=sys.stderr)
        print(f"{name}-{scheme}.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds of traffic first")
    args = ap.parse_args()
    missing = browser_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    d2 = short_dir()
    token = d2 / "token"
    token.write_text("screenshot-token\n")
    token.chmod(0o600)
    guarded = CollectorProc(d2, args=("--auth-token-file", str(token)))
    try:
        with running_dashboard(jobs_per_s=12, failure_rate=0.06, history=True, workers=3) as live:
            guarded.start()
            base = live.url
            wait_for(lambda: len(live.failed_ids()) >= 8, 60, "fails")
            time.sleep(args.settle)
            session = DashboardSession(base)
            session.post(f"/queues/failed/{quote(live.failed_ids()[0], safe='')}/retry")
            job = live.failed_ids()[0]
            with start_browser(width=WIDTH, height=HEIGHT) as b:
                b.viewport(WIDTH, HEIGHT)
                _shoot(b, base + "/queues/", "overview", args.out, charts=True)
                _shoot(b, base + "/queues/q/emails", "queue", args.out, charts=True)
                _shoot(b, base + "/queues/workers", "workers", args.out)
                _shoot(b, base + "/queues/failed", "failed", args.out)
                _shoot(b, base + f"/queues/failed/{quote(job, safe='')}", "job", args.out)
                _shoot(b, base + "/queues/audit", "audit", args.out)
                _shoot(b, guarded.http + "/queues/login", "login", args.out)
    finally:
        guarded.cleanup()
        shutil.rmtree(d2, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
