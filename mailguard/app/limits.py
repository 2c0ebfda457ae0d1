"""Connection limits: open connections counted in total and per client IP.

``[limits] max_connections`` and ``max_connections_per_ip`` are enforced with one
:class:`ConnectionLimiter` per listener kind: the MX (``smtp``), submission
(``submission`` and ``submissions``) and POP3 (``pop3`` and ``pop3s``) each count
their own, so a flood of idle connections to port 25 leaves submission free for
staff.  A client is an IPv4 address or an IPv6 /64 (:func:`client_key`).  This
module imports nothing from Twisted at run time.

``[limits] memory_budget`` is one :class:`MemoryBudget` shared by every SMTP
session of a process: the octets of unfinished messages held in memory (with
``[server] workers`` each process has its own).

With ``[server] workers`` above 1 the counts live in the first process and the
others ask it over a pipe (:class:`mailguard.app.state.RemoteLimiter`): their
``admit`` answers later, with a Deferred.  :class:`Limiter` is what a listener
uses of either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from mailguard.core.clients import client_key

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = ["ConnectionLimiter", "Limiter", "MemoryBudget", "PER_IP", "TOTAL", "client_key"]

TOTAL = "total"
PER_IP = "per_ip"


class Limiter(Protocol):
    """Admits and releases connections: :class:`ConnectionLimiter` here, or a remote one."""

    def admit(self, ip: str) -> str | None | Deferred[str | None]:
        """Count a new connection; which limit refuses it (``TOTAL``/``PER_IP``), or None."""

    def release(self, ip: str) -> None:
        """Forget one admitted connection."""


class ConnectionLimiter:
    """Counts open connections in total and per client IP."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total_limit = total
        self.per_ip_limit = per_ip
        self.total = 0
        self.by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        """Count a new connection; return which limit refuses it (``TOTAL``/``PER_IP``), or None."""
        ip = client_key(ip)
        if self.total >= self.total_limit:
            return TOTAL
        if self.by_ip.get(ip, 0) >= self.per_ip_limit:
            return PER_IP
        self.total += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        """Forget one connection admitted by :meth:`admit`."""
        ip = client_key(ip)
        self.total -= 1
        n = self.by_ip.get(ip, 1) - 1
        if n:
            self.by_ip[ip] = n
        else:
            self.by_ip.pop(ip, None)


class MemoryBudget:
    """Octets of unfinished messages held in memory by all sessions together.

    Each session keeps its own share and sets it with :meth:`hold`; :meth:`fits` says
    whether a share may grow to a size without the total passing ``limit``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def fits(self, share: int, new: int) -> bool:
        """True when a session holding ``share`` octets may hold ``new`` instead."""
        return new <= share or self.held - share + new <= self.limit

    def hold(self, share: int, new: int) -> int:
        """Change a session's share from ``share`` to ``new`` octets; returns ``new``."""
        self.held += new - share
        return new
