"""Authentication: bearer token, basic-auth users, signed session cookies, a trusted proxy's
header; and the login rate limit.

Pure apart from hashlib (no HTTP objects; the access middleware feeds it header values).

Credentials, in the order they are looked at:

1. ``Authorization: Bearer <token>`` (``--auth-token-file``), compared in constant time;
2. ``Authorization: Basic`` (``--basic-auth-file``): scrypt/PBKDF2, a wrong user name costs
   as much as a wrong password (``DUMMY_HASH``); successful checks are remembered by an HMAC
   of name and password (not the password) so an API client does not pay scrypt per request;
3. the session cookie set by the login form (``--auth-token-file`` token or a user's password);
4. ``--auth-proxy-header`` from a ``--trusted-proxy`` peer (the caller checks the peer).

Session cookie value (``csrf.sign`` with purpose ``session``, so it is never a CSRF token)::

    <b64url(user)>~<method>~<expires unix seconds>~<nonce>.<mac>

The secret is the app's (random per start), so a restart logs everyone out; logout deletes
the cookie. Failed attempts count per client address: after ``max_failures`` within
``window`` seconds every credentialed attempt from it answers 429 until the window passes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from qdash_mp.access_settings import ACTIONS, User
from qdash_mp.web import csrf
from qdash_mp.web.authz import Identity
from qdash_mp.web.passwords import DUMMY_HASH, PasswordHash, parse_hash, verify

__all__ = ["SESSION_COOKIE", "Authenticator", "BadCredentials", "RateLimiter"]

SESSION_COOKIE = "qdash_session"
_PURPOSE = "session"
_CACHE = 256


class BadCredentials(Exception):
    """Credentials were presented and are wrong (401)."""


@dataclass
class RateLimiter:
    """Failures per key (client address) in a sliding window; bounded memory."""

    max_failures: int = 5
    window: float = 60.0
    max_keys: int = 10_000
    _fails: OrderedDict[str, list[float]] = field(default_factory=OrderedDict)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        times = [t for t in self._fails.get(key, ()) if now - t < self.window]
        if times:
            self._fails[key] = times
        else:
            self._fails.pop(key, None)
        if len(times) < self.max_failures:
            return 0.0
        return max(0.0, times[0] + self.window - now)

    def failure(self, key: str, now: float) -> None:
        self._fails.setdefault(key, []).append(now)
        self._fails.move_to_end(key)
        while len(self._fails) > self.max_keys:
            self._fails.popitem(last=False)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> str | None:
    try:
        raw = text.encode("ascii")
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4)).decode("utf-8")
    except (UnicodeError, binascii.Error, ValueError):
        return None


class Authenticator:
    """Checks credentials against the configured token, users and session secret."""

    def __init__(
        self,
        secret: bytes,
        *,
        token: str | None = None,
        users: tuple[User, ...] = (),
        proxy_header: str | None = None,
        session_ttl: float = 12 * 3600.0,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._secret = secret
        self._token = token.encode("utf-8") if token else None
        self._users: Mapping[str, tuple[PasswordHash, frozenset[str]]] = {
            u.name: (parse_hash(u.hash), u.actions) for u in users
        }
        self.proxy_header = proxy_header
        self.session_ttl = session_ttl
        self.limiter = limiter if limiter is not None else RateLimiter()
        self._ok: OrderedDict[bytes, None] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._token or self._users or self.proxy_header)

    @property
    def has_token(self) -> bool:
        return self._token is not None

    @property
    def has_users(self) -> bool:
        return bool(self._users)

    # -- checks (constant-time where a secret is compared) -----------------------------------

    def check_token(self, token: str) -> Identity:
        if self._token is None or not hmac.compare_digest(token.encode("utf-8"), self._token):
            raise BadCredentials("wrong token")
        return Identity("token", "token")

    def check_password(self, user: str, password: str) -> Identity:
        """Slow (scrypt/PBKDF2): call off the event loop."""
        entry = self._users.get(user)
        key = hmac.new(self._secret, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        if entry is not None and key in self._ok:
            self._ok.move_to_end(key)
            return Identity(user, "basic", entry[1])
        if entry is None:
            verify(password, DUMMY_HASH)
            raise BadCredentials("wrong user or password")
        if not verify(password, entry[0]):
            raise BadCredentials("wrong user or password")
        self._ok[key] = None
        while len(self._ok) > _CACHE:
            self._ok.popitem(last=False)
        return Identity(user, "basic", entry[1])

    @staticmethod
    def parse_basic(value: str) -> tuple[str, str]:
        """``Basic <b64(user:password)>`` -> (user, password); ``BadCredentials`` if junk."""
        try:
            decoded = base64.b64decode(value.encode("ascii"), validate=True).decode("utf-8")
        except (UnicodeError, binascii.Error, ValueError):
            raise BadCredentials("unreadable basic credentials") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise BadCredentials("unreadable basic credentials")
        return user, password

    def proxy_identity(self, user: str) -> Identity:
        """The identity a trusted proxy vouched for (actions from the users file if listed)."""
        entry = self._users.get(user)
        return Identity(user, "proxy", entry[1] if entry else frozenset(ACTIONS))

    # -- sessions ---------------------------------------------------------------------------

    def new_session(self, identity: Identity, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.session_ttl)
        nonce = secrets.token_urlsafe(12)
        data = f"{_b64(identity.user)}~{identity.method}~{expires}~{nonce}"
        return csrf.sign(self._secret, _PURPOSE, data)

    def session(self, value: str, now: float | None = None) -> Identity | None:
        """The identity of a valid, unexpired session cookie, else ``None``."""
        data = csrf.unsign(self._secret, _PURPOSE, value)
        if data is None:
            return None
        parts = data.split("~")
        if len(parts) != 4 or not parts[2].isdigit():
            return None
        user, method = _unb64(parts[0]), parts[1]
        if user is None or int(parts[2]) <= (time.time() if now is None else now):
            return None
        if method == "token" and self._token is not None:
            return Identity(user, "session")
        entry = self._users.get(user)
        if method == "basic" and entry is not None:  # a user removed from the file is out
            return Identity(user, "session", entry[1])
        return None
