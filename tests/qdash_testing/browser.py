"""A real headless browser for tests: Debian's ``chromium`` driven through ``chromedriver``.

``Browser`` wraps a selenium ``webdriver.Chrome`` on a fresh profile (its own temporary
``--user-data-dir``, so parallel runs never share cookies, storage or a profile lock) and
collects everything that went wrong on the pages it showed:

- console errors (``goog:loggingPrefs`` browser log, level ``SEVERE``): script errors, failed
  loads, and Chromium's own "Refused to ..." lines for CSP violations;
- CSP violations, independently of the console: a ``securitypolicyviolation`` listener added
  to every document before its own scripts run (CDP ``Page.addScriptToEvaluateOnNewDocument``;
  such scripts are not subject to the page's CSP) records each violation in
  ``sessionStorage``, which survives navigations within the tab.

``browser.problems()`` drains both; ``browser.assert_clean()`` fails listing them.

Fixtures (register in a conftest: ``from qdash_testing.browser import browser, fresh_browser``):
``browser`` is one driver per test module (fast; the test should not depend on the state an
earlier test left in cookies or storage, or call ``browser.reset()``), ``fresh_browser`` a new
profile for one test (a first visit: no cookies, no cache). Both skip, saying why, when
``chromium`` or ``chromedriver`` is not installed (``.ci/run`` installs them, so CI never
skips). Tests using them carry the ``browser`` marker (``pytest -m browser``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from qdash_testing.collector import wait_for

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "Browser",
    "browser",
    "browser_missing",
    "fresh_browser",
    "start_browser",
]

T = TypeVar("T")

CHROMIUM = os.environ.get("QDASH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("QDASH_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
)

_CSP_KEY = "__qdash_csp"
_CSP_LISTENER = (
    "document.addEventListener('securitypolicyviolation', function (e) {"
    "  try {"
    f"    var k = '{_CSP_KEY}';"
    "    var seen = JSON.parse(sessionStorage.getItem(k) || '[]');"
    "    seen.push({directive: e.violatedDirective, blocked: e.blockedURI,"
    "               source: e.sourceFile, line: e.lineNumber, sample: e.sample,"
    "               page: document.location.href});"
    "    sessionStorage.setItem(k, JSON.stringify(seen));"
    "  } catch (err) {}"
    "}, true);"
)


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or ``None`` when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found: apt-get install {package} (.ci/run does)"
    return None


class Browser:
    """One headless Chromium with its own profile; see the module docstring."""

    def __init__(self, *, width: int = 1280, height: int = 800) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="qdash-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",  # root in a container: the setuid sandbox is unavailable
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-features=Translate,MediaRouter,OptimizationHints",
            "--password-store=basic",
            "--hide-scrollbars",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
        ):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # An explicit driver path: selenium-manager never runs (it would reach the network).
        service = Service(executable_path=CHROMEDRIVER, port=0)
        try:
            self.driver = webdriver.Chrome(options=opts, service=service)
        except BaseException:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        self.driver.set_page_load_timeout(30)
        self.driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument", {"source": _CSP_LISTENER}
        )
        self._console: list[str] = []

    # -- navigation --------------------------------------------------------------------------

    def get(self, url: str) -> None:
        """Load ``url`` (after harvesting what the current page logged)."""
        self._harvest()
        self.driver.get(url)

    def wait(self, predicate: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
        """Poll ``predicate`` (a browser round trip each time) until truthy; its value.

        An element the predicate holds that goes stale (the page navigated, or htmx swapped
        it) counts as "not yet": the next poll finds the new one.
        """
        from selenium.common.exceptions import StaleElementReferenceException

        def poll() -> T | None:
            try:
                return predicate()
            except StaleElementReferenceException:
                return None

        value = wait_for(poll, timeout, what, interval=0.1)
        assert value is not None  # wait_for returns only a truthy value
        return value

    def js(self, script: str, *args: Any) -> Any:
        """``execute_script``: run ``script`` (a function body; ``arguments[i]``) in the page."""
        return self.driver.execute_script(script, *args)

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def css_all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def color_scheme(self, scheme: str | None) -> None:
        """Emulate ``prefers-color-scheme`` (``"dark"``, ``"light"``; ``None`` resets)."""
        features = [] if scheme is None else [{"name": "prefers-color-scheme", "value": scheme}]
        self.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": features})

    def viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        """Emulate a viewport (``Emulation.setDeviceMetricsOverride``)."""
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    def reset_viewport(self) -> None:
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def reset(self) -> None:
        """Back to a blank state: no cookies, no storage, default media and viewport."""
        self._harvest()
        self.driver.delete_all_cookies()
        with contextlib.suppress(Exception):
            self.js("localStorage.clear();")
        self.color_scheme(None)
        self.reset_viewport()

    # -- what went wrong ---------------------------------------------------------------------

    def _harvest(self) -> None:
        with contextlib.suppress(Exception):  # no page loaded yet / a page without storage
            raw = self.js(
                f"var v = sessionStorage.getItem('{_CSP_KEY}');"
                f"sessionStorage.removeItem('{_CSP_KEY}'); return v;"
            )
            for v in json.loads(raw or "[]"):
                self._console.append(f"CSP violation: {v}")
        for entry in self.driver.get_log("browser"):
            if entry.get("level") == "SEVERE":
                self._console.append(f"console: {entry.get('message')}")

    def problems(self) -> list[str]:
        """Console errors and CSP violations since the last call (drains them)."""
        self._harvest()
        found, self._console = self._console, []
        return found

    def assert_clean(self) -> None:
        """Fail if any page shown since the last check logged an error or violated the CSP."""
        found = self.problems()
        assert not found, "browser problems:\n  " + "\n  ".join(found)

    # -- lifetime ----------------------------------------------------------------------------

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


@contextlib.contextmanager
def start_browser(**kwargs: Any) -> Iterator[Browser]:
    """A ``Browser`` for a ``with`` block (scripts: ``scripts/screenshots.py``)."""
    b = Browser(**kwargs)
    try:
        yield b
    finally:
        b.quit()


def _skip_if_missing() -> None:
    reason = browser_missing()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the whole test module (see the module docstring)."""
    _skip_if_missing()
    with start_browser() as b:
        yield b


@pytest.fixture
def fresh_browser() -> Iterator[Browser]:
    """A headless Chromium on a brand-new profile, for one test."""
    _skip_if_missing()
    with start_browser() as b:
        yield b
