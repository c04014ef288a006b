"""The hooks contract: what a job queue tells qdash_mp about its jobs.

``Hooks`` is a base class whose every method does nothing, in the spirit of dramatiq's
``Middleware``: an implementation overrides the events it cares about. ``Client`` (worker
side, sends to the collector) and ``StatsBase`` (embedded counters) are both ``Hooks``, so
an integration written against ``Hooks`` feeds either. ``queue`` is the queue's name;
``job`` a ``Job`` (or any object with its attributes); ``runtime`` seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qdash_mp.models import Job

__all__ = ["Hooks"]


class Hooks:
    """Job events; every method is a no-op here and never raises in an implementation."""

    # No instance dict of its own: ``Client`` keeps its hook path on ``__slots__``.
    __slots__ = ()

    def on_pushed(self, queue: str, job: Job | None = None) -> None:
        """A job was enqueued on ``queue``."""

    def on_started(self, queue: str, job: Job | None = None) -> None:
        """A worker began a job of ``queue``: started, active until it finishes, timed."""

    def on_processed(
        self, queue: str, job: Job | None = None, runtime: float | None = None
    ) -> None:
        """A job of ``queue`` finished successfully, in ``runtime`` seconds if known."""

    def on_failed(
        self,
        queue: str,
        job: Job | None,
        error: BaseException | str,
        runtime: float | None = None,
    ) -> None:
        """A job of ``queue`` failed for good with ``error``."""

    def on_retried(self, queue: str, job: Job | None = None) -> None:
        """A job of ``queue`` will run again; ``job`` (if given) ends this attempt as active."""
