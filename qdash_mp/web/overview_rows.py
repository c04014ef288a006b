"""The overview's queue rows as HTML, built in Python: the one loop of the dashboard that runs
a thousand times per page (1,000 queues), where Jinja's per-expression overhead doubled the
page's time. The output is what ``overview.html`` rendered for each row, escaped the same way
(``visible`` then HTML-escaped, like every ``{{ }}``); ``tests/test_dash_overview.py`` checks
it against the template's own rendering of the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from markupsafe import Markup

from qdash_mp.models import QueueStat
from qdash_mp.web.display import duration, rate, visible
from qdash_mp.web.urls import Urls

__all__ = ["queue_rows"]


class Row(Protocol):
    @property
    def stat(self) -> QueueStat: ...
    @property
    def per_second(self) -> float: ...


# ``visible`` then markupsafe's HTML escaping, as one str.translate (the characters each maps
# are disjoint: control/format characters vs & < > " ')
_TABLE = {ord(c): visible(c) for c in map(chr, range(0x3000)) if visible(c) != c}
_TABLE.update({ord("&"): "&amp;", ord("<"): "&lt;", ord(">"): "&gt;"})
_TABLE.update({ord('"'): "&#34;", ord("'"): "&#39;"})
_TABLE.update({0xFEFF: visible("\ufeff")})


def _text(value: str) -> str:
    return value.translate(_TABLE)


def queue_rows(rows: Sequence[Row], urls: Urls) -> Markup:
    """The ``<tr>`` of every row (see ``overview.html``: same columns as its header)."""
    out: list[str] = []
    add = out.append
    for row in rows:
        s = row.stat
        name = _text(s.queue)
        href = _text(urls.queue(s.queue))
        runtime = s.runtime
        add(
            f'<tr>\n<td class="queue">{name}</td>\n'
            f'<td class="open"><a href="{href}" aria-label="Open queue {name}" title="Open queue"'
            f' data-queue="{name}">\u203a</a></td>\n'
            f'<td class="num">{s.pushed:,}</td>\n'
            f'<td class="num">{s.processed:,}</td>\n'
            f'<td class="num{" bad" if s.failed else ""}">{s.failed:,}</td>\n'
            f'<td class="num">{s.retried:,}</td>\n'
            f'<td class="num">{s.pending:,}</td>\n'
            f'<td class="num">{s.active:,}</td>\n'
            # duration() and rate() write digits, units and "—": nothing to escape
            f'<td class="num">{duration(runtime.p50)}</td>\n'
            f'<td class="num">{duration(runtime.p99)}</td>\n'
            '<td class="spark-cell"></td>\n'
            f'<td class="num">{rate(row.per_second)}</td>\n</tr>\n'
        )
    return Markup("".join(out))  # noqa: S704  (every value above is escaped or safe by form)
