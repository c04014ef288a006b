"""Rate-limited logging for background threads that may fail the same way for hours.

A client whose collector is down would otherwise log one line per reconnect attempt;
``LogThrottle`` lets one line per key through every ``every`` seconds and counts the rest.
"""

from __future__ import annotations

import logging
import time

__all__ = ["LogThrottle"]

LOG_EVERY = 60.0


class LogThrottle:
    """At most one log line per key per ``every`` seconds, with a count of the rest."""

    def __init__(self, logger: logging.Logger, every: float = LOG_EVERY) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, key: str, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        skipped = self._skipped.pop(key, 0)
        self._last[key] = now
        if skipped:
            self.logger.log(level, msg + " (%d more like this not logged)", *args, skipped)
        else:
            self.logger.log(level, msg, *args)

    def reset(self, key: str) -> None:
        self._last.pop(key, None)
        self._skipped.pop(key, None)
