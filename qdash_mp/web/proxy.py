"""Reverse proxies: ``X-Forwarded-*`` honoured only from ``--trusted-proxy`` addresses.

Pure. Behind a TLS proxy the dashboard sees ``http`` from 127.0.0.1; the proxy says what the
browser saw. From a trusted peer (its address inside one of the CIDRs) these headers count:

    X-Forwarded-Proto   http | https         -> request scheme (Secure cookies, Origin checks)
    X-Forwarded-Host    host[:port]          -> request host (links, Host allowlist, Origin)
    X-Forwarded-Prefix  /path                -> prefix of every link and cookie path
    X-Forwarded-For     a, b, c              -> client address: rightmost untrusted hop

From anyone else they are ignored, as is ``--auth-proxy-header``. Values that do not parse
(a prefix with ``..``, a host with ``/``) are ignored too, so a bad proxy config falls back to
the direct view rather than to an attacker-chosen one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from qdash_mp.errors import ConfigError

__all__ = ["LINK_PREFIX", "Forwarded", "TrustedProxies", "forwarded"]

_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$"
)
_PREFIX = re.compile(r"^(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The CIDRs whose peers may set ``X-Forwarded-*`` and the auth proxy header."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        nets: list[Network] = []
        for cidr in cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    f"--trusted-proxy expects an address or CIDR like 127.0.0.1/32, not {cidr!r}"
                ) from None
        self.networks = tuple(nets)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str | None) -> bool:
        """Whether a peer address is inside a trusted network."""
        if not address or not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.networks)


@dataclass(frozen=True, slots=True)
class Forwarded:
    """How the request looked to the client: scheme, host, link prefix, client address."""

    scheme: str
    host: str
    prefix: str
    remote: str | None
    via_proxy: bool


def _first(value: str | None) -> str | None:
    if value is None:
        return None
    first = value.split(",")[0].strip()
    return first or None


def forwarded(
    headers: Mapping[str, str],
    remote: str | None,
    scheme: str,
    host: str,
    proxies: TrustedProxies,
) -> Forwarded:
    """The client's view of a request from ``remote`` (headers honoured if it is trusted)."""
    if not proxies.trusts(remote):
        return Forwarded(scheme, host, "", remote, False)
    proto = (_first(headers.get("X-Forwarded-Proto")) or "").lower()
    if proto in ("http", "https"):
        scheme = proto
    fhost = _first(headers.get("X-Forwarded-Host"))
    if fhost and _HOST.match(fhost):
        host = fhost
    prefix = (headers.get("X-Forwarded-Prefix") or "").strip().rstrip("/")
    if not _PREFIX.match(prefix) or any(s in (".", "..") for s in prefix.split("/")):
        prefix = ""
    client = remote
    hops = [h.strip() for h in (headers.get("X-Forwarded-For") or "").split(",") if h.strip()]
    for hop in reversed(hops):
        client = hop
        if not proxies.trusts(hop):
            break
    return Forwarded(scheme, host, prefix, client, True)


LINK_PREFIX: ContextVar[str] = ContextVar("qdash_mp.link_prefix", default="")
"""The current request's ``X-Forwarded-Prefix`` (set by the access middleware at the start of
every request, so ``Dashboard.urls()`` needs no request argument)."""
