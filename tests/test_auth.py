"""Tests for mailguard.auth.authenticator: login throttling with a task.Clock, and POP-before-SMTP."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailguard.auth.authenticator import MAX_ACCOUNT_DELAY, MAX_PARALLEL_CHECKS, Authenticator, PopBeforeSmtp, Throttled

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


def test_clean_ip_not_delayed_by_failures_on_the_same_account(checker: Checker) -> None:
    """An attacker hammering alice's account from one IP cannot slow alice down from hers."""
    for _ in range(3 * THRESHOLD):
        checker.attempt(ATTACKER, "wrong")
    waited, result = checker.attempt(CLEAN, "right")
    assert (waited, result) == (0.0, USER)


def test_account_delay_applies_to_other_failing_clients(checker: Checker) -> None:
    """Another IP that has failed before waits for the account's failures too (a spread attack), capped."""
    for _ in range(3 * THRESHOLD):
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


def test_concurrent_logins_from_a_clean_ip_are_not_delayed(checker: Checker) -> None:
    """An office behind one NAT address logs in many users at once: none is delayed."""
    users = [checker.auth.check(USER, "right", CLEAN, "smtp") for _ in range(20)]
    got: list[Any] = []
    for d in users:
        d.addBoth(got.append)
    checker.clock.advance(0)
    assert got == [USER] * 20


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
        auth.check(USER, "right", f"192.0.2.{i}", "pop3").addBoth(results.append)
    clock.advance(0)
    assert len(running) == MAX_PARALLEL_CHECKS
    running[0].callback(USER)
    assert len(running) == MAX_PARALLEL_CHECKS + 1
    while len(results) < 10:
        for d in list(running):
            if not d.called:
                d.callback(USER)
    assert results == [USER] * 10
