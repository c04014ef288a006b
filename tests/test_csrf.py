"""The pure CSRF token logic: signing, verification, double-submit matching, origin checks."""

from __future__ import annotations

import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdash_mp.web.csrf import (
    new_secret,
    new_token,
    same_origin,
    sign,
    token_valid,
    tokens_match,
    unsign,
)


def test_new_secret_is_random_and_long() -> None:
    a, b = new_secret(), new_secret()
    assert len(a) == 32
    assert a != b


def test_token_verifies_only_with_its_secret() -> None:
    secret, other = new_secret(), new_secret()
    token = new_token(secret)
    assert token_valid(secret, token)
    assert not token_valid(other, token)
    assert new_token(secret) != token  # fresh nonce every time


def test_token_shape_is_cookie_and_form_safe() -> None:
    token = new_token(new_secret())
    nonce, mac = token.split(".")
    assert len(nonce) == len(mac) == 43
    assert token.isascii()
    assert all(c.isalnum() or c in "-_." for c in token)


def test_tampered_tokens_fail() -> None:
    secret = new_secret()
    token = new_token(secret)
    nonce, mac = token.split(".")
    flipped = "A" if mac[0] != "A" else "B"
    other_nonce = new_token(secret).split(".")[0]
    for bad in (
        f"{nonce}.{flipped}{mac[1:]}",  # mac changed
        f"{other_nonce}.{mac}",  # nonce swapped
        f"{nonce}{mac}",  # separator gone
        f"{nonce}.{mac}=",  # too long
        token[:-1],  # too short
        f"{nonce}:{mac}",  # wrong separator
        "",
        ".",
        "é" * 87,
        f"{nonce}.{mac[:-1]}é",
        f"{nonce[:-1]}!.{mac}",
    ):
        assert not token_valid(secret, bad), bad


@given(st.text(max_size=200))
def test_token_valid_never_raises(text: str) -> None:
    assert token_valid(b"k" * 32, text) in (True, False)


def test_tokens_match_is_double_submit() -> None:
    secret, other = new_secret(), new_secret()
    token = new_token(secret)
    assert tokens_match(secret, token, token)
    assert not tokens_match(secret, None, token)  # no cookie
    assert not tokens_match(secret, token, None)  # no field
    assert not tokens_match(secret, "", "")
    assert not tokens_match(secret, token, new_token(secret))  # both valid, not equal
    foreign = new_token(other)
    assert not tokens_match(secret, foreign, foreign)  # equal, signed by someone else
    assert not tokens_match(secret, "x", "x")
    assert not tokens_match(secret, "é\udcff", "é\udcff")  # odd text does not raise


def test_constant_time_compare_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    secret = new_secret()
    token = new_token(secret)
    assert tokens_match(secret, token, token)
    assert len(calls) == 2  # cookie == field, then the signature


@pytest.mark.parametrize(
    ("origin", "scheme", "host", "same"),
    [
        ("http://127.0.0.1:8700", "http", "127.0.0.1:8700", True),
        ("http://localhost", "http", "localhost:80", True),
        ("https://Example.COM", "https", "example.com:443", True),
        ("https://example.com/", "https", "example.com", True),
        ("http://[::1]:8700", "http", "[::1]:8700", True),
        ("http://127.0.0.1:8701", "http", "127.0.0.1:8700", False),
        ("https://127.0.0.1:8700", "http", "127.0.0.1:8700", False),
        ("http://evil.example", "http", "127.0.0.1:8700", False),
        ("http://example.com.evil", "http", "example.com", False),
        ("null", "http", "127.0.0.1:8700", False),
        ("", "http", "127.0.0.1:8700", False),
        ("http://[::1", "http", "127.0.0.1:8700", False),
        ("http://x:99999", "http", "x", False),
        ("http://example.com/path", "http", "example.com", False),
        ("http://127.0.0.1:8700", "http", "", False),
    ],
)
def test_same_origin(origin: str, scheme: str, host: str, same: bool) -> None:
    assert same_origin(origin, scheme, host) is same


@given(st.text(max_size=100), st.text(max_size=50))
def test_same_origin_never_raises(origin: str, host: str) -> None:
    assert same_origin(origin, "http", host) in (True, False)


def test_sign_and_unsign_are_purpose_bound() -> None:
    secret = new_secret()
    signed = sign(secret, "flash", "aGVsbG8")
    assert unsign(secret, "flash", signed) == "aGVsbG8"
    assert unsign(secret, "other", signed) is None
    assert unsign(new_secret(), "flash", signed) is None
    assert unsign(secret, "flash", signed + "x") is None
    assert unsign(secret, "flash", "no-dot") is None
    assert unsign(secret, "flash", "é.x") is None
    # a CSRF token is not a valid signed value and vice versa
    token = new_token(secret)
    assert unsign(secret, "flash", token) is None
    assert not token_valid(secret, sign(secret, "qdash-csrf", "a" * 43))
