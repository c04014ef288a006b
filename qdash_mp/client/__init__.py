"""The worker side: hooks, the sender and its session, and the spool for a collector away.

    hooks.py         ``Client``: the hot path (cumulative counters) and the public API
    tally.py         the hooks' counters (``itertools.count``) and how the sender reads them
    options.py       ``Client``'s arguments checked -> the sender's config
    record.py        a failed job -> its packed FAILED record
    batcher.py       cumulative counts + records -> BATCH frames (pure)
    session.py       one stream's connection state machine (HELLO/WELCOME, ACKs, resend,
                     backoff, ERROR, REQUEUE), shared by the sender and the replayer
    sender.py        the sender thread: ticks, flushes, spooling, retiring an id
    requeue.py       REQUEUE requests: which queues, the callback's thread
    spool_format.py  the spool file's bytes (pure)
    spool.py         spool files: create, append, lock, adopt orphans
    replay.py        the replayer thread: spool files -> a session
    process.py       atexit, fork and multiprocessing hooks

See ``docs/client.md`` for how they fit together.
"""

from qdash_mp.client.hooks import Client
from qdash_mp.client.locked import _LockedClient
from qdash_mp.client.replay import Replayer
from qdash_mp.client.spool import SUFFIX, SpoolFile, adopt_orphans, file_stem
from qdash_mp.client.spool_format import (
    FORMAT_VERSION,
    MAGIC,
    MAX_ID_BYTES,
    RECORD_HEAD,
    RecordRef,
    ScanResult,
    SpoolCorrupt,
    decode_header,
    encode_header,
    encode_record,
    scan,
)

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_ID_BYTES",
    "RECORD_HEAD",
    "SUFFIX",
    "Client",
    "RecordRef",
    "Replayer",
    "ScanResult",
    "SpoolCorrupt",
    "SpoolFile",
    "_LockedClient",
    "adopt_orphans",
    "decode_header",
    "encode_header",
    "encode_record",
    "file_stem",
    "scan",
]
