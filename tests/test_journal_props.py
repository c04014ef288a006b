"""Property tests of the journal against an in-memory model.

The model is two ordered dicts: ``committed`` (what ``len``/``page``/``get`` must show) and
``pending`` (committed plus everything staged: what ``stage_removed`` checks against and
what the next commit makes durable). Failing, retrying, forgetting, flushing, committing,
compacting, reopening and crashing (dropping the files without a commit) are interleaved at
random, with a retention limit small enough to prune.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qdash_mp.errors import NotFound, ProtocolError
from qdash_mp.journal import (
    BatchReader,
    Journal,
    Problem,
    RecordType,
    append_record,
    commit_record,
    decode_failed,
    encode_removed,
)
from qdash_mp.models import FailedJob, Job
from qdash_mp.records import (
    MAX_TIMESTAMP,
    FailedRecord,
    check_failed,
    pack_failed,
    pack_payload,
)

T0 = 1_700_000_000.0
MAX_JOBS = 3
_SHM = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)


class JournalModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="qjp-", dir=_SHM))
        self.path = self.root / "journal"
        self.tick = 0
        self.journal = self._open()
        self.committed: dict[str, FailedJob] = {}
        self.pending: dict[str, FailedJob] = {}
        self.seqs: dict[str, int] = {}
        self.pending_seqs: dict[str, int] = {}

    def _open(self) -> Journal:
        return Journal.open(self.path, max_jobs=MAX_JOBS, clock=lambda: T0 + 60, segment_bytes=4096)

    @rule(
        key=st.sampled_from([f"j{i}" for i in range(5)]),
        error=texts,
        trace=texts,
        payload=payloads,
        attempts=st.integers(0, 2**40),
    )
    def fail(self, key: str, error: str, trace: str, payload: Any, attempts: int) -> None:
        self.tick += 1
        failed = FailedJob(
            id=key,
            queue="q" + key[-1],
            job=Job(id=key, name="task", payload=payload, attempts=attempts),
            error=error,
            failed_at=datetime.fromtimestamp(T0 + self.tick, UTC),
            traceback=trace,
        )
        self.journal.stage_failed(failed)
        self.pending.pop(key, None)
        self.pending[key] = failed
        while len(self.pending) > MAX_JOBS:  # retention: the oldest goes
            del self.pending[next(iter(self.pending))]

    @rule(key=st.sampled_from([f"j{i}" for i in range(5)]), retried=st.booleans())
    def remove(self, key: str, retried: bool) -> None:
        reason = "retried" if retried else "forgotten"
        if key in self.pending:
            self.journal.stage_removed(key, reason)
            del self.pending[key]
        else:
            with pytest.raises(NotFound):
                self.journal.stage_removed(key, reason)

    @rule()
    def flush(self) -> None:
        self.journal.stage_flush()
        self.pending.clear()

    @rule(client=st.sampled_from(["a", "b"]), seq=st.integers(0, 50))
    def client_seq(self, client: str, seq: int) -> None:
        self.journal.stage_client_seq(client, seq)
        self.pending_seqs[client] = max(seq, self.pending_seqs.get(client, -1))

    @rule()
    def commit(self) -> None:
        self.journal.commit()
        self.committed = dict(self.pending)
        self.seqs = dict(self.pending_seqs)

    @rule()
    def compact(self) -> None:
        self.journal.compact()  # staged records stay staged

    @rule()
    def reopen(self) -> None:
        self.journal.close()  # commits what is staged
        self.committed = dict(self.pending)
        self.seqs = dict(self.pending_seqs)
        self.journal = self._open()
        assert self.journal.recovery.bytes_cut == 0

    @rule()
    def crash(self) -> None:
        self.journal._abandon()  # kill -9: staged records are lost, committed ones stay
        self.pending = dict(self.committed)
        self.pending_seqs = dict(self.seqs)
        self.journal = self._open()

    @precondition(lambda self: self.committed)
    @rule(data=st.data())
    def read_one(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.committed)))
        assert self.journal.get(key) == self.committed[key]

    @invariant()
    def shows_what_is_committed(self) -> None:
        journal = self.journal
        newest = list(reversed(self.committed))
        assert len(journal) == len(newest)
        assert [v.id for v in journal.page(0, 100)] == newest
        assert [v.id for v in journal.page(2, 3)] == newest[2:5]
        assert journal.client_seqs == self.seqs
        for key in newest:
            assert key in journal

    def teardown(self) -> None:
        self.journal.close()
        shutil.rmtree(self.root, ignore_errors=True)


TestJournalModel = JournalModel.TestCase
TestJournalModel.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- the pure format -----------------------------------------------------------------------

ids = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20)


@st.composite
def failed_fields(draw: st.DrawFn) -> tuple[Any, ...]:
    """Any FAILED record within the rules (``protocol.check_failed``)."""
    return (
        draw(ids),
        draw(texts),
        draw(payloads.map(pack_payload)),
        draw(st.integers(-(2**63), 2**63 - 1)),
        draw(st.none() | st.floats(-MAX_TIMESTAMP, MAX_TIMESTAMP)),
        draw(ids),
        draw(texts),
        draw(texts),
        draw(st.floats(0.0, MAX_TIMESTAMP)),
    )


BREAKS: list[tuple[int, Any]] = [
    (0, ""),
    (0, "i" * 1025),
    (1, None),
    (2, "not bin"),
    (2, b""),
    (2, b"\xc0\xc0"),
    (2, b"\xd4\x05\x00"),  # an ext type
    (2, b"\x91" * 33 + b"\xc0"),  # nested too deep
    (3, True),
    (3, 2**63),
    (4, 1),
    (4, float("inf")),
    (5, ""),
    (5, "q" * 256),
    (6, b"e"),
    (7, None),
    (8, -0.5),
    (8, float("nan")),
    (8, 1e300),
]


@settings(max_examples=100, deadline=None)
@given(fields=failed_fields(), broken=st.sampled_from(BREAKS))
def test_the_failed_record_refuses_what_recovery_would(
    fields: tuple[Any, ...], broken: tuple[int, Any]
) -> None:
    # The journal stores FAILED arrays packed by the wire's pack_failed (one set of rules).
    record = pack_failed(FailedRecord(*fields))
    assert check_failed(msgpack.unpackb(record)) == ""
    index, value = broken
    bad = list(fields)
    bad[index] = value
    with pytest.raises(ProtocolError, match="FAILED"):
        pack_failed(FailedRecord(*bad))


def _journal_bytes(batches: list[list[tuple[Any, ...]]]) -> tuple[bytes, list[int]]:
    """Batches of FAILED and REMOVED records, each closed by a COMMIT; and the batch ends."""
    buf = bytearray()
    ends = []
    for batch in batches:
        start = len(buf)
        for fields in batch:
            append_record(buf, RecordType.FAILED, pack_failed(FailedRecord(*fields)))
            append_record(buf, RecordType.REMOVED, encode_removed(fields[0], "retried"))
        buf += commit_record(start, 2 * len(batch))
        ends.append(len(buf))
    return bytes(buf), ends


batches_st = st.lists(st.lists(failed_fields(), min_size=1, max_size=3), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(batches=batches_st)
def test_committed_batches_read_back_exactly(batches: list[list[tuple[Any, ...]]]) -> None:
    data, _ends = _journal_bytes(batches)
    reader = BatchReader(data, 0, len(data))
    for batch in batches:
        got = reader.read_batch()
        assert got is not None
        start, ops = got
        offset = start
        for fields, (failed_op, removed_op) in zip(
            batch, zip(ops[::2], ops[1::2], strict=True), strict=True
        ):
            assert failed_op[:2] == (RecordType.FAILED, fields[0])
            assert failed_op[3] == fields[8]
            record = data[offset + 9 : offset + failed_op[2]]
            assert tuple(getattr(decode_failed(record), f) for f in FIELDS) == fields
            assert removed_op[:2] == (RecordType.REMOVED, fields[0])
            assert removed_op[3] == "retried"
            offset += failed_op[2] + removed_op[2]
    assert reader.read_batch() is None
    assert reader.problem is None


@settings(max_examples=150, deadline=None)
@given(batches=batches_st, data=st.data())
def test_a_cut_anywhere_yields_exactly_the_whole_batches(
    batches: list[list[tuple[Any, ...]]], data: st.DataObject
) -> None:
    raw, ends = _journal_bytes(batches)
    cut = data.draw(st.integers(0, len(raw)))
    reader = BatchReader(raw[:cut], 0, cut)
    read = 0
    while reader.read_batch() is not None:
        read += 1
    assert read == sum(1 for e in ends if e <= cut)
    assert reader.committed == (ends[read - 1] if read else 0)
    if reader.committed < cut:
        assert isinstance(reader.problem, Problem)
        assert reader.problem.offset >= reader.committed
    else:
        assert reader.problem is None


FIELDS = (
    "id",
    "name",
    "payload_raw",
    "attempts",
    "enqueued_at",
    "queue",
    "error",
    "traceback",
    "failed_at",
)
