"""The browser tests: every test here carries the ``browser`` marker and gets the fixtures
of ``qdash_testing.browser`` (one headless Chromium per module, or a fresh one per test)."""

from __future__ import annotations

import pytest
from qdash_testing.browser import browser, fresh_browser  # noqa: F401  (registers them)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/browser/" in str(item.path):
            item.add_marker(pytest.mark.browser)
