"""SMTP AUTH (RFC 4954) with PLAIN and LOGIN, decoded by :mod:`mailguard.auth.sasl`.

AUTH is offered and taken only on an encrypted channel unless ``[tls]
auth_requires_tls`` is false, after EHLO, outside a transaction and once per
session.  Malformed or cancelled exchanges are answered 501, never a dropped
connection; a proxy login (an authorization identity other than the login) is a
failed login.  While the password is checked, later pipelined commands wait.
"""

from __future__ import annotations

from twisted.python.failure import Failure

from mailguard.app import maillog
from mailguard.auth import sasl
from mailguard.auth.authenticator import Throttled
from mailguard.core import replies
from mailguard.smtp.context import SMTPContext
from mailguard.smtp.session import Session
from mailguard.smtp.wire import AUTH, CLOSED, COMMAND

MAX_THROTTLED = 3            # throttled AUTH attempts in one session before it is closed

EHLO_FIRST = replies.Reply(503, "5.5.1", "Send EHLO first")
AUTH_SYNTAX = replies.Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")


class AuthCommands(Session):
    """The AUTH command and its continuation lines."""

    def __init__(self, ctx: SMTPContext, kind: str) -> None:
        super().__init__(ctx, kind)
        self._auth_state: tuple[str, str] | None = None   # (mechanism, username so far)
        self._throttled = 0

    def auth_offered(self) -> bool:
        """May AUTH be used on this channel?"""
        return self.encrypted or not self.cfg.tls.auth_requires_tls

    def smtp_AUTH(self, arg: str) -> None:
        if self.helo is None or not self.esmtp:
            self.reply(EHLO_FIRST)
            return
        if not self.auth_offered():
            self.reply(replies.AUTH_NEEDS_TLS)
            return
        if self.authenticated:
            self.reply(replies.AUTH_ALREADY)
            return
        if self.envelope.sender is not None:
            self.reply(replies.AUTH_IN_TRANSACTION)
            return
        mech, _, initial = arg.partition(" ")
        mech, initial = mech.upper(), initial.strip()
        if not mech:
            self.reply(AUTH_SYNTAX)
        elif mech == "PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self._challenge(("PLAIN", ""), "")
        elif mech == "LOGIN":
            if initial:
                self._auth_login_user(initial)
            else:
                self._challenge(("LOGIN", ""), sasl.LOGIN_USER_CHALLENGE)
        else:
            self.reply(replies.AUTH_MECHANISM)

    def _challenge(self, state: tuple[str, str], text: str) -> None:
        self._auth_state = state
        self.mode = AUTH
        self.send_raw(f"334 {text}\r\n")

    def auth_aborted(self) -> None:
        self._auth_state = None

    def auth_response_received(self, line: bytes) -> None:
        state, self._auth_state = self._auth_state, None
        self.mode = COMMAND
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            self.reply(replies.AUTH_CANCELLED)
        elif state is None:
            self.reply(replies.AUTH_MALFORMED)
        elif state[0] == "PLAIN":
            self._auth_plain(text)
        elif state[1] == "":
            self._auth_login_user(text)
        else:
            password = sasl.decode_text(text)
            if password is None:
                self.reply(replies.AUTH_MALFORMED)
            else:
                self._auth_check(state[1], password)

    def _auth_login_user(self, text: str) -> None:
        user = sasl.decode_text(text)
        if not user:
            self.reply(replies.AUTH_MALFORMED)
            return
        self._challenge(("LOGIN", user), sasl.LOGIN_PASSWORD_CHALLENGE)

    def _auth_plain(self, text: str) -> None:
        creds = sasl.decode_plain(text)
        if creds is None:
            self.reply(replies.AUTH_MALFORMED)
        elif creds.proxy:
            maillog.auth_failure("smtp", self.client_ip, creds.authcid)
            self.reply(replies.AUTH_FAILED)
        else:
            self._auth_check(creds.authcid, creds.password)

    def _auth_check(self, user: str, password: str) -> None:
        self.pause()
        d = self.ctx.authenticator.check(user, password, self.client_ip, "smtp")

        def done(mailbox: str | None) -> None:
            if mailbox is None:
                self.reply(replies.AUTH_FAILED)
            else:
                self.authenticated = mailbox
                self.reply(replies.AUTH_OK)

        def failed(f: Failure) -> None:
            if f.check(Throttled):
                # A refusal costs the client nothing to provoke: a few end the session.
                self._throttled += 1
                self.reply(replies.AUTH_THROTTLED)
                if self._throttled >= MAX_THROTTLED and self.mode != CLOSED:
                    maillog.event("smtp", "throttled-close", self.client_ip, refusals=self._throttled)
                    self.close(replies.AUTH_THROTTLED_CLOSE)
            else:
                maillog.log.failure("mailguard smtp auth error", f)
                self.reply(replies.AUTH_TEMPFAIL)

        d.addCallbacks(done, failed).addBoth(lambda _: self.resume())
