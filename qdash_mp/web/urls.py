"""Dashboard URLs: job ids as path segments, and every link built from the mount point.

Pure: ``Urls`` is made from two strings (the views read them from the app's router, so a
dashboard mounted with ``add_subapp("/ops", ...)`` links to ``/ops/queues/...``).

``{id}`` is one path segment: job ids are percent-quoted with no safe characters (``/`` is
``%2F``). The ids ``""``, ``"."`` and ``".."`` cannot be path segments (clients resolve dot
segments, even quoted ones); such rows are listed without links or buttons.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["Urls", "addressable", "quote_id"]


def quote_id(id: str) -> str:
    """A job id as one URL path segment: percent-quoted, ``/`` included."""
    return quote(id, safe="")


def addressable(id: str) -> bool:
    """Whether ``id`` survives as a URL path segment.

    ``""``, ``"."`` and ``".."`` do not: clients resolve dot segments (even ``%2E``-quoted
    ones) before sending. Such jobs are listed without links; flush still drops them.
    """
    return id not in ("", ".", "..")


def _query(page: int) -> str:
    return f"?page={page}" if page > 1 else ""


@dataclass(frozen=True, slots=True)
class Urls:
    """Every dashboard URL, built from the mount point (``base`` ends with ``/queues/``)."""

    base: str
    static_base: str

    @property
    def overview(self) -> str:
        return self.base

    def failed(self, page: int = 1) -> str:
        return f"{self.base}failed{_query(page)}"

    def job(self, id: str, page: int = 1) -> str:
        return f"{self.base}failed/{quote_id(id)}{_query(page)}"

    def retry(self, id: str) -> str:
        return f"{self.base}failed/{quote_id(id)}/retry"

    def forget(self, id: str) -> str:
        return f"{self.base}failed/{quote_id(id)}/forget"

    def queue(self, name: str) -> str:
        return f"{self.base}q/{quote_id(name)}"

    @property
    def workers(self) -> str:
        return f"{self.base}workers"

    @property
    def flush(self) -> str:
        return f"{self.base}failed/flush"

    @property
    def api_stats(self) -> str:
        return f"{self.base}api/stats"

    @property
    def api_failed(self) -> str:
        return f"{self.base}api/failed"

    def static(self, name: str) -> str:
        return f"{self.static_base}/{quote(name)}"
