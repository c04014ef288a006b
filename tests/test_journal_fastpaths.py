"""The journal's cheap paths agree with their plain twins.

- ``Columns._texts`` (a batch of short ASCII errors in one join/lower/encode) gives the same
  blob and offsets as ``_texts_plain`` (each error prefixed, case-folded, encoded alone),
  for ASCII, non-ASCII, long and mixed batches;
- ``Columns._file`` (a one-code batch as one range) files the same slots as one by one;
- the narrow int columns widen (``fit``) without changing what any filter selects;
- a code's slot list built late (first query, one pass) equals one kept in step since the
  start (both the one-byte ``translate`` build and the wider columns' one);
- ``stage_failed_packed`` with the wire decoder's ``metas`` (the collector's path) gives the
  same filter pages and totals as without them (decoded from the bytes), before and after
  reopening; both wire decode paths hand the same ``metas`` on.
"""

from __future__ import annotations

import contextlib
import errno
import random
from array import array
from pathlib import Path

import pytest

from qdash_mp.errors import JournalError, NotFound
from qdash_mp.failed_filter import FailedFilter
from qdash_mp.fsio import FileIO
from qdash_mp.journal import Journal
from qdash_mp.journal.columns import ERROR_KEY, Columns
from qdash_mp.records import pack_failed_fields
from qdash_mp.strict_msgpack import unpackb
from qdash_mp.wire.codec import decode_body, encode_batch
from qdash_mp.wire.messages import Batch, parse
from tests.qdash_testing.journal import T0

ASCII = ["ValueError: Bad Input", "TimeoutError: GATEWAY timeout", "KeyError: 'user'", ""]
OTHER = ["Ünïcode FEHLER", "straße ﬁle", "İstanbul", "emoji 🎉 BOOM"]
SURROGATE = ["x\udcffy"]  # a str a FailedJob may hold, though no wire record can


def _errors(rng: random.Random, n: int, pool: list[str]) -> list[str]:
    out = []
    for i in range(n):
        e = rng.choice(pool) + f" #{i}"
        if rng.random() < 0.1:
            e = e * (ERROR_KEY // max(1, len(e)) + 2)  # longer than ERROR_KEY
        out.append(e)
    return out


def _plain_blob(errors: list[str]) -> tuple[bytes, list[int]]:
    texts = [e[:ERROR_KEY].casefold().encode("utf-8", "surrogatepass") for e in errors]
    offs, pos = [], 0
    for t in texts:
        offs.append(pos)
        pos += len(t)
    return b"".join(texts), offs


@pytest.mark.parametrize(
    "pool", [ASCII, OTHER + SURROGATE, ASCII + OTHER], ids=["ascii", "other", "mixed"]
)
def test_texts_fast_path_matches_plain(pool: list[str]) -> None:
    rng = random.Random(7)
    cols = Columns()
    every: list[str] = []
    for size in [1, 5, 40, 200, 0, 3]:
        errors = _errors(rng, size, pool)
        if pool is ASCII and size == 40:
            errors[3] = "A" * (ERROR_KEY + 5)  # ASCII but too long: the plain path
        cols._texts(errors)
        every += errors
    blob, offs = _plain_blob(every)
    assert bytes(cols.blob) == blob
    assert list(cols.eoff) == offs
    for p, e in enumerate(every):
        assert cols.text_of(p) == e[:ERROR_KEY].casefold().encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("ncodes", [1, 3, 8, 9, 50])
def test_file_few_codes_matches_one_by_one(ncodes: int) -> None:
    rng = random.Random(ncodes)
    lists: list[array[int]] = [array("i") for _ in range(ncodes)]
    live = [0] * ncodes
    ref: list[list[int]] = [[] for _ in range(ncodes)]
    p0 = 0
    for k in [1, 17, 300, 2]:
        codes = [rng.randrange(ncodes) for _ in range(k)]
        Columns._file(codes, p0, lists, live)
        for i, c in enumerate(codes):
            ref[c].append(p0 + i)
        p0 += k
    assert [list(a) for a in lists] == ref
    assert live == [len(r) for r in ref]


def _packed(
    i: int, rng: random.Random, nq: int, nn: int, queue: str | None = None
) -> tuple[bytes, str, float]:
    jid = f"j{rng.randrange(400)}"
    at = T0 + i
    data = pack_failed_fields(
        jid,
        f"name{rng.randrange(nn)}",
        b"\xc0",
        1,
        None,
        queue or f"queue{rng.randrange(nq)}",
        rng.choice(ASCII + OTHER) + f" #{i}",
        "",
        at,
    )
    return data, jid, at


def _filters(rng: random.Random, nq: int, nn: int) -> list[FailedFilter]:
    out = [
        FailedFilter(),
        FailedFilter(q="timeout"),
        FailedFilter(q="STRASSE"),
        FailedFilter(q="#1"),
        FailedFilter(after=T0 + 100, before=T0 + 900),
    ]
    for _ in range(12):
        out.append(
            FailedFilter(
                queue=f"queue{rng.randrange(nq)}" if rng.random() < 0.7 else None,
                name=f"name{rng.randrange(nn)}" if rng.random() < 0.5 else None,
                q=rng.choice([None, "bad", "é", "#2", "🎉"]),
                after=rng.choice([None, T0 + rng.randrange(1000)]),
            )
        )
    return out


def _results(j: Journal, filters: list[FailedFilter]) -> list[tuple[list[str], int]]:
    out = []
    for f in filters:
        rows, total, _hw = j.query(f, 0, 1000)
        out.append(([r.id for r in rows], total))
        rows, total2, _hw = j.query(f, 7, 5)
        out.append(([r.id for r in rows], total2))
    return out


@pytest.mark.parametrize(("nq", "nn"), [(3, 4), (300, 70000)], ids=["narrow", "widened"])
def test_staging_with_wire_metas_matches_decoding(tmp_path: Path, nq: int, nn: int) -> None:
    """The collector's path (metas from the wire decode) and the plain one (the journal
    decodes the bytes) give the same pages and totals; with 300 queues and up to 70,000
    names the code columns widen on the way ('B' -> 'H' -> 'I')."""
    rng = random.Random(nq)
    batches = []
    n = 0
    while n < 1200:
        k = rng.choice([1, 3, 16, 40, 150])
        recs = [_packed(n + i, rng, nq, nn) for i in range(k)]
        seq = len(batches) + 2
        batches.append(decode_body(encode_batch(seq, {}, [r[0] for r in recs])[4:]))
        n += k
    if nn > 1000:  # many distinct names: make sure the name codes go past 2**16
        many = [
            (pack_failed_fields(f"m{i}", f"x{i}", b"\xc0", 1, None, "q", "e", "", T0), f"m{i}", T0)
            for i in range(66000)
        ]
        batches.insert(0, Batch(1, {}, tuple(many)))
    removing = {b.seq for b in batches if isinstance(b, Batch) and rng.random() < 0.2}
    journals = []
    for twin in ("wire", "plain"):
        j = Journal.open(tmp_path / twin, max_jobs=10**6, clock=lambda: T0 + 2000)
        journals.append(j)
        for b in batches:
            assert isinstance(b, Batch)
            if twin == "wire" and b.metas is not None:
                j.stage_failed_packed(b.failed, b.metas)
            else:
                j.stage_failed_packed(b.failed)
            j.commit()
            if b.seq in removing:  # removals too (kills, and then squeezes)
                for id in {r[1] for r in b.failed[: len(b.failed) // 2]}:
                    with contextlib.suppress(NotFound):
                        j.stage_removed(id, "forgotten")
                j.commit()
    rng = random.Random(1)
    filters = _filters(rng, nq, nn)
    wire, plain = journals
    if nn > 1000:
        assert wire._index.cols.nc.typecode in ("I", "q")
        assert wire._index.cols.qc.typecode == "H"
    assert _results(wire, filters) == _results(plain, filters)
    expected = _results(plain, filters)
    for j in journals:
        j.close()
    again = Journal.open(tmp_path / "wire", max_jobs=10**6, clock=lambda: T0 + 2000)
    try:
        assert _results(again, filters) == expected
    finally:
        again.close()


def test_staging_refuses_metas_of_another_length(tmp_path: Path) -> None:
    rec = _packed(0, random.Random(0), 1, 1)
    with Journal.open(tmp_path / "j") as j:
        with pytest.raises(ValueError, match="1 metas for 2 records"):
            j.stage_failed_packed([rec, rec], [("q", "n", "e")])
        assert j.staged == 0


def test_both_wire_decode_paths_hand_on_the_same_metas() -> None:
    rng = random.Random(3)
    recs = [_packed(i, rng, 4, 4) for i in range(30)]
    frame = encode_batch(5, {"q": (1, 0, 0, 0)}, [r[0] for r in recs])
    fast = decode_body(frame[4:])  # the one-pass BATCH decoder
    general = parse(unpackb(frame[4:], len(frame), 10**6), 10**6, 32)  # the general one
    assert isinstance(fast, Batch)
    assert isinstance(general, Batch)
    want = tuple((r[5], r[1], r[6]) for r in (unpackb(d, len(d), 100) for d, _, _ in recs))
    assert fast.metas == want
    assert general.metas == want
    assert fast == general  # metas are not part of equality


class _FailSyncOnce(FileIO):
    """Real I/O, except that the ``n``-th fdatasync fails once with EIO."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def fdatasync(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.EIO, "injected fsync failure")
        super().fdatasync(fd)


def test_a_failed_commit_keeps_each_record_with_its_metas(tmp_path: Path) -> None:
    """Records re-staged in front after a failed commit keep their own (queue, name,
    error): the same filter results as a journal whose commits all went through."""
    rng = random.Random(5)
    batches = []
    for b in range(6):
        recs = [_packed(100 * b + i, rng, 4, 4) for i in range(rng.choice([2, 20]))]
        batches.append(decode_body(encode_batch(b + 1, {}, [r[0] for r in recs])[4:]))
    io = _FailSyncOnce(0)
    faulty = Journal.open(tmp_path / "faulty", io=io, clock=lambda: T0 + 2000)
    plain = Journal.open(tmp_path / "plain", clock=lambda: T0 + 2000)
    try:
        io.n = io.calls + 2  # the second commit below fails
        failures = 0
        for b in batches:
            assert isinstance(b, Batch)
            for j in (faulty, plain):
                j.stage_failed_packed(b.failed, b.metas)
                try:
                    j.commit()
                except JournalError:
                    assert j is faulty
                    failures += 1
        assert failures == 1
        faulty.commit()
        filters = _filters(random.Random(2), 4, 4)
        assert _results(faulty, filters) == _results(plain, filters)
    finally:
        faulty.close()
        plain.close()


def test_code_lists_built_late_match_lists_kept_in_step(tmp_path: Path) -> None:
    """A queue's / name's slot list is built by the first query that needs it, then kept in
    step by appends and dropped by squeezes: a journal queried after every batch (lists
    built early, then extended) and one queried only at the end (built in one pass) give
    the same pages and totals."""
    rng = random.Random(11)
    filters = [f for f in _filters(random.Random(4), 6, 5) if f.queue or f.name]
    early = Journal.open(tmp_path / "early", clock=lambda: T0 + 5000)
    late = Journal.open(tmp_path / "late", clock=lambda: T0 + 5000)
    try:
        for b in range(30):
            k = rng.choice([1, 4, 30])
            # half of the batches of one queue: ``_file``'s range path
            one = f"queue{rng.randrange(6)}" if rng.random() < 0.5 else None
            recs = [_packed(100 * b + i, rng, 6, 5, one) for i in range(k)]
            gone = {r[1] for r in recs[: k // 3]} if b % 4 == 3 else set()
            for j in (early, late):
                j.stage_failed_packed(recs)
                j.commit()
                for id in sorted(gone):
                    with contextlib.suppress(NotFound):
                        j.stage_removed(id, "forgotten")
                j.commit()
                j._index.maybe_rebuild()
            _results(early, filters)
        assert early._index.cols.q_slots.count(None) < len(early._index.cols.q_slots)
        assert late._index.cols.q_slots.count(None) == len(late._index.cols.q_slots)
        assert _results(late, filters) == _results(early, filters)
    finally:
        early.close()
        late.close()
