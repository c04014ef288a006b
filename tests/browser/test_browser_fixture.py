"""The browser fixture itself: it loads a real dashboard page and it does see a CSP violation
and a console error (a fixture that saw nothing would make every page test vacuous)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from qdash_testing.browser import Browser

from qdash_mp.testing import CollectorThread


@pytest.fixture(scope="module")
def live() -> Iterator[CollectorThread]:
    with CollectorThread() as qc:
        yield qc


def test_a_page_loads_and_the_browser_reports_nothing(
    browser: Browser, live: CollectorThread
) -> None:
    browser.get(live.url + "/queues/")
    assert browser.css("h1").text
    browser.assert_clean()


def test_csp_violations_and_console_errors_are_caught(
    browser: Browser, live: CollectorThread
) -> None:
    browser.get(live.url + "/queues/")
    browser.js("document.head.insertAdjacentHTML('beforeend', '<style>body{color:red}</style>');")
    browser.js("setTimeout(function () { throw new Error('boom from the test'); }, 0);")
    found = browser.wait(lambda: browser.problems() or None, what="the violation to be reported")
    text = "\n".join(found)
    assert "style-src" in text, text
    # the error may arrive with the violation or just after it
    if "boom from the test" not in text:
        later = browser.wait(lambda: browser.problems() or None, what="the console error")
        text += "\n".join(later)
    assert "boom from the test" in text, text
    browser.assert_clean()
