"""Password hashes for ``--basic-auth-file``: scrypt (default) or PBKDF2-SHA256, via hashlib.

Pure, stdlib only. A hash is one ASCII string without ``:`` (so it fits a ``user:hash`` line)::

    scrypt$<n>$<r>$<p>$<salt>$<key>          n, r, p decimal; salt 16 bytes, key 32 bytes
    pbkdf2_sha256$<iterations>$<salt>$<key>  salt 16 bytes, key 32 bytes

``salt`` and ``key`` are base64url without padding. Defaults: scrypt n=2**14, r=8, p=1
(16 MiB, ~50 ms); PBKDF2 600 000 iterations (OWASP 2023). Parameters are bounded when a hash
is parsed (n <= 2**20, iterations <= 10**7) so a hostile file cannot make one check take
minutes. ``verify`` compares with ``hmac.compare_digest`` (constant time).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

__all__ = ["DUMMY_HASH", "PasswordHash", "hash_password", "parse_hash", "verify"]

_SALT = 16
_KEY = 32
_SCRYPT = (2**14, 8, 1)
_PBKDF2_ITERATIONS = 600_000
_MAX_N = 2**20
_MAX_ITERATIONS = 10**7
_MAXMEM = 256 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    raw = text.encode("ascii")
    return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A parsed hash: the scheme, its numeric parameters, salt and derived key."""

    scheme: str
    params: tuple[int, ...]
    salt: bytes
    key: bytes

    def derive(self, password: str) -> bytes:
        secret = password.encode("utf-8")
        if self.scheme == "scrypt":
            n, r, p = self.params
            return hashlib.scrypt(
                secret, salt=self.salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(self.key)
            )
        return hashlib.pbkdf2_hmac("sha256", secret, self.salt, self.params[0], len(self.key))

    def encode(self) -> str:
        nums = "$".join(str(v) for v in self.params)
        return f"{self.scheme}${nums}${_b64(self.salt)}${_b64(self.key)}"


def parse_hash(text: str) -> PasswordHash:
    """The ``PasswordHash`` in ``text``; ``ValueError`` saying what is wrong."""
    parts = text.strip().split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = (int(v) for v in parts[1:4])
            if n < 2 or n & (n - 1) or n > _MAX_N or not 1 <= r <= 64 or not 1 <= p <= 16:
                raise ValueError("scrypt parameters out of range")
            h = PasswordHash("scrypt", (n, r, p), _unb64(parts[4]), _unb64(parts[5]))
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            iterations = int(parts[1])
            if not 1000 <= iterations <= _MAX_ITERATIONS:
                raise ValueError("pbkdf2 iterations out of range")
            h = PasswordHash("pbkdf2_sha256", (iterations,), _unb64(parts[2]), _unb64(parts[3]))
        else:
            raise ValueError("not a scrypt$... or pbkdf2_sha256$... hash")
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"bad base64 in hash: {exc}") from None
    if len(h.salt) < 8 or not 16 <= len(h.key) <= 64:
        raise ValueError("salt or key of a wrong length")
    return h


def hash_password(password: str, scheme: str = "scrypt") -> str:
    """A new hash of ``password`` with a random salt (``scrypt`` or ``pbkdf2_sha256``)."""
    salt = secrets.token_bytes(_SALT)
    if scheme == "scrypt":
        h = PasswordHash("scrypt", _SCRYPT, salt, b"\0" * _KEY)
    elif scheme == "pbkdf2_sha256":
        h = PasswordHash(scheme, (_PBKDF2_ITERATIONS,), salt, b"\0" * _KEY)
    else:
        raise ValueError(f"unknown scheme {scheme!r}; use scrypt or pbkdf2_sha256")
    return PasswordHash(h.scheme, h.params, salt, h.derive(password)).encode()


DUMMY_HASH = PasswordHash("scrypt", _SCRYPT, b"qdash-dummy-salt", b"\0" * _KEY)
"""Checked against for unknown users, so a wrong name costs as long as a wrong password."""


def verify(password: str, stored: PasswordHash) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time comparison of the keys)."""
    return hmac.compare_digest(stored.derive(password), stored.key)
