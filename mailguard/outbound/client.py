"""The SMTP client that carries queued mail to the next hop (RFC 5321, RFC 3207, RFC 4954).

Written on ``LineReceiver`` instead of Twisted's ``ESMTPClient`` because that client
dot-stuffs each 16 KiB chunk on its own (a ``.`` line on a chunk boundary ends the
message early: the rest reaches the next hop as commands).  Here the message goes out
through :class:`mailguard.core.dotstuff.DotStuffer`, which keeps its state across chunks.

:class:`ClientConnection` is the wire: it sends one command at a time and hands back
each (multi-line) reply, with a timeout on every command.  :func:`transact` is one
mail transaction over it: greeting, EHLO (HELO when EHLO is refused), STARTTLS when
offered, AUTH PLAIN or LOGIN when credentials are given, MAIL FROM (with ``SIZE=``
when the peer advertises SIZE; a message over the peer's limit is not sent), one
RCPT TO per recipient (each answered on its own), DATA, QUIT.  When the peer offers
PIPELINING (RFC 2920), MAIL, the RCPTs and DATA go out in one write and their
replies are read in order; otherwise one command at a time.

Every failure is classified at this boundary: :class:`SessionError` when the whole
transaction failed (``permanent`` or not, and whether another host may be tried), or
a per-recipient :class:`Outcome` (delivered / deferred / failed with the reply).

TLS: a peer's certificate is verified (chain against the system store plus
``[outbound] tls_ca_file``, and the name) when :attr:`SessionOptions.verify_name` is
set, which the courier does for the smarthost unless ``smarthost_tls_verify =
false``; a failed verification ends the session before anything else is said, so
credentials never reach an impostor.  MX hosts get opportunistic, unverified TLS
(RFC 7435; Postfix's ``smtp_tls_security_level = may``).  Credentials are never sent
over a cleartext channel.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from twisted.internet import defer, error, interfaces, ssl
# The interface optionsForClientTLS documents for trustRoot; Twisted exports no public name for it.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mailguard.app.connection import Connection, connection
from mailguard.core.dotstuff import DotStuffer
from mailguard.storage.queue import DEFERRED, DELIVERED, FAILED

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
CHUNK = 65536
MAX_REPLY_LINES = 100


@dataclass(frozen=True)
class ServerReply:
    """A complete reply from the peer: the code and the text of each line."""

    code: int
    lines: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.code} {' '.join(s for s in self.lines if s)}".rstrip()

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def status(self) -> str:
        """The enhanced status code (RFC 3463) from the text, or one made from the code."""
        m = _STATUS.match(self.lines[0] if self.lines else "")
        if m and m.group(1) == str(self.code)[0]:
            return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        return f"{self.code // 100}.0.0" if self.code >= 400 else "2.0.0"


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient: ``delivered``, ``deferred`` or ``failed``."""

    state: str
    reply: str
    relay: str = ""

    @classmethod
    def from_reply(cls, reply: ServerReply, relay: str) -> Outcome:
        if reply.ok:
            return cls(DELIVERED, str(reply), relay)
        return cls(FAILED if reply.permanent else DEFERRED, str(reply), relay)


class SessionError(Exception):
    """The transaction failed as a whole (no per-recipient answer).

    :ivar permanent: 5xx: fail every recipient; otherwise retry later.
    :ivar next_host: another MX host may do better (connection, greeting, EHLO, TLS,
        AUTH, a 4xx to MAIL FROM).
    """

    def __init__(self, reply: str, permanent: bool = False, next_host: bool = True) -> None:
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent
        self.next_host = next_host


class ReplyTimeout(Exception):
    """No complete reply within the command timeout."""


@dataclass(frozen=True)
class SessionOptions:
    """How to talk to one peer.

    :ivar tls: ``opportunistic`` (STARTTLS when offered), ``starttls`` (required),
        ``tls`` (the connection is already TLS), ``none`` (never TLS).
    """

    hostname: str
    tls: str = "opportunistic"
    user: str = ""
    password: str = ""
    command_timeout: float = 300.0
    verify_name: str = ""          # verify the peer's certificate for this name; "" = do not verify
    ca_file: Path | None = None    # CA certificates trusted besides the system store

    def tls_creator(self) -> Any:
        """The client TLS settings for this peer (see the module docstring)."""
        return tls_options(self.verify_name, self.ca_file)


@implementer(IOpenSSLTrustRoot)
class _TrustRoot:
    """The system's trust store, plus the CA certificates of one PEM file."""

    def __init__(self, ca_file: Path | None) -> None:
        self.ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        if self.ca_file is not None:
            context.load_verify_locations(str(self.ca_file))


def tls_options(verify_name: str = "", ca_file: Path | None = None) -> Any:
    """Client TLS settings: verified for ``verify_name`` when given, else unverified."""
    if not verify_name:
        return ssl.CertificateOptions(verify=False)
    return ssl.optionsForClientTLS(verify_name, trustRoot=_TrustRoot(ca_file))


def tls_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake failed, for the queue and the log; None when ``exc`` is not one."""
    if isinstance(exc, SSL.Error):
        reasons = [r[2] for r in exc.args[0] if isinstance(r, tuple) and len(r) == 3] if exc.args and \
            isinstance(exc.args[0], list) else []
        return ", ".join(str(r) for r in reasons if r) or "TLS handshake failed"
    if type(exc).__module__.startswith("service_identity"):
        return f"certificate name mismatch: {exc}"
    return None


@implementer(interfaces.IPullProducer)
class _MessageProducer:
    """Feeds a message to the transport in chunks, dot-stuffed, ``.`` line last."""

    def __init__(self, transport: Connection, message: bytes, done: defer.Deferred[None]) -> None:
        self.transport = transport
        self.message = memoryview(message)
        self.offset = 0
        self.stuffer = DotStuffer()
        self.done = done

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        chunk = bytes(self.message[self.offset:self.offset + CHUNK])
        self.offset += len(chunk)
        if chunk:
            self.transport.write(self.stuffer.feed(chunk))
        if self.offset >= len(self.message):
            self.transport.write(self.stuffer.finish())
            self.transport.unregisterProducer()
            self.done.callback(None)

    def stopProducing(self) -> None:
        if not self.done.called:
            self.done.errback(error.ConnectionLost("connection lost while sending the message"))


class ClientConnection(LineReceiver):
    """One connection to a peer: commands out, complete replies back, a timer on each.

    :param clock: an ``IReactorTime`` (``task.Clock`` in tests).
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 4096

    def __init__(self, clock: interfaces.IReactorTime, command_timeout: float) -> None:
        self.clock = clock
        self.command_timeout = command_timeout
        self._lines: list[str] = []
        self._replies: list[ServerReply] = []
        self._waiting: defer.Deferred[ServerReply] | None = None
        self._timer: interfaces.IDelayedCall | None = None
        self._lost: Failure | None = None
        self.tls = False

    # -- receiving -----------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or (len(text) > 3 and text[3] not in " -"):
            self._abort(SessionError(f"451 4.5.0 bad reply from peer: {text[:80]!r}"))
            return
        self._lines.append(text[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            self._abort(SessionError("451 4.5.0 reply from peer has too many lines"))
            return
        if len(text) > 3 and text[3] == "-":
            return
        reply = ServerReply(int(text[:3]), tuple(self._lines))
        self._lines = []
        self._replies.append(reply)
        self._deliver()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort(SessionError("451 4.5.0 reply line from peer too long"))

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        self._cancel_timer()
        if self._lost is None:
            self._lost = reason
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(self._lost)

    def _abort(self, exc: Exception) -> None:
        self._lost = Failure(exc)
        if self.transport is not None:
            connection(self.transport).abortConnection()
        self.connectionLost(self._lost)

    def _deliver(self) -> None:
        if self._waiting is not None and self._replies:
            self._cancel_timer()
            d, self._waiting = self._waiting, None
            d.callback(self._replies.pop(0))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._abort(ReplyTimeout(f"no reply within {self.command_timeout:g} s"))

    # -- the interface used by transact() ------------------------------------

    def read_reply(self) -> defer.Deferred[ServerReply]:
        """The next complete reply (errback on timeout or a lost connection)."""
        if self._waiting is not None:
            raise RuntimeError("already waiting for a reply")
        d: defer.Deferred[ServerReply] = defer.Deferred()
        if self._replies:
            d.callback(self._replies.pop(0))
            return d
        if self._lost is not None:
            d.errback(self._lost)
            return d
        self._waiting = d
        self._timer = self.clock.callLater(self.command_timeout, self._timed_out)
        return d

    def send_lines(self, lines: list[bytes]) -> None:
        """Send several command lines in one write (RFC 2920); read their replies with :meth:`read_reply`."""
        if self._lost is None:
            connection(self.transport).write(b"".join(line + self.delimiter for line in lines))

    def command(self, line: bytes) -> defer.Deferred[ServerReply]:
        """Send one command line and wait for its reply."""
        if self._lost is None:
            connection(self.transport).write(line + self.delimiter)
        return self.read_reply()

    def send_message(self, message: bytes) -> defer.Deferred[ServerReply]:
        """Stream the message (after a 354), dot-stuffed, and wait for the final reply."""
        done: defer.Deferred[None] = defer.Deferred()
        conn = connection(self.transport)
        conn.registerProducer(_MessageProducer(conn, message, done), False)
        return done.addCallback(lambda _: self.read_reply())

    def start_tls(self, creator: Any = None) -> None:
        """Switch to TLS after the peer's 220 to STARTTLS.

        Refuses (and drops the connection) when the peer sent more after its 220: bytes
        sent in cleartext must never be taken as if they came over TLS (CVE-2011-0411).
        """
        if self._buffer or self._replies or self._lines:
            exc = SessionError("451 4.7.0 peer sent data after its 220 to STARTTLS (injection attempt)")
            self._abort(exc)
            raise exc
        connection(self.transport).startTLS(creator if creator is not None else tls_options())
        self.tls = True

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.loseConnection()


def capabilities(ehlo: ServerReply) -> dict[str, str]:
    """EHLO keywords (upper case) -> their parameters (RFC 5321 section 4.1.1.1)."""
    caps = {}
    for line in ehlo.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        caps[keyword.upper()] = params.strip()
    return caps


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode("utf-8"))


async def _authenticate(conn: ClientConnection, caps: dict[str, str], opts: SessionOptions) -> None:
    """AUTH PLAIN or LOGIN (RFC 4954); raises SessionError (temporary) on refusal."""
    mechanisms = caps.get("AUTH", "").upper().split()
    if "PLAIN" in mechanisms:
        reply = await conn.command(b"AUTH PLAIN " + _b64(f"\0{opts.user}\0{opts.password}"))
    elif "LOGIN" in mechanisms:
        reply = await conn.command(b"AUTH LOGIN")
        if reply.code == 334:
            reply = await conn.command(_b64(opts.user))
        if reply.code == 334:
            reply = await conn.command(_b64(opts.password))
    else:
        raise SessionError("451 4.7.0 peer offers no AUTH PLAIN or LOGIN")
    if reply.code != 235:
        # Like Postfix's smtp_sasl_auth_soft_bounce: a refused login is retried, not bounced.
        raise SessionError(f"451 4.7.0 authentication failed: {reply}")


async def _hello(conn: ClientConnection, opts: SessionOptions) -> dict[str, str]:
    reply = await conn.command(b"EHLO " + opts.hostname.encode("ascii", "replace"))
    if reply.code == 250:
        return capabilities(reply)
    reply = await conn.command(b"HELO " + opts.hostname.encode("ascii", "replace"))
    if reply.code != 250:
        raise SessionError(f"{reply.code} {reply.status} HELO refused: {reply}", reply.permanent)
    return {}


async def transact(conn: ClientConnection, opts: SessionOptions, sender: str,
                   recipients: list[str], message: bytes, relay: str = "") -> dict[str, Outcome]:
    """One mail transaction on a fresh connection; the connection is closed afterwards.

    :returns: an :class:`Outcome` for every recipient.
    :raises SessionError: the transaction failed before any recipient was answered.
    """
    results: dict[str, Outcome] = {}
    accepted: list[str] = []
    stage = "greeting"
    try:
        greeting = await conn.read_reply()
        if greeting.code != 220:
            raise SessionError(f"451 4.4.0 greeting refused: {greeting}")
        stage = "EHLO"
        caps = await _hello(conn, opts)
        tls = opts.tls == "tls"
        if not tls and opts.tls != "none" and "STARTTLS" in caps:
            stage = "STARTTLS"
            reply = await conn.command(b"STARTTLS")
            if reply.code == 220:
                conn.start_tls(opts.tls_creator())
                tls = True
                stage = "EHLO after STARTTLS"
                caps = await _hello(conn, opts)
            elif opts.tls == "starttls":
                raise SessionError(f"451 4.7.4 STARTTLS refused: {reply}")
        if opts.tls == "starttls" and not tls:
            raise SessionError("451 4.7.4 TLS is required but the peer does not offer STARTTLS")
        if opts.user:
            if not tls:
                raise SessionError("451 4.7.4 will not send credentials over a cleartext connection")
            stage = "AUTH"
            await _authenticate(conn, caps, opts)
        params = b""
        if "SIZE" in caps:
            limit = caps["SIZE"]
            if limit.isdigit() and int(limit) > 0 and len(message) > int(limit):
                raise SessionError(f"552 5.3.4 message size {len(message)} exceeds the limit of {relay or 'the peer'}"
                                   f" ({limit})", permanent=True, next_host=False)
            params += b" SIZE=%d" % len(message)
        if "8BITMIME" in caps and any(b > 127 for b in message):
            params += b" BODY=8BITMIME"
        stage = "MAIL FROM"
        mail = b"MAIL FROM:<" + sender.encode("utf-8") + b">" + params
        rcpt_lines = [b"RCPT TO:<" + rcpt.encode("utf-8") + b">" for rcpt in recipients]
        if "PIPELINING" in caps:
            # RFC 2920: MAIL, every RCPT and DATA in one write, the replies read in order.
            conn.send_lines([mail, *rcpt_lines, b"DATA"])
            mail_reply = await conn.read_reply()
            stage = "RCPT TO"
            rcpt_replies = [await conn.read_reply() for _ in recipients]
            stage = "DATA"
            data_reply = await conn.read_reply()
        else:
            mail_reply = await conn.command(mail)
            rcpt_replies, data_reply = [], None
            if mail_reply.ok:
                stage = "RCPT TO"
                rcpt_replies = [await conn.command(line) for line in rcpt_lines]
        if not mail_reply.ok:
            if data_reply is not None and data_reply.code == 354:
                await conn.send_message(b"")       # a server that said 354 anyway: end it empty
            raise SessionError(str(mail_reply), mail_reply.permanent, next_host=not mail_reply.permanent)
        for rcpt, reply in zip(recipients, rcpt_replies):
            if reply.ok:
                accepted.append(rcpt)
            else:
                results[rcpt] = Outcome.from_reply(reply, relay)
        if data_reply is None and accepted:
            stage = "DATA"
            data_reply = await conn.command(b"DATA")
        if data_reply is not None and data_reply.code == 354 and not accepted:
            stage = "end of data"
            await conn.send_message(b"")           # RFC 2920 section 3.1: nothing to send, end DATA
        elif data_reply is not None and accepted:
            reply = data_reply
            if reply.code == 354:
                stage = "end of data"
                reply = await conn.send_message(message)
            elif reply.ok:
                reply = ServerReply(451, ("4.5.0 DATA answered with " + str(reply),))
            for rcpt in accepted:
                results[rcpt] = Outcome.from_reply(reply, relay)
        stage = "QUIT"
        try:
            await conn.command(b"QUIT")
        except Exception:
            pass
    except SessionError as e:
        if not results and not accepted:
            raise
        for rcpt in recipients:
            if rcpt not in results:
                results[rcpt] = Outcome(FAILED if e.permanent else DEFERRED, e.reply, relay)
    except Exception as e:
        tls_reason = tls_failure(e)
        reason = e.args[0] if isinstance(e, ReplyTimeout) else f"connection lost ({type(e).__name__})"
        text = f"451 4.4.2 {relay or 'peer'}: {reason} during {stage}"
        if tls_reason is not None:
            text = f"451 4.7.5 {relay or 'peer'}: TLS certificate not accepted: {tls_reason}"
        if stage == "QUIT":
            pass
        elif not results and not accepted:
            raise SessionError(text) from None
        else:
            for rcpt in recipients:
                if rcpt not in results:
                    results[rcpt] = Outcome(DEFERRED, text, relay)
    finally:
        conn.close()
    return results
