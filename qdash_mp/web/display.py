"""How values look on the pages and in JSON: dates, rates, clipped errors, pretty payloads.

Pure functions; ``template_env()`` registers them as Jinja filters. Job data is hostile, so
the environment autoescapes everything and fails on undefined names.
"""

from __future__ import annotations

import json
import pprint
from datetime import UTC, datetime
from typing import Any

import jinja2
import markupsafe

from qdash_mp.web.urls import addressable

__all__ = [
    "clip",
    "duration",
    "epoch",
    "jsonable",
    "pretty",
    "rate",
    "template_env",
    "visible",
    "when",
]

_LIST_ERROR_CHARS = 200
_PAYLOAD_MAX_CHARS = 64 * 1024


def _invisible() -> dict[int, str]:
    # C0 (but tab and newline), DEL, C1, and the format characters that reorder or hide text
    # (bidi embeddings/overrides/isolates, marks, zero-width ones, line/paragraph separators).
    codes = [*range(0x20), *range(0x7F, 0xA0), 0x061C, *range(0x200B, 0x2010)]
    codes += [*range(0x2028, 0x202F), *range(0x2060, 0x2065), *range(0x2066, 0x206A), 0xFEFF]
    return {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in codes if c not in (9, 10)}


_INVISIBLE = _invisible()


def visible(value: Any) -> Any:
    """Text with control and bidi/format characters written as ``\\xNN`` / ``\\uNNNN``.

    Job data is hostile: a U+202E in an id or error would reorder what the operator reads, a
    NUL would cut it. Applied to every ``{{ }}`` output (the environment's ``finalize``);
    markup and non-text values pass through.
    """
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        return value.translate(_INVISIBLE)
    return value


def when(value: datetime | None) -> str:
    """A datetime as ``YYYY-MM-DD HH:MM:SS UTC`` (an em dash for ``None``)."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def epoch(value: float) -> str:
    """Epoch seconds as ``when()`` shows them; the number itself if out of range."""
    try:
        return when(datetime.fromtimestamp(value, UTC))
    except (OverflowError, OSError, ValueError):
        return str(value)


def clip(text: str, limit: int = _LIST_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rate(per_second: float) -> str:
    """A throughput in jobs/s: two decimals, so one job a minute still shows (``0.02``)."""
    return f"{per_second:,.2f}"


def duration(seconds: float | None) -> str:
    """A runtime for people: ``850 µs``, ``12.5 ms``, ``3.20 s``, ``4m 05s`` (``—``: none)."""
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:,.1f} ms"
    if seconds < 60:
        return f"{seconds:,.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def pretty(payload: Any) -> str:
    """Payload as indented JSON (falling back to ``pprint``), cut at a readable size.

    A payload that is itself a JSON document (text or bytes holding an object or array) is
    shown as that document, indented.
    """
    if isinstance(payload, (str, bytes)):
        try:
            decoded = json.loads(payload)
        except (ValueError, RecursionError):
            decoded = None
        if isinstance(decoded, (dict, list)):
            payload = decoded
    try:
        text = json.dumps(payload, indent=2, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = pprint.pformat(payload, width=100)
    if len(text) > _PAYLOAD_MAX_CHARS:
        text = text[:_PAYLOAD_MAX_CHARS] + f"\n… ({len(text) - _PAYLOAD_MAX_CHARS} more chars)"
    return text


def jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold (bytes, odd keys) turned into text."""
    try:
        return json.loads(json.dumps(value, default=repr))
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def template_env() -> jinja2.Environment:
    """The dashboard's Jinja environment over ``qdash_mp/templates``, filters registered."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("qdash_mp", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=visible,
    )
    env.filters["num"] = lambda n: f"{n:,}"
    env.filters["rate"] = rate
    env.filters["when"] = when
    env.filters["epoch"] = epoch
    env.filters["clip"] = clip
    env.filters["duration"] = duration
    env.tests["addressable"] = addressable
    return env
