"""The browser tests: every test here carries the ``browser`` marker and gets the fixtures
of ``qdash_testing.browser`` (one headless Chromium per module, or a fresh one per test)."""

from __future__ import annotations

import pytest
from qdash_testing.browser import Browser, browser, fresh_browser  # noqa: F401  (registers them)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/browser/" in str(item.path):
            item.add_marker(pytest.mark.browser)


@pytest.fixture
def page(browser: Browser) -> Browser:  # noqa: F811  (the fixture imported above)
    """The module's browser, reset (cookies, storage, media, viewport) before each test."""
    browser.reset()
    browser.problems()
    return browser
