"""Redis key names of the hub (issue 13). Pure: strings only, no I/O.

Every key starts with a prefix (``DEFAULT_PREFIX``, ``"qdash:"``); ``{host}`` is the host
name a collector publishes under (``--host-name``, default the machine's hostname)::

    key                      type     content (encodings in qdash_mp.hub.format)
    qdash:seq                HASH     host -> last applied publish seq (decimal int)
    qdash:hosts              HASH     host -> host info (msgpack map)
    qdash:q:{host}           HASH     queue -> queue record (msgpack map)
    qdash:w:{host}           STRING   workers list (msgpack array of maps)
    qdash:hm:{host}:{queue}  HASH     minute start (decimal unix s) -> history point; 24 h kept
    qdash:hh:{host}:{queue}  HASH     hour start (decimal unix s) -> history point; 30 days kept
    qdash:hq:{host}          SET      queues that have history keys (so a reader need not SCAN)
    qdash:fi:{host}          ZSET     failed id -> failed_at (unix s, the journal's exact float)
    qdash:fj:{host}          HASH     failed id -> FAILED record bytes (the journal's, copied)
    qdash:fall               ZSET     "{host}\\x00{id}" -> failed_at, every host
    qdash:fseq               STRING   counter: the last failed-entry arrival sequence (INCR)
    qdash:fseqz              ZSET     "{host}\\x00{id}" -> its arrival sequence (new or changed
                                      record); the hub's failed-list snapshots bound on it
    qdash:frmz               ZSET     "{host}\\x00{id}" -> the fseq value of its removal (INCR
                                      too); the last 100,000 removals (hub mirrors follow it)
    qdash:frmlo              STRING   the highest removal sequence trimmed from frmz
    qdash:fepoch             STRING   random id of this fseq's run (set by the hub if missing:
                                      a Redis that lost fseq loses it too, old snapshots fail)
    qdash:cmd:{host}         STREAM   hub -> host commands (op, id, req, by, at)
    qdash:res:{req}          STRING   host -> hub command result (msgpack map), TTL 1 h

Host names and queue names are used verbatim inside keys (Redis keys are binary-safe); a
host name may not contain NUL (the ``qdash:fall`` separator) or ``:`` (keeps ``hm:{host}:{q}``
unambiguous for a reader that splits), and is at most ``MAX_HOST`` characters.
"""

from __future__ import annotations

from typing import Final

from qdash_mp.errors import ConfigError

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_HOST",
    "RESULT_TTL",
    "Keys",
    "check_host",
]

DEFAULT_PREFIX: Final = "qdash:"
MAX_HOST: Final = 255
RESULT_TTL: Final = 3600
"""Seconds a command result (``res:{req}``) is kept."""


def check_host(host: str) -> str:
    """``host`` if it can name a host in the hub's keys; ``ConfigError`` otherwise."""
    if not host or len(host) > MAX_HOST:
        raise ConfigError(f"host name must be 1..{MAX_HOST} characters, not {host!r}")
    if "\x00" in host or ":" in host:
        raise ConfigError(f"host name {host!r} must not contain ':' or NUL")
    return host


class Keys:
    """The key names under one ``prefix`` (``Keys().q("web1")`` == ``"qdash:q:web1"``)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    @property
    def seq(self) -> str:
        return f"{self.prefix}seq"

    @property
    def hosts(self) -> str:
        return f"{self.prefix}hosts"

    @property
    def fall(self) -> str:
        return f"{self.prefix}fall"

    @property
    def fseq(self) -> str:
        return f"{self.prefix}fseq"

    @property
    def fseqz(self) -> str:
        return f"{self.prefix}fseqz"

    @property
    def frmz(self) -> str:
        return f"{self.prefix}frmz"

    @property
    def frmlo(self) -> str:
        return f"{self.prefix}frmlo"

    @property
    def fepoch(self) -> str:
        return f"{self.prefix}fepoch"

    def q(self, host: str) -> str:
        return f"{self.prefix}q:{host}"

    def w(self, host: str) -> str:
        return f"{self.prefix}w:{host}"

    def hm(self, host: str, queue: str) -> str:
        return f"{self.prefix}hm:{host}:{queue}"

    def hh(self, host: str, queue: str) -> str:
        return f"{self.prefix}hh:{host}:{queue}"

    def hq(self, host: str) -> str:
        return f"{self.prefix}hq:{host}"

    def fi(self, host: str) -> str:
        return f"{self.prefix}fi:{host}"

    def fj(self, host: str) -> str:
        return f"{self.prefix}fj:{host}"

    def cmd(self, host: str) -> str:
        return f"{self.prefix}cmd:{host}"

    def res(self, req: str) -> str:
        return f"{self.prefix}res:{req}"
