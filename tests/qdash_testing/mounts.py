"""A tmpfs mounted for one test (root only): a read-only data dir, or a tiny one to fill."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qdash_testing.collector import short_dir

__all__ = ["mounted_tmpfs"]


@contextlib.contextmanager
def mounted_tmpfs(options: str, what: str, *, lazy: bool = False) -> Iterator[Path]:
    """A fresh short dir with a tmpfs mounted on it (``mount -o options``), unmounted and
    removed afterwards; the test is skipped, saying why, where mounting is not permitted."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting {what} needs root")
    d = short_dir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"mount not permitted here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", *(["-l"] if lazy else []), str(d)], check=False)
        d.rmdir()
