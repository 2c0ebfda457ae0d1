"""Tests for mailguard.auth.authenticator: login throttling with a task.Clock, and POP-before-SMTP."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailguard.app import maillog
from mailguard.auth.authenticator import (MAX_ACCOUNT_DELAY, MAX_PARALLEL_CHECKS, MAX_QUEUED_CHECKS, Authenticator,
                                          PopBeforeSmtp, Throttled)

from conftest import LogCapture, make_config

USER = "alice@office.example"
ATTACKER = "198.51.100.66"
CLEAN = "192.0.2.10"
THRESHOLD = 3
LOCKOUT = 300


def sync_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """Run the 'thread' work at once (the hash check is faked anyway)."""
    return defer.maybeDeferred(f, *args)


class Checker:
    """An Authenticator over a fake verify, with helpers to run one attempt to its end."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.verified: list[tuple[str, str]] = []
        limits = make_config(limits={"login_failures": THRESHOLD, "login_lockout": LOCKOUT}).limits
        self.auth = Authenticator(self.verify, self.clock, limits, run_in_thread=sync_thread)

    def verify(self, login: str, password: str) -> str | None:
        self.verified.append((login, password))
        return USER if (login, password) == (USER, "right") else None

    def attempt(self, ip: str, password: str, login: str = USER) -> tuple[float, Any]:
        """Start a check; return (seconds until it answered, result or Failure)."""
        results: list[Any] = []
        start = self.clock.seconds()
        d = self.auth.check(login, password, ip, "smtp")
        d.addBoth(results.append)
        self.clock.advance(0)
        while not results and self.clock.seconds() - start < 60:
            self.clock.advance(0.25)
        assert results, "no answer within 60 s"
        return self.clock.seconds() - start, results[0]


@pytest.fixture
def checker() -> Checker:
    """An Authenticator with login_failures = 3, login_lockout = 300 s."""
    return Checker()


def test_correct_login_answers_at_once(checker: Checker) -> None:
    """A clean client's correct login is checked without delay and gives the mailbox."""
    d = checker.auth.check(" Alice@Office.Example ", "right", CLEAN, "smtp")
    results: list[Any] = []
    d.addCallback(results.append)
    checker.clock.advance(0)
    assert results == [USER]
    assert checker.verified == [(USER, "right")]


def test_wrong_password_gives_none_and_logs_a_stable_line(checker: Checker, logs: LogCapture) -> None:
    """A failure fires None and logs 'mailguard auth failure: service=smtp client=<ip> user=<login>', no password."""
    waited, result = checker.attempt(ATTACKER, "hunter2")
    assert result is None and waited == 0
    lines = logs.matching("mailguard auth failure")
    assert lines == [f"mailguard auth failure: service=smtp client={ATTACKER} user={USER}"]
    assert not any("hunter2" in line for line in logs.lines())


def test_delays_grow_after_login_failures(checker: Checker) -> None:
    """Below the threshold no delay; from it on 1 s, 2 s, 4 s ... before the check even runs."""
    waits = []
    for _ in range(3 * THRESHOLD - 1):
        waited, result = checker.attempt(ATTACKER, "wrong")
        assert result is None
        waits.append(waited)
    assert waits[:THRESHOLD] == [0.0] * THRESHOLD
    assert waits[THRESHOLD:] == [1.0, 2.0, 4.0, 8.0, 16.0][: len(waits) - THRESHOLD]
    assert checker.auth.delay_for(USER, ATTACKER) == 16.0


def test_delay_is_not_a_check(checker: Checker) -> None:
    """While the delay runs, the password is not checked (the hash work waits too)."""
    for _ in range(THRESHOLD):
        checker.attempt(ATTACKER, "wrong")
    checker.verified.clear()
    d = checker.auth.check(USER, "wrong", ATTACKER, "smtp")
    checker.clock.advance(0.5)
    assert checker.verified == [] and not d.called
    checker.clock.advance(0.5)
    assert checker.verified == [(USER, "wrong")] and d.called


def test_throttled_past_three_times_the_threshold(checker: Checker, logs: LogCapture) -> None:
    """From 3x login_failures failures the IP gets Throttled (454) at once, even with the right password."""
    for _ in range(3 * THRESHOLD):
        checker.attempt(ATTACKER, "wrong")
    checker.verified.clear()
    d = checker.auth.check(USER, "right", ATTACKER, "smtp")
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(Throttled)
    assert checker.verified == []
    assert logs.matching(f"client={ATTACKER}")


def test_window_expiry_forgives(checker: Checker) -> None:
    """Failures older than login_lockout seconds no longer count."""
    for _ in range(3 * THRESHOLD):
        checker.attempt(ATTACKER, "wrong")
    with pytest.raises(Throttled):
        checker.auth.delay_for(USER, ATTACKER)
    checker.clock.advance(LOCKOUT + 1)
    assert checker.auth.delay_for(USER, ATTACKER) == 0.0
    waited, result = checker.attempt(ATTACKER, "right")
    assert (waited, result) == (0.0, USER)


def test_owner_not_delayed_by_failures_on_the_same_account(checker: Checker) -> None:
    """An attacker hammering alice's account cannot slow alice down from an address she logged in from."""
    assert checker.attempt(CLEAN, "right") == (0.0, USER)
    for _ in range(3 * THRESHOLD):
        checker.attempt(ATTACKER, "wrong")
    waited, result = checker.attempt(CLEAN, "right")
    assert (waited, result) == (0.0, USER)


def test_account_delay_applies_to_other_failing_clients(checker: Checker) -> None:
    """Another IP waits for the account's failures too (a spread attack), capped."""
    for _ in range(THRESHOLD):
        checker.attempt(ATTACKER, "wrong")
    checker.attempt("198.51.100.67", "wrong")                       # one failure of its own
    delay = checker.auth.delay_for(USER, "198.51.100.67")
    assert 0 < delay <= MAX_ACCOUNT_DELAY


def test_throttling_is_per_ip(checker: Checker) -> None:
    """Failures from one IP on other accounts do not throttle a different IP."""
    for i in range(3 * THRESHOLD):
        checker.attempt(ATTACKER, "wrong", login=f"user{i}@office.example")
    with pytest.raises(Throttled):
        checker.auth.delay_for("someone@office.example", ATTACKER)
    assert checker.auth.delay_for("someone@office.example", CLEAN) == 0.0


def test_pop_before_smtp_window() -> None:
    """A POP3 login lets that IP relay for the window, then no more; other IPs never."""
    clock = task.Clock()
    pbs = PopBeforeSmtp(clock, 600)
    assert not pbs.allowed(CLEAN)
    pbs.record(CLEAN)
    assert pbs.allowed(CLEAN) and not pbs.allowed(ATTACKER)
    clock.advance(599)
    assert pbs.allowed(CLEAN)
    pbs.record(CLEAN)                       # a new login restarts the window
    clock.advance(599)
    assert pbs.allowed(CLEAN)
    clock.advance(2)
    assert not pbs.allowed(CLEAN)


def test_pop_before_smtp_off() -> None:
    """window = 0: recording does nothing."""
    pbs = PopBeforeSmtp(task.Clock(), 0)
    pbs.record(CLEAN)
    assert not pbs.allowed(CLEAN)


def test_parallel_guesses_after_a_failure_count_while_in_flight(checker: Checker) -> None:
    """Once an IP has failed, guesses it runs in parallel count before they finish.

    Nine attempts started at once after one failure: with login_failures = 3 the
    hard limit is 9, so the last ones are refused (Throttled) at once instead of
    all being checked at the old count.
    """
    checker.attempt(ATTACKER, "wrong")
    results: list[Any] = []
    for _ in range(9):
        checker.auth.check(USER, "wrong", ATTACKER, "smtp").addBoth(results.append)
    refused = [r for r in results if isinstance(r, Failure) and r.check(Throttled)]
    assert len(refused) == 9 - (3 * THRESHOLD - 1)
    checker.clock.advance(60)
    assert len(results) == 9


def test_concurrent_logins_from_a_clean_ip_are_not_delayed() -> None:
    """An office behind one NAT address logs in many users at once: none is delayed."""
    clock = task.Clock()
    limits = make_config(limits={"login_failures": THRESHOLD, "login_lockout": LOCKOUT}).limits
    auth = Authenticator(lambda login, password: login, clock, limits, run_in_thread=sync_thread)
    got: list[Any] = []
    for i in range(20):
        auth.check(f"user{i}@office.example", "right", CLEAN, "smtp").addBoth(got.append)
    clock.advance(0)
    assert got == [f"user{i}@office.example" for i in range(20)]


def test_at_most_two_password_checks_run_at_once() -> None:
    """A login storm queues for the hash: at most MAX_PARALLEL_CHECKS checks run at once."""
    clock = task.Clock()
    running: list[defer.Deferred] = []

    def slow_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        running.append(d)
        return d

    limits = make_config(limits={"login_failures": THRESHOLD, "login_lockout": LOCKOUT}).limits
    auth = Authenticator(lambda login, password: USER, clock, limits, run_in_thread=slow_thread)
    results: list[Any] = []
    for i in range(10):
        auth.check(f"user{i}@office.example", "right", f"192.0.2.{i}", "pop3").addBoth(results.append)
    clock.advance(0)
    assert len(running) == MAX_PARALLEL_CHECKS
    running[0].callback(USER)
    assert len(running) == MAX_PARALLEL_CHECKS + 1
    while len(results) < 10:
        for d in list(running):
            if not d.called:
                d.callback(USER)
    assert results == [USER] * 10


# -- the per-account budget (issue 17 item 5) ------------------------------------------------


def test_guesses_spread_over_many_ips_hit_the_account_budget(checker: Checker) -> None:
    """One guess each from 400 addresses: from login_failures failures on the account they wait,
    from 3x they get Throttled without a hash check."""
    outcomes = []
    for i in range(400):
        waited, result = checker.attempt(f"203.0.113.{i % 250}" if i < 250 else f"198.18.0.{i - 250}", "wrong")
        outcomes.append((waited, "throttled" if isinstance(result, Failure) and result.check(Throttled) else result))
    assert [o[1] for o in outcomes[:3 * THRESHOLD]] == [None] * (3 * THRESHOLD)
    assert [o[0] for o in outcomes[:3 * THRESHOLD]] == [0.0, 0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 16.0]
    assert {o[1] for o in outcomes[3 * THRESHOLD:]} == {"throttled"}
    assert len(checker.verified) == 3 * THRESHOLD


def test_known_client_keeps_access_to_a_throttled_account(checker: Checker) -> None:
    """The owner's earlier address logs in at once while the account refuses everyone else."""
    assert checker.attempt(CLEAN, "right") == (0.0, USER)
    for i in range(3 * THRESHOLD):
        checker.attempt(f"203.0.113.{i}", "wrong")
    _, refused = checker.attempt("203.0.113.200", "right")
    assert isinstance(refused, Failure) and refused.check(Throttled)
    assert checker.attempt(CLEAN, "right") == (0.0, USER)


def test_parallel_first_guesses_on_one_account_count_while_in_flight() -> None:
    """400 guesses started at once from 400 addresses: once one failed, the rest count in flight."""
    clock = task.Clock()
    pending: list[defer.Deferred] = []

    def slow(f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        pending.append(d)
        return d

    limits = make_config(limits={"login_failures": THRESHOLD, "login_lockout": LOCKOUT}).limits
    auth = Authenticator(lambda login, password: None, clock, limits, run_in_thread=slow)
    auth.check(USER, "wrong", "203.0.113.1", "smtp")
    clock.advance(0)
    pending.pop().callback(None)                     # one failure on the account
    results: list[Any] = []
    for i in range(400):
        auth.check(USER, "wrong", f"198.18.{i // 200}.{i % 200}", "smtp").addBoth(results.append)
    refused = [r for r in results if isinstance(r, Failure) and r.check(Throttled)]
    assert len(refused) == 400 - (3 * THRESHOLD - 1)
    for r in refused:
        assert r.check(Throttled)


def test_ipv6_counts_per_64(checker: Checker) -> None:
    """Addresses of one IPv6 /64 share one failure count: rotating within it does not help."""
    for i in range(3 * THRESHOLD):
        checker.attempt(f"2001:db8:1:2::{i + 1:x}", "wrong", login=f"user{i}@office.example")
    with pytest.raises(Throttled):
        checker.auth.delay_for("other@office.example", "2001:db8:1:2:ffff::1")
    assert checker.auth.delay_for("other@office.example", "2001:db8:1:3::1") == 0.0


def test_deep_hash_queue_refuses_unknown_clients_early_and_serves_known_ones_first() -> None:
    """With MAX_QUEUED_CHECKS attempts waiting for a hash, the next unknown one is Throttled at
    once, and a known client's login runs before the queued ones."""
    clock = task.Clock()
    running: list[tuple[str, defer.Deferred]] = []

    def slow(f: Callable[..., Any], login: str, password: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        running.append((password, d))
        return d

    limits = make_config(limits={"login_failures": THRESHOLD, "login_lockout": LOCKOUT}).limits
    auth = Authenticator(lambda login, password: None, clock, limits, run_in_thread=slow)
    auth._trust(USER, CLEAN)                         # alice logged in from CLEAN before
    results: list[Any] = []
    for i in range(MAX_PARALLEL_CHECKS + MAX_QUEUED_CHECKS):
        auth.check(f"user{i}@office.example", "guess", f"198.18.0.{i}", "pop3").addBoth(results.append)
    clock.advance(0)
    late: list[Any] = []
    auth.check("late@office.example", "guess", "198.18.1.1", "pop3").addBoth(late.append)
    assert late and isinstance(late[0], Failure) and late[0].check(Throttled)
    owner: list[Any] = []
    auth.check(USER, "owner", CLEAN, "pop3").addBoth(owner.append)
    clock.advance(0)
    running[0][1].callback(None)                    # one hash slot frees up
    assert running[MAX_PARALLEL_CHECKS][0] == "owner"


def test_repeated_failure_lines_are_suppressed_with_a_count(logs: LogCapture) -> None:
    """Past 10 lines a minute per client, failures are counted, then reported in one line."""
    now = [0.0]
    maillog.AUTH_LINES.now = lambda: now[0]
    try:
        for _ in range(500):
            maillog.auth_failure("smtp", ATTACKER, USER, throttled=True)
        now[0] = 61.0
        maillog.auth_failure("smtp", ATTACKER, USER, throttled=True)
    finally:
        maillog.AUTH_LINES.now = __import__("time").monotonic
    lines = [ln for ln in logs.lines() if "mailguard auth" in ln]
    first = f"mailguard auth failure: service=smtp client={ATTACKER} user={USER} throttled=yes"
    assert lines == [first] * 10 + [f"mailguard auth suppressed: service=smtp client={ATTACKER} count=490", first]
