"""One-shot flash messages ("Retried job 7.") carried to the next page in a signed cookie.

The cookie value is ``csrf.sign(secret, "qdash-flash", b64url(json([level, text, expires])))``:
a forged, altered or expired cookie reads as no message. It lives ``FLASH_TTL`` seconds and
is deleted by the page that shows it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from aiohttp import web

from qdash_mp.web import csrf

__all__ = ["FLASH_COOKIE", "FLASH_TTL", "Flash", "decode_flash", "encode_flash", "set_flash"]

FLASH_COOKIE = "qdash_flash"
FLASH_TTL = 60
"""Seconds a flash message stays readable."""

_FLASH_PURPOSE = "qdash-flash"
_FLASH_MAX_TEXT = 300


@dataclass(frozen=True, slots=True)
class Flash:
    """A one-shot message shown on the next page: ``level`` is ``ok`` or ``error``."""

    level: str
    text: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encode_flash(secret: bytes, level: str, text: str, now: float) -> str:
    """The signed cookie value for a message shown until ``now + FLASH_TTL``."""
    if len(text) > _FLASH_MAX_TEXT:
        text = text[: _FLASH_MAX_TEXT - 1] + "…"
    body = json.dumps([level, text, int(now) + FLASH_TTL], ensure_ascii=True)
    return csrf.sign(secret, _FLASH_PURPOSE, _b64(body.encode("ascii")))


def decode_flash(secret: bytes, value: str, now: float) -> Flash | None:
    """The message in a cookie value, or ``None`` if it is forged, malformed or expired."""
    data = csrf.unsign(secret, _FLASH_PURPOSE, value)
    if data is None:
        return None
    try:
        level, text, expires = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    except (binascii.Error, ValueError, TypeError):
        return None
    if level not in ("ok", "error") or not isinstance(text, str) or not isinstance(expires, int):
        return None
    return Flash(level, text) if now <= expires else None


def set_flash(
    response: web.StreamResponse,
    secret: bytes,
    flash: Flash,
    path: str,
    now: float,
    *,
    secure: bool,
) -> None:
    """Put ``flash`` on ``response`` as a cookie scoped to the dashboard's ``path``."""
    response.set_cookie(
        FLASH_COOKIE,
        encode_flash(secret, flash.level, flash.text, now),
        path=path,
        max_age=FLASH_TTL,
        httponly=True,
        samesite="Strict",
        secure=secure or None,
    )
