"""The failed list's snapshot token: what the operator saw, signed so it cannot be widened. Pure.

A page of the failed list is taken at a *high-water mark* ``seq`` of the store's append
sequence (every stored failure has one; a new failure, or a job failing again, gets a higher
one). Jobs with ``seq < hw`` are what the page counted; later failures are not. The token is::

    <epoch>.<hw>.<mac>     epoch: the store's run id (hex; a restarted collector has another)
                           hw: decimal; mac: first 16 bytes of HMAC-SHA256(secret,
                           "qdash-snapshot:<epoch>:<hw>"), URL-safe base64 without padding

Signed with the dashboard's secret (the CSRF one): a client cannot raise ``hw`` to take in
failures it never saw. Bulk actions, the flush and the pager use it; an old epoch or a bad mac
is a ``ValueError`` (the web layer answers 400: reload the page).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Final

__all__ = ["SnapshotError", "sign", "verify"]

_TOKEN: Final = re.compile(r"^([0-9a-f]{1,32})\.([0-9]{1,19})\.([A-Za-z0-9_-]{22})$")


class SnapshotError(ValueError):
    """A snapshot token that is malformed, forged, or from another run of the store."""


def _mac(secret: bytes, epoch: str, hw: int) -> str:
    digest = hmac.new(secret, f"qdash-snapshot:{epoch}:{hw}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode("ascii")


def sign(secret: bytes, epoch: str, hw: int) -> str:
    """The token of high-water mark ``hw`` in store run ``epoch``."""
    return f"{epoch}.{hw}.{_mac(secret, epoch, hw)}"


def verify(secret: bytes, epoch: str, token: str) -> int:
    """The high-water mark in ``token``; ``SnapshotError`` unless it is genuine and current."""
    m = _TOKEN.match(token)
    if m is None:
        raise SnapshotError("malformed snapshot token")
    tok_epoch, hw_text, mac = m.groups()
    hw = int(hw_text)
    if not hmac.compare_digest(mac, _mac(secret, tok_epoch, hw)):
        raise SnapshotError("snapshot token does not verify")
    if tok_epoch != epoch:
        raise SnapshotError(
            "the snapshot is from an earlier run of the collector; reload the list and try again"
        )
    return hw
