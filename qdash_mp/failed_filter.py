"""Filters of the failed-job list: parsing them from a query string, matching one record. Pure.

A ``FailedFilter`` combines (AND) up to five conditions, each optional::

    key     matches a failed job when                          value
    queue   its queue is exactly this                          1..255 characters
    name    its job name is exactly this                       1..1024 characters
    q       the error text contains this, ignoring case        1..200 characters
            (``str.casefold`` on both sides)
    after   failed_at >= after                                 Unix seconds or ISO 8601
    before  failed_at <  before                                (a naive time is UTC)

The same keys are the URL query parameters of ``/queues/failed`` and ``/queues/api/failed``
and the form fields of the bulk actions, so a filtered view is a shareable link. Invalid
values raise ``FilterError`` (a ``ValueError``) saying which key and why: the web layer answers
400 with that text. Both stores (``MemoryFailedJobs`` and the collector's journal) apply it;
how the journal makes it fast is in ``qdash_mp.journal.columns``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from qdash_mp.records import MAX_ID, MAX_NAME, MAX_TIMESTAMP

__all__ = ["FILTER_KEYS", "MAX_TEXT", "FailedFilter", "FilterError", "parse_filter", "parse_time"]

FILTER_KEYS: Final = ("queue", "name", "q", "after", "before")
MAX_TEXT: Final = 200
"""Longest ``q`` accepted, in characters."""


class FilterError(ValueError):
    """A filter value that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class FailedFilter:
    """Conditions on failed jobs, all of which must hold (``None``: no condition)."""

    queue: str | None = None
    name: str | None = None
    q: str | None = None
    after: float | None = None
    before: float | None = None

    @property
    def empty(self) -> bool:
        return self == _EMPTY

    @property
    def needle(self) -> str | None:
        """``q`` case-folded: what the error text (case-folded) must contain."""
        return None if self.q is None else self.q.casefold()

    def matches(self, queue: str, name: str, error: str, failed_at: float) -> bool:
        """Whether a job with these fields passes every condition."""
        if self.queue is not None and queue != self.queue:
            return False
        if self.name is not None and name != self.name:
            return False
        if self.after is not None and not failed_at >= self.after:
            return False
        if self.before is not None and not failed_at < self.before:
            return False
        needle = self.needle
        return needle is None or needle in error.casefold()

    def to_query(self) -> dict[str, str]:
        """The URL query parameters of this filter (``parse_filter`` reads them back)."""
        out: dict[str, str] = {}
        for key in FILTER_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            out[key] = _format_time(value) if key in ("after", "before") else value
        return out

    def to_dict(self) -> dict[str, Any]:
        """For the audit log and JSON answers: the set conditions only."""
        return {k: getattr(self, k) for k in FILTER_KEYS if getattr(self, k) is not None}


_EMPTY: Final = FailedFilter()


def _format_time(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return repr(value)


def parse_time(key: str, text: str) -> float:
    """Unix seconds from ``text``: a number (``1700000000``, ``1700000000.5``) or ISO 8601
    (``2026-12-02T06:00:00Z``, ``2026-12-02``; naive means UTC). ``FilterError`` otherwise."""
    text = text.strip()
    value: float
    try:
        value = float(text)
    except ValueError:
        try:
            dt = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            raise FilterError(
                f"{key} must be Unix seconds or an ISO 8601 time "
                f"(e.g. 2026-12-02T06:00:00Z), not {text[:40]!r}"
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        value = dt.timestamp()
    if not math.isfinite(value) or not -MAX_TIMESTAMP <= value <= MAX_TIMESTAMP:
        raise FilterError(f"{key} is out of range: {text[:40]!r}")
    return value


def _text(key: str, raw: str, limit: int) -> str | None:
    if raw == "":
        return None  # an empty form field means "no condition"
    if len(raw) > limit:
        raise FilterError(f"{key} is longer than {limit} characters")
    if any(c in raw for c in "\x00"):
        raise FilterError(f"{key} must not contain NUL characters")
    return raw


def parse_filter(query: Mapping[str, str]) -> FailedFilter:
    """The filter in a query string or form (other keys are ignored); ``FilterError`` if a
    value is invalid. Empty values mean no condition, so an empty form field clears it."""
    queue = _text("queue", query.get("queue", ""), MAX_NAME)
    name = _text("name", query.get("name", ""), MAX_ID)
    q = _text("q", query.get("q", ""), MAX_TEXT)
    if q is not None and not q.strip():
        q = None
    after = before = None
    if query.get("after", "").strip():
        after = parse_time("after", query["after"])
    if query.get("before", "").strip():
        before = parse_time("before", query["before"])
    if after is not None and before is not None and not after < before:
        raise FilterError("after must be earlier than before")
    return FailedFilter(queue=queue, name=name, q=q, after=after, before=before)
