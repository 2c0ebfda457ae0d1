"""One SMTP connection's state: who the client is, what it said, and its limits.

:class:`Session` admits or refuses the connection (``[limits] max_connections``
and ``max_connections_per_ip``), runs the idle and whole-session timers, and holds
what the commands share: the HELO name, the SMTP AUTH identity and the current
:class:`Envelope`.  The commands live in :mod:`~mailguard.smtp.authcommand`,
:mod:`~mailguard.smtp.transaction` and :mod:`~mailguard.smtp.server`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import interfaces, protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailguard.app import limits as limits_mod
from mailguard.app.connection import Connection, connection
from mailguard.app.limits import Limiter
from mailguard.app import maillog
from mailguard.config import IPAddress
from mailguard.core import policy, replies
from mailguard.core.quota import Usage
from mailguard.core.checks import parse_ip
from mailguard.smtp.context import SMTPContext
from mailguard.smtp.wire import CLOSED, SMTPWire

_UNSPECIFIED = parse_ip("0.0.0.0")             # the client address until the connection is made
_NO_HOST = object()


def _host(address: object) -> str:
    """The address's ``host`` (an IP address), or its text form when it has none."""
    host: Any = getattr(address, "host", _NO_HOST)
    return str(address) if host is _NO_HOST else host  # no repr built for every connection


@dataclass
class Envelope:
    """One mail transaction: the sender and the accepted recipients' decisions."""

    sender: str | None = None                  # None: no MAIL yet; "" is the null sender
    decisions: list[policy.Decision] = field(default_factory=list)
    declared_size: int = 0
    usage: dict[str, Usage] = field(default_factory=dict)   # mailboxes with a quota, as measured at RCPT


@functools.lru_cache(maxsize=8)
def _spool_of(data_dir: Path) -> Path:
    """Where a session spools a large message: one join per configuration, not per connection."""
    return data_dir / "spool"


class Session(SMTPWire):
    """The state of one SMTP session.  ``kind`` is ``smtp``, ``submission`` or ``submissions``."""

    def __init__(self, ctx: SMTPContext, kind: str) -> None:
        super().__init__()
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.kind = kind
        self.clock = ctx.clock
        self.max_message_size = ctx.cfg.limits.max_message_size
        self.spool_dir = _spool_of(ctx.cfg.server.data_dir)
        self.memory = ctx.memory
        self.helo: str | None = None
        self.esmtp = False
        self.authenticated: str | None = None
        self.envelope = Envelope()
        self.msg_id = ""        # the id of the current (or last) transaction's message, made at MAIL
        self._admitted = False
        self._idle_call: interfaces.IDelayedCall | None = None
        self._session_call: interfaces.IDelayedCall | None = None
        self.client_ip = "0.0.0.0"
        self.local_ip = "0.0.0.0"
        self.client_ip_obj: IPAddress = _UNSPECIFIED
        self.local_ip_obj: IPAddress | None = None

    def connectionMade(self) -> None:
        conn = connection(self.transport)
        self.client_ip = _host(conn.getPeer())
        self.local_ip = _host(conn.getHost())
        self.client_ip_obj = parse_ip(self.client_ip)
        self.local_ip_obj = parse_ip(self.local_ip)
        limiter = self.ctx.limiter_for(self.kind)
        over = limiter.admit(self.client_ip)
        if isinstance(over, Deferred):
            # Counted by the first process ([server] workers): nothing is read until it answers.
            conn.pauseProducing()
            over.addCallback(self._admission, limiter, conn)
            return
        self._admit_or_refuse(over)

    def _admission(self, over: str | None, limiter: Limiter, conn: Connection) -> None:
        if self.mode == CLOSED:                  # the client left while the count was asked for
            if over is None:
                limiter.release(self.client_ip)
            return
        conn.resumeProducing()
        self._admit_or_refuse(over)

    def _admit_or_refuse(self, over: str | None) -> None:
        if over is not None:
            refusal = replies.TOO_MANY_CONNECTIONS if over == limits_mod.TOTAL else replies.TOO_MANY_FROM_IP
            maillog.event("smtp", "refused", self.client_ip, reason=refusal.text)
            self.close(refusal)
            return
        self._admitted = True
        self.start_flow_control()
        limits = self.cfg.limits
        self._idle_call = self.clock.callLater(limits.idle_timeout, self._timed_out)
        self._session_call = self.clock.callLater(limits.session_timeout, self._timed_out)
        self.send_raw(f"220 {self.cfg.server.hostname} ESMTP mailguard\r\n")
        self.admitted()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.mode = CLOSED
        self.forget_message()
        for call in (self._idle_call, self._session_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._session_call = None
        if self._admitted:
            self._admitted = False
            self.ctx.limiter_for(self.kind).release(self.client_ip)

    def admitted(self) -> None:
        """The client was admitted and greeted (subclasses start per-connection work here)."""

    def input_seen(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.cfg.limits.idle_timeout)

    def _timed_out(self) -> None:
        if self.mode != CLOSED:
            maillog.event("smtp", "timeout", self.client_ip)
            self.close(replies.TIMEOUT)

    @property
    def encrypted(self) -> bool:
        """True when the channel is TLS (STARTTLS done, or an implicit-TLS listener)."""
        return interfaces.ISSLTransport.providedBy(self.transport)

    def forget(self) -> None:
        """Forget everything the client said (after STARTTLS, RFC 3207 section 4.2)."""
        self.helo = None
        self.esmtp = False
        self.authenticated = None
        self.envelope = Envelope()
