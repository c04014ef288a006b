"""The failed-jobs page in a real browser (headless Chromium), against a real collector with
real worker processes failing jobs all the time (``qdash_testing.traffic``).

What each test proves: the filter form narrows the list server-side (and the URL carries the
filter); a bulk retry on a filter requeues exactly the jobs that matched when the page was
shown (the count in the confirm is the count acted on; jobs of other queues and later
failures are untouched); the "N new failures" notice appears from the SSE stream while the
list stays as it was (no reload, same rows); the payload copy button appears; no console
error and no CSP violation on any of it.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import pytest
from qdash_testing.browser import Browser
from qdash_testing.collector import wait_for
from qdash_testing.http import get_json
from qdash_testing.live import Live, running_dashboard


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with running_dashboard(jobs_per_s=20, failure_rate=0.3) as live:
        wait_for(
            lambda: all(live.api(queue=q)["total"] >= 2 for q in ("emails", "billing")),
            60,
            "failed jobs on emails and billing",
        )
        yield live


def _queues_listed(b: Browser) -> list[str]:
    cells = b.js(
        "return [...document.querySelectorAll('table.grid tbody td.queue')]"
        ".map(td => td.textContent)"
    )
    return [str(c) for c in cells]


def test_filter_form_narrows_the_list(page: Browser, live: Live) -> None:
    page.get(live.url + "/queues/failed")
    assert len(set(_queues_listed(page))) > 1
    page.css('form.filters input[name="queue"]').send_keys("billing")
    page.css("form.filters button[type=submit]").click()
    page.wait(lambda: "queue=billing" in page.driver.current_url, 10, "the filtered URL")
    listed = _queues_listed(page)
    assert listed
    assert set(listed) == {"billing"}
    assert "Clear filter" in page.driver.page_source
    page.assert_clean()


def test_new_failures_notice_without_shifting_the_list(page: Browser, live: Live) -> None:
    page.get(live.url + "/queues/failed")
    page.js("window.__same_page = 'yes';")
    rows = page.js(
        "return [...document.querySelectorAll('table.grid tbody tr')].map(r => r.textContent)"
    )
    note = page.css("#new-failures")
    page.wait(note.is_displayed, 30, "the N new failures notice")
    count = int(page.css("#new-failures .count").text)
    assert count >= 1
    assert page.js("return window.__same_page") == "yes"  # no reload
    after = page.js(
        "return [...document.querySelectorAll('table.grid tbody tr')].map(r => r.textContent)"
    )
    assert after == rows  # the list did not shift
    page.css("#new-failures a").click()  # "show": the fresh list
    page.wait(lambda: page.js("return window.__same_page") is None, 10, "the fresh list")
    page.assert_clean()


def test_bulk_retry_on_a_filter_requeues_exactly_the_matching_jobs(
    page: Browser, live: Live
) -> None:
    page.get(live.url + "/queues/failed?queue=emails")
    token = page.css('#bulk-form input[name="snapshot"]').get_attribute("value")
    # what the operator sees: the jobs of the page's snapshot (stable while new ones fail)
    shown = live.api(queue="emails", snapshot=token)
    total = int(str(shown["total"]))
    ids: set[str] = set()
    for n in range(1, int(str(shown["pages"])) + 1):
        doc = live.api(queue="emails", snapshot=token, page=str(n))
        ids |= {str(j["id"]) for j in doc["jobs"]}  # type: ignore[attr-defined]
    others = {
        str(j["id"]): j["failed_at"]
        for j in live.api(queue="billing", snapshot=token)["jobs"]  # type: ignore[attr-defined]
    }
    stats = get_json(live.url + "/queues/api/stats")
    retried_before = {q["queue"]: q["retried"] for q in stats["queues"]}
    summary = next(
        s for s in page.css_all("details.confirm summary") if s.text.startswith("Retry all")
    )
    assert f"Retry all {total:,} matching" in summary.text
    summary.click()
    page.css('form[action$="/failed/retry"] button[type=submit]').click()
    page.wait(lambda: "Retried" in page.driver.page_source, 60, "the bulk retry's result")
    assert f"Retried {total:,} of {total:,}" in page.driver.page_source
    stats = get_json(live.url + "/queues/api/stats")
    retried = {q["queue"]: q["retried"] for q in stats["queues"]}
    assert retried["emails"] - retried_before.get("emails", 0) == total
    assert retried.get("billing", 0) == retried_before.get("billing", 0)
    # none of the retried jobs is listed any more with its old failure
    old = live.api(queue="emails", snapshot=token)
    assert old["total"] == 0
    # billing's jobs of that time are untouched
    still = {
        str(j["id"]): j["failed_at"]
        for j in live.api(queue="billing", snapshot=token)["jobs"]  # type: ignore[attr-defined]
    }
    assert still == others
    assert ids
    page.assert_clean()


def test_job_page_copy_button(page: Browser, live: Live) -> None:
    doc = live.api()
    job = doc["jobs"][0]  # type: ignore[index]
    page.get(f"{live.url}/queues/failed/{urllib.parse.quote(str(job['id']), safe='')}")
    button = page.css(".copy-button")
    page.wait(button.is_displayed, 5, "the copy button (failed.js)")
    assert page.css("#payload").text
    page.assert_clean()
