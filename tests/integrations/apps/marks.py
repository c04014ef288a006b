"""What the test apps' tasks share: marks on disk, and a switch that makes failing tasks pass."""

from __future__ import annotations

import os
from pathlib import Path

MARKS = Path(os.environ.get("IT_MARKS", "/tmp/qdash-it-marks"))


def mark(name: str) -> None:
    """Leave ``name`` on disk (appending a line per run, so repeated runs are seen)."""
    with (MARKS / name).open("a") as f:
        f.write(f"{os.getpid()}\n")


def fixed() -> bool:
    """True once the test "fixed the bug": failing tasks then succeed."""
    return (MARKS / "fixed").exists()


def boom(x: object) -> None:
    """Fail with a recognisable error unless fixed; leave a mark either way."""
    if fixed():
        mark(f"ok-{x}")
        return
    mark(f"boom-{x}")
    raise ValueError(f"boom {x}")
