"""The POP3 server: RFC 1939, CAPA and response codes (RFC 2449, RFC 3206), STLS
(RFC 2595) and AUTH PLAIN (RFC 5034, RFC 4616) over :mod:`mailguard.storage.maildir`.

This is a fresh protocol on ``Protocol`` + ``TimeoutMixin`` rather than a subclass of
``twisted.mail.pop3.POP3``: a subclass would have to replace the line handling
(to bound line lengths and drop pipelined cleartext after STLS), the dispatcher
(its error path crashes on str arguments and it reaches ``APOP``/``RPOP``/``LAST``
by method name), every command (they are written for its index-based ``IMailbox``
and a cred portal) and the capability list, leaving nothing of the base class in use.

Behaviour an administrator can rely on:

- Every malformed or unknown command gets ``-ERR``; the connection stays open.  A
  command line longer than 255 octets with its CRLF (RFC 2449 section 4) gets
  ``-ERR``; an unterminated line past :attr:`POP3Server.MAX_LINE` octets gets ``-ERR``
  and the connection is closed.
- Commands may be pipelined (RFC 2449 ``PIPELINING``): while a login, a mailbox scan,
  a ``RETR`` or the commit is in progress, later commands wait their turn.
- ``USER``/``PASS``/``AUTH`` are refused with ``-ERR [AUTH]`` on a cleartext channel
  while ``[tls] auth_requires_tls`` is true, and ``USER`` and ``SASL`` are then left
  out of ``CAPA`` (they reappear after ``STLS``).
- After ``+OK`` to ``STLS`` any input already received is discarded (RFC 2595
  section 4 / the STARTTLS injection of CVE-2011-0411).
- A mailbox is opened by one session at a time; a second gets
  ``-ERR [IN-USE] Mailbox is locked by another session``.
- Deletions and the seen flags are applied at ``QUIT`` only; a dropped or timed-out
  connection changes nothing (RFC 1939 sections 3 and 6).
- ``RETR``/``TOP`` stream the LF-stored file as CRLF through the stateful
  :class:`~mailguard.core.dotstuff.DotStuffer`, so a ``.`` line on a chunk boundary is
  stuffed like any other; ``LIST`` sizes equal the octets sent before stuffing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, interfaces, protocol, threads
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import implementer

from mailguard.app import maillog
from mailguard.auth import sasl
from mailguard.app.connection import connection
from mailguard.app.tls import TLSContext
from mailguard.auth.authenticator import Authenticator, PopBeforeSmtp, Throttled
from mailguard.directory.base import DirectoryError
from mailguard.config import Config
from mailguard.core.dotstuff import DotStuffer
from mailguard.app.limits import ConnectionLimiter
from mailguard.pop3 import stream as stream_mod
from mailguard.pop3.stream import MessageStream
from mailguard.storage.maildir import CommitResult, LockTable, Mailbox, MailboxLocked, maildir_path

log = Logger(namespace="mailguard")

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
class POP3Server(protocol.Protocol, policies.TimeoutMixin):
    """One POP3 session; see the module docstring.

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
        if not f.admit(self.peer):
            self._counted = False
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
        if self._out_paused:
            # The client stopped reading: a graceful close would wait for it forever.
            connection(self.transport).abortConnection()
        else:
            connection(self.transport).loseConnection()

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
        backlog = len(self._buffer) > self.MAX_PIPELINE
        if backlog and not self._reading_paused:
            self._reading_paused = True
            connection(self.transport).pauseProducing()
        elif not backlog and self._reading_paused:
            self._reading_paused = False
            connection(self.transport).resumeProducing()

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
        connection(self.transport).write(line + b"\r\n")
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
        connection(self.transport).write(first + b"\r\n" + body + b".\r\n")

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

    def do_STLS(self, rest: bytes) -> None:
        if rest:
            self._send(ERR_SYNTAX)
        elif self.state != AUTHORIZATION:
            self._send(ERR_ALREADY)
        elif self.encrypted:
            self._send(ERR_TLS_ACTIVE)
        elif self.factory.tls_context is None:
            self._send(ERR_TLS_UNAVAILABLE)
        else:
            self._send(b"+OK Begin TLS negotiation")
            # RFC 2595 section 4: nothing sent in the clear after STLS may be acted on.
            self._buffer.clear()
            self._user = None
            connection(self.transport).startTLS(self.factory.tls_context.options())
            self._tls_started = True

    def _credentials_accepted(self) -> bool:
        """USER/PASS may be sent now: not logged in yet, and the channel is encrypted (or may be clear)."""
        if self.state != AUTHORIZATION:
            self._send(ERR_ALREADY)
            return False
        if not self._login_allowed():
            self._send(ERR_NEEDS_TLS)
            return False
        return True

    def do_USER(self, rest: bytes) -> None:
        if not self._credentials_accepted():
            return
        try:
            name = rest.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = ""
        if not name or not name.isprintable():
            self._send(ERR_SYNTAX)
            return
        self._user = name
        self._send(b"+OK Send PASS")

    def do_PASS(self, rest: bytes) -> None:
        if not self._credentials_accepted():
            return
        if self._user is None:
            self._send(ERR_USER_FIRST)
            return
        user, self._user = self._user, None
        try:
            password = rest.decode("utf-8")
        except UnicodeDecodeError:
            self._send(ERR_AUTH_FAILED)
            return
        self._login(user, password)

    def do_AUTH(self, rest: bytes) -> None:
        if self.state != AUTHORIZATION:
            self._send(ERR_ALREADY)
            return
        args = rest.split()
        if not args:
            # The mechanism list many clients probe with a bare AUTH.
            self._multiline(b"+OK Supported mechanisms follow",
                            [b"PLAIN"] if self._login_allowed() else [])
            return
        if args[0].upper() != b"PLAIN" or len(args) > 2:
            self._send(ERR_MECHANISM)
            return
        if not self._login_allowed():
            self._send(ERR_NEEDS_TLS)
            return
        if len(args) == 2:
            self._auth_response(args[1])
        else:
            self._sasl_pending = True
            self._send(b"+ ")

    def _auth_response(self, line: bytes) -> None:
        if line.strip() == b"*":
            self._send(ERR_AUTH_CANCELLED)
            return
        creds = sasl.decode_plain(line.strip())
        if creds is None:
            self._send(ERR_AUTH_MALFORMED)
        elif creds.proxy:                      # no logins on behalf of someone else
            maillog.auth_failure("pop3", self.peer, creds.authcid)
            self._send(ERR_AUTH_FAILED)
        else:
            self._login(creds.authcid, creds.password)

    def do_APOP(self, rest: bytes) -> None:
        self._send(b"-ERR APOP not supported")

    def _login(self, login: str, password: str) -> None:
        """Check the credentials, lock the mailbox, scan it; later commands wait."""
        f = self.factory
        d = defer.maybeDeferred(f.authenticator.check, login, password, self.peer, "pop3")
        d.addCallbacks(self._authenticated, self._auth_error)
        self._wait(d)

    def _auth_error(self, failure: Failure) -> None:
        if self._gone:
            return
        if failure.check(Throttled):
            # Refusals cost the client nothing to provoke: a few end the session.
            self._throttled += 1
            self._send(ERR_THROTTLED)
            if self._throttled >= self.MAX_THROTTLED and not self._gone:
                maillog.event("pop3", "throttled-close", self.peer, refusals=self._throttled)
                self._close()
        elif failure.check(DirectoryError):        # the directory is down: say so in one line
            maillog.event("pop3", "auth-tempfail", self.peer, reason=failure.getErrorMessage())
            self._send(ERR_TEMPFAIL)
        else:
            log.failure("mailguard pop3: authentication error", failure)
            self._send(ERR_TEMPFAIL)

    def _authenticated(self, address: str | None) -> defer.Deferred[None] | None:
        if self._gone:
            return None
        if address is None:
            self._send(ERR_AUTH_FAILED)
            return None
        f = self.factory
        try:
            path = maildir_path(f.config.mail_dir, address)
            f.locks.acquire(path)
        except MailboxLocked:
            maillog.event("pop3", "in-use", self.peer, user=address)
            self._send(ERR_IN_USE)
            return None
        except ValueError:
            log.error("mailguard pop3: unusable mailbox address {address!r}", address=address)
            self._send(ERR_TEMPFAIL)
            return None
        self._locked = path
        d = f.run_in_thread(Mailbox.open, path)
        return d.addCallbacks(self._opened, self._open_failed, callbackArgs=(address,))

    def _opened(self, mailbox: Mailbox, address: str) -> None:
        if self._gone:
            return
        self.mailbox, self.mailbox_address = mailbox, address
        self.state = TRANSACTION
        self.factory.pop_before_smtp.record(self.peer)
        count, octets = mailbox.stat()
        maillog.event("pop3", "open", self.peer, user=address, messages=count, octets=octets)
        self._send(b"+OK Logged in, %d messages (%d octets)" % (count, octets))

    def _open_failed(self, failure: Failure) -> None:
        log.failure("mailguard pop3: cannot open mailbox", failure)
        self._release()
        if not self._gone:
            self._send(ERR_TEMPFAIL)

    # -- TRANSACTION -----------------------------------------------------------------

    def _message_arg(self, rest: bytes) -> int | None:
        """The one message-number argument; answers -ERR itself when there is none."""
        args = rest.split(b" ")
        n = _number(args[0]) if len(args) == 1 else None
        if n is None:
            self._send(ERR_SYNTAX)
            return None
        assert self.mailbox is not None
        try:
            self.mailbox.message(n)
        except KeyError:
            self._send(ERR_NO_SUCH)
            return None
        return n

    def do_STAT(self, rest: bytes) -> None:
        if rest:
            self._send(ERR_SYNTAX)
            return
        assert self.mailbox is not None
        self._send(b"+OK %d %d" % self.mailbox.stat())

    def do_LIST(self, rest: bytes) -> None:
        assert self.mailbox is not None
        if rest:
            n = self._message_arg(rest)
            if n is not None:
                self._send(b"+OK %d %d" % (n, self.mailbox.message(n).size))
            return
        count, octets = self.mailbox.stat()
        self._multiline(b"+OK %d messages (%d octets)" % (count, octets),
                        [b"%d %d" % (i, m.size) for i, m in self.mailbox.live()])

    def do_UIDL(self, rest: bytes) -> None:
        assert self.mailbox is not None
        if rest:
            n = self._message_arg(rest)
            if n is not None:
                self._send(b"+OK %d %s" % (n, self.mailbox.message(n).uid.encode("ascii")))
            return
        self._multiline(b"+OK Unique-ID listing follows",
                        [b"%d %s" % (i, m.uid.encode("ascii")) for i, m in self.mailbox.live()])

    def do_RETR(self, rest: bytes) -> None:
        n = self._message_arg(rest)
        if n is None:
            return
        assert self.mailbox is not None
        try:
            fh = self.mailbox.open_message(n)
        except OSError:
            self._send(ERR_VANISHED)
            return
        size = self.mailbox.message(n).size
        self._send(b"+OK %d octets" % size)
        if size <= stream_mod.CHUNK:
            # Most mail: one read, one write, no streaming round trips.
            with fh:
                data = fh.read()
            stuffer = DotStuffer()
            connection(self.transport).write(stuffer.feed(data) + stuffer.finish())
            self.mailbox.mark_retrieved(n)
            return
        mailbox = self.mailbox
        self._stream_message(MessageStream(fh)).addCallback(lambda _: mailbox.mark_retrieved(n))

    def do_TOP(self, rest: bytes) -> None:
        args = rest.split(b" ")
        lines = _number(args[1]) if len(args) == 2 else None
        if lines is None:
            self._send(ERR_SYNTAX)
            return
        n = self._message_arg(args[0])
        if n is None:
            return
        assert self.mailbox is not None
        try:
            fh = self.mailbox.open_message(n)
        except OSError:
            self._send(ERR_VANISHED)
            return
        self._send(b"+OK Top of message follows")
        self._stream_message(MessageStream(fh, lines))

    def do_DELE(self, rest: bytes) -> None:
        n = self._message_arg(rest)
        if n is None:
            return
        assert self.mailbox is not None
        self.mailbox.delete(n)
        self._send(b"+OK Message %d deleted" % n)

    def do_RSET(self, rest: bytes) -> None:
        if rest:
            self._send(ERR_SYNTAX)
            return
        assert self.mailbox is not None
        self.mailbox.reset()
        count, octets = self.mailbox.stat()
        self._send(b"+OK %d messages (%d octets)" % (count, octets))

    def do_NOOP(self, rest: bytes) -> None:
        self._send(ERR_SYNTAX if rest else b"+OK")

    def do_QUIT(self, rest: bytes) -> None:
        if self.state != TRANSACTION or self.mailbox is None:
            self._send(b"+OK Bye")
            self._close()
            return
        self.state = UPDATE
        mailbox, address = self.mailbox, self.mailbox_address
        d = self.factory.run_in_thread(mailbox.commit)

        def committed(result: CommitResult) -> None:
            maillog.event("pop3", "commit", self.peer, user=address, deleted=result.deleted,
                          failed=result.failed)
            self._release()
            if self._gone:
                return
            if result.failed:
                self._send(ERR_COMMIT)
            else:
                self._send(b"+OK Bye, %d messages deleted" % result.deleted)
            self._close()

        def failed(failure: Failure) -> None:
            log.failure("mailguard pop3: commit failed", failure)
            self._release()
            if not self._gone:
                self._send(ERR_COMMIT)
                self._close()

        self._wait(d.addCallbacks(committed, failed))

    _COMMANDS: dict[bytes, Callable[[POP3Server, bytes], None]] = {
        b"CAPA": do_CAPA, b"STLS": do_STLS, b"USER": do_USER, b"PASS": do_PASS,
        b"AUTH": do_AUTH, b"APOP": do_APOP, b"STAT": do_STAT, b"LIST": do_LIST,
        b"UIDL": do_UIDL, b"RETR": do_RETR, b"TOP": do_TOP, b"DELE": do_DELE,
        b"RSET": do_RSET, b"NOOP": do_NOOP, b"QUIT": do_QUIT,
    }


#: The lock table every factory in this process shares unless given its own, so that the
#: ``pop3`` and ``pop3s`` listeners lock each other out of a mailbox too.
PROCESS_LOCKS = LockTable()


class POP3Factory(protocol.ServerFactory[POP3Server]):
    """Builds :class:`POP3Server` sessions sharing one lock table and connection counts.

    :param authenticator: ``check(login, password, client_ip, service) -> Deferred[str | None]``
        (canonical mailbox address, or None), errback ``mailguard.auth.authenticator.Throttled``.
    :param pop_before_smtp: ``record(ip)`` after each successful login.
    :param tls_context: ``options()`` for ``startTLS``; None: no STLS.
    :param clock: the reactor's time (idle timeouts); the global reactor when None.
    :param run_in_thread: ``deferToThread``-like; tests pass a synchronous one.
    :param locks: the mailbox locks; by default the one table of this process.
    """

    protocol = POP3Server
    noisy = False

    def __init__(self, config: Config, authenticator: Authenticator, pop_before_smtp: PopBeforeSmtp,
                 tls_context: TLSContext | None, clock: IReactorTime | None = None,
                 run_in_thread: RunInThread | None = None, locks: LockTable | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = IReactorTime(reactor)
        self.config = config
        self.authenticator = authenticator
        self.pop_before_smtp = pop_before_smtp
        self.tls_context = tls_context
        self.clock = clock
        self.run_in_thread: RunInThread = run_in_thread or threads.deferToThread
        self.locks = locks if locks is not None else PROCESS_LOCKS
        self.limiter = ConnectionLimiter(config.limits.max_connections, config.limits.max_connections_per_ip)

    def admit(self, ip: str) -> bool:
        """Count a new connection; False when a limit in ``[limits]`` is reached."""
        return self.limiter.admit(ip) is None

    def leave(self, ip: str) -> None:
        """A counted connection ended."""
        self.limiter.release(ip)
