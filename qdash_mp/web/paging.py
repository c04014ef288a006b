"""Page numbers for the failed list: parsing ``?page=`` and choosing which links the pager shows.

Pure functions, no HTTP: the views turn a ``ValueError`` here into a 400.
"""

from __future__ import annotations

import math
import sys

from qdash_mp.models import PAGE_SIZE

__all__ = ["MAX_PAGE", "last_page", "page_numbers", "parse_back_page", "parse_page"]

MAX_PAGE = sys.maxsize // PAGE_SIZE
"""Page numbers above this are treated as this one (always past the end of any real list)."""

_PAGE_DIGITS = 30  # longer digit strings are certainly past MAX_PAGE: skip int() on them


def parse_page(text: str | None) -> int:
    """A ``?page=`` value as a page number: missing means 1; huge values cap at ``MAX_PAGE``.

    Only plain ASCII digits are accepted; ``ValueError`` for anything else or for < 1.
    """
    if text is None:
        return 1
    if not text or not text.isascii() or not text.isdigit():
        raise ValueError("page must be a whole number ≥ 1")
    if len(text.lstrip("0")) > _PAGE_DIGITS:
        return MAX_PAGE
    page = int(text)
    if page < 1:
        raise ValueError("page must be a whole number ≥ 1")
    return min(page, MAX_PAGE)


def parse_back_page(text: str | None) -> int:
    """A form's ``page`` field (where to go back to after a POST): junk means page 1."""
    try:
        return parse_page(text)
    except ValueError:
        return 1


def last_page(total: int) -> int:
    """The last page of a list of ``total`` items (1 for an empty list)."""
    return max(1, math.ceil(total / PAGE_SIZE))


def page_numbers(current: int, last: int, spread: int = 2) -> list[int | None]:
    """Page links to show: first, last and ``current ± spread``; ``None`` marks a gap."""
    wanted = {1, last, *range(current - spread, current + spread + 1)}
    pages = sorted(p for p in wanted if 1 <= p <= last)
    out: list[int | None] = []
    for p in pages:
        if out and p - (out[-1] or 0) > 1:
            out.append(None)
        out.append(p)
    return out
