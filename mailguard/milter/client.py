"""One milter conversation over Twisted: the connection, and the exchange for one message.

:class:`MilterConnection` frames packets (:mod:`mailguard.milter.codec`) and hands
them out one at a time; every wait for a reply has its own ``milter_timeout``
(``SMFIR_PROGRESS`` starts it again).  :func:`converse` runs the whole exchange for
one message the way Postfix does: option negotiation (version 6), then connect, HELO,
MAIL, each RCPT, DATA, the headers, end of headers, the body in chunks of at most
64 KiB, end of message, QUIT; macros go before each step.  Steps the milter asked
not to get (``SMFIP_NO*``) are not sent, replies it said it will not give
(``SMFIP_NR_*``) are not awaited, and ``SMFIR_SKIP`` ends the body early.

A milter's final answer for the message is a :class:`Verdict`.  Anything the milter
does that is not the protocol, or not what it negotiated, raises
:class:`~mailguard.milter.codec.ProtocolError`; a dropped connection raises
:class:`MilterGone`; silence raises :class:`MilterTimeout`.  The caller turns each
of those into ``milter_default_action``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailguard.core.replies import MILTER_REJECTED as REJECT_REPLY
from mailguard.core.replies import MILTER_TEMPFAIL as TEMPFAIL_REPLY
from mailguard.core.replies import Reply
from mailguard.milter import codec, edit


class MilterTimeout(Exception):
    """The milter did not answer within milter_timeout."""


class MilterGone(Exception):
    """The milter closed the connection (or it failed) in the middle of an exchange."""


class MilterConnection(protocol.Protocol):
    """The MTA end of one milter connection: send packets, read them one at a time."""

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock: Any = clock             # Any: mypy cannot read zope interfaces
        self.timeout = timeout
        self._reader = codec.Reader()
        self._packets: deque[tuple[bytes, bytes]] = deque()
        self._waiting: defer.Deferred[tuple[bytes, bytes]] | None = None
        self._timer: Any = None             # IDelayedCall
        self._error: Exception | None = None
        self.on_connect: Callable[[], None] | None = None

    def connectionMade(self) -> None:
        if self.on_connect is not None:
            self.on_connect()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            self._packets.extend(self._reader.feed(data))
        except codec.ProtocolError as e:
            self._stop(e)
            return
        self._deliver()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._error is None:
            self._error = MilterGone(f"connection closed: {reason.getErrorMessage()}")
        self._deliver()

    def send(self, data: bytes) -> None:
        if self._error is None:
            self._transport().write(data)

    def read(self) -> defer.Deferred[tuple[bytes, bytes]]:
        """The next packet from the milter, within ``timeout`` seconds."""
        if self._waiting is not None:
            raise RuntimeError("one read at a time")
        d: defer.Deferred[tuple[bytes, bytes]] = defer.Deferred()
        self._waiting = d
        if not self._packets and self._error is None:
            self._timer = self.clock.callLater(self.timeout, self._timed_out)
        self._deliver()
        return d

    def close(self) -> None:
        """Drop the connection now (after QUIT, or to give up)."""
        if self._error is None:
            self._error = MilterGone("closed by the MTA")
        if self.transport is not None:
            self._transport().loseConnection()

    def _transport(self) -> Any:
        return self.transport

    def _timed_out(self) -> None:
        self._timer = None
        self._stop(MilterTimeout(f"no reply within {self.timeout:g} s"))

    def _stop(self, error: Exception) -> None:
        """Remember the failure, fail the pending read, abort the connection."""
        if self._error is None:
            self._error = error
        self._deliver()
        if self.transport is not None:
            self._transport().abortConnection()

    def _deliver(self) -> None:
        d = self._waiting
        if d is None:
            return
        if self._packets:
            result: Any = self._packets.popleft()
        elif self._error is not None:
            result = Failure(self._error)
        else:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._waiting = None
        d.callback(result) if not isinstance(result, Failure) else d.errback(result)


@dataclass
class Facts:
    """What the milters are told about the connection and the transaction."""

    hostname: str                 # j: this host's name
    daemon_name: str              # {daemon_name}: the listener kind (smtp, submission, ...)
    client_addr: str
    client_port: int
    client_name: str              # the verified reverse name, or "unknown"
    local_addr: str
    local_port: int
    helo: str
    sender: str                   # "" for <>
    recipients: list[str]
    queue_id: str                 # i
    auth_authen: str = ""         # the login of an authenticated client
    tls_version: str = ""
    cipher: str = ""
    mail_args: list[str] = field(default_factory=list)

    def macros(self, stage: int, rcpt: str = "") -> dict[str, str]:
        """The macros Postfix sends at this stage (by default; a milter may ask for fewer)."""
        if stage == codec.M_CONNECT:
            return {"j": self.hostname, "{daemon_name}": self.daemon_name, "{daemon_addr}": self.local_addr,
                    "{daemon_port}": str(self.local_port), "v": "mailguard",
                    "_": f"{self.client_name} [{self.client_addr}]", "{client_addr}": self.client_addr,
                    "{client_name}": self.client_name, "{client_port}": str(self.client_port),
                    "{client_ptr}": self.client_name}
        if stage == codec.M_HELO:
            out = {"{tls_version}": self.tls_version, "{cipher}": self.cipher}
            return {k: v for k, v in out.items() if v}
        if stage == codec.M_ENVFROM:
            out = {"i": self.queue_id, "{mail_addr}": self.sender, "{mail_host}": _domain(self.sender),
                   "{mail_mailer}": "smtp"}
            if self.auth_authen:
                out.update({"{auth_type}": "PLAIN", "{auth_authen}": self.auth_authen})
            return out
        if stage == codec.M_ENVRCPT:
            local = "local" if not _domain(rcpt) else "smtp"
            return {"i": self.queue_id, "{rcpt_addr}": rcpt, "{rcpt_host}": _domain(rcpt), "{rcpt_mailer}": local}
        return {"i": self.queue_id}


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


@dataclass
class Verdict:
    """One milter's answer for one message.

    ``action``: ``continue`` (or ``accept``: pass, with ``message``/``sender``/
    ``recipients`` as the milter left them), ``reject``, ``tempfail`` or ``discard``.
    ``reply`` is the refusal's reply.  ``refused`` maps a recipient the milter
    refused at RCPT to its reply; ``quarantine`` is the reason of SMFIR_QUARANTINE.
    """

    action: str
    message: bytes
    sender: str
    recipients: list[str]
    reply: Reply | None = None
    refused: dict[str, Reply] = field(default_factory=dict)
    quarantine: str = ""
    edits: list[str] = field(default_factory=list)     # names of the changes made, for the log


class _Done(Exception):
    """Ends the exchange early with a verdict (accept, reject, tempfail, discard)."""

    def __init__(self, action: str, reply: Reply | None = None) -> None:
        self.action = action
        self.reply = reply


def _final(command: bytes, data: bytes) -> tuple[str, Reply | None]:
    """The meaning of a final reply: (action, reply)."""
    if command == codec.CONTINUE:
        return "continue", None
    if command == codec.ACCEPT:
        return "accept", None
    if command == codec.DISCARD:
        return "discard", None
    if command == codec.REJECT:
        return "reject", REJECT_REPLY
    if command in (codec.TEMPFAIL, codec.CONN_FAIL, codec.SHUTDOWN):
        return "tempfail", TEMPFAIL_REPLY
    if command == codec.REPLYCODE:
        r = codec.reply_text(data)
        return ("reject" if r.permanent else "tempfail"), r
    if command == codec.SKIP:
        return "skip", None
    raise codec.ProtocolError(f"unexpected reply {command!r}")


class _Exchange:
    """The state of one message's exchange with one milter."""

    def __init__(self, conn: MilterConnection, neg: codec.Negotiated, facts: Facts, message: bytes,
                 max_size: int) -> None:
        self.max_size = max_size
        self.conn = conn
        self.neg = neg
        self.facts = facts
        self.msg = edit.Message.parse(message)
        self.sender = facts.sender
        self.recipients = list(facts.recipients)
        self.refused: dict[str, Reply] = {}
        self.quarantine = ""
        self.edits: list[str] = []
        self.leadspc = bool(neg.protocol & codec.P_HDR_LEADSPC)
        self._new_body: bytearray | None = None

    def send_macros(self, command: bytes, rcpt: str = "") -> None:
        stage = codec.STAGE_OF[command]
        values = self.facts.macros(stage, rcpt)
        wanted = self.neg.symlists.get(stage)
        if wanted is not None:
            values = {k: v for k, v in values.items() if k in wanted}
        if values:
            self.conn.send(codec.macros(command, values))

    async def step(self, command: bytes, data: bytes, rcpt: str | None = None) -> str:
        """Send one command (unless left out); its action: continue, skip, or a refusal of ``rcpt``."""
        if not self.neg.sends(command):
            return "continue"
        if command in codec.STAGE_OF:
            self.send_macros(command, rcpt or "")
        self.conn.send(data)
        if not self.neg.replies_to(command):
            return "continue"
        while True:
            reply, payload = await self.conn.read()
            if reply != codec.PROGRESS:
                break
        action, r = _final(reply, payload)
        if action == "skip":
            if command != codec.BODY or not self.neg.protocol & codec.P_SKIP:
                raise codec.ProtocolError("SMFIR_SKIP outside the body")
            return "skip"
        if rcpt is not None and action in ("reject", "tempfail"):
            assert r is not None
            self.refused[rcpt] = r
            return action
        if action != "continue":
            raise _Done(action, r)
        return action

    async def end_of_message(self) -> tuple[str, Reply | None]:
        self.send_macros(codec.BODYEOB)
        self.conn.send(codec.simple(codec.BODYEOB))
        while True:
            reply, payload = await self.conn.read()
            if reply == codec.PROGRESS:
                continue
            if reply in codec.EDITS:
                self.apply(reply, payload)
                continue
            action, r = _final(reply, payload)
            if action == "skip":
                raise codec.ProtocolError("SMFIR_SKIP after end of message")
            return action, r

    def apply(self, reply: bytes, data: bytes) -> None:
        """One modification at end of message, checked against the negotiated actions."""
        if not self.neg.may(codec.EDIT_FLAG[reply]):
            raise codec.ProtocolError(f"modification {reply!r} was not negotiated")
        msg, lead = self.msg, self.leadspc
        if reply == codec.ADDHEADER:
            name, value = codec.strings(data, 2)
            edit.add_header(msg, name, value, lead)
            self.edits.append(f"add-header:{name}")
        elif reply == codec.INSHEADER:
            index, name, value = codec.indexed(data)
            # Index 0 is the very top, above this host's Received: (as Postfix does).
            edit.insert_header(msg, index, name, value, lead)
            self.edits.append(f"insert-header:{name}")
        elif reply == codec.CHGHEADER:
            index, name, value = codec.indexed(data)
            edit.change_header(msg, index, name, value, lead)
            self.edits.append(f"change-header:{name}")
        elif reply == codec.REPLBODY:
            if self._new_body is None:
                self._new_body = bytearray()
                self.edits.append("replace-body")
            self._new_body += data
            if self.max_size and len(self._new_body) > self.max_size:
                raise codec.ProtocolError(f"replacement body past {self.max_size} octets")
        elif reply == codec.QUARANTINE:
            (reason,) = codec.strings(data, 1)
            self.quarantine = reason or "quarantined by a milter"
        elif reply == codec.CHGFROM:
            (sender,) = codec.strings(data, 1)
            self.sender = _strip_brackets(sender)
            self.edits.append("change-sender")
        elif reply in (codec.ADDRCPT, codec.ADDRCPT_PAR):
            (rcpt,) = codec.strings(data, 1)
            address = _strip_brackets(rcpt)
            if not address:
                raise codec.ProtocolError("empty recipient added")
            if address.lower() not in (r.lower() for r in self.recipients):
                self.recipients.append(address)
            self.edits.append("add-rcpt")
        elif reply == codec.DELRCPT:
            (rcpt,) = codec.strings(data, 1)
            gone = _strip_brackets(rcpt).lower()
            self.recipients = [r for r in self.recipients if r.lower() != gone]
            self.edits.append("delete-rcpt")

    def result(self, action: str, reply: Reply | None) -> Verdict:
        if self._new_body is not None:
            self.msg.body = edit.crlf(bytes(self._new_body))
            self.msg.had_separator = True
        message = self.msg.to_bytes()
        if self.max_size and len(message) > self.max_size:
            raise codec.ProtocolError(f"message grew past {self.max_size} octets")
        return Verdict(action, message, self.sender, self.recipients, reply, self.refused,
                       self.quarantine, self.edits)


def _strip_brackets(text: str) -> str:
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if any(c in text for c in "\r\n\0<> "):
        raise codec.ProtocolError(f"bad address {text[:80]!r}")
    return text


async def negotiate(conn: MilterConnection) -> codec.Negotiated:
    """Option negotiation: offer version 6, every action and every protocol step."""
    conn.send(codec.optneg())
    command, data = await conn.read()
    if command != codec.OPTNEG:
        raise codec.ProtocolError(f"expected an option negotiation reply, got {command!r}")
    return codec.parse_optneg(data)


async def converse(conn: MilterConnection, facts: Facts, message: bytes, max_size: int = 0) -> Verdict:
    """The whole exchange for one message (see the module docstring); QUIT at the end.

    :param message: CRLF, dot-stuffing removed, with this host's ``Received:`` first.
    :param max_size: the largest message the milter may leave (0: no bound); past it the
        milter's changes are nonsense (:class:`~mailguard.milter.codec.ProtocolError`).
    """
    try:
        return await _converse(conn, facts, message, max_size)
    finally:
        conn.close()


async def _converse(conn: MilterConnection, facts: Facts, message: bytes, max_size: int) -> Verdict:
    neg = await negotiate(conn)
    ex = _Exchange(conn, neg, facts, message, max_size)
    try:
        family = "6" if ":" in facts.client_addr else "4"
        await ex.step(codec.CONNECT, codec.connect(facts.client_name, family, facts.client_port, facts.client_addr))
        await ex.step(codec.HELO, codec.helo(facts.helo))
        await ex.step(codec.MAIL, codec.mail(facts.sender, facts.mail_args))
        for rcpt in facts.recipients:
            await ex.step(codec.RCPT, codec.rcpt(rcpt), rcpt=rcpt)
        ex.recipients = [r for r in ex.recipients if r not in ex.refused]
        if not ex.recipients:
            refusal = list(ex.refused.values())[-1]
            raise _Done("reject" if refusal.permanent else "tempfail", refusal)
        await ex.step(codec.DATA, codec.simple(codec.DATA))
        for h in ex.msg.headers:
            await ex.step(codec.HEADER, codec.header(h.name, edit.value_for_milter(h, ex.leadspc)))
        await ex.step(codec.EOH, codec.simple(codec.EOH))
        for chunk in edit.body_chunks(ex.msg.body, codec.CHUNK):
            if await ex.step(codec.BODY, codec.body(chunk)) == "skip":
                break
        action, reply = await ex.end_of_message()
    except _Done as done:
        action, reply = done.action, done.reply
        ex.edits.clear()
        ex.msg = edit.Message.parse(message)
        ex.sender, ex.recipients = facts.sender, [r for r in facts.recipients if r not in ex.refused]
    conn.send(codec.simple(codec.QUIT))
    return ex.result(action, reply)
