"""What an SMTP session needs from the running host, and nothing more.

:class:`SMTPContext` is built once by the service and shared by every session of
every SMTP listener.  Each part is named by the small interface the session uses,
so tests hand in fakes and the SMTP package never imports the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mailguard.app.limits import Limiter, MemoryBudget
from mailguard.config import Config
from mailguard.core.policy import Decision
from mailguard.core.srs import SRS
from mailguard.directory.base import Directory
from mailguard.milter.chain import MilterChain

if TYPE_CHECKING:
    from mailguard.checks.pipeline import InboundChecks
    from mailguard.smtp.quota import MailboxQuotas


class MessageStore(Protocol):
    """Makes an accepted message durable (the Deferred fires when it is; fails: 451)."""

    def store(self, msg_id: str, sender: str, decisions: Sequence[Decision], received: bytes,
              message: bytes, held: str = "") -> Deferred[Any]: ...


class CredentialCheck(Protocol):
    """Checks a login: the mailbox, None for bad credentials, or a Throttled failure."""

    def check(self, login: str, password: str, client_ip: str, service: str) -> Deferred[Any]: ...


class RecentLogins(Protocol):
    """POP-before-SMTP: did this IP log in over POP3 recently?"""

    def allowed(self, ip: str) -> bool: ...


class OutgoingMail(Protocol):
    """Completes and DKIM-signs a trusted client's message (the Deferred fires with it)."""

    def prepare(self, message: bytes, msg_id: str, now: float) -> Deferred[bytes]: ...


class TLSOptions(Protocol):
    """The server certificate, as ``transport.startTLS`` takes it."""

    def options(self) -> Any: ...


@dataclass
class SMTPContext:
    """The shared parts of the SMTP listeners."""

    cfg: Config
    directory: Directory
    store: MessageStore
    authenticator: CredentialCheck
    pop_before_smtp: RecentLogins
    limiter: Limiter
    tls: TLSOptions | None
    clock: IReactorTime
    milters: MilterChain | None = None         # [filters]; None when no milter is configured
    outgoing: OutgoingMail | None = None       # Date/Message-ID and DKIM for trusted clients' mail
    srs: SRS | None = None                     # the SRS secret: bounces to forwarded mail verify
    checks: InboundChecks | None = None        # [checks]/[limits] rates; None: no inbound checks at all
    quotas: MailboxQuotas | None = None        # mailbox quotas at RCPT; None: no quota is ever checked
    #: submission and submissions count their connections apart from port 25, so idle
    #: connections to the MX cannot lock staff out; None: they share ``limiter``.
    submission_limiter: Limiter | None = None
    #: ``[limits] memory_budget``: unfinished messages' octets in memory, all sessions together.
    memory: MemoryBudget | None = None

    def __post_init__(self) -> None:
        if self.memory is None:
            self.memory = MemoryBudget(self.cfg.limits.memory_budget)

    def limiter_for(self, kind: str) -> Limiter:
        """The connection limiter of a listener kind (``smtp``, ``submission``, ``submissions``)."""
        if kind != "smtp" and self.submission_limiter is not None:
            return self.submission_limiter
        return self.limiter
