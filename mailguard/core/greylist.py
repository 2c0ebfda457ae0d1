"""Greylisting decisions (the postgrey model), on a triplet's stored state.

A triplet is (client network /24 or /64, sender, recipient).  The first time one is
seen it is deferred with ``greylisted`` and its time recorded.  A retry after the
delay (and within :data:`RETRY_WINDOW`) passes; the triplet is then remembered as
passed, and the client network is auto-whitelisted for :data:`MAX_AGE`: it has shown
it is a real mail server that retries, so its later mail is not delayed again.  A
retry before the delay is deferred again without restarting the clock.

This module imports nothing from Twisted or sqlite3; the store is
:mod:`mailguard.checks.greylist`.
"""

from __future__ import annotations

from dataclasses import dataclass

RETRY_WINDOW = 2 * 86400      # seconds a first-seen triplet waits for its retry
MAX_AGE = 35 * 86400          # seconds a passed triplet / a whitelisted client is remembered


@dataclass(frozen=True)
class Triplet:
    """What is stored for one triplet: when first seen, and whether a retry passed."""

    first_seen: float
    passed: bool = False
    last_seen: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """The decision, and the state to store (None: leave as is)."""

    deferred: bool
    reason: str                           # new | early | retried | known | whitelisted
    triplet: Triplet | None = None        # write this triplet
    whitelist_until: float | None = None  # whitelist the client network until then


def decide(triplet: Triplet | None, whitelisted_until: float | None, now: float, delay: float) -> Outcome:
    """Greylist one (network, sender, recipient) seen at ``now`` with ``delay`` seconds."""
    if whitelisted_until is not None and whitelisted_until > now:
        return Outcome(False, "whitelisted")
    if triplet is not None and triplet.passed and now - triplet.last_seen <= MAX_AGE:
        return Outcome(False, "known", Triplet(triplet.first_seen, True, now))
    if triplet is None or triplet.passed or now - triplet.first_seen > RETRY_WINDOW:
        return Outcome(True, "new", Triplet(now, False, now))
    if now - triplet.first_seen < delay:
        return Outcome(True, "early")
    return Outcome(False, "retried", Triplet(triplet.first_seen, True, now), now + MAX_AGE)
