"""CSRF protection for the dashboard: a signed double-submit token plus an ``Origin`` check.

Why this scheme: the dashboard keeps no server-side sessions, so the token has to be
verifiable from the request alone. A token is::

    <nonce>.<mac>
    nonce  43 chars  base64url (no padding) of 32 random bytes from ``secrets``
    mac    43 chars  base64url (no padding) of HMAC-SHA256(secret, b"qdash-csrf\\0" + nonce)

``secret`` is 32 random bytes made once per dashboard app (``create_app``), so a token minted
by another app — or by anyone who does not hold the secret — never verifies. Pages set the
token as a cookie (``SameSite=Strict; HttpOnly``, path limited to the dashboard) and embed it
in every form. A mutating request passes only if

1. its ``Origin`` header, when present, is the request's own ``scheme://host[:port]``,
   and ``Sec-Fetch-Site``, when present, is not ``cross-site``;
2. it carries the token in the form field ``csrf_token`` (or the ``X-CSRF-Token`` header),
3. that value equals the cookie (constant-time), and
4. it is validly signed by this app's secret (constant-time).

A missing ``Origin`` is not refused: the token decides. Browsers send ``Origin`` on every
cross-origin POST (form or ``fetch``), so a forged browser request meets check 1; a request
without it comes from a same-origin page or a non-browser client (curl, a script), and such a
client can present a valid cookie+token pair only after reading a dashboard page, which is
what a cross-site attacker cannot do.

The pure functions (``new_secret``, ``new_token``, ``token_valid``, ``tokens_match``,
``same_origin``) know nothing of HTTP; the small aiohttp helpers at the bottom read the
cookie/headers and set the cookie.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from aiohttp import web

__all__ = [
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "check_request",
    "issue_token",
    "new_secret",
    "new_token",
    "same_origin",
    "set_token_cookie",
    "sign",
    "token_valid",
    "tokens_match",
    "unsign",
]

CSRF_COOKIE = "qdash_csrf"
"""Cookie holding the token."""

CSRF_FIELD = "csrf_token"
"""Hidden form field carrying the token."""

CSRF_HEADER = "X-CSRF-Token"
"""Header carrying the token, for JSON clients."""

_SECRET_BYTES = 32
_NONCE_BYTES = 32
_B64_LEN = 43  # base64url of 32 bytes, without padding
_TOKEN_LEN = 2 * _B64_LEN + 1
_CSRF_PURPOSE = b"qdash-csrf"
_SIGN_PURPOSE = b"qdash-signed:"  # sign()/unsign() purposes live under this, apart from CSRF
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        raw = text.encode("ascii")
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None


def _mac(secret: bytes, purpose: bytes, data: str) -> str:
    return _b64(hmac.new(secret, purpose + b"\0" + data.encode("ascii"), hashlib.sha256).digest())


def _bytes(text: str) -> bytes:
    # compare_digest refuses non-ASCII str; header values are arbitrary text
    return text.encode("utf-8", "surrogatepass")


def new_secret() -> bytes:
    """A fresh per-app signing secret."""
    return secrets.token_bytes(_SECRET_BYTES)


def new_token(secret: bytes) -> str:
    """A fresh ``<nonce>.<mac>`` token signed by ``secret``."""
    nonce = _b64(secrets.token_bytes(_NONCE_BYTES))
    return f"{nonce}.{_mac(secret, _CSRF_PURPOSE, nonce)}"


def token_valid(secret: bytes, token: str) -> bool:
    """Whether ``token`` is well formed and signed by ``secret``."""
    if len(token) != _TOKEN_LEN or token[_B64_LEN] != ".":
        return False
    nonce, mac = token[:_B64_LEN], token[_B64_LEN + 1 :]
    if _unb64(nonce) is None or _unb64(mac) is None:
        return False
    return hmac.compare_digest(_bytes(mac), _bytes(_mac(secret, _CSRF_PURPOSE, nonce)))


def tokens_match(secret: bytes, cookie: str | None, submitted: str | None) -> bool:
    """The double-submit check: both present, equal, and signed by ``secret``."""
    if not cookie or not submitted:
        return False
    equal = hmac.compare_digest(_bytes(cookie), _bytes(submitted))
    return equal and token_valid(secret, submitted)


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether an ``Origin`` header names ``scheme://host`` (default ports normalised).

    ``null`` and anything unparsable are not the same origin.
    """
    try:
        theirs = urlsplit(origin)
        ours = urlsplit(f"{scheme}://{host}")
        their_port = theirs.port or _DEFAULT_PORTS.get(theirs.scheme.lower())
        our_port = ours.port or _DEFAULT_PORTS.get(ours.scheme.lower())
    except ValueError:
        return False
    if not theirs.scheme or not theirs.hostname or theirs.path not in ("", "/"):
        return False
    return (
        theirs.scheme.lower() == ours.scheme.lower()
        and theirs.hostname == ours.hostname  # urlsplit lower-cases hostnames
        and their_port == our_port
    )


def sign(secret: bytes, purpose: str, data: str) -> str:
    """``data.<mac>``: ASCII ``data`` signed for ``purpose`` (e.g. flash cookies).

    The MAC input is ``b"qdash-signed:" + purpose + b"\\0" + data``, so no signed value is ever
    a valid CSRF token (and one purpose's values are not another's).
    """
    return f"{data}.{_mac(secret, _SIGN_PURPOSE + purpose.encode('ascii'), data)}"


def unsign(secret: bytes, purpose: str, value: str) -> str | None:
    """The ``data`` of a ``sign()`` result, or ``None`` if the signature does not verify."""
    data, sep, mac = value.rpartition(".")
    if not sep or not data.isascii():
        return None
    expected = _mac(secret, _SIGN_PURPOSE + purpose.encode("ascii"), data)
    return data if hmac.compare_digest(_bytes(mac), _bytes(expected)) else None


# -- aiohttp helpers -------------------------------------------------------------------------


def issue_token(request: web.Request, secret: bytes) -> str:
    """The request's valid token cookie if it has one, else a new token (set it on the reply)."""
    current = request.cookies.get(CSRF_COOKIE)
    if current and token_valid(secret, current):
        return current
    return new_token(secret)


def set_token_cookie(
    response: web.StreamResponse, token: str, path: str, *, secure: bool = False
) -> None:
    """Store ``token`` in the CSRF cookie, scoped to ``path`` (``Secure`` over HTTPS)."""
    response.set_cookie(
        CSRF_COOKIE, token, path=path, httponly=True, samesite="Strict", secure=secure or None
    )


def check_request(request: web.Request, secret: bytes, form: Mapping[str, str]) -> str | None:
    """Why this mutating request fails the CSRF checks, or ``None`` if it passes.

    ``form`` is the already-parsed request body (empty for JSON clients, who send the
    ``X-CSRF-Token`` header instead).
    """
    origin = request.headers.get("Origin")
    if origin is not None and not same_origin(origin, request.scheme, request.host):
        return "cross-origin request refused"
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return "cross-site request refused"
    submitted = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    cookie = request.cookies.get(CSRF_COOKIE)
    if not tokens_match(secret, cookie, submitted):
        return "missing or invalid CSRF token; reload the page and try again"
    return None
