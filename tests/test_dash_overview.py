"""The overview's rows (built in Python for speed, ``qdash_mp.web.overview_rows``) are what the
Jinja template rendered before: same cells, same escaping of hostile queue names (HTML and
control/bidi characters), and the page keeps its header columns in the same order."""

from __future__ import annotations

import re
from typing import Any

import jinja2

from qdash_mp import Stats, create_app, new_inspector
from qdash_mp.web.display import template_env
from qdash_mp.web.overview_rows import queue_rows
from qdash_mp.web.urls import Urls
from qdash_mp.web.views import _Row

# The rows as overview.html rendered them (before the Python version), as the reference.
REFERENCE = """{% for row in rows %}
<tr>
<td class="queue">{{ row.stat.queue }}</td>
<td class="open"><a href="{{ urls.queue(row.stat.queue) }}" \
aria-label="Open queue {{ row.stat.queue }}" title="Open queue" \
data-queue="{{ row.stat.queue }}">\u203a</a></td>
<td class="num">{{ row.stat.pushed|num }}</td>
<td class="num">{{ row.stat.processed|num }}</td>
<td class="num{% if row.stat.failed %} bad{% endif %}">{{ row.stat.failed|num }}</td>
<td class="num">{{ row.stat.retried|num }}</td>
<td class="num">{{ row.stat.pending|num }}</td>
<td class="num">{{ row.stat.active|num }}</td>
<td class="num">{{ row.stat.runtime.p50|duration }}</td>
<td class="num">{{ row.stat.runtime.p99|duration }}</td>
<td class="spark-cell"></td>
<td class="num">{{ row.per_second|rate }}</td>
</tr>
{% endfor %}"""

HOSTILE = [
    "emails",
    "<script>alert(1)</script>\"'&",
    "rtl\u202eoverride",
    "nul\x00byte",
    "zero\u200bwidth\ufeff",
    "队列 🚀",
    "a/b c?d#e",
]


def _rows() -> list[_Row]:
    stats = Stats()
    for i, q in enumerate(HOSTILE):
        for _ in range(i + 1):
            stats.on_pushed(q)
        stats.on_processed(q, runtime=0.0005 * 10**i)
        if i % 2:
            stats.on_failed(q)
    return [_Row(q, 0.25 * i) for i, q in enumerate(stats.snapshot().queues)]


def _squash(html: str) -> str:
    return re.sub(r">\s+<", "><", html.strip())


def test_python_rows_equal_the_template_rows() -> None:
    env = template_env()
    env.loader = jinja2.DictLoader({"rows.html": REFERENCE})
    urls = Urls("/ops/queues/", "/ops/queues/static")
    rows = _rows()
    expected = env.get_template("rows.html").render(rows=rows, urls=urls)
    assert _squash(str(queue_rows(rows, urls))) == _squash(expected)
    html = str(queue_rows(rows, urls))
    assert "<script>" not in html
    assert "\u202e" not in html
    assert "\x00" not in html
    assert "\\u202e" in html


async def test_overview_columns_match_the_header(aiohttp_client: Any) -> None:
    stats = Stats()
    stats.on_pushed("emails")
    stats.on_processed("emails", runtime=0.01)
    client = await aiohttp_client(create_app(new_inspector(stats, None)))
    html = await (await client.get("/queues/")).text()
    head = re.search(r"<thead>(.*?)</thead>", html, re.S)
    body = re.search(r"<tbody>(.*?)</tbody>", html, re.S)
    foot = re.search(r"<tfoot>(.*?)</tfoot>", html, re.S)
    assert head is not None
    assert body is not None
    assert foot is not None
    n_head = len(re.findall(r"<th\b", head.group(1)))
    assert len(re.findall(r"<td\b", body.group(1))) == n_head
    assert len(re.findall(r"<t[dh]\b", foot.group(1))) == n_head
    keys = re.findall(r'data-k="(\w+)"', head.group(1))
    assert keys == [
        "pushed",
        "processed",
        "failed",
        "retried",
        "pending",
        "active",
        "p50",
        "p99",
        "spark",
        "rate",
    ]
