"""The ``Host`` allowlist (DNS rebinding) and the ``Origin`` check of mutating requests.

Pure. A page on ``evil.example`` whose DNS name is rebound to 127.0.0.1 talks to the dashboard
same-origin *to itself*: its requests carry ``Host: evil.example``, which is how they are told
apart. Only names in the allowlist are answered (421 otherwise, before any handler runs);
defaults are the bound address, ``localhost``, ``127.0.0.1`` and ``[::1]``; ``--allowed-host``
adds names. Ports are not compared: whoever can reach the port is answered by this process
anyway, and a proxy may publish it on another port.

A mutating request that carries ``Origin`` must name an allowed host, and be same-origin with
the (possibly proxy-forwarded) scheme and host; ``Origin: null`` is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["DEFAULT_HOSTS", "HostAllowlist", "host_name"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str | None:
    """The lower-case name of a ``Host`` value (port and IPv6 brackets dropped), or None."""
    if not host or any(c in host for c in "/?#@\\ \t"):
        return None
    try:
        parts = urlsplit(f"//{host}")
        _ = parts.port  # raises on a non-numeric port
    except ValueError:
        return None
    name = parts.hostname
    return name.rstrip(".") if name else None


def _entry_name(entry: str) -> str | None:
    """An allowlist entry (``name``, ``name:port``, ``::1``, ``[::1]``) as a host name."""
    entry = entry.strip()
    if entry.count(":") > 1 and not entry.startswith("["):
        return entry.lower()  # a bare IPv6 address
    return host_name(entry)


class HostAllowlist:
    """The set of host names this dashboard answers to."""

    def __init__(self, names: Iterable[str] = (), *, defaults: bool = True) -> None:
        wanted = [*(DEFAULT_HOSTS if defaults else ()), *names]
        self.names = frozenset(n for n in (_entry_name(x) for x in wanted) if n)

    def __repr__(self) -> str:
        return f"HostAllowlist({sorted(self.names)!r})"

    def allows(self, host: str) -> bool:
        """Whether a ``Host`` header value names an allowed host."""
        name = host_name(host)
        return name is not None and name in self.names

    def allows_origin(self, origin: str) -> bool:
        """Whether an ``Origin`` value is ``http(s)://`` an allowed host (``null`` is not)."""
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme.lower() not in ("http", "https") or parts.path not in ("", "/"):
            return False
        return self.allows(parts.netloc)
