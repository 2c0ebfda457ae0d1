"""The hardened SMTP server: MX intake, submission (RFC 6409) and implicit-TLS submission (RFC 8314).

A session is built in layers, one module each:

- :mod:`~mailguard.smtp.wire`: framing, line limits, DATA end detection, reply order;
- :mod:`~mailguard.smtp.session`: admission, timeouts, the state the commands share;
- :mod:`~mailguard.smtp.authcommand`: AUTH PLAIN/LOGIN (RFC 4954);
- :mod:`~mailguard.smtp.transaction`: MAIL, RCPT, DATA, the store (trace headers in
  :mod:`~mailguard.smtp.trace`);
- here: command dispatch, HELO/EHLO, the small commands and STARTTLS, and the factory.

EHLO advertises PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, STARTTLS (on a
cleartext channel with a certificate) and AUTH (where it may be used).  After
``STARTTLS`` anything pipelined in cleartext is discarded and all session state
(HELO, transaction, AUTH) is forgotten (RFC 3207 section 4.2).  Commands that only
cost the server (NOOP, RSET, VRFY, HELP, EHLO, HELO, EXPN) are limited to
:data:`MAX_JUNK` per session between messages; an HTTP or POP3 verb closes the
connection.  Every session gets what it needs from an :class:`SMTPContext`.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import protocol

from mailguard.app import maillog
from mailguard.app.connection import connection
from mailguard.core import replies
from mailguard.smtp.authcommand import AuthCommands
from mailguard.smtp.context import SMTPContext
from mailguard.smtp.session import Envelope
from mailguard.smtp.transaction import MailCommands

MAX_JUNK = 100               # NOOP/RSET/VRFY/HELP/EHLO/HELO in one session before 421 (command floods)
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "HELP", "EHLO", "HELO", "EXPN"})
FOREIGN_VERBS = frozenset({"CONNECT", "GET", "POST", "HEAD", "PUT", "USER"})

NOT_SMTP = replies.Reply(421, "4.7.0", "This is an SMTP server, closing connection")
COMMAND_FLOOD = replies.Reply(421, "4.7.0", "Too many commands without mail, closing connection")
EHLO_SYNTAX = replies.Reply(501, "5.5.4", "Syntax: EHLO hostname")
EXPN_UNAVAILABLE = replies.Reply(502, "5.5.1", "EXPN not available")
STARTTLS_SYNTAX = replies.Reply(501, "5.5.4", "STARTTLS takes no arguments")

__all__ = ["SMTPContext", "SMTPFactory", "SMTPServer"]


class SMTPServer(AuthCommands, MailCommands):
    """One SMTP session.  ``kind`` is ``smtp``, ``submission`` or ``submissions``."""

    def __init__(self, ctx: SMTPContext, kind: str) -> None:
        super().__init__(ctx, kind)
        self._junk = 0

    def command_received(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        verb, _, arg = text.strip().partition(" ")
        verb = verb.upper()
        handler: Callable[[str], None] | None = getattr(self, f"smtp_{verb}", None) if verb.isalpha() else None
        if handler is None:
            if verb in FOREIGN_VERBS:
                maillog.event("smtp", "forbidden-command", self.client_ip, command=verb)
                self.close(NOT_SMTP)
                return
            self.reply(replies.SYNTAX_ERROR)
            return
        if verb in JUNK_COMMANDS:
            self._junk += 1
            if self._junk > MAX_JUNK:
                maillog.event("smtp", "command-flood", self.client_ip, command=verb)
                self.close(COMMAND_FLOOD)
                return
        handler(arg.strip())

    def stored(self) -> None:
        self._junk = 0                  # a client that sends mail is not flooding

    # -- greeting --------------------------------------------------------------------

    def smtp_HELO(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def _greet(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg:
            self.reply(EHLO_SYNTAX)
            return
        self.helo = arg
        self.esmtp = esmtp
        self.envelope = Envelope()
        host = self.cfg.server.hostname
        if not esmtp:
            self.send_raw(f"250 {host}\r\n")
            return
        lines = [host, "PIPELINING", f"SIZE {self.cfg.limits.max_message_size}", "8BITMIME",
                 "ENHANCEDSTATUSCODES"]
        if not self.encrypted and self.ctx.tls is not None:
            lines.append("STARTTLS")
        if self.auth_offered() and not self.authenticated:
            lines.append("AUTH PLAIN LOGIN")
        self.send_raw("".join(f"250-{ln}\r\n" for ln in lines[:-1]) + f"250 {lines[-1]}\r\n")

    # -- the small commands ------------------------------------------------------------

    def smtp_NOOP(self, arg: str) -> None:
        self.reply(replies.NOOP_OK)

    def smtp_RSET(self, arg: str) -> None:
        self.envelope = Envelope()
        self.reply(replies.RESET_OK)

    def smtp_QUIT(self, arg: str) -> None:
        self.close(replies.Reply(221, "2.0.0", f"{self.cfg.server.hostname} closing connection"))

    def smtp_VRFY(self, arg: str) -> None:
        self.reply(replies.VRFY_CANNOT if arg else replies.ARG_SYNTAX)

    def smtp_EXPN(self, arg: str) -> None:
        self.reply(EXPN_UNAVAILABLE)

    def smtp_HELP(self, arg: str) -> None:
        self.reply(replies.HELP)

    def smtp_BDAT(self, arg: str) -> None:
        self.reply(replies.NOT_IMPLEMENTED)

    def smtp_TURN(self, arg: str) -> None:
        self.reply(replies.NOT_IMPLEMENTED)

    def smtp_ETRN(self, arg: str) -> None:
        self.reply(replies.NOT_IMPLEMENTED)

    # -- STARTTLS (RFC 3207) -----------------------------------------------------------

    def smtp_STARTTLS(self, arg: str) -> None:
        if self.encrypted:
            self.reply(replies.TLS_ALREADY)
            return
        if arg:
            self.reply(STARTTLS_SYNTAX)
            return
        if self.ctx.tls is None:
            self.reply(replies.TLS_UNAVAILABLE)
            return
        self.reply(replies.TLS_READY)
        # RFC 3207 section 4.2: forget everything learnt in cleartext, including what
        # the client pipelined after STARTTLS (command injection).
        self.discard_input()
        self.forget()
        connection(self.transport).startTLS(self.ctx.tls.options())


class SMTPFactory(protocol.ServerFactory):
    """Builds :class:`SMTPServer` sessions for one listener kind."""

    noisy = False

    def __init__(self, ctx: SMTPContext, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind

    def buildProtocol(self, addr: object) -> SMTPServer:
        p = SMTPServer(self.ctx, self.kind)
        p.factory = self
        return p
