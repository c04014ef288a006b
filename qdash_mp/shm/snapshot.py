"""The stats snapshot file: a whole table on disk for a clean restart (encode, decode, I/O).

On a clean shutdown the collector ``save``\\ s the table to this file and then removes the
segment; ``create_or_attach(..., restore_from=path)`` loads it when it has to create a new
table. The file is written to a temporary name, fsynced, renamed over ``path`` and the
directory fsynced, so ``path`` is always a whole snapshot, old or new::

    offset  size  field
    0       8     magic, the bytes b"QDASHSNP"
    8       4     format version, 2 (big-endian unsigned)
    12      4     CRC-32 (``zlib.crc32``) of the body (big-endian unsigned)
    16      8     body length B (big-endian unsigned); the file is exactly 24 + B bytes
    24      B     body: one msgpack map
                    "window":   int, the throughput window in seconds (R - 1)
                    "started":  int, Unix second the table began counting
                    "saved_at": int, Unix second of the save
                    "queues":   array of [name: bin (UTF-8, surrogatepass, the stored form),
                                          record: array of L ints, the record of ``stats``:
                                          counters, started, ring, runtime and wait
                                          histograms (``stats.record_len``)]
                    "clients":  array of [id: bin (UTF-8, surrogatepass), seq: int,
                                          second: int], least recently updated first

Format 1 (before ``started`` and the histograms: records of ``4 + 2R`` ints) is still read
and converted (``started`` and ``active`` 0, empty histograms), so a clean stop carries the
counters over an upgrade. A file that does not verify (magic, version, length, CRC,
structure, value ranges) or that was saved with another window is renamed to
``path + ".bad"`` with a warning, and the table starts empty. A file that cannot be written
raises ``SnapshotError`` and leaves any previous file as it was. Which wins when both a
segment and a file exist: see ``docs/shm.md``.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack

from qdash_mp.errors import ShmError, SnapshotError
from qdash_mp.fsio import write_atomically
from qdash_mp.histogram import NBUCKETS
from qdash_mp.shm.layout import CLIENT_ID_MAX, NAME_MAX
from qdash_mp.stats import record_len

__all__ = [
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_VERSION",
    "BadSnapshot",
    "Content",
    "decode",
    "encode",
    "load",
    "save",
]

log = logging.getLogger("qdash_mp.shm")

SNAPSHOT_MAGIC: Final = b"QDASHSNP"
SNAPSHOT_VERSION: Final = 2
_CONVERTED_VERSIONS: Final = (1,)
_HEAD = struct.Struct(">8sIIQ")
_INT64 = range(-(2**63), 2**63)


class BadSnapshot(ShmError):
    """A snapshot file that does not verify (handled by ``load``: set aside, start empty)."""


@dataclass(frozen=True)
class Content:
    """A table's contents outside shared memory: what ``save`` writes and a restore loads."""

    window: int
    started: int
    saved_at: int
    queues: list[tuple[bytes, list[int]]]
    """(stored name as UTF-8, record), in directory order."""
    clients: list[tuple[bytes, int, int]]
    """(id as UTF-8, last seq, second of its last update), least recently updated first."""


def encode(content: Content) -> bytes:
    """The snapshot file's bytes (see the table above)."""
    body: bytes = msgpack.packb(
        {
            "window": content.window,
            "started": content.started,
            "saved_at": content.saved_at,
            "queues": [[name, record] for name, record in content.queues],
            "clients": [[raw_id, seq, second] for raw_id, seq, second in content.clients],
        },
        use_bin_type=True,
    )
    head = _HEAD.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, zlib.crc32(body), len(body))
    return head + body


def decode(raw: bytes, window: int) -> Content:
    """Verify and decode a snapshot file saved with a ``window`` s window; ``BadSnapshot``."""
    if len(raw) < _HEAD.size:
        raise BadSnapshot(f"{len(raw)} bytes is too short for a header")
    magic, version, crc, length = _HEAD.unpack_from(raw)
    body = raw[_HEAD.size :]
    if magic != SNAPSHOT_MAGIC:
        raise BadSnapshot("bad magic (not a qdash_mp stats snapshot)")
    if version != SNAPSHOT_VERSION and version not in _CONVERTED_VERSIONS:
        raise BadSnapshot(f"format version {version}, this qdash_mp reads {SNAPSHOT_VERSION}")
    if length != len(body):
        raise BadSnapshot(f"the header announces {length} body bytes, the file has {len(body)}")
    if zlib.crc32(body) != crc:
        raise BadSnapshot("CRC mismatch (the file is damaged)")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadSnapshot(f"undecodable body: {exc or type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise BadSnapshot("the body is not a map")
    saved_window = _int(obj, "window")
    if saved_window != window:
        raise BadSnapshot(f"saved with a {saved_window} s throughput window, not {window} s")
    rs = record_len(window + 1)
    if version == 1:  # 4 counters + 2R ring slots: insert started and active, append buckets
        rs = 4 + 2 * (window + 1)
    queues: list[tuple[bytes, list[int]]] = []
    names: set[bytes] = set()
    for row in _list(obj, "queues"):
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], bytes)):
            raise BadSnapshot("a queue row is not [name, record]")
        name, record = row
        _utf8(name, "queue name")
        if len(name) > NAME_MAX or name in names:
            raise BadSnapshot(f"queue name {name[:40]!r}... is too long or repeated")
        if not (isinstance(record, list) and len(record) == rs and all(map(_is_int64, record))):
            raise BadSnapshot(f"the record of queue {name[:40]!r} is not {rs} int64s")
        names.add(name)
        if version == 1:
            record = [*record[:4], 0, 0, *record[4:], *[0] * (2 * NBUCKETS)]
        queues.append((name, record))
    clients: list[tuple[bytes, int, int]] = []
    ids: set[bytes] = set()
    for row in _list(obj, "clients"):
        if not (
            isinstance(row, list)
            and len(row) == 3
            and isinstance(row[0], bytes)
            and _is_int64(row[1])
            and _is_int64(row[2])
            and row[1] >= 0
        ):
            raise BadSnapshot("a client row is not [id, seq >= 0, second]")
        raw_id, seq, second = row
        if not 1 <= len(_utf8(raw_id, "client id")) <= CLIENT_ID_MAX or raw_id in ids:
            raise BadSnapshot(f"client id {raw_id[:40]!r} is too long, empty or repeated")
        ids.add(raw_id)
        clients.append((raw_id, seq, second))
    return Content(window, _int(obj, "started"), _int(obj, "saved_at"), queues, clients)


def _is_int64(value: object) -> bool:
    return type(value) is int and value in _INT64


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not _is_int64(value):
        raise BadSnapshot(f"{key!r} is missing or not an int64")
    assert isinstance(value, int)
    return value


def _list(obj: dict[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise BadSnapshot(f"{key!r} is missing or not an array")
    return value


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise BadSnapshot(f"a {what} is not UTF-8: {exc}") from None


def load(path: Path, window: int) -> Content | None:
    """The snapshot at ``path`` if there is one and it verifies; a bad one is set aside."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read stats snapshot %s (%s): counters start from 0", path, exc)
        return None
    try:
        return decode(raw, window)
    except BadSnapshot as exc:
        bad = path.with_name(path.name + ".bad")
        try:
            os.replace(path, bad)
        except OSError as err:
            aside = f"could not move it aside: {err}"
        else:
            aside = f"moved it to {bad}"
        log.warning(
            "stats snapshot %s is unusable (%s); %s; counters start from 0", path, exc, aside
        )
        return None


def save(path: Path, content: Content, table: str) -> None:
    """Write ``content`` to ``path`` atomically; ``SnapshotError`` if it cannot be written.

    On failure the temporary file is removed and a previous ``path`` is left as it was (the
    rename is the last step), so nothing on disk gets worse; ``table`` names the table in
    the message.
    """
    try:
        write_atomically(path, encode(content))
    except OSError as exc:
        raise SnapshotError(
            f"cannot save shared stats {table!r} to {path}: {exc}; the counters are still "
            "in shared memory (keep the segment: the next start reattaches it)"
        ) from exc
