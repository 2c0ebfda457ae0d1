"""The configured milters, called in order for one message, as Postfix calls its smtpd_milters.

:class:`MilterChain` gives each milter of ``[filters] milters`` the message as the
milter before it left it (headers added, body replaced, recipients changed), and
stops at the first refusal:

- ``reject`` / ``tempfail``: the milter's own reply (``SMFIR_REPLYCODE``), or
  Postfix's ``550 5.7.1 Command rejected`` / ``451 4.7.1 Service unavailable - try
  again later``;
- ``discard``: the client is told the message was queued; nothing is stored;
- a quarantine (``SMFIR_QUARANTINE``) does not stop the chain: the message is
  stored held, with the reason.

A milter that cannot be reached, stays silent past ``milter_timeout`` or speaks
nonsense is handled by ``milter_default_action``: ``tempfail`` (the message is
refused with 451 4.7.1), ``reject`` (550 5.7.1), or ``accept`` (the milter is skipped,
its changes dropped).  Each such failure, and each refusal, is one log line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer, error, protocol
from twisted.python.failure import Failure

from mailguard.app import maillog
from mailguard.core.replies import Reply
from mailguard.milter import codec
from mailguard.core.replies import MILTER_REJECTED, MILTER_TEMPFAIL
from mailguard.milter.client import Facts, MilterConnection, MilterGone
from mailguard.milter.client import MilterTimeout, converse

#: How much a milter may add to a message of max_message_size (headers, a disclaimer).
HEADROOM = 1 << 20

Connect = Callable[[str], "defer.Deferred[MilterConnection]"]


@dataclass
class Outcome:
    """What the chain decided for one message.

    ``action`` is ``pass`` (store ``message`` for ``sender`` and ``recipients``),
    ``reject``, ``tempfail`` or ``discard``.  ``refused`` are recipients a milter
    refused at RCPT while others went on; ``quarantine`` is a hold reason ("" = none).
    """

    action: str
    message: bytes
    sender: str
    recipients: list[str]
    reply: Reply | None = None
    quarantine: str = ""
    refused: dict[str, Reply] = field(default_factory=dict)
    milter: str = ""


class MilterChain:
    """Runs ``milters`` (``inet:HOST:PORT`` / ``unix:PATH``) in order; see the module docstring.

    :param connect: opens a connection to one milter address (tests replace it).
    :param max_message_size: ``[limits] max_message_size``; a milter that leaves a message
        larger than this plus :data:`HEADROOM` is treated as speaking nonsense (0: no bound).
    """

    def __init__(self, reactor: Any, milters: tuple[str, ...], default_action: str, timeout: float,
                 connect: Connect | None = None, max_message_size: int = 0) -> None:
        self.max_size = max_message_size + HEADROOM if max_message_size else 0
        self.reactor = reactor
        self.milters = milters
        self.default_action = default_action
        self.timeout = timeout
        self.connect = connect or self._connect

    def _connect(self, address: str) -> defer.Deferred[MilterConnection]:
        """Connect to one milter (a quiet factory: no log line per connection)."""
        kind, where, port = codec.parse_address(address)
        conn = MilterConnection(self.reactor, self.timeout)
        factory = _Connecting(conn)
        if kind == "unix":
            self.reactor.connectUNIX(where, factory, timeout=self.timeout)
        else:
            self.reactor.connectTCP(where, port, factory, timeout=self.timeout)
        return factory.connected


    def check(self, facts: Facts, message: bytes) -> defer.Deferred[Outcome]:
        """Run the chain for one message (CRLF, this host's ``Received:`` first)."""
        return defer.ensureDeferred(self._check(facts, message))

    async def _check(self, facts: Facts, message: bytes) -> Outcome:
        out = Outcome("pass", message, facts.sender, list(facts.recipients))
        for address in self.milters:
            step = dataclasses.replace(facts, sender=out.sender, recipients=list(out.recipients))
            try:
                conn = await self.connect(address)
                verdict = await converse(conn, step, out.message, self.max_size)
            except (codec.ProtocolError, MilterTimeout, MilterGone, error.ConnectError, error.TimeoutError,
                    error.ConnectionLost, OSError) as e:
                refusal = self._failed(address, facts, e)
                if refusal is not None:
                    return refusal
                continue
            out.refused.update(verdict.refused)
            for rcpt, r in verdict.refused.items():
                self._log(facts, address, "rcpt-refused", rcpt=rcpt, reply=r)
            if verdict.action in ("reject", "tempfail", "discard"):
                self._log(facts, address, verdict.action, reply=verdict.reply or "250 (discarded)")
                return Outcome(verdict.action, message, facts.sender, [], verdict.reply, refused=out.refused,
                               milter=address)
            out.message, out.sender, out.recipients = verdict.message, verdict.sender, verdict.recipients
            if verdict.edits:
                self._log(facts, address, "changed", edits=",".join(verdict.edits))
            if verdict.quarantine:
                out.quarantine = verdict.quarantine
                out.milter = address
                self._log(facts, address, "quarantine", reason=verdict.quarantine)
        return out

    def _failed(self, address: str, facts: Facts, e: Exception) -> Outcome | None:
        """One log line; the default action's refusal, or None to go on without this milter."""
        what = str(e) or type(e).__name__
        maillog.event("milter", "failure", facts.client_addr, milter=address, id=facts.queue_id,
                      error=f"{type(e).__name__}: {what}", action=self.default_action)
        if self.default_action == "accept":
            return None
        reply = MILTER_TEMPFAIL if self.default_action == "tempfail" else MILTER_REJECTED
        return Outcome(self.default_action, b"", facts.sender, [], reply, milter=address)

    @staticmethod
    def _log(facts: Facts, address: str, what: str, **fields: object) -> None:
        maillog.event("milter", what, facts.client_addr, milter=address, id=facts.queue_id,
                      **{"from": f"<{facts.sender}>"}, **fields)


class _Connecting(protocol.ClientFactory):
    """Hands out one MilterConnection; ``connected`` fires with it, or with the failure."""

    noisy = False

    def __init__(self, conn: MilterConnection) -> None:
        self.conn = conn
        self.connected: defer.Deferred[MilterConnection] = defer.Deferred()
        conn.on_connect = self._made

    def buildProtocol(self, addr: object) -> MilterConnection:
        return self.conn

    def _made(self) -> None:
        if not self.connected.called:
            self.connected.callback(self.conn)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if not self.connected.called:
            self.connected.errback(reason)
