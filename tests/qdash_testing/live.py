"""A live dashboard for the browser tests and the screenshots: a real collector process fed by
real worker processes (``qdash_testing.traffic``), on a fresh short directory."""

from __future__ import annotations

import contextlib
import shutil
import urllib.parse
from collections.abc import Iterator

from qdash_testing.collector import CollectorProc, short_dir
from qdash_testing.http import get_json
from qdash_testing.traffic import DemoWorkers, seed_history

__all__ = ["Live", "running_dashboard"]


class Live:
    """A collector process with worker processes feeding it, as the browser tests reach it."""

    def __init__(self, collector: CollectorProc) -> None:
        self.collector = collector
        self.url = collector.http

    def api(self, **params: str) -> dict[str, object]:
        """The failed list's JSON (``/queues/api/failed``) with these query parameters."""
        query = urllib.parse.urlencode(params)
        doc: dict[str, object] = get_json(f"{self.url}/queues/api/failed?{query}")
        return doc

    def failed_ids(self) -> list[str]:
        """The ids on the failed list's first page, newest first."""
        return [j["id"] for j in get_json(self.url + "/queues/api/failed")["jobs"]]


@contextlib.contextmanager
def running_dashboard(
    *, jobs_per_s: float, failure_rate: float, history: bool = False, workers: int = 2
) -> Iterator[Live]:
    """A collector process on a fresh short dir (``history``: with 30 days of seeded history)
    and ``workers`` worker processes (``DemoWorkers``); all of it taken down afterwards."""
    d = short_dir()
    collector = CollectorProc(d)
    try:
        if history:
            seed_history(d)
        collector.start()
        with DemoWorkers(
            collector.socket, workers, jobs_per_s=jobs_per_s, failure_rate=failure_rate
        ):
            yield Live(collector)
    finally:
        collector.cleanup()
        shutil.rmtree(d, ignore_errors=True)
