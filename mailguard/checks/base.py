"""The shape every inbound check has, and the facts it is given.

:class:`Connection` is what one SMTP connection has learnt (address, HELO) plus the
lookups started for it, shared by its transactions: a DNSBL or reverse lookup
started when the client connects is awaited by the check that needs it, once.
:class:`Facts` adds one transaction's sender and recipient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from mailguard.core.checks import IPAddress, Refusal, parse_ip

MAIL = "mail"
RCPT = "rcpt"


class _Shared:
    """One result that any number of callers may wait for (a Deferred may be awaited once)."""

    def __init__(self, d: defer.Deferred[Any]) -> None:
        self.done = False
        self.result: Any = None
        self.waiters: list[defer.Deferred[Any]] = []
        d.addBoth(self._fire)

    def _fire(self, result: Any) -> None:
        self.done, self.result = True, result
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            w.callback(result) if not isinstance(result, Failure) else w.errback(result)

    def wait(self) -> defer.Deferred[Any]:
        if self.done:
            return defer.fail(self.result) if isinstance(self.result, Failure) else defer.succeed(self.result)
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiters.append(d)
        return d


@dataclass
class Connection:
    """One SMTP connection as the checks know it."""

    client_ip: str
    local_ip: str = ""
    helo: str | None = None
    _shared: dict[str, _Shared] = field(default_factory=dict, repr=False)

    @property
    def ip(self) -> IPAddress:
        return parse_ip(self.client_ip)

    def once(self, key: str, start: Callable[[], Coroutine[Any, Any, Any]]) -> defer.Deferred[Any]:
        """The result of ``start()`` for this connection, started at the first call only."""
        entry = self._shared.get(key)
        if entry is None:
            entry = self._shared[key] = _Shared(defer.Deferred.fromCoroutine(start()))
        return entry.wait()


@dataclass(frozen=True)
class Facts:
    """What a check decides on: the connection, who the client is, and the transaction."""

    conn: Connection
    trusted: bool                       # authenticated, allow, internal_address or pop_before_smtp
    authenticated: str | None = None    # the account, after SMTP AUTH
    sender: str = ""                    # MAIL FROM, "" for <>
    recipient: str | None = None        # RCPT TO (None at MAIL)
    now: float = 0.0
    dry_run: bool = False               # mailguard explain: decide, but change no state


class Check(Protocol):
    """One inbound check.

    ``rule`` names it; ``stage`` is :data:`MAIL` or :data:`RCPT`; ``for_trusted`` says
    whether trusted clients are checked too.  :meth:`connected` may start lookups for
    a new connection; :meth:`check` decides.
    """

    rule: str
    stage: str
    for_trusted: bool

    def connected(self, conn: Connection) -> None: ...

    async def check(self, facts: Facts) -> Refusal | None: ...
