"""Small durable-file primitives shared by the journal, the spool, the stats and the daemon.

Each is a few lines, but each is easy to get subtly wrong (a short ``pwrite``, a rename that
is not durable until its directory is synced, a lock taken on the wrong object), so there is
one copy of each.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync_dir", "pwrite_all", "try_flock", "write_atomically"]

_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make ``directory``'s entries (creates, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(
    fd: int,
    data: bytes | bytearray | memoryview,
    offset: int,
    pwrite: Callable[[int, memoryview, int], int] = os.pwrite,
) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            n = pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError("write made no progress")
            done += n


def try_flock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting; False if another holds it.

    The lock lives as long as the open file description: the kernel drops it when the last
    fd is closed, also when the process is killed, so a crash never leaves a stale lock.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a temporary file, fsync, rename, fsync of the directory.

    A crash at any moment leaves either the old file or the new one, never a mix.
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
