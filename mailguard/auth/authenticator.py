"""Credential checks shared by SMTP AUTH and POP3, with throttling of password guessing.

:class:`Authenticator` checks a login through the directory's ``verify_password``
(which hashes in a thread, never on the reactor) and slows down guessing:

- failures are counted per client (an IPv4 address, an IPv6 /64) and per account
  over a sliding window of ``[limits] login_lockout`` seconds;
- from ``login_failures`` failures on, each further attempt from that client waits
  ``2**(n - login_failures)`` seconds (at most 16) before it is checked;
- from ``3 * login_failures`` failures, the client gets :class:`Throttled`
  (SMTP ``454 4.7.0``) until its oldest failures leave the window;
- each account has the same budget, counted over every client: guesses spread over
  many addresses wait, then get :class:`Throttled` — except from a client that has
  logged in to that account successfully before (remembered for
  :data:`TRUST_SECONDS`), so an attacker cannot lock the owner out;
- attempts under way count as failures-to-be (on the account always, on the client
  once it has failed), so parallel guesses cannot all slip in under the current count;
- when more than :data:`MAX_QUEUED_CHECKS` checks wait for a hash slot, further
  attempts from unknown clients get :class:`Throttled` at once, and known clients
  go first (:mod:`mailguard.auth.hashqueue`).

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
from mailguard.core.clients import client_key
from mailguard.auth.hashqueue import HashQueue
from mailguard.config import LimitsConfig

MAX_IP_DELAY = 16.0
MAX_ACCOUNT_DELAY = 16.0
MAX_PARALLEL_CHECKS = 2         # password hashes computed at once (one per core here)
MAX_QUEUED_CHECKS = 16          # ordinary attempts waiting for a hash before refusing early
TRUST_SECONDS = 30 * 86400      # how long a successful login vouches for its client
MAX_TRUSTED = 100_000


class Throttled(Exception):
    """Too many failed logins from this client or on this account: answer 454 / -ERR [SYS/TEMP]."""


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


def _backoff(n: int, threshold: int, cap: float) -> float:
    return min(2.0 ** (n - threshold), cap) if n >= threshold else 0.0


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
        self._in_flight: dict[str, int] = {}       # checks under way per client and per account
        self._trusted: dict[tuple[str, str], float] = {}   # (login, client) -> until
        self.hashes = HashQueue(MAX_PARALLEL_CHECKS, MAX_QUEUED_CHECKS)
        #: Told of every failed login here (``[server] workers``: the other processes count it too).
        self.share: Callable[[str, str], None] | None = None

    def learn_failure(self, client: str, login: str) -> None:
        """Count one failed login of ``login`` from ``client`` (a :func:`client_key`), here or elsewhere."""
        self.by_ip.add(client)
        self.by_account.add(login)

    def configure(self, limits: LimitsConfig) -> None:
        """Use a reloaded ``[limits]`` login_failures/login_lockout; failures so far still count."""
        self.threshold = limits.login_failures
        self.by_ip.span = self.by_account.span = max(limits.login_lockout, 1)

    def trusted(self, login: str, client_ip: str) -> bool:
        """True when this client logged in to ``login`` successfully within TRUST_SECONDS."""
        until = self._trusted.get((login, client_key(client_ip)))
        return until is not None and until > self.clock.seconds()

    def _trust(self, login: str, client: str) -> None:
        now = self.clock.seconds()
        self._trusted[(login, client)] = now + TRUST_SECONDS
        if len(self._trusted) > MAX_TRUSTED:
            self._trusted = {k: v for k, v in self._trusted.items() if v > now}
            while len(self._trusted) > MAX_TRUSTED // 2:
                del self._trusted[next(iter(self._trusted))]

    def delay_for(self, login: str, client_ip: str) -> float:
        """Seconds to wait before checking this attempt; raises Throttled past a hard limit."""
        client = client_key(client_ip)
        n_ip = self.by_ip.count(client)
        if n_ip:
            n_ip += self._in_flight.get(client, 0)
        if n_ip >= 3 * self.threshold:
            raise Throttled(client_ip)
        delay = _backoff(n_ip, self.threshold, MAX_IP_DELAY)
        if self.trusted(login, client_ip):
            return delay
        # Guesses from unknown clients still being checked always count: a botnet's
        # first guesses arrive together, before any of them has failed.
        n_acct = self.by_account.count(login) + self._in_flight.get("@" + login, 0)
        if n_acct >= 3 * self.threshold:
            raise Throttled(login)
        if self.hashes.full():
            raise Throttled("hash queue")
        return max(delay, _backoff(n_acct, self.threshold, MAX_ACCOUNT_DELAY))

    def check(self, login: str, password: str, client_ip: str, service: str) -> defer.Deferred[str | None]:
        """Fire with the mailbox address, or None for bad credentials; errback Throttled."""
        login = login.strip().lower()
        client = client_key(client_ip)
        try:
            delay = self.delay_for(login, client_ip)
        except Throttled as e:
            maillog.auth_failure(service, client_ip, login, throttled=True)
            return defer.fail(e)
        urgent = self.trusted(login, client_ip)
        keys = (client,) if urgent else (client, "@" + login)
        for key in keys:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        d = task.deferLater(self.clock, delay).addCallback(
            lambda _: self.hashes.run(urgent, self.run_in_thread, self.verify, login, password))

        def settled(result: str | None | Failure) -> str | None | Failure:
            for key in keys:
                n = self._in_flight.get(key, 1) - 1
                if n:
                    self._in_flight[key] = n
                else:
                    self._in_flight.pop(key, None)
            return result

        def done(mailbox: str | None) -> str | None:
            if mailbox is None:
                self.learn_failure(client, login)
                if self.share is not None:
                    self.share(client, login)
                maillog.auth_failure(service, client_ip, login)
            else:
                self._trust(login, client)
                maillog.event(service, "login", client_ip, user=mailbox)
            return mailbox

        return d.addBoth(settled).addCallback(done)


class PopBeforeSmtp:
    """IPs that logged in over POP3, each allowed to relay for ``window`` seconds."""

    def __init__(self, clock: IReactorTime, window: int) -> None:
        self.clock = clock
        self.window = window
        self._until: dict[str, float] = {}
        #: Told of every login recorded here (``[server] workers``: the other processes).
        self.share: Callable[[str], None] | None = None

    def record(self, ip: str) -> None:
        """A successful POP3 login from ``ip``."""
        self.learn(ip)
        if self.share is not None and self.window > 0:
            self.share(ip)

    def learn(self, ip: str) -> None:
        """A successful POP3 login from ``ip``, here or in another process."""
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
