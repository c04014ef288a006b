"""The spool file's byte format (``qdash_mp.client.spool_format``): pure bytes, no files.

Every truncation and every bit flip of a small file, records that do not follow, bad
headers, and the docstring's byte table and hex dump checked against the encoder.
"""

from __future__ import annotations

import re
import struct

import pytest

from qdash_mp.client import spool_format
from qdash_mp.client.spool_format import (
    RECORD_HEAD,
    SpoolCorrupt,
    decode_header,
    encode_header,
    encode_record,
    scan,
)
from qdash_mp.wire import Ack, Batch, encode


def batch_frame(seq: int, counters: dict[str, tuple[int, int, int, int]] | None = None) -> bytes:
    return encode(Batch(seq=seq, counters=counters or {"q": (seq, 0, 0, 0)}))


def spool_bytes(client_id: str, seqs: range) -> bytes:
    return encode_header(client_id) + b"".join(encode_record(s, batch_frame(s)) for s in seqs)


def docstring_dump() -> bytes:
    """The bytes of the hex dump under "Example" in the module docstring."""
    doc = spool_format.__doc__
    assert doc is not None
    example = doc[doc.index("Example") :]
    hexes = [
        m.group(1) for m in re.finditer(r"^    ((?:[0-9a-f]{2} )*[0-9a-f]{2})  ", example, re.M)
    ]
    assert hexes, "no hex dump in the docstring"
    return bytes.fromhex(" ".join(hexes))


def test_docstring_hex_dump_is_what_the_encoder_writes() -> None:
    frame = batch_frame(1, {"q": (1, 0, 0, 0)})
    assert docstring_dump() == encode_header("ab") + encode_record(1, frame)


def table_rows(doc: str, title: str) -> dict[str, tuple[int, int]]:
    """``field: (offset, size)`` of the fixed-size rows of the docstring table ``title``."""
    block = doc[doc.index(title) :].split("\n\n", 1)[0]
    rows = re.findall(r"^    (\d+)\s+(\d+)\s+(\w+)", block, re.M)
    return {field: (int(offset), int(size)) for offset, size, field in rows}


def struct_rows(layout: struct.Struct, names: list[str]) -> dict[str, tuple[int, int]]:
    codes = re.findall(r"\d*[a-zA-Z]", layout.format.lstrip("<"))
    rows, offset = {}, 0
    for name, code in zip(names, codes, strict=True):
        size = struct.calcsize("<" + code)
        rows[name] = (offset, size)
        offset += size
    return rows


def test_docstring_tables_match_the_structs() -> None:
    doc = spool_format.__doc__
    assert doc is not None
    header = table_rows(doc, "header, once, at offset 0")
    assert header == struct_rows(spool_format._HEAD, ["magic", "version", "n"])
    record = table_rows(doc, "records, one per batch")
    assert record == struct_rows(RECORD_HEAD, ["crc", "seq", "N"])
    assert "16      N     frame" in doc
    assert RECORD_HEAD.size == 16


def test_docstring_example_bytes() -> None:
    frame = batch_frame(1, {"q": (1, 0, 0, 0)})
    assert frame.hex(" ") == "00 00 00 0c 94 03 01 81 a1 71 94 01 00 00 00 90"
    data = encode_header("ab") + encode_record(1, frame)
    assert data[:14].hex(" ") == "51 44 53 50 4f 4f 4c 00 01 00 02 00 61 62"
    assert data[22:34].hex(" ") == "01 00 00 00 00 00 00 00 10 00 00 00"
    assert len(data) == 18 + RECORD_HEAD.size + len(frame)


def test_header_and_records_round_trip() -> None:
    data = spool_bytes("abc", range(3, 8))
    result = scan(data)
    assert result.client_id == "abc"
    assert result.problem is None
    assert result.end == len(data)
    assert [r.seq for r in result.records] == [3, 4, 5, 6, 7]
    for r in result.records:
        assert data[r.offset : r.end] == batch_frame(r.seq)
    assert decode_header(data) == ("abc", result.header_size)


def test_every_truncation_keeps_exactly_the_whole_records() -> None:
    data = spool_bytes("trunc", range(1, 5))
    full = scan(data)
    header = full.header_size
    for cut in range(header, len(data) + 1):
        result = scan(data[:cut])
        whole = [r for r in full.records if r.end <= cut]
        assert result.records == whole, cut
        assert result.end == (whole[-1].end if whole else header)
        assert (result.problem is None) == (cut == result.end), cut
    for cut in range(header):
        with pytest.raises(SpoolCorrupt):
            scan(data[:cut])


def test_every_bit_flip_is_caught() -> None:
    data = spool_bytes("flip", range(1, 4))
    full = scan(data)
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            if i < full.header_size:
                with pytest.raises(SpoolCorrupt):
                    scan(bytes(bad))
                continue
            result = scan(bytes(bad))
            assert result.problem is not None, (i, bit)
            # Only records wholly before the flipped byte survive, byte for byte.
            assert all(r.end <= i for r in result.records), (i, bit)
            assert result.records == [r for r in full.records if r.end <= i]


def test_records_that_do_not_follow_or_do_not_match_are_cut() -> None:
    head = encode_header("x")
    gap = head + encode_record(1, batch_frame(1)) + encode_record(3, batch_frame(3))
    result = scan(gap)
    assert [r.seq for r in result.records] == [1]
    assert result.problem is not None
    assert "does not follow" in result.problem

    mismatch = head + encode_record(1, batch_frame(1)) + encode_record(2, batch_frame(5))
    result = scan(mismatch)
    assert [r.seq for r in result.records] == [1]
    assert result.problem is not None
    assert "holds batch 5" in result.problem

    not_batch = head + encode_record(1, encode(Ack(seq=1)))
    result = scan(not_batch)
    assert result.records == []
    assert result.problem is not None
    assert "not a BATCH" in result.problem
    assert scan(not_batch, verify=False).records != []  # checksum and length alone pass


def test_bad_headers_are_refused() -> None:
    good = encode_header("abc")
    with pytest.raises(SpoolCorrupt, match="not a spool file"):
        scan(b"JUNKJUNK" + good[8:])
    with pytest.raises(SpoolCorrupt, match="checksum"):
        scan(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match="client_id"):
        encode_header("")
    with pytest.raises(ValueError, match="seq"):
        encode_record(0, batch_frame(1))
