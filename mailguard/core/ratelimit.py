"""Rate control (RFC 2505 section 2.8): how many messages one key sent in a sliding window.

:class:`Window` counts events per key (a client address, an account) over the last
``period`` seconds.  :meth:`Window.full` says whether the key already reached
``limit``; :meth:`Window.add` records one accepted message.  Memory is bounded: a
key keeps at most ``limit`` timestamps, and keys whose newest event left the window
are dropped as the window is used.

This module imports nothing from Twisted.
"""

from __future__ import annotations

from collections import deque


class Window:
    """Events per key in the last ``period`` seconds, at most ``limit`` kept per key."""

    def __init__(self, limit: int, period: float) -> None:
        self.limit = limit
        self.period = period
        self._events: dict[str, deque[float]] = {}
        self._sweep_at = 0.0

    def _recent(self, key: str, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        while events and events[0] <= now - self.period:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def count(self, key: str, now: float) -> int:
        """Events of ``key`` within the window ending at ``now``."""
        events = self._recent(key, now)
        return len(events) if events is not None else 0

    def full(self, key: str, now: float) -> bool:
        """True when ``key`` already has ``limit`` events in the window (0 = no limit)."""
        return self.limit > 0 and self.count(key, now) >= self.limit

    def add(self, key: str, now: float) -> None:
        """Record one event of ``key`` at ``now``."""
        if self.limit <= 0:
            return
        events = self._recent(key, now)
        if events is None:
            events = self._events[key] = deque(maxlen=self.limit)
        events.append(now)
        if now >= self._sweep_at:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        self._sweep_at = now + self.period
        for key in [k for k, ev in self._events.items() if ev[-1] <= now - self.period]:
            del self._events[key]
