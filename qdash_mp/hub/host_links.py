"""``?host=`` carried by every in-page link and form of a host-scoped hub page. Pure.

The dashboard's templates and views build their URLs without knowing about the hub (the
same pages serve a single host), so on ``/queues/failed?host=web-1`` the pager, the job
rows, the queue links, the filter form, the flush form and the polled fragments would all
drop the host -- and a flush would act on every host. ``with_host`` rewrites the rendered
page instead, once, where every URL passes: each dashboard URL (under ``base``) in an
``href``, ``action``, ``formaction``, ``hx-get``, ``data-since-url`` or ``data-history``
(the charts and sparklines add ``queue=`` to its query) attribute gets ``host=NAME`` added
to its query, and each ``method="get"`` form a hidden ``host`` field
(a browser replaces a GET form's action query with the form's fields).

Left alone: URLs outside ``base`` or under ``static_base``, the hosts page (it lists every
host by definition) and URLs that already say ``host=`` (the nav's "all hosts" link says
``host=`` empty: no filter). The hub app passes the ``Location`` of its redirects (after a
retry, forget, flush or bulk action) through ``carry_host`` too.
"""

from __future__ import annotations

import html
import re
from typing import Final
from urllib.parse import parse_qsl, quote, urlsplit

__all__ = ["ATTRIBUTES", "carry_host", "with_host"]

ATTRIBUTES: Final = ("href", "action", "formaction", "hx-get", "data-since-url", "data-history")
_ATTR_RE: Final = re.compile(r"(?<![\w-])(" + "|".join(ATTRIBUTES) + r')="([^"]*)"')
_GET_FORM_RE: Final = re.compile(r'<form\b[^>]*\bmethod="get"[^>]*>', re.IGNORECASE)


def carry_host(url: str, host: str, base: str, static_base: str) -> str | None:
    """``url`` with ``host=`` added, or ``None`` when it is left alone (module docstring)."""
    if not url.startswith(base) or url.startswith(static_base + "/"):
        return None
    path, hash_, fragment = url.partition("#")
    parts = urlsplit(path)
    if parts.path == base + "hosts":
        return None
    if any(k == "host" for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return None
    sep = "&" if parts.query else ("" if path.endswith("?") else "?")
    return f"{path}{sep}host={quote(host, safe='')}{hash_}{fragment}"


def with_host(page: str, host: str, base: str, static_base: str) -> str:
    """``page`` (rendered HTML) with ``host`` carried by its in-page links and forms."""

    def attr(m: re.Match[str]) -> str:
        url = carry_host(html.unescape(m.group(2)), host, base, static_base)
        if url is None:
            return m.group(0)
        return f'{m.group(1)}="{html.escape(url)}"'

    field = f'<input type="hidden" name="host" value="{html.escape(host)}">'
    page = _ATTR_RE.sub(attr, page)
    return _GET_FORM_RE.sub(lambda m: m.group(0) + field, page)
