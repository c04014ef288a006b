"""``build_access``: ``create_app``'s keyword arguments and ``AccessSettings`` -> ``Access``."""

from __future__ import annotations

from collections.abc import Iterable

from qdash_mp.access_settings import AccessSettings
from qdash_mp.audit import AuditLog, MemoryAuditLog
from qdash_mp.web.access import Access, Health
from qdash_mp.web.auth import Authenticator
from qdash_mp.web.authz import Authorize
from qdash_mp.web.hosts import HostAllowlist
from qdash_mp.web.proxy import TrustedProxies

__all__ = ["build_access"]


def build_access(
    settings: AccessSettings | None,
    secret: bytes,
    *,
    read_only: bool = False,
    authorize: Authorize | None = None,
    allowed_hosts: Iterable[str] | None = None,
    audit: AuditLog | None = None,
    health: Health | None = None,
) -> Access:
    """The checks of one app; keyword arguments add to (never loosen) ``settings``."""
    s = settings if settings is not None else AccessSettings()
    names = [*s.allowed_hosts, *(allowed_hosts or ())]
    hosts = None if "*" in names else HostAllowlist(names)
    auth = Authenticator(
        secret,
        token=s.token,
        users=s.users,
        proxy_header=s.proxy_header,
        session_ttl=s.session_ttl,
    )
    return Access(
        auth=auth,
        hosts=hosts,
        proxies=TrustedProxies(s.trusted_proxies),
        read_only=read_only or s.read_only,
        authorize=authorize,
        audit=audit if audit is not None else MemoryAuditLog(),
        metrics_public=s.metrics_public,
        health=health,
    )
