"""Give the memory of big partial frames back to the OS once they are dropped.

Why it is needed: glibc raises its mmap threshold to the size of the largest block freed
(up to 32 MiB on 64-bit). After the first big frame buffer is freed, buffers of that size come
from the heap instead of their own mapping, and a freed heap block stays resident while small
objects allocated after it sit above it. A peer that sends and abandons 200 MB of partial frames
left the daemon 10-30 MiB larger for good in 3 of 10 runs. ``malloc_trim(0)`` returns every
whole free page of every arena (about 4 ms on a 200 MB heap), so it runs only after
``TRIM_AFTER`` bytes of big partial frames were released, and at most once per ``MIN_INTERVAL``.

On a C library without ``malloc_trim`` (musl, macOS) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

__all__ = ["HeapTrimmer", "malloc_trim"]

log = logging.getLogger("qdash_mp.collector.heap")

TRIM_AFTER = 4 << 20
"""Bytes of partial frames released before a trim is worth its cost."""

BIG = 256 << 10
"""A partial frame smaller than this is not counted: glibc serves such buffers from its pools
and reuses them, and every read boundary of a busy stream leaves one (they would trim for
nothing)."""

MIN_INTERVAL = 1.0
"""Seconds between two trims: a stream of big frames costs at most one trim a second."""


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


_malloc_trim = _load_malloc_trim()


def malloc_trim() -> bool:
    """Return free heap pages to the OS; False when the C library has no ``malloc_trim``."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class HeapTrimmer:
    """Counts released partial-frame bytes; trims the heap soon after enough were released."""

    def __init__(self, trim_after: int = TRIM_AFTER, min_interval: float = MIN_INTERVAL) -> None:
        self.trim_after = trim_after
        self.min_interval = min_interval
        self.released = 0
        """Bytes released since the last trim."""
        self.trims = 0
        self._last = float("-inf")
        self._timer: asyncio.TimerHandle | None = None

    def released_bytes(self, n: int) -> None:
        """A partial frame of ``n`` bytes was dropped (completed, abandoned or evicted)."""
        if n < BIG:
            return
        self.released += n
        if self.released < self.trim_after or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        # Not at once: the connection's task must end first for its buffers to be freed.
        delay = max(0.05, self._last + self.min_interval - loop.time())
        self._timer = loop.call_later(delay, self._trim)

    def _trim(self) -> None:
        self._timer = None
        self._last = asyncio.get_running_loop().time()
        released, self.released = self.released, 0
        if malloc_trim():
            self.trims += 1
            log.debug("heap trimmed after %d bytes of partial frames were released", released)

    def close(self) -> None:
        """Cancel a pending trim (the collector is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
