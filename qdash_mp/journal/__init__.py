"""The failed-job journal: an append-only, checksummed, fsync'd store of dead-lettered jobs.

``Journal`` (``store``) ties the parts together; ``GroupCommit`` lets asyncio tasks share
its fsyncs. The record format is in ``format`` (byte tables there), reading it back in
``scan``, the in-memory index in ``index``, opening and repair in ``recovery``, staging
and retention in ``staging``, compaction in ``compaction``. The filter columns are
in ``columns`` (kept in step) and ``matching`` (queries). The story is in
``docs/journal.md``. Every name code or tests import is re-exported here.
"""

from __future__ import annotations

from qdash_mp.fsio import FileIO
from qdash_mp.journal.compaction import COMPACTION_STEPS, SimulatedCrash
from qdash_mp.journal.format import (
    COMMIT_SIZE,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    REASONS,
    Buffer,
    FailedFields,
    Op,
    Problem,
    RecordType,
    SegmentHeader,
    append_record,
    commit_record,
    decode_failed,
    decode_op,
    encode_client_seq,
    encode_removed,
    flushed_payload,
    frame_records,
    header_size,
    read_header,
    read_record,
    record_header,
    segment_record,
)
from qdash_mp.journal.group_commit import GroupCommit
from qdash_mp.journal.recovery import Cut, RecoveryReport, Repaired, Skipped
from qdash_mp.journal.scan import BatchReader, classify_last_commit, find_commit, find_record
from qdash_mp.journal.store import (
    DEFAULT_COMPACT_MIN_BYTES,
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_JOBS,
    DEFAULT_SEGMENT_BYTES,
    ERROR_PREVIEW,
    Journal,
)

__all__ = [
    # the store
    "COMPACTION_STEPS",
    "DEFAULT_COMPACT_MIN_BYTES",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_JOBS",
    "DEFAULT_SEGMENT_BYTES",
    "ERROR_PREVIEW",
    "Cut",
    "FileIO",
    "GroupCommit",
    "Journal",
    "RecoveryReport",
    "Repaired",
    "SimulatedCrash",
    "Skipped",
    # the record format
    "COMMIT_SIZE",
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "MAX_PAYLOAD",
    "REASONS",
    "BatchReader",
    "Buffer",
    "FailedFields",
    "Op",
    "Problem",
    "RecordType",
    "SegmentHeader",
    "append_record",
    "classify_last_commit",
    "commit_record",
    "decode_failed",
    "decode_op",
    "encode_client_seq",
    "encode_removed",
    "find_commit",
    "find_record",
    "flushed_payload",
    "frame_records",
    "header_size",
    "read_header",
    "read_record",
    "record_header",
    "segment_record",
]
