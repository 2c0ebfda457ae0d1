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

from typing import Callable

from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import IReactorTime

from mailguard.app.limits import ConnectionLimiter, Limiter
from mailguard.app.tls import TLSContext
from mailguard.auth.authenticator import Authenticator, PopBeforeSmtp
from mailguard.config import Config
from mailguard.pop3.login import LoginCommands
from mailguard.pop3.mailbox import MailboxCommands
from mailguard.pop3.session import *  # noqa: F401,F403 - the replies, for callers and tests
from mailguard.pop3.session import RunInThread
from mailguard.storage.poplock import LockTable


class POP3Server(LoginCommands, MailboxCommands):
    """One POP3 session: the wire (:class:`~mailguard.pop3.session.POP3Session`) and every command."""

    _COMMANDS: dict[bytes, Callable[[POP3Server, bytes], None]] = {
        b"CAPA": LoginCommands.do_CAPA, b"STLS": LoginCommands.do_STLS, b"USER": LoginCommands.do_USER,
        b"PASS": LoginCommands.do_PASS, b"AUTH": LoginCommands.do_AUTH, b"APOP": LoginCommands.do_APOP,
        b"STAT": MailboxCommands.do_STAT, b"LIST": MailboxCommands.do_LIST, b"UIDL": MailboxCommands.do_UIDL,
        b"RETR": MailboxCommands.do_RETR, b"TOP": MailboxCommands.do_TOP, b"DELE": MailboxCommands.do_DELE,
        b"RSET": MailboxCommands.do_RSET, b"NOOP": MailboxCommands.do_NOOP, b"QUIT": MailboxCommands.do_QUIT,
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
        self.limiter: Limiter = ConnectionLimiter(config.limits.max_connections, config.limits.max_connections_per_ip)

    def admit(self, ip: str) -> bool | defer.Deferred[bool]:
        """Count a new connection; False when a limit in ``[limits]`` is reached (later, with
        ``[server] workers``: a Deferred)."""
        over = self.limiter.admit(ip)
        if isinstance(over, defer.Deferred):
            return over.addCallback(lambda refused: refused is None)
        return over is None

    def leave(self, ip: str) -> None:
        """A counted connection ended."""
        self.limiter.release(ip)

