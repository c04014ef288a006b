"""FAILED records for tests of the wire and the journal: a full one, and arrays to spoil."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from qdash_mp.records import FIELDS, FailedRecord, pack_failed_record, pack_payload

__all__ = ["FAILED", "PACKED", "failed_array", "json_like"]

FAILED = FailedRecord(
    job_id="job-1",
    name="send_email",
    payload_raw=pack_payload({"to": "a@example.com", "n": [1, 2, {"deep": b"\x00\xff"}]}),
    attempts=3,
    enqueued_at=1_700_000_000.25,
    queue="mail",
    error="ValueError: boom",
    traceback='Traceback (most recent call last):\n  File "x.py"\nValueError: boom\n',
    failed_at=1_700_000_001.5,
)
PACKED = pack_failed_record(FAILED)

_DEFAULTS = ("j", "n", b"\xc0", 0, None, "q", "e", "", 1.0)  # payload_raw: nil


def failed_array(**changes: Any) -> list[Any]:
    """A valid decoded FAILED array (a nil payload), with ``changes`` to its fields."""
    unknown = changes.keys() - set(FIELDS)
    if unknown:
        raise TypeError(f"not FAILED fields: {sorted(unknown)}")
    return [changes.get(f, d) for f, d in zip(FIELDS, _DEFAULTS, strict=True)]


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5), children, max_size=4)
    ),
    max_leaves=20,
)
"""Any plain payload value (what ``pack_payload`` takes)."""
