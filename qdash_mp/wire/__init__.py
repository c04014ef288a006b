"""The collector wire protocol: frames, messages and strict decoding. Pure, no I/O.

Workers' ``Client`` objects and the collector daemon talk over a Unix stream socket in
*frames* (``frames``: the length header and ``FrameDecoder``), each one message (``messages``:
the seven bodies and their parsing), turned into bytes and back by ``codec``. A FAILED
record inside BATCH and REQUEUE is ``qdash_mp.records``, shared with the journal. Anything
malformed is refused with a ``ProtocolError`` whose text says what was wrong;
``docs/protocol.md`` is the long-form description, with hex dumps.
"""

from qdash_mp.records import (
    MAX_DEPTH,
    MAX_FRAME,
    MAX_ID,
    MAX_INT,
    MAX_ITEMS,
    MAX_NAME,
    MAX_TIMESTAMP,
    MIN_INT,
    FailedRecord,
    PackedFailed,
    check_failed,
    check_payload,
    pack_failed,
    pack_failed_fields,
    pack_failed_record,
    pack_payload,
    unpack_failed,
)
from qdash_mp.wire.codec import HEADER, decode_body, encode, encode_batch
from qdash_mp.wire.frames import FrameDecoder
from qdash_mp.wire.messages import (
    ALL_QUEUES,
    MAX_CLIENT_ID,
    MAX_DELTA,
    MAX_REASON,
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Counts,
    ErrorCode,
    ErrorMsg,
    Hello,
    Message,
    MsgType,
    Requeue,
    RequeueResult,
    UnsupportedVersion,
    Welcome,
)

__all__ = [
    "ALL_QUEUES",
    "HEADER",
    "MAX_CLIENT_ID",
    "MAX_DELTA",
    "MAX_DEPTH",
    "MAX_FRAME",
    "MAX_ID",
    "MAX_INT",
    "MAX_ITEMS",
    "MAX_NAME",
    "MAX_REASON",
    "MAX_TIMESTAMP",
    "MIN_INT",
    "PROTOCOL_VERSION",
    "Ack",
    "Batch",
    "Counts",
    "ErrorCode",
    "ErrorMsg",
    "FailedRecord",
    "FrameDecoder",
    "Hello",
    "Message",
    "MsgType",
    "PackedFailed",
    "Requeue",
    "RequeueResult",
    "UnsupportedVersion",
    "Welcome",
    "check_failed",
    "check_payload",
    "decode_body",
    "encode",
    "encode_batch",
    "pack_failed",
    "pack_failed_fields",
    "pack_failed_record",
    "pack_payload",
    "unpack_failed",
]
