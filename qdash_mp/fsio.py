"""Small durable-file primitives shared by the journal, the spool, the stats and the daemon.

Each is a few lines, but each is easy to get subtly wrong (a short ``pwrite``, a rename that
is not durable until its directory is synced, a lock taken on the wrong object), so there is
one copy of each.

``FileIO`` is the one seam for fault injection: every write, sync, truncate and directory
sync of the journal and of these functions goes through a ``FileIO`` (``DEFAULT_IO`` unless
one is passed), so a test subclass can count calls, hold them, or fail chosen ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_IO",
    "FileIO",
    "fsync_dir",
    "pwrite_all",
    "try_flock",
    "write_atomically",
]

_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class FileIO:
    """The writes and syncs the durable files make: override a method to count or fail it."""

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset``; returns bytes written (may be short)."""
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        """Make the file's data (and its size) durable."""
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        """Make the file's data and metadata durable."""
        os.fsync(fd)

    def truncate(self, fd: int, length: int) -> None:
        """Cut the file to ``length`` bytes."""
        os.ftruncate(fd, length)

    def fsync_dir(self, directory: str | os.PathLike[str]) -> None:
        """Make ``directory``'s entries (creates, renames, unlinks) durable."""
        fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)

    def pwrite_all(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` with ``pwrite`` (which may write less)."""
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                n = self.pwrite(fd, view[done:], offset + done)
                if n <= 0:
                    raise OSError("write made no progress")
                done += n


DEFAULT_IO: Final = FileIO()
"""The ``FileIO`` used where none is passed: plain OS calls."""


def fsync_dir(directory: str | os.PathLike[str], io: FileIO = DEFAULT_IO) -> None:
    """Make ``directory``'s entries (creates, renames, unlinks) durable."""
    io.fsync_dir(directory)


def pwrite_all(
    fd: int, data: bytes | bytearray | memoryview, offset: int, io: FileIO = DEFAULT_IO
) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    io.pwrite_all(fd, data, offset)


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


def write_atomically(path: Path, data: bytes, mode: int = 0o600, io: FileIO = DEFAULT_IO) -> None:
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
            io.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    io.fsync_dir(directory)
