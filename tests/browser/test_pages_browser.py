"""The dashboard in a real browser (headless Chromium), against a real collector daemon with
real worker processes pushing jobs (``qdash_testing.traffic``) and 30 days of history.

What each test proves: the overview's counters move without a page load (the one SSE stream,
htmx's SSE extension, qdash.js); the charts draw on real canvases from /api/history, for
every range; dark mode follows the system and the toggle (kept across pages, no flash); no
page logs a console error or violates the CSP (script-src 'self', no inline style); a fresh
profile's first Retry works; nothing is cut off at phone width; the pages work without
JavaScript; the keyboard reaches the controls and the focus is visible.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from qdash_testing.browser import Browser
from qdash_testing.collector import CollectorProc, short_dir, wait_for
from qdash_testing.http import get_json
from qdash_testing.live import Live, running_dashboard

PAGES = ("/queues/", "/queues/q/emails", "/queues/workers", "/queues/failed", "/queues/audit")


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with running_dashboard(jobs_per_s=15, failure_rate=0.05, history=True) as live:
        wait_for(lambda: len(live.failed_ids()) >= 3, 30, "a few failed jobs")
        wait_for(lambda: get_json(live.url + "/queues/api/workers")["workers"], 30, "the workers")
        yield live


def _totals_processed(b: Browser) -> str:
    return str(b.js("return document.querySelector('#queues tfoot tr').children[3].textContent"))


def test_overview_counters_change_without_a_page_load(page: Browser, live: Live) -> None:
    page.get(live.url + "/queues/")
    page.js("window.__same_page = 'yes';")
    first = _totals_processed(page)
    page.wait(lambda: _totals_processed(page) != first, 20, "the processed total to change")
    page.wait(lambda: page.css("#live-at").get_attribute("data-state") == "live", 10, "live state")
    assert page.js("return window.__same_page") == "yes"  # no reload happened
    # rows too: some queue's processed cell moved
    row = "return document.querySelector('#queues tbody tr').children[3].textContent"
    before = page.js(row)
    page.wait(lambda: page.js(row) != before, 20, "a row's counter to change")
    assert page.js("return window.__same_page") == "yes"
    # the sparkline of a row is drawn once two updates arrived
    page.wait(lambda: page.css_all("#queues tbody svg.spark polyline"), 10, "a sparkline")
    page.assert_clean()


def test_workers_and_queue_jobs_update_without_a_page_load(page: Browser, live: Live) -> None:
    for path, selector in (("/queues/workers", "#workers tbody"), ("/queues/q/emails", "#jobs")):
        page.get(live.url + path)
        page.js("window.__same_page = 'yes';")
        text = "return document.querySelector(arguments[0]).innerText"
        first = page.js(text, selector)
        assert "demo-worker-" in first or path != "/queues/workers", first
        page.wait(lambda: page.js(text, selector) != first, 20, f"{path} to change")  # noqa: B023
        assert page.js("return window.__same_page") == "yes"
    page.assert_clean()


_INK = """
return [...document.querySelectorAll('section.charts canvas')].map(c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
  return n;
});
"""


def _drawn(b: Browser) -> list[int]:
    """Painted pixels of each chart canvas (one round trip: a redraw cannot interleave)."""
    return [int(n) for n in b.js(_INK)]


@pytest.mark.parametrize("path", ["/queues/", "/queues/q/emails"])
def test_charts_draw_for_every_range(page: Browser, live: Live, path: str) -> None:
    page.get(live.url + path)
    page.wait(lambda: page.css("section.charts").get_attribute("data-state") == "drawn", 20)
    inked = _drawn(page)
    assert len(inked) == 2, inked
    assert all(n > 500 for n in inked), inked  # lines, not just axes
    expect = {"300": 5, "3600": 60, "86400": 1440, "2592000": 720}
    for rng, points in expect.items():
        page.js("document.querySelector('section.charts').removeAttribute('data-state');")
        page.css(f"[data-range='{rng}']").click()
        page.wait(lambda: page.css("section.charts").get_attribute("data-state") == "drawn", 20)
        drawn = {p.get_attribute("data-drawn") for p in page.css_all("section.charts .plot")}
        assert drawn == {str(points)}, (rng, drawn)
        assert page.css(f"[data-range='{rng}']").get_attribute("aria-pressed") == "true"
    assert all(n > 200 for n in _drawn(page))
    page.assert_clean()


def _background(b: Browser) -> str:
    return str(b.js("return getComputedStyle(document.documentElement).backgroundColor"))


LIGHT_BG = "rgb(244, 245, 247)"
DARK_BG = "rgb(17, 19, 24)"


def test_dark_mode_follows_the_system_and_the_toggle(page: Browser, live: Live) -> None:
    page.color_scheme("light")
    page.get(live.url + "/queues/")
    assert _background(page) == LIGHT_BG
    page.color_scheme("dark")
    page.wait(lambda: _background(page) == DARK_BG, 5, "the dark background")
    toggle = page.css("#theme-toggle")
    assert toggle.is_displayed()
    assert toggle.get_attribute("aria-pressed") == "true"
    # the system is dark: the toggle chooses light, kept across pages and reloads
    toggle.click()
    assert _background(page) == LIGHT_BG
    assert page.js("return localStorage.getItem('qdash-theme')") == "light"
    page.get(live.url + "/queues/workers")
    assert page.js("return document.documentElement.dataset.theme") == "light"
    assert _background(page) == LIGHT_BG
    # toggling back to what the system says forgets the choice: follow the system again
    page.css("#theme-toggle").click()
    assert _background(page) == DARK_BG
    assert page.js("return localStorage.getItem('qdash-theme')") is None
    page.color_scheme("light")
    page.wait(lambda: _background(page) == LIGHT_BG, 5, "light again")
    # a stored dark choice on a light system
    page.css("#theme-toggle").click()
    assert _background(page) == DARK_BG
    page.get(live.url + "/queues/q/emails")
    assert _background(page) == DARK_BG
    page.wait(lambda: page.css("section.charts").get_attribute("data-state") == "drawn", 20)
    page.assert_clean()


def _let_live_parts_run(b: Browser) -> None:
    """Wait until the page's live parts did their work once: an SSE update applied, the
    workers table re-read by htmx, the charts drawn."""
    if b.css_all("#live-at"):
        b.wait(lambda: b.js("return document.getElementById('live-at').dataset.state") == "live")
    if b.css_all("[hx-get][hx-trigger^=every]"):
        b.js("document.addEventListener('htmx:afterSwap', () => { window.__swapped = true; });")
        b.wait(lambda: b.js("return window.__swapped === true"), 10, "the htmx refresh")
    if b.css_all("section.charts"):
        b.wait(lambda: b.js("return document.querySelector('section.charts').dataset.state"))
    time.sleep(0.3)  # anything logged after the last of these


def test_no_console_errors_or_csp_violations_on_any_page(page: Browser, live: Live) -> None:
    job = live.failed_ids()[-1]
    paths = [*PAGES, f"/queues/failed/{quote(job, safe='')}", "/queues/nope", "/queues/q/nope"]
    for scheme in ("light", "dark"):
        page.color_scheme(scheme)
        for path in paths:
            page.get(live.url + path)
            assert page.css("h1").text, path
            _let_live_parts_run(page)
            found = page.problems()
            # the deliberate 404s log their own status line, nothing else may appear
            if path.endswith("nope"):
                found = [p for p in found if "404" not in p]
            assert not found, (path, found)


def test_login_page_and_sign_in_are_clean(fresh_browser: Browser, tmp_path: Path) -> None:
    d = short_dir()
    token = d / "token"
    token.write_text("s3cret-token-for-the-browser-test\n")
    token.chmod(0o600)
    collector = CollectorProc(d, args=("--auth-token-file", str(token)))
    try:
        collector.start()
        b = fresh_browser
        b.get(collector.http + "/queues/")
        b.wait(lambda: "/queues/login" in b.driver.current_url, 10, "the login page")
        field = b.css("input[name=token]")
        field.send_keys("s3cret-token-for-the-browser-test")
        field.submit()
        b.wait(lambda: "/queues/login" not in b.driver.current_url, 10, "to leave the login")
        b.wait(lambda: b.css("h1").text == "Queue Overview", 10, "the overview's heading")
        time.sleep(1.5)
        # the login page answered 401 for the first, unauthenticated request: that status
        # line is expected; nothing else
        found = [p for p in b.problems() if "401" not in p]
        assert not found, found
    finally:
        collector.cleanup()
        shutil.rmtree(d, ignore_errors=True)


def test_fresh_profile_first_click_on_retry_works(fresh_browser: Browser, live: Live) -> None:
    b = fresh_browser
    b.get(live.url + "/queues/failed")
    forms = [
        f
        for f in b.css_all("form[action$='/retry']")
        if not f.get_attribute("action").endswith("/queues/failed/retry")
    ]
    assert forms, "no per-job Retry button on the failed page"
    action = forms[0].get_attribute("action")
    job = action.rsplit("/", 2)[-2]
    forms[0].find_element("css selector", "button[type=submit]").click()
    b.wait(lambda: "/retry" not in b.driver.current_url, 15, "the redirect after Retry")
    status = b.js("return performance.getEntriesByType('navigation')[0].responseStatus")
    assert status == 200, status
    flash = b.css(".flash").text
    assert flash.startswith("Retried job"), flash
    # the job left the list (the redirected page, and the store)
    assert f"/failed/{job}/retry" not in b.driver.page_source
    assert job not in [quote(i, safe="") for i in live.failed_ids()]
    b.assert_clean()


def test_phone_width_has_no_horizontal_scroll(page: Browser, live: Live) -> None:
    page.viewport(375, 800, mobile=True)
    for path in PAGES:
        page.get(live.url + path)
        time.sleep(0.3)
        width = page.js("return document.documentElement.scrollWidth")
        inner = page.js("return window.innerWidth")
        assert width <= inner, (path, width, inner)
        body = page.js("return document.body.scrollWidth")
        assert body <= inner, (path, body, inner)
    page.assert_clean()


def test_keyboard_reaches_the_controls_with_a_visible_focus(page: Browser, live: Live) -> None:
    from selenium.webdriver.common.keys import Keys

    page.get(live.url + "/queues/")
    reached = []
    for _ in range(12):
        page.driver.switch_to.active_element.send_keys(Keys.TAB)
        el = page.driver.switch_to.active_element
        reached.append(el.get_attribute("id") or el.text)
        outline = page.js(
            "const s = getComputedStyle(document.activeElement);"
            "return [s.outlineStyle, s.outlineWidth];"
        )
        assert outline[0] != "none", (reached[-1], outline)
        assert outline[1] != "0px", (reached[-1], outline)
    assert "Workers" in reached, reached
    assert "theme-toggle" in reached, reached
    page.assert_clean()


def test_pages_work_without_javascript(page: Browser, live: Live) -> None:
    page.driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        page.get(live.url + "/queues/")
        assert page.css_all("#queues tbody tr")
        assert not page.css("#theme-toggle").is_displayed()  # needs JS: stays hidden
        assert 'http-equiv="refresh"' in page.driver.page_source
        page.css("a[href$='/queues/workers']").click()
        assert page.css("h1").text.startswith("Workers")
    finally:
        page.driver.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})
