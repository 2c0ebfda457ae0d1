"""The hardened ESMTP server: MX intake, submission (RFC 6409) and implicit-TLS submission (RFC 8314).

:class:`SMTPServer` subclasses Twisted's ``ESMTP`` but reads the wire itself,
because the base class's line handling is where its faults live
(``TWISTED-NOTES.md``).  What it does differently:

- Commands and DATA are parsed from one buffer.  A command line past
  :data:`MAX_COMMAND` is answered 500; a line with no end past it, or a DATA line
  past :data:`MAX_DATA_LINE`, is answered 500 and the connection closed — the rest
  is never read as commands.
- Only ``CRLF.CRLF`` ends DATA; a bare CR or LF anywhere in the message makes the
  final reply ``550 5.6.2`` (RFC 5321 section 2.3.8; the 2023 smuggling class).
- Replies go out strictly in order: while a command waits (AUTH, the store of a
  message) later pipelined commands wait too (RFC 2920).
- ``250`` to the final dot is sent only after every copy is on disk, fsynced; a
  failed store is ``451`` (transient), never 550.
- After ``STARTTLS`` anything pipelined in cleartext is discarded and all session
  state (HELO, transaction, AUTH) is forgotten (RFC 3207 section 4.2).  STARTTLS is
  not offered on an encrypted channel.
- AUTH PLAIN/LOGIN (RFC 4954) only on an encrypted channel unless configured;
  malformed or cancelled exchanges are answered 501, never a dropped connection.
- EHLO advertises PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES; SIZE=, BODY=
  are honoured; NOOP, VRFY (252), HELP work; HELO/EHLO is required before MAIL.
- Limits: recipients per message, message size, idle and whole-session timeouts,
  connections in total and per client IP, errors per session.

Every RCPT decision is logged in one line (:mod:`mailguard.app.maillog`).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import interfaces, protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailguard.app.connection import connection
from mailguard.app import limits as limits_mod
from mailguard.app import maillog
from mailguard.core import policy, replies
from mailguard.smtp._twistedmail import smtp as twsmtp
from mailguard.core.address import AddressError, parse_mail_arg, parse_path
from mailguard.auth.authenticator import Throttled
from mailguard.config import IPAddress
from mailguard.directory.base import DirectoryError
from mailguard.directory.facts import gather
from mailguard.milter import filtering
from mailguard.milter.client import Facts

if TYPE_CHECKING:
    from mailguard.app.service import Mailhost

MAX_COMMAND = 2048           # octets in a command line (RFC 5321 says 512; Postfix allows 2048)
MAX_AUTH_LINE = 12288        # RFC 4954 section 4
MAX_DATA_LINE = 65536        # a DATA line longer than this closes the connection
MAX_ERRORS = 50              # error replies in one session before 421
MAX_JUNK = 100               # NOOP/RSET/VRFY/HELP/EHLO/HELO in one session before 421 (command floods)
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "HELP", "EHLO", "HELO", "EXPN"})
MAX_PENDING_INPUT = 1 << 20  # pipelined input held while a reply is pending
MAX_HOPS = 50                # Received: headers before a message is taken for a mail loop

_ids = itertools.count()


def make_id(clock: IReactorTime) -> str:
    """A short unique message id: time, process id and a counter, base 36."""
    n = (int(clock.seconds() * 1000) << 20) ^ (os.getpid() << 8) ^ next(_ids)
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


@dataclass
class Envelope:
    """One mail transaction: the sender and the accepted recipients' decisions."""

    sender: str | None = None                  # None: no MAIL yet; "" is the null sender
    decisions: list[policy.Decision] = field(default_factory=list)
    declared_size: int = 0


class SMTPServer(twsmtp.ESMTP):
    """One SMTP session.  ``kind`` is ``smtp``, ``submission`` or ``submissions``."""

    def __init__(self, host: Mailhost, kind: str) -> None:
        twsmtp.ESMTP.__init__(self)
        self.mailhost = host
        self.cfg = host.cfg
        self.kind = kind
        self.clock = host.clock
        self._buf = bytearray()
        self._mode = "command"                  # command | data | auth | closed
        self._paused = False
        self._processing = False
        self._helo: str | None = None
        self._esmtp = False
        self._authenticated: str | None = None
        self._auth_state: tuple[str, str] | None = None   # (mechanism, username so far)
        self._envelope = Envelope()
        self._body: bytearray | None = None
        self._too_big = False
        self._line_len = 0
        self._errors = 0
        self._junk = 0
        self._admitted = False
        self._idle_call: interfaces.IDelayedCall | None = None
        self._session_call: interfaces.IDelayedCall | None = None
        self.client_ip = "0.0.0.0"
        self.local_ip = "0.0.0.0"
        self._client_ip_obj: IPAddress = policy.parse_ip("0.0.0.0")
        self._local_ip_obj: IPAddress | None = None

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        conn = connection(self.transport)
        peer, local = conn.getPeer(), conn.getHost()
        self.client_ip = getattr(peer, "host", str(peer))
        self.local_ip = getattr(local, "host", str(local))
        self._client_ip_obj = policy.parse_ip(self.client_ip)
        self._local_ip_obj = policy.parse_ip(self.local_ip)
        over = self.mailhost.limiter.admit(self.client_ip)
        if over is not None:
            refusal = replies.TOO_MANY_CONNECTIONS if over == limits_mod.TOTAL else replies.TOO_MANY_FROM_IP
            maillog.event("smtp", "refused", self.client_ip, reason=refusal.text)
            self._close(refusal)
            return
        self._admitted = True
        limits = self.cfg.limits
        self._idle_call = self.clock.callLater(limits.idle_timeout, self._timed_out)
        self._session_call = self.clock.callLater(limits.session_timeout, self._timed_out)
        self._send_raw(f"220 {self.cfg.server.hostname} ESMTP mailguard\r\n")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._mode = "closed"
        for call in (self._idle_call, self._session_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._session_call = None
        if self._admitted:
            self._admitted = False
            self.mailhost.limiter.release(self.client_ip)

    def _timed_out(self) -> None:
        if self._mode != "closed":
            maillog.event("smtp", "timeout", self.client_ip)
            self._close(replies.TIMEOUT)

    @property
    def encrypted(self) -> bool:
        """True when the channel is TLS (STARTTLS done, or an implicit-TLS listener)."""
        return interfaces.ISSLTransport.providedBy(self.transport)

    # -- output ----------------------------------------------------------------

    def _send_raw(self, text: str) -> None:
        if self._mode != "closed":
            connection(self.transport).write(text.encode("utf-8", "replace"))

    def reply(self, r: replies.Reply, suffix: str = "") -> None:
        """Send one reply line; 4xx/5xx replies count towards the error limit."""
        line = str(r) + (f" {suffix}" if suffix else "")
        self._send_raw(line + "\r\n")
        if r.code >= 500 or r.code in (421,):
            self._errors += 1
            if self._errors > MAX_ERRORS and self._mode != "closed":
                self._close(replies.Reply(421, "4.7.0", "Too many errors, closing connection"))

    def _close(self, r: replies.Reply) -> None:
        self._send_raw(f"{r}\r\n")
        self._mode = "closed"
        self._buf.clear()
        connection(self.transport).loseConnection()

    # -- input -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == "closed":
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.cfg.limits.idle_timeout)
        self._buf += data
        if self._paused:
            if len(self._buf) > MAX_PENDING_INPUT:
                connection(self.transport).pauseProducing()
            return
        self._process()

    def _process(self) -> None:
        if self._processing:                    # resumed from inside the loop: it goes on
            return
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False

    def _process_buffer(self) -> None:
        while not self._paused and self._mode != "closed" and self._buf:
            if self._mode == "data":
                if not self._data_input():
                    return
                continue
            nl = self._buf.find(b"\n")
            limit = MAX_AUTH_LINE if self._mode == "auth" else MAX_COMMAND
            if nl < 0:
                if len(self._buf) > limit:
                    self._close(replies.LINE_TOO_LONG)
                return
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                if self._mode == "auth":           # the exchange cannot go on in step
                    self._mode, self._auth_state = "command", None
                self.reply(replies.LINE_TOO_LONG)
            elif self._mode == "auth":
                self._auth_continue(line)
            else:
                self._command(line)

    def _pause(self) -> None:
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        if self._mode == "closed":
            return
        connection(self.transport).resumeProducing()
        if self._buf:
            self._process()

    # -- commands --------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        verb, _, arg = text.strip().partition(" ")
        verb = verb.upper()
        handler: Callable[[str], None] | None = getattr(self, f"smtp_{verb}", None) if verb.isalpha() else None
        if handler is None:
            if verb in ("CONNECT", "GET", "POST", "HEAD", "PUT", "USER"):
                maillog.event("smtp", "forbidden-command", self.client_ip, command=verb)
                self._close(replies.Reply(421, "4.7.0", "This is an SMTP server, closing connection"))
                return
            self.reply(replies.SYNTAX_ERROR)
            return
        if verb in JUNK_COMMANDS:
            self._junk += 1
            if self._junk > MAX_JUNK:
                maillog.event("smtp", "command-flood", self.client_ip, command=verb)
                self._close(replies.Reply(421, "4.7.0", "Too many commands without mail, closing connection"))
                return
        handler(arg.strip())

    def smtp_HELO(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def _greet(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg:
            self.reply(replies.Reply(501, "5.5.4", "Syntax: EHLO hostname"))
            return
        self._helo = arg
        self._esmtp = esmtp
        self._envelope = Envelope()
        host = self.cfg.server.hostname
        if not esmtp:
            self._send_raw(f"250 {host}\r\n")
            return
        lines = [host, "PIPELINING", f"SIZE {self.cfg.limits.max_message_size}", "8BITMIME",
                 "ENHANCEDSTATUSCODES"]
        if not self.encrypted and self.mailhost.tls is not None:
            lines.append("STARTTLS")
        if self._auth_offered() and not self._authenticated:
            lines.append("AUTH PLAIN LOGIN")
        out = "".join(f"250-{ln}\r\n" for ln in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._send_raw(out)

    def _auth_offered(self) -> bool:
        return self.encrypted or not self.cfg.tls.auth_requires_tls

    def smtp_NOOP(self, arg: str) -> None:
        self.reply(replies.NOOP_OK)

    def smtp_RSET(self, arg: str) -> None:
        self._envelope = Envelope()
        self.reply(replies.RESET_OK)

    def smtp_QUIT(self, arg: str) -> None:
        self._close(replies.Reply(221, "2.0.0", f"{self.cfg.server.hostname} closing connection"))

    def smtp_VRFY(self, arg: str) -> None:
        if not arg:
            self.reply(replies.ARG_SYNTAX)
        else:
            self.reply(replies.VRFY_CANNOT)

    def smtp_EXPN(self, arg: str) -> None:
        self.reply(replies.Reply(502, "5.5.1", "EXPN not available"))

    def smtp_HELP(self, arg: str) -> None:
        self.reply(replies.HELP)

    def smtp_BDAT(self, arg: str) -> None:
        self.reply(replies.NOT_IMPLEMENTED)

    def smtp_TURN(self, arg: str) -> None:
        self.reply(replies.NOT_IMPLEMENTED)

    def smtp_ETRN(self, arg: str) -> None:
        self.reply(replies.NOT_IMPLEMENTED)

    # -- STARTTLS (RFC 3207) -----------------------------------------------------

    def smtp_STARTTLS(self, arg: str) -> None:
        if self.encrypted:
            self.reply(replies.TLS_ALREADY)
            return
        if arg:
            self.reply(replies.Reply(501, "5.5.4", "STARTTLS takes no arguments"))
            return
        if self.mailhost.tls is None:
            self.reply(replies.TLS_UNAVAILABLE)
            return
        self.reply(replies.TLS_READY)
        # RFC 3207 section 4.2: forget everything learnt in cleartext, including what
        # the client pipelined after STARTTLS (command injection).
        self._buf.clear()
        self._helo = None
        self._esmtp = False
        self._authenticated = None
        self._envelope = Envelope()
        connection(self.transport).startTLS(self.mailhost.tls.options())

    # -- AUTH (RFC 4954) -----------------------------------------------------------

    def smtp_AUTH(self, arg: str) -> None:
        if self._helo is None or not self._esmtp:
            self.reply(replies.Reply(503, "5.5.1", "Send EHLO first"))
            return
        if not self._auth_offered():
            self.reply(replies.AUTH_NEEDS_TLS)
            return
        if self._authenticated:
            self.reply(replies.AUTH_ALREADY)
            return
        if self._envelope.sender is not None:
            self.reply(replies.AUTH_IN_TRANSACTION)
            return
        mech, _, initial = arg.partition(" ")
        mech, initial = mech.upper(), initial.strip()
        if not mech:
            self.reply(replies.Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        elif mech == "PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self._auth_state = ("PLAIN", "")
                self._mode = "auth"
                self._send_raw("334 \r\n")
        elif mech == "LOGIN":
            if initial:
                self._auth_login_step(initial)
            else:
                self._auth_state = ("LOGIN", "")
                self._mode = "auth"
                self._send_raw("334 VXNlcm5hbWU6\r\n")
        else:
            self.reply(replies.AUTH_MECHANISM)

    def _auth_continue(self, line: bytes) -> None:
        state, self._auth_state = self._auth_state, None
        self._mode = "command"
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            self.reply(replies.AUTH_CANCELLED)
        elif state is None:
            self.reply(replies.AUTH_MALFORMED)
        elif state[0] == "PLAIN":
            self._auth_plain(text)
        elif state[1] == "":
            self._auth_login_step(text)
        else:
            password = _b64(text)
            if password is None:
                self.reply(replies.AUTH_MALFORMED)
            else:
                self._auth_check(state[1], password)

    def _auth_login_step(self, text: str) -> None:
        user = _b64(text)
        if user is None or not user:
            self.reply(replies.AUTH_MALFORMED)
            return
        self._auth_state = ("LOGIN", user)
        self._mode = "auth"
        self._send_raw("334 UGFzc3dvcmQ6\r\n")

    def _auth_plain(self, text: str) -> None:
        decoded = "" if text == "=" else _b64(text)
        parts = decoded.split("\0") if decoded is not None else []
        if len(parts) != 3 or not parts[1]:
            self.reply(replies.AUTH_MALFORMED)
            return
        authzid, authcid, password = parts
        if authzid and authzid.lower() != authcid.lower():
            maillog.auth_failure("smtp", self.client_ip, authcid)
            self.reply(replies.AUTH_FAILED)
            return
        self._auth_check(authcid, password)

    def _auth_check(self, user: str, password: str) -> None:
        self._pause()
        d = self.mailhost.authenticator.check(user, password, self.client_ip, "smtp")

        def done(mailbox: str | None) -> None:
            if mailbox is None:
                self.reply(replies.AUTH_FAILED)
            else:
                self._authenticated = mailbox
                self.reply(replies.AUTH_OK)

        def failed(f: Failure) -> None:
            if f.check(Throttled):
                self.reply(replies.AUTH_THROTTLED)
            elif f.check(DirectoryError):          # the directory is down: say so in one line
                maillog.event("smtp", "auth-tempfail", self.client_ip, user=user, reason=f.getErrorMessage())
                self.reply(replies.AUTH_TEMPFAIL)
            else:
                maillog.log.failure("mailguard smtp auth error", f)
                self.reply(replies.AUTH_TEMPFAIL)

        d.addCallbacks(done, failed).addBoth(lambda _: self._resume())

    # -- the mail transaction ------------------------------------------------------

    def smtp_MAIL(self, arg: str) -> None:
        if self._helo is None:
            self.reply(replies.HELO_FIRST)
            return
        if self._envelope.sender is not None:
            self.reply(replies.NESTED_MAIL)
            return
        if self.kind != "smtp" and not self._authenticated:
            self.reply(replies.AUTH_REQUIRED)
            return
        try:
            path, params = parse_mail_arg(arg, "FROM")
            sender = parse_path(path, null_ok=True)
        except AddressError:
            self.reply(replies.BAD_SENDER_SYNTAX)
            return
        size = 0
        for name, value in params.items():
            if name == "SIZE" and value is not None and value.isdigit():
                size = int(value)
            elif name == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
                pass
            elif name == "AUTH" and value is not None:
                pass                               # RFC 4954 section 5: accepted, not trusted
            else:
                self.reply(replies.BAD_PARAM)
                return
        if size > self.cfg.limits.max_message_size:
            self.reply(replies.TOO_BIG)
            return
        sender_text = str(sender) if sender is not None else ""
        if self._authenticated and sender is not None and self.cfg.submission.enforce_sender:
            self._pause()
            d = self.mailhost.directory.addresses_of(self._authenticated)
            d.addCallbacks(self._sender_owned, self._lookup_failed, callbackArgs=(sender.key, sender_text, size))
            d.addBoth(lambda _: self._resume())
            return
        self._envelope = Envelope(sender=sender_text, declared_size=size)
        self.reply(replies.SENDER_OK)

    def _sender_owned(self, owned: frozenset[str], key: str, sender_text: str, size: int) -> None:
        if key not in owned:
            maillog.event("smtp", "sender-refused", self.client_ip, user=self._authenticated, sender=sender_text)
            self.reply(replies.SENDER_NOT_OWNED)
            return
        self._envelope = Envelope(sender=sender_text, declared_size=size)
        self.reply(replies.SENDER_OK)

    def _lookup_failed(self, f: Failure) -> None:
        """A directory lookup for MAIL failed: 4xx, never a pass."""
        if not f.check(DirectoryError):
            maillog.log.failure("mailguard smtp directory lookup error", f)
        self.reply(self.cfg.replies.directory_failure)

    def smtp_RCPT(self, arg: str) -> None:
        env = self._envelope
        if env.sender is None:
            self.reply(replies.MAIL_FIRST)
            return
        try:
            path, params = parse_mail_arg(arg, "TO")
        except AddressError:
            self.reply(replies.ARG_SYNTAX)
            return
        if params:
            self.reply(replies.BAD_PARAM)
            return
        if len(env.decisions) >= self.cfg.limits.max_recipients:
            self.reply(replies.TOO_MANY_RCPT)
            return
        who = self._client()
        self._pause()
        d = gather(lambda facts: policy.decide(self.cfg, facts, who, path), self.mailhost.directory)
        d.addErrback(self._decision_failed, path)
        d.addCallback(self._decided, env)
        d.addBoth(lambda _: self._resume())

    def _decision_failed(self, f: Failure, path: str) -> policy.Decision:
        """The directory could not answer for this recipient: 4xx (directory_failure)."""
        if not f.check(DirectoryError):
            maillog.log.failure("mailguard smtp directory lookup error", f)
        return policy.directory_failure(self.cfg, path)

    def _decided(self, decision: policy.Decision, env: Envelope) -> None:
        maillog.decision(self.client_ip, self.local_ip, self._helo or "", env.sender or "", decision.recipient,
                         decision.rule, decision.reply)
        if decision.accepted:
            env.decisions.append(decision)
        self.reply(decision.reply)

    def smtp_DATA(self, arg: str) -> None:
        env = self._envelope
        if env.sender is None:
            self.reply(replies.MAIL_FIRST)
        elif not env.decisions:
            self.reply(replies.NO_VALID_RCPT)
        elif arg:
            self.reply(replies.ARG_SYNTAX)
        else:
            self._mode = "data"
            self._body = bytearray(b"\r\n")     # a virtual CRLF: the first line can be "."
            self._too_big = False
            self._line_len = 0
            self._send_raw("354 End data with <CR><LF>.<CR><LF>\r\n")

    def _data_input(self) -> bool:
        """Consume buffered DATA; True when the message ended and commands follow."""
        assert self._body is not None
        data = bytes(self._buf)
        self._buf.clear()
        if self._long_line(data):
            self._close(replies.LINE_TOO_LONG)
            return False
        body = self._body
        start = max(0, len(body) - 4)
        body += data
        end = body.find(b"\r\n.\r\n", start)
        if end < 0:
            if len(body) > self.cfg.limits.max_message_size + 2:
                self._too_big = True
                del body[:-4]
            return False
        self._buf += body[end + 5:]
        message = bytes(body[2: end + 2])
        self._body = None
        self._mode = "command"
        self._end_of_data(message)
        return True

    def _long_line(self, data: bytes) -> bool:
        first = data.find(b"\n")
        if first < 0:
            self._line_len += len(data)
            return self._line_len > MAX_DATA_LINE
        if self._line_len + first > MAX_DATA_LINE:
            return True
        if len(data) > MAX_DATA_LINE and max(map(len, data.split(b"\n"))) > MAX_DATA_LINE:
            return True
        self._line_len = len(data) - data.rfind(b"\n") - 1
        return False

    def _end_of_data(self, message: bytes) -> None:
        env, self._envelope = self._envelope, Envelope()
        if self._too_big or len(message) > self.cfg.limits.max_message_size:
            self.reply(replies.TOO_BIG)
            return
        crlf = message.count(b"\r\n")
        if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
            maillog.event("smtp", "bare-linefeed", self.client_ip, sender=env.sender)
            self.reply(replies.BARE_LINEFEED)
            return
        # Remove dot-stuffing (RFC 5321 section 4.5.2).
        message = (b"\r\n" + message).replace(b"\r\n.", b"\r\n")[2:]
        if _hops(message) > MAX_HOPS:
            maillog.event("smtp", "mail-loop", self.client_ip, sender=env.sender)
            self.reply(replies.TOO_MANY_HOPS)
            return
        msg_id = make_id(self.clock)
        received = self._received(msg_id, env)
        self._pause()
        if filtering.applies(self.cfg, self._client()):
            filtered = Deferred.fromCoroutine(self._filter_and_store(msg_id, env, received, message))
            filtered.addErrback(self._filter_failed, msg_id).addBoth(lambda _: self._resume())
            return
        d = self.mailhost.store.store(msg_id, env.sender or "", env.decisions, received, message)

        def stored(_: object) -> None:
            maillog.event("smtp", "stored", self.client_ip, id=msg_id, sender=env.sender,
                          rcpts=len(env.decisions), size=len(message))
            self._junk = 0                  # a client that sends mail is not flooding
            self.reply(replies.QUEUED, msg_id)

        def failed(f: Failure) -> None:
            maillog.log.failure("mailguard smtp store failed for {id}", f, id=msg_id)
            self.reply(replies.STORE_FAILED)

        d.addCallbacks(stored, failed).addBoth(lambda _: self._resume())

    def _client(self) -> policy.Client:
        return policy.Client(self._client_ip_obj, self._local_ip_obj, self._authenticated,
                             self.mailhost.pop_before_smtp.allowed(self.client_ip))

    async def _filter_and_store(self, msg_id: str, env: Envelope, received: bytes, message: bytes) -> None:
        """Run the milters ([filters]), then store what they left, held if they quarantined it."""
        transport: Any = self.transport
        peer, local = transport.getPeer(), transport.getHost()
        facts = Facts(hostname=self.cfg.server.hostname, daemon_name=self.kind, client_addr=self.client_ip,
                      client_port=getattr(peer, "port", 0), client_name="unknown", local_addr=self.local_ip,
                      local_port=getattr(local, "port", 0), helo=self._helo or "", sender=env.sender or "",
                      recipients=list(dict.fromkeys(d.recipient for d in env.decisions)), queue_id=msg_id,
                      auth_authen=self._authenticated or "", tls_version=filtering.tls_version(self.transport))
        result = await filtering.filter_transaction(self.cfg, self.mailhost.milters, self.mailhost.directory,
                                                    facts, env.decisions, received, message)
        if result.action == "refuse":
            assert result.reply is not None
            self.reply(result.reply)
            return
        if result.action == "store":
            await self.mailhost.store.store(msg_id, result.sender, result.decisions, b"", result.message,
                                            held=result.held)
            maillog.event("smtp", "held" if result.held else "stored", self.client_ip, id=msg_id,
                          sender=result.sender, rcpts=len(result.decisions), size=len(result.message))
        self._junk = 0
        self.reply(replies.QUEUED, msg_id)

    def _filter_failed(self, f: Failure, msg_id: str) -> None:
        if f.check(DirectoryError):
            self.reply(self.cfg.replies.directory_failure)
            return
        maillog.log.failure("mailguard smtp filtering or store failed for {id}", f, id=msg_id)
        self.reply(replies.STORE_FAILED)

    def _received(self, msg_id: str, env: Envelope) -> bytes:
        """The Received: header (RFC 5321 section 4.4; RFC 3848 protocol names)."""
        proto = "ESMTP" if self._esmtp else "SMTP"
        if self.encrypted:
            proto += "S"
        if self._authenticated:
            proto += "A"
        rcpt = f"\r\n\tfor <{env.decisions[0].recipient}>" if len(env.decisions) == 1 else ""
        helo = maillog.clean(self._helo or "unknown")
        ip = self.client_ip
        literal = f"IPv6:{ip}" if ":" in ip else ip
        auth = " (authenticated sender)" if self._authenticated else ""
        date = _date(self.clock.seconds())
        return (f"Received: from {helo} ([{literal}]){auth}\r\n\tby {self.cfg.server.hostname} (mailguard) "
                f"with {proto} id {msg_id}{rcpt};\r\n\t{date}\r\n").encode("utf-8", "replace")


def _hops(message: bytes) -> int:
    """How many Received: headers the message carries (RFC 5321 section 6.3, loop detection)."""
    end = message.find(b"\r\n\r\n")
    head = b"\r\n" + (message if end < 0 else message[:end]).lower()
    return head.count(b"\r\nreceived:")


_last_date: tuple[int, str] = (-1, "")


def _date(now: float) -> str:
    """RFC 5322 date for the Received: header, computed once per second."""
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        _last_date = (second, formatdate(second, localtime=True))
    return _last_date[1]


def _b64(text: str) -> str | None:
    """Decode a base64 SASL token to text, or None when malformed."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None


class SMTPFactory(protocol.ServerFactory):
    """Builds :class:`SMTPServer` sessions for one listener kind."""

    noisy = False

    def __init__(self, host: Mailhost, kind: str) -> None:
        self.mailhost = host
        self.kind = kind

    def buildProtocol(self, addr: object) -> SMTPServer:
        p = SMTPServer(self.mailhost, self.kind)
        p.factory = self
        return p

