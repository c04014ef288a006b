"""Client spool files on disk: durable appends, ownership by ``flock``, takeover of orphans.

The byte layout is in ``qdash_mp.client.spool_format``; this module does the file I/O, and
``qdash_mp.client.replay`` sends the files (the whole story is in ``docs/client.md``).

Files. ``<spool_dir>/<client id>.spool`` holds the batches of one client id (a client id
that is not a plain file name is replaced by a hash of it; the real id is in the header)::

    <stem>.spool                 a spool file, always with a whole, durable header
    .<stem>.<pid>.<rand>.spool.new
                                 being created (locked); an unlocked one older than 60 s
                                 is a leftover of a crashed create and is removed
    <stem>~<n>.spool             a second spool of a client id that already has one
    <name>.spool.corrupt         header damaged: set aside, never replayed
    <name>.spool.rejected        the collector refused its batches: set aside

Create: lock the new ``.new`` file, write the header, fsync, ``link`` it to its final name
(never replacing a file), unlink the ``.new``, fsync the directory. Append: ``pwrite`` +
``fsync`` at the end of what is known good. Delete (every batch acknowledged): unlink +
directory fsync. Whoever has the file open holds an exclusive ``flock`` on it; a file whose
lock can be taken is an *orphan* (its writer is gone) and ``adopt_orphans`` takes it over.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from qdash_mp.client.spool_format import (
    RECORD_HEAD,
    RecordRef,
    ScanResult,
    SpoolCorrupt,
    encode_header,
    encode_record,
    scan,
)
from qdash_mp.fsio import fsync_dir, pwrite_all, try_flock

__all__ = ["REJECTED", "SUFFIX", "SpoolFile", "adopt_orphans", "file_stem"]

log = logging.getLogger("qdash_mp.client.spool")

SUFFIX = ".spool"
_NEW = ".new"
_CORRUPT = ".corrupt"
REJECTED = ".rejected"
_STALE_NEW = 60.0
"""Seconds after which an unlocked ``.spool.new`` file is a leftover of a crashed create."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def file_stem(client_id: str) -> str:
    """The file name (without suffix) of a spool of ``client_id``."""
    if _SAFE_NAME.fullmatch(client_id):
        return client_id
    digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()
    return "id-" + digest[:32]


class SpoolFile:
    """One spool file this process holds open, and so locked.

    ``records`` are the verified batches in the file, ``extra`` batches that belong after
    them but only exist in memory (a client whose spool write failed hands them over
    this way), ``acked`` the highest seq the collector acknowledged. ``tag`` is the
    owner's label (a ``Client`` puts its stream generation there; ``None`` for orphans).
    """

    __slots__ = ("_end", "_fd", "acked", "broken", "client_id", "extra", "path", "records", "tag")

    def __init__(
        self,
        path: Path,
        fd: int,
        client_id: str,
        records: list[RecordRef],
        end: int,
        *,
        tag: object = None,
    ) -> None:
        self.path = path
        self._fd: int | None = fd
        self.client_id = client_id
        self.records = records
        self._end = end
        self.extra: list[tuple[int, bytes]] = []
        self.acked = 0
        self.tag = tag
        self.broken = False

    def __repr__(self) -> str:
        seqs = f"{self.first_seq}..{self.last_seq}"
        return f"<SpoolFile {self.path} client={self.client_id} batches={seqs}>"

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, directory: Path, client_id: str, *, tag: object = None) -> SpoolFile:
        """A new, empty spool of ``client_id`` in ``directory``, locked and durable."""
        header = encode_header(client_id)
        stem = file_stem(client_id)
        tmp = directory / f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{SUFFIX}{_NEW}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
        try:
            try_flock(fd)  # a new inode: nobody else can hold it
            pwrite_all(fd, header, 0)
            os.fsync(fd)
            path = directory / f"{stem}{SUFFIX}"
            n = 0
            while True:
                try:
                    os.link(tmp, path)  # unlike rename, never replaces an existing spool
                    break
                except FileExistsError:
                    n += 1
                    path = directory / f"{stem}~{n}{SUFFIX}"
            os.unlink(tmp)
            fsync_dir(directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if n:
            log.warning(
                "qdash_mp spool: a spool of client id %r already exists in %s; this one is %s "
                "(a client id must not be reused while its spool is waiting: the collector "
                "would take the later batches for duplicates)",
                client_id,
                directory,
                path.name,
            )
        return cls(path, fd, client_id, [], len(header), tag=tag)

    @classmethod
    def adopt(cls, path: Path) -> SpoolFile | None:
        """Take over ``path`` if no live process holds it; ``None`` if held, gone or unusable.

        A torn or corrupt tail is cut (logged); a file without a single whole batch is
        deleted; a file whose header is damaged is renamed ``….corrupt`` and left alone.
        """
        try:
            fd = os.open(path, os.O_RDWR | _O_CLOEXEC)
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as exc:
            log.error("qdash_mp spool: cannot open %s: %s", path, exc)
            return None
        keep = False
        try:
            if not try_flock(fd):
                return None
            st = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return None  # deleted by its replayer after we opened it
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                return None
            try:
                result = _scan_fd(fd, st.st_size)
            except SpoolCorrupt as exc:
                aside = path.with_name(path.name + _CORRUPT)
                log.error(
                    "qdash_mp spool: %s cannot be replayed (%s); renamed to %s",
                    path,
                    exc,
                    aside.name,
                )
                os.rename(path, aside)
                fsync_dir(path.parent)
                return None
            if result.problem is not None:
                log.warning(
                    "qdash_mp spool: %s has a torn or corrupt tail (%s): cutting %d bytes, "
                    "keeping %d whole batches",
                    path,
                    result.problem,
                    st.st_size - result.end,
                    len(result.records),
                )
                os.ftruncate(fd, result.end)
                os.fsync(fd)
            if not result.records:
                log.info("qdash_mp spool: %s holds no batch; deleted", path)
                os.unlink(path)
                fsync_dir(path.parent)
                return None
            spool = cls(path, fd, result.client_id, result.records, result.end)
            log.info(
                "qdash_mp spool: took over %s (client %s, batches %d..%d)",
                path,
                spool.client_id,
                spool.first_seq,
                spool.last_seq,
            )
            keep = True
            return spool
        except OSError as exc:
            log.error("qdash_mp spool: cannot take over %s: %s", path, exc)
            return None
        finally:
            if not keep:
                os.close(fd)

    # ------------------------------------------------------------------ contents

    @property
    def first_seq(self) -> int:
        if self.records:
            return self.records[0].seq
        return self.extra[0][0] if self.extra else 0

    @property
    def last_seq(self) -> int:
        if self.extra:
            return self.extra[-1][0]
        return self.records[-1].seq if self.records else 0

    def pending(self) -> int:
        """Batches held here that the collector has not acknowledged."""
        last = self.last_seq
        if not last:
            return 0
        return max(0, last - max(self.acked, self.first_seq - 1))

    def ack(self, seq: int) -> None:
        """The collector acknowledged every batch up to ``seq``."""
        self.acked = max(self.acked, min(seq, self.last_seq))

    def frames(self, after: int) -> Iterator[tuple[int, bytes]]:
        """``(seq, frame)`` of every batch with a seq above ``after``, in order."""
        fd = self._fd
        if fd is None:
            raise OSError(f"spool {self.path} is closed")
        records = self.records
        start = max(0, after - records[0].seq + 1) if records else 0
        for ref in records[start:]:
            frame = os.pread(fd, ref.size, ref.offset)
            if len(frame) != ref.size:
                raise OSError(f"short read in {self.path} at offset {ref.offset}")
            yield ref.seq, frame
        for seq, frame in self.extra:
            if seq > after:
                yield seq, frame

    # ------------------------------------------------------------------ changing

    def append(self, batches: Sequence[tuple[int, bytes]]) -> None:
        """Append ``(seq, frame)`` batches (consecutive seqs) and make them durable.

        On failure the file is cut back to what was durable, marked ``broken`` (never
        written again) and the ``OSError`` propagates: the caller still holds the batches.
        """
        fd = self._fd
        if fd is None or self.broken:
            raise OSError(f"spool {self.path} can no longer be written")
        if not batches:
            return
        expect = self.last_seq + 1 if self.last_seq else batches[0][0]
        data = bytearray()
        refs: list[RecordRef] = []
        pos = self._end
        for seq, frame in batches:
            if seq != expect:
                raise ValueError(f"spool {self.path}: batch {seq} does not follow {expect - 1}")
            record = encode_record(seq, frame)
            refs.append(RecordRef(seq=seq, offset=pos + RECORD_HEAD.size, size=len(frame)))
            data += record
            pos += len(record)
            expect += 1
        try:
            pwrite_all(fd, data, self._end)
            os.fsync(fd)
        except OSError:
            self.broken = True
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._end)
            raise
        self.records.extend(refs)
        self._end = pos

    def remove(self) -> None:
        """Delete the file (every batch in it is acknowledged) and let go of it."""
        try:
            os.unlink(self.path)
            fsync_dir(self.path.parent)
        finally:
            self.release()

    def set_aside(self, suffix: str) -> Path:
        """Rename the file ``<name><suffix>`` (kept for an operator) and let go of it."""
        aside = self.path.with_name(self.path.name + suffix)
        try:
            os.rename(self.path, aside)
            fsync_dir(self.path.parent)
        finally:
            self.release()
        return aside

    def release(self) -> None:
        """Close the file: its lock goes with it, unless a forked process still shares it.

        Also what a forked child does with the spools it inherited: closing its copy leaves
        the parent's lock (one open file, two descriptors) in place.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd is None


def _scan_fd(fd: int, size: int) -> ScanResult:
    if size == 0:
        raise SpoolCorrupt("empty file")
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        return scan(mm)


def adopt_orphans(directory: Path) -> list[SpoolFile]:
    """Take over every spool file in ``directory`` that no live process holds, oldest first."""
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        log.error("qdash_mp spool: cannot list %s: %s", directory, exc)
        return []
    found: list[tuple[float, str, SpoolFile]] = []
    for entry in entries:
        name = entry.name
        if name.endswith(SUFFIX + _NEW):
            _remove_stale_new(Path(entry.path))
            continue
        if name.startswith(".") or not name.endswith(SUFFIX):
            continue
        spool = SpoolFile.adopt(Path(entry.path))
        if spool is not None:
            try:
                mtime = entry.stat().st_mtime
            except OSError:
                mtime = 0.0
            found.append((mtime, name, spool))
    found.sort(key=lambda item: (item[0], item[1]))
    return [spool for _, _, spool in found]


def _remove_stale_new(path: Path) -> None:
    """Delete a ``.spool.new`` left by a create that crashed (it holds no batch)."""
    try:
        if time.time() - path.stat().st_mtime < _STALE_NEW:
            return
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return
    try:
        if try_flock(fd):
            os.unlink(path)
            log.info("qdash_mp spool: removed %s, left by an interrupted create", path)
    except OSError:
        pass
    finally:
        os.close(fd)
