"""Client spool files on disk: durable appends, ownership by ``flock``, takeover and replay.

A ``Client(spool_dir=...)`` never drops a failed job's details and never loses a count
when the collector is away: what it cannot deliver goes to a spool file, and whoever holds
that file later sends it. The byte layout is in ``qdash_mp.spool_format``; this module does
the I/O.

Files. ``<spool_dir>/<client id>.spool`` holds the batches of one client id (a client id
that is not a plain file name is replaced by a hash of it; the real id is in the header).
A file is created as a hidden ``.….spool.new``, locked, given its header, fsync'd, then
linked to its final name and the directory fsync'd, so a ``*.spool`` file always has a
whole header and is locked by its creator from the first moment it can be seen. Appends
are ``pwrite`` + ``fsync`` at the end of what is known to be good; the file never changes
otherwise until it is deleted (unlink + directory fsync) once the collector has
acknowledged its last batch.

Ownership. Whoever has a spool file open holds an exclusive ``flock`` on it for as long
as it does (an ``flock`` belongs to the open file, so the kernel drops it when the holder
exits, however it exits; a forked child only closes its inherited copy, which leaves the
parent's lock alone). A file whose lock can be taken is an *orphan*: its writer is gone.
``adopt_orphans`` takes every orphan in a directory (lock kept), checks that the name still
points at the locked file, reads it with the verifying scanner, cuts a torn tail (logged,
never sent) and returns the files. ``Replayer`` then sends them.

Replay. A ``Replayer`` is a thread that owns a queue of spool files (the client's own
retired ones first, orphans after) and, one file at a time, opens its own connection to
the collector with ``HELLO client_id = the file's client id``, learns from WELCOME's
``last_seq`` which batches are already applied, sends the rest in order (at most
``window`` unacknowledged), and deletes the file when an ACK covers its last batch. The
collector deduplicates by (client id, seq), so a file replayed twice, or after the
collector applied part of it, counts everything exactly once. A collector that cannot be
reached is retried with backoff; a collector that refuses the file's sequence or frames
(ERROR ``sequence``/``protocol``: it cannot be replayed as is) gets it set aside as
``.rejected`` (kept, logged) so it does not block the others. The directory is scanned for
new orphans at start and every ``rescan`` seconds.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import mmap
import os
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from qdash_mp.errors import ProtocolError
from qdash_mp.fsio import fsync_dir, pwrite_all, try_flock
from qdash_mp.spool_format import (
    RECORD_HEAD,
    RecordRef,
    ScanResult,
    SpoolCorrupt,
    encode_header,
    encode_record,
    scan,
)
from qdash_mp.throttle import LogThrottle
from qdash_mp.wire import (
    Ack,
    ErrorCode,
    ErrorMsg,
    FrameDecoder,
    Hello,
    Message,
    Welcome,
    encode,
)

__all__ = ["SUFFIX", "Replayer", "SpoolFile", "adopt_orphans", "file_stem"]

log = logging.getLogger("qdash_mp.spool")

SUFFIX = ".spool"
_NEW = ".new"
_CORRUPT = ".corrupt"
_REJECTED = ".rejected"
_STALE_NEW = 60.0
"""Seconds after which an unlocked ``.spool.new`` file is a leftover of a crashed create."""

RESCAN_INTERVAL = 30.0
CONNECT_TIMEOUT = 1.0
HANDSHAKE_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
ACK_TIMEOUT = 30.0
"""A replay connection that gets no ACK progress for this long is dropped and retried."""
_POLL = 0.2
_FIRST_BACKOFF = 0.05

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


# ---------------------------------------------------------------------- replay


class _Unavailable(Exception):
    """The collector cannot take the replay now; try again later."""

    def __init__(self, reason: str, *, slow: bool = False) -> None:
        super().__init__(reason)
        self.slow = slow


class _Rejected(Exception):
    """The collector refuses this file's batches as they are; set the file aside."""


class _Stopped(Exception):
    """The replayer is stopping."""


class Replayer:
    """A thread that sends spool files to the collector, one at a time, oldest first.

    ``add`` hands it a file this process spooled itself (sent before orphans); it also
    takes over orphans in ``directory`` at start and every ``rescan`` seconds.
    ``on_done(spool)`` runs (in the replayer thread) after a file was fully acknowledged
    and deleted; ``on_unreachable()`` after each failed attempt to reach the collector.
    """

    def __init__(
        self,
        directory: Path,
        socket_path: str,
        host: str,
        *,
        window: int = 16,
        reconnect_max: float = 1.0,
        rescan: float = RESCAN_INTERVAL,
        on_done: Callable[[SpoolFile], None] | None = None,
        on_unreachable: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self.socket_path = socket_path
        self.host = host
        self.window = window
        self.reconnect_max = reconnect_max
        self.rescan = rescan
        self._on_done = on_done
        self._on_unreachable = on_unreachable
        self._lock = threading.Lock()
        self._own: collections.deque[SpoolFile] = collections.deque()
        self._orphans: collections.deque[SpoolFile] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._throttle = LogThrottle(log)

    def start(self, name: str = "qdash-spool") -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, spool: SpoolFile) -> None:
        """Replay ``spool`` (held by this process) before any orphan."""
        with self._lock:
            self._own.append(spool)
        self._wake.set()

    def pending(self) -> int:
        """Batches in the files held here that the collector has not acknowledged."""
        with self._lock:
            return sum(s.pending() for s in (*self._own, *self._orphans))

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread; the files it still holds are released (left for a later client)."""
        self._stop = True
        self._wake.set()
        thread = self._thread
        if thread is None:
            self._release_all()
        elif thread is not threading.current_thread():
            thread.join(timeout)

    def forget_in_child(self) -> None:
        """In a forked child: close the inherited descriptors, touching no lock and no file."""
        for spool in [*self._own, *self._orphans]:
            spool.release()
        self._own.clear()
        self._orphans.clear()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        backoff = _FIRST_BACKOFF
        next_scan = 0.0
        try:
            while not self._stop:
                now = time.monotonic()
                if now >= next_scan:
                    self._scan()
                    next_scan = now + self.rescan
                spool = self._next()
                if spool is None:
                    self._sleep(next_scan - time.monotonic())
                    continue
                try:
                    if self._replay(spool):
                        self._finish(spool)
                    backoff = _FIRST_BACKOFF
                except _Stopped:
                    break
                except _Unavailable as exc:
                    self._throttle.log(
                        "unavailable",
                        logging.WARNING,
                        "qdash_mp spool: cannot replay %s to the collector at %s (%s); "
                        "%d batches wait on disk, retrying",
                        spool.path.name,
                        self.socket_path,
                        exc,
                        spool.pending(),
                    )
                    if self._on_unreachable is not None:
                        self._on_unreachable()
                    self._sleep(self.reconnect_max if exc.slow else backoff)
                    backoff = min(backoff * 2, self.reconnect_max)
                except _Rejected as exc:
                    self._drop(spool)
                    with contextlib.suppress(OSError):
                        aside = spool.set_aside(_REJECTED)
                        log.error(
                            "qdash_mp spool: the collector refuses %s (%s); set aside as %s",
                            spool.path,
                            exc,
                            aside.name,
                        )
                except OSError as exc:
                    log.error("qdash_mp spool: cannot read %s: %s; left for later", spool.path, exc)
                    self._drop(spool)
                    spool.release()
                except Exception:
                    log.exception("qdash_mp spool: unexpected error replaying %s", spool.path)
                    self._sleep(self.reconnect_max)
        finally:
            self._release_all()

    def _scan(self) -> None:
        found = adopt_orphans(self.directory)
        if found:
            with self._lock:
                self._orphans.extend(found)

    def _next(self) -> SpoolFile | None:
        with self._lock:
            if self._own:
                return self._own[0]
            return self._orphans[0] if self._orphans else None

    def _drop(self, spool: SpoolFile) -> None:
        with self._lock:
            for queue in (self._own, self._orphans):
                with contextlib.suppress(ValueError):
                    queue.remove(spool)

    def _finish(self, spool: SpoolFile) -> None:
        self._drop(spool)
        try:
            spool.remove()
        except OSError as exc:
            log.error(
                "qdash_mp spool: %s is replayed but could not be deleted: %s", spool.path, exc
            )
        else:
            log.info(
                "qdash_mp spool: %s replayed (client %s, batches up to %d) and deleted",
                spool.path.name,
                spool.client_id,
                spool.last_seq,
            )
        self._throttle.reset("unavailable")
        if self._on_done is not None:
            self._on_done(spool)

    def _release_all(self) -> None:
        with self._lock:
            spools = [*self._own, *self._orphans]
            self._own.clear()
            self._orphans.clear()
        for spool in spools:
            spool.release()

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and not self._stop:
            self._wake.wait(seconds)
        self._wake.clear()

    # ------------------------------------------------------------------ one connection

    def _replay(self, spool: SpoolFile) -> bool:
        """Send ``spool``'s unapplied batches; True once the collector acknowledged them all."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise _Unavailable(f"no socket: {exc}") from None
        self._sock = sock
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                raise _Unavailable(str(exc)) from None
            sock.settimeout(SEND_TIMEOUT)
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            decoder = FrameDecoder()
            hello = Hello(client_id=spool.client_id, pid=os.getpid(), host=self.host)
            self._send(sock, encode(hello))
            spool.ack(self._welcome(sock, poller, decoder))
            sent = spool.acked
            frames = spool.frames(sent)
            progress = time.monotonic()
            while spool.pending():
                if self._stop:
                    raise _Stopped
                while sent - spool.acked < self.window:
                    item = next(frames, None)
                    if item is None:
                        break
                    sent, frame = item
                    self._send(sock, frame)
                for msg in self._receive(sock, poller, decoder):
                    if isinstance(msg, Ack):
                        if msg.seq > spool.acked:
                            progress = time.monotonic()
                        spool.ack(msg.seq)
                    elif isinstance(msg, ErrorMsg):
                        self._refused(msg)
                    else:
                        raise _Unavailable(f"unexpected {type(msg).__name__} from the collector")
                if time.monotonic() - progress > ACK_TIMEOUT:
                    raise _Unavailable(f"no acknowledgement for {ACK_TIMEOUT:g} s")
            return True
        finally:
            self._sock = None
            sock.close()

    def _welcome(self, sock: socket.socket, poller: select.poll, decoder: FrameDecoder) -> int:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        while time.monotonic() < deadline:
            if self._stop:
                raise _Stopped
            msgs = self._receive(sock, poller, decoder)
            if not msgs:
                continue
            first = msgs[0]
            if isinstance(first, Welcome):
                return first.last_seq
            if isinstance(first, ErrorMsg):
                self._refused(first)
            raise _Unavailable(f"expected WELCOME, got {type(first).__name__}")
        raise _Unavailable(f"no WELCOME within {HANDSHAKE_TIMEOUT:g} s")

    def _refused(self, msg: ErrorMsg) -> None:
        text = f"ERROR {msg.code}: {msg.reason}"
        if msg.code in (ErrorCode.SEQUENCE, ErrorCode.PROTOCOL):
            raise _Rejected(text)
        raise _Unavailable(text, slow=msg.code == ErrorCode.VERSION)

    @staticmethod
    def _send(sock: socket.socket, frame: bytes) -> None:
        try:
            sock.sendall(frame)
        except OSError as exc:
            raise _Unavailable(f"send failed: {exc}") from None

    @staticmethod
    def _receive(sock: socket.socket, poller: select.poll, decoder: FrameDecoder) -> list[Message]:
        try:
            if not poller.poll(_POLL * 1000):
                return []
            data = sock.recv(65536)
        except OSError as exc:
            raise _Unavailable(f"receive failed: {exc}") from None
        if not data:
            raise _Unavailable("closed by the collector")
        try:
            return decoder.feed(data)
        except ProtocolError as exc:
            raise _Unavailable(f"bad frame from the collector: {exc}") from None
