"""Credential checks shared by SMTP AUTH and POP3, with throttling of password guessing.

:class:`Authenticator` checks a login through the directory's ``verify_password``
(which hashes in a thread, never on the reactor) and slows down guessing:

- failures are counted per client IP and per account over a sliding window of
  ``[limits] login_lockout`` seconds;
- from ``login_failures`` failures on, each further attempt from that IP waits
  ``2**(n - login_failures)`` seconds (at most 16) before it is checked;
- from ``3 * login_failures`` failures, the IP gets :class:`Throttled`
  (SMTP ``454 4.7.0``) until its oldest failures leave the window;
- failures against one account delay further attempts on it by at most 4 s, and only
  for clients that have failed before: a user's own correct login from a clean IP is
  never delayed, so an attacker cannot lock a user out.

:class:`PopBeforeSmtp` remembers, in memory only, the IPs that logged in over POP3;
a restart forgets them (clients log in again at their next mail check).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailguard.app import maillog
from mailguard.config import LimitsConfig

MAX_IP_DELAY = 16.0
MAX_ACCOUNT_DELAY = 4.0
MAX_PARALLEL_CHECKS = 2         # password hashes computed at once (one per core here)


class Throttled(Exception):
    """Too many failed logins from this client: answer 454 / -ERR [SYS/TEMP]."""


class _Window:
    """Timestamps of failures per key, pruned to a sliding window."""

    def __init__(self, clock: IReactorTime, span: float) -> None:
        self.clock = clock
        self.span = span
        self.events: dict[str, deque[float]] = {}

    def count(self, key: str) -> int:
        q = self.events.get(key)
        if not q:
            return 0
        cutoff = self.clock.seconds() - self.span
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self.events[key]
            return 0
        return len(q)

    def add(self, key: str) -> None:
        self.events.setdefault(key, deque()).append(self.clock.seconds())
        if len(self.events) > 100_000:              # bounded memory under a spray of IPs
            for k in list(self.events)[:10_000]:
                self.count(k)


Verify = Callable[[str, str], "defer.Deferred[str | None] | str | None"]


class Authenticator:
    """Checks logins; see the module docstring for the throttling rules."""

    def __init__(self, verify: Verify, clock: IReactorTime, limits: LimitsConfig,
                 run_in_thread: Callable[..., defer.Deferred[str | None]] | None = None) -> None:
        """``verify(login, password)`` gives the mailbox or None, as a Deferred (a
        :class:`~mailguard.directory.base.Directory`'s ``verify_password``); a blocking
        ``verify`` is given with the ``run_in_thread`` that runs it off the reactor."""
        self.verify = verify
        self.clock = clock
        self.threshold = limits.login_failures
        self.by_ip = _Window(clock, max(limits.login_lockout, 1))
        self.by_account = _Window(clock, max(limits.login_lockout, 1))
        self.run_in_thread = run_in_thread or defer.maybeDeferred
        self._in_flight: dict[str, int] = {}       # checks under way per IP
        # Each argon2 check holds ~19 MiB and a core: run at most this many at once, so a
        # login storm queues instead of multiplying memory by the thread pool's size.
        self._slots = defer.DeferredSemaphore(MAX_PARALLEL_CHECKS)

    def delay_for(self, login: str, client_ip: str) -> float:
        """Seconds to wait before checking this attempt; raises Throttled past the hard limit."""
        # Once an IP has failed, its attempts still being checked count as failures-to-be:
        # parallel guesses cannot all slip in under the current count.  (An office behind
        # one NAT address, with no failures, is not slowed by its own concurrent logins.)
        n_ip = self.by_ip.count(client_ip)
        if n_ip:
            n_ip += self._in_flight.get(client_ip, 0)
        if n_ip >= 3 * self.threshold:
            raise Throttled(client_ip)
        delay = 0.0
        if n_ip >= self.threshold:
            delay = min(2.0 ** (n_ip - self.threshold), MAX_IP_DELAY)
        if n_ip:
            n_acct = self.by_account.count(login)
            if n_acct >= self.threshold:
                delay = max(delay, min(0.5 * (n_acct - self.threshold + 1), MAX_ACCOUNT_DELAY))
        return delay

    def check(self, login: str, password: str, client_ip: str, service: str) -> defer.Deferred[str | None]:
        """Fire with the mailbox address, or None for bad credentials; errback Throttled."""
        login = login.strip().lower()
        try:
            delay = self.delay_for(login, client_ip)
        except Throttled as e:
            maillog.auth_failure(service, client_ip, login)
            return defer.fail(e)
        self._in_flight[client_ip] = self._in_flight.get(client_ip, 0) + 1
        d = task.deferLater(self.clock, delay).addCallback(
            lambda _: self._slots.run(self.run_in_thread, self.verify, login, password))

        def settled(result: str | None | Failure) -> str | None | Failure:
            n = self._in_flight.get(client_ip, 1) - 1
            if n:
                self._in_flight[client_ip] = n
            else:
                self._in_flight.pop(client_ip, None)
            return result

        def done(mailbox: str | None) -> str | None:
            if mailbox is None:
                self.by_ip.add(client_ip)
                self.by_account.add(login)
                maillog.auth_failure(service, client_ip, login)
            else:
                maillog.event(service, "login", client_ip, user=mailbox)
            return mailbox

        return d.addBoth(settled).addCallback(done)


class PopBeforeSmtp:
    """IPs that logged in over POP3, each allowed to relay for ``window`` seconds."""

    def __init__(self, clock: IReactorTime, window: int) -> None:
        self.clock = clock
        self.window = window
        self._until: dict[str, float] = {}

    def record(self, ip: str) -> None:
        """A successful POP3 login from ``ip``."""
        if self.window <= 0:
            return
        now = self.clock.seconds()
        self._until[ip] = now + self.window
        if len(self._until) > 10_000:
            self._until = {k: v for k, v in self._until.items() if v > now}

    def allowed(self, ip: str) -> bool:
        """True while the window of the last POP3 login from ``ip`` is open."""
        until = self._until.get(ip)
        return until is not None and until > self.clock.seconds()
