"""The queue in front of the password hashes: a few at once, known clients first, bounded.

Each argon2 check holds ~19 MiB and a core, so :class:`HashQueue` runs at most
``size`` at once.  Attempts from a client that logged in to the account before go
ahead of the rest (``urgent``), so a storm of guesses cannot make the owner wait;
the others wait in order, and :meth:`HashQueue.full` tells the caller to refuse
early (454) instead of queueing a guess behind hundreds of others.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet import defer


class HashQueue:
    """Runs ``f(*args)`` (returning a value or a Deferred) at most ``size`` at a time."""

    def __init__(self, size: int, max_waiting: int) -> None:
        self.free = size
        self.max_waiting = max_waiting
        self._urgent: deque[defer.Deferred[None]] = deque()
        self._normal: deque[defer.Deferred[None]] = deque()

    @property
    def waiting(self) -> int:
        """Ordinary attempts waiting for a slot."""
        return len(self._normal)

    def full(self) -> bool:
        """True when an ordinary attempt should be refused rather than queued."""
        return len(self._normal) >= self.max_waiting

    def run(self, urgent: bool, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Fire with ``f``'s result once it ran in a free slot."""
        gate: defer.Deferred[None] = defer.Deferred()
        (self._urgent if urgent else self._normal).append(gate)

        def release(result: object) -> object:
            self.free += 1
            self._start()
            return result

        d = gate.addCallback(lambda _: defer.maybeDeferred(f, *args)).addBoth(release)
        self._start()
        return d

    def _start(self) -> None:
        while self.free > 0 and (self._urgent or self._normal):
            self.free -= 1
            (self._urgent or self._normal).popleft().callback(None)
