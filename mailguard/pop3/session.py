"""The POP3 session's wire: lines in, replies out, pipelining and back-pressure.

:class:`POP3Session` reads command lines (bounded, RFC 2449 section 4), runs them
one at a time (later pipelined commands wait while a login, a scan, a ``RETR`` or the
commit is in progress), and writes replies; as the transport's streaming producer it
stops reading and streaming while the client does not read.  The commands live in
:mod:`mailguard.pop3.login` and :mod:`mailguard.pop3.mailbox`; the session class
that joins them is :class:`mailguard.pop3.server.POP3Server`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer, interfaces, protocol
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import implementer

from mailguard.app import maillog
from mailguard.app.connection import connection, hang_up, hold_reading, send
from mailguard.pop3.stream import MessageStream
from mailguard.storage.maildir import Mailbox

log = Logger(namespace="mailguard")

if TYPE_CHECKING:
    from mailguard.pop3.server import POP3Factory

RunInThread = Callable[..., defer.Deferred[Any]]

AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"

# Replies (RFC 2449 section 8 and RFC 3206 response codes in brackets).
ERR_UNKNOWN = b"-ERR Unknown command"
ERR_LOGIN_FIRST = b"-ERR Not logged in"
ERR_ALREADY = b"-ERR Already logged in"
ERR_SYNTAX = b"-ERR Syntax error"
ERR_TOO_LONG = b"-ERR Line too long"
ERR_NO_SUCH = b"-ERR No such message"
ERR_NEEDS_TLS = b"-ERR [AUTH] Authentication requires TLS: use STLS first"
ERR_AUTH_FAILED = b"-ERR [AUTH] Authentication failed"
ERR_THROTTLED = b"-ERR [SYS/TEMP] Too many failed logins, try later"
ERR_TEMPFAIL = b"-ERR [SYS/TEMP] Temporary failure, try later"
ERR_IN_USE = b"-ERR [IN-USE] Mailbox is locked by another session"
ERR_USER_FIRST = b"-ERR USER first"
ERR_TLS_ACTIVE = b"-ERR TLS already active"
ERR_TLS_UNAVAILABLE = b"-ERR [SYS/TEMP] TLS not available"
ERR_MECHANISM = b"-ERR Unsupported authentication mechanism"
ERR_AUTH_CANCELLED = b"-ERR Authentication cancelled"
ERR_AUTH_MALFORMED = b"-ERR [AUTH] Malformed authentication data"
ERR_VANISHED = b"-ERR [SYS/TEMP] Message is no longer available"
ERR_TOO_MANY = b"-ERR [SYS/TEMP] Too many connections, try later"
ERR_AUTOLOGOUT = b"-ERR Autologout; idle for too long"
ERR_COMMIT = b"-ERR [SYS/TEMP] Some deleted messages not removed"
ERR_TOO_MANY_ERRORS = b"-ERR Too many errors, closing connection"

_TRANSACTION_COMMANDS = {b"STAT", b"LIST", b"UIDL", b"TOP", b"RETR", b"DELE", b"RSET", b"NOOP"}


def _number(arg: bytes) -> int | None:
    """A message number or line count: ASCII digits only (no sign, no spaces)."""
    if not arg or len(arg) > 9 or not arg.isdigit():
        return None
    return int(arg)


@implementer(interfaces.IPushProducer)
class POP3Session(protocol.Protocol, policies.TimeoutMixin):
    """One POP3 session's wire and state; the commands are added by its subclasses.

    The session is the transport's streaming producer: when the client stops reading
    and the transport's write buffer passes its bound, :meth:`pauseProducing` stops
    command processing and message streaming until the buffer drains.
    """

    MAX_COMMAND = 255     # octets including CRLF (RFC 2449 section 4)
    MAX_LINE = 8192       # SASL lines may be longer; an unterminated line past this closes
    MAX_PIPELINE = 1 << 16  # stop reading the socket while this much input waits
    MAX_ERRORS = 50       # -ERR replies in one session before it is closed
    MAX_THROTTLED = 3     # logins refused as throttled in one session before it is closed

    factory: POP3Factory

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._busy = False
        self._draining = False
        self._gone = False
        self._reading_paused = False
        self.state = AUTHORIZATION
        self.mailbox: Mailbox | None = None
        self.mailbox_address: str | None = None
        self._user: str | None = None
        self._locked: Path | None = None
        self._sasl_pending = False
        self._tls_started = False
        self._out_paused = False
        self._stream: MessageStream | None = None
        self._stream_done: defer.Deferred[None] | None = None
        self._errors = 0
        self._throttled = 0

    # -- connection ------------------------------------------------------------------

    def callLater(self, period: float, func: Callable[[], object]) -> interfaces.IDelayedCall:
        """The idle timer of ``TimeoutMixin``, on the factory's clock (``task.Clock`` in tests)."""
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:
        f = self.factory
        self.peer = getattr(connection(self.transport).getPeer(), "host", "unknown")
        self._counted = False
        admitted = f.admit(self.peer)
        if isinstance(admitted, defer.Deferred):
            # Counted by the first process ([server] workers): nothing is read until it answers.
            connection(self.transport).pauseProducing()
            admitted.addCallback(self._admission)
            return
        self._admit_or_refuse(admitted)

    def _admission(self, admitted: bool) -> None:
        if self._gone:                           # the client left while the count was asked for
            if admitted:
                self.factory.leave(self.peer)
            return
        connection(self.transport).resumeProducing()
        self._admit_or_refuse(admitted)

    def _admit_or_refuse(self, admitted: bool) -> None:
        f = self.factory
        if not admitted:
            self._send(ERR_TOO_MANY)
            self._close()
            return
        self._counted = True
        connection(self.transport).registerProducer(self, True)
        policies.TimeoutMixin.setTimeout(self, f.config.limits.idle_timeout)
        # The whole-session deadline ([limits] session_timeout) also ends busy clients
        # that never go idle, such as a slow drip of NOOPs.
        self._deadline = f.clock.callLater(f.config.limits.session_timeout, self.timeoutConnection)
        self._send(b"+OK " + f.config.server.hostname.encode("ascii", "replace") + b" POP3 server ready")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._gone = True
        policies.TimeoutMixin.setTimeout(self, None)
        deadline = getattr(self, "_deadline", None)
        if deadline is not None and deadline.active():
            deadline.cancel()
        if getattr(self, "_counted", False):
            self.factory.leave(self.peer)
            self._counted = False
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self.state != UPDATE:
            self._release()

    def timeoutConnection(self) -> None:
        """RFC 1939 section 3 autologout: close without entering the UPDATE state."""
        if self.state == UPDATE or self._gone:
            return
        maillog.event("pop3", "timeout", self.peer, user=self.mailbox_address or "-")
        self._send(ERR_AUTOLOGOUT)
        self._close()

    def _close(self) -> None:
        self._gone = True
        self._buffer.clear()
        hang_up(self.transport, client_reads=not self._out_paused)

    # -- IPushProducer: the transport's write buffer ----------------------------------

    def pauseProducing(self) -> None:
        """The client is not reading: run no command and stream nothing until it does."""
        self._out_paused = True

    def resumeProducing(self) -> None:
        """The write buffer drained: go on streaming, then with the pipelined commands."""
        self._out_paused = False
        self._pump()
        if not self._busy:
            self._drain()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._out_paused = True
        if self._stream is not None:
            self._stream.close()

    def _release(self) -> None:
        if self._locked is not None:
            self.factory.locks.release(self._locked)
            self._locked = None

    @property
    def encrypted(self) -> bool:
        """True on an implicit-TLS listener or after STLS."""
        return self._tls_started or ISSLTransport.providedBy(self.transport)

    def _login_allowed(self) -> bool:
        return self.encrypted or not self.factory.config.tls.auth_requires_tls

    # -- input -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        """Run complete lines one at a time, stopping while a command is in progress."""
        if self._draining:
            return
        self._draining = True
        try:
            while not self._busy and not self._gone and not self._out_paused:
                end = self._buffer.find(b"\n")
                if end < 0:
                    if len(self._buffer) > self.MAX_LINE:
                        self._send(ERR_TOO_LONG)
                        self._close()
                    break
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                policies.TimeoutMixin.resetTimeout(self)
                self._line(line)
        finally:
            self._draining = False
        self._flow()

    def _flow(self) -> None:
        """Stop reading the socket while a large pipelined backlog waits."""
        if self._gone:
            return
        self._reading_paused = hold_reading(self.transport, self._reading_paused,
                                            len(self._buffer) > self.MAX_PIPELINE)

    def _line(self, line: bytes) -> None:
        if self._sasl_pending:
            self._sasl_pending = False
            self._auth_response(line)
            return
        keyword, _, rest = line.partition(b" ")
        command = keyword.upper()
        if len(line) + 2 > self.MAX_COMMAND and command != b"AUTH":
            self._send(ERR_TOO_LONG)
            return
        if len(line) + 2 > self.MAX_LINE:
            self._send(ERR_TOO_LONG)
            return
        handler = self._COMMANDS.get(command)
        if handler is None:
            self._send(ERR_UNKNOWN)
            return
        if self.state == AUTHORIZATION and command in _TRANSACTION_COMMANDS:
            self._send(ERR_LOGIN_FIRST)
            return
        handler(self, rest)

    def _wait(self, d: defer.Deferred[Any]) -> None:
        """Hold later commands until ``d`` has fired (PIPELINING, RFC 2449 section 6.6)."""
        self._busy = True

        def unexpected(failure: Failure) -> None:
            log.failure("mailguard pop3: unexpected error", failure)
            if not self._gone:
                self._send(ERR_TEMPFAIL)

        def done(_: object) -> None:
            self._busy = False
            if not self._gone:
                self._drain()

        d.addErrback(unexpected).addBoth(done)

    # -- output ----------------------------------------------------------------------

    def _send(self, line: bytes) -> None:
        send(self.transport, line + b"\r\n")
        if line.startswith(b"-ERR") and not self._gone:
            self._errors += 1
            if self._errors >= self.MAX_ERRORS:
                maillog.event("pop3", "error-flood", self.peer, errors=self._errors)
                connection(self.transport).write(ERR_TOO_MANY_ERRORS + b"\r\n")
                self._close()

    def _stream_message(self, stream: MessageStream) -> defer.Deferred[None]:
        """Send ``stream`` chunk by chunk while the client reads; later commands wait."""
        self._stream = stream
        self._stream_done = defer.Deferred()
        done = self._stream_done
        self._wait(done)
        self._pump()
        return done

    def _pump(self) -> None:
        while self._stream is not None and not self._out_paused and not self._gone:
            policies.TimeoutMixin.resetTimeout(self)
            try:
                chunk = self._stream.next_chunk()
            except OSError:
                # "+OK" is already sent: closing is the only honest end of a cut message.
                self._stream = None
                self._close()
                return
            if chunk is None:
                self._stream, done = None, self._stream_done
                self._stream_done = None
                assert done is not None
                done.callback(None)
                return
            connection(self.transport).write(chunk)

    def _multiline(self, first: bytes, lines: list[bytes]) -> None:
        body = b"".join(line + b"\r\n" for line in lines)
        send(self.transport, first + b"\r\n" + body + b".\r\n")

    # -- AUTHORIZATION ---------------------------------------------------------------

    def capabilities(self) -> list[bytes]:
        """The CAPA list for the current state and channel (RFC 2449 section 6)."""
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self._login_allowed():
            caps += [b"USER", b"SASL PLAIN"]
        if not self.encrypted and self.factory.tls_context is not None and self.state == AUTHORIZATION:
            caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION mailguard")
        return caps

    def do_CAPA(self, rest: bytes) -> None:
        self._multiline(b"+OK Capability list follows", self.capabilities())


    #: verb -> handler, filled in by :class:`mailguard.pop3.server.POP3Server`
    _COMMANDS: dict[bytes, Callable[[Any, bytes], None]] = {}

    def _auth_response(self, line: bytes) -> None:
        """The client's answer to an AUTH challenge (:class:`mailguard.pop3.login.LoginCommands`)."""
        raise NotImplementedError
