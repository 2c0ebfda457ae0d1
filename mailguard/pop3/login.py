"""POP3 logins: STLS (RFC 2595), USER/PASS (RFC 1939), AUTH PLAIN (RFC 5034, RFC 4616).

A login is checked by the shared authenticator (throttled per client and per
account), then the mailbox is opened and locked; a second session on it gets
``-ERR [IN-USE]`` (RFC 2449 response codes).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from mailguard.app import maillog
from mailguard.app.connection import connection
from mailguard.auth import sasl
from mailguard.auth.authenticator import Throttled
from mailguard.directory.base import DirectoryError
from mailguard.pop3.session import (AUTHORIZATION, ERR_ALREADY, ERR_AUTH_CANCELLED, ERR_AUTH_FAILED,
                                     ERR_AUTH_MALFORMED, ERR_IN_USE, ERR_MECHANISM, ERR_NEEDS_TLS,
                                     ERR_SYNTAX, ERR_TEMPFAIL, ERR_THROTTLED, ERR_TLS_ACTIVE,
                                     ERR_TLS_UNAVAILABLE, ERR_USER_FIRST, TRANSACTION)
from mailguard.pop3.session import POP3Session, log
from mailguard.storage.maildir import Mailbox, maildir_path
from mailguard.storage.poplock import MailboxLocked


class LoginCommands(POP3Session):
    """CAPA's login part, STLS, USER, PASS, AUTH and APOP (refused)."""

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

