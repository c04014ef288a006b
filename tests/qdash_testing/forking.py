"""``os.fork`` in a test process that has threads (a client's sender), without the warning."""

from __future__ import annotations

import os
import warnings

__all__ = ["fork_quietly"]


def fork_quietly() -> int:
    """``os.fork()``; Python 3.12+ warns (DeprecationWarning, an error under
    ``filterwarnings = error``) when the process has threads, as every client's has."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        return os.fork()
