"""Rate control (RFC 2505 section 2.8): ``[limits] messages_per_ip_per_minute``, ``messages_per_user_per_hour``.

An untrusted client address may have at most ``messages_per_ip_per_minute`` messages
accepted in any minute; an authenticated account at most ``messages_per_user_per_hour``
in any hour (a stolen password must not send thousands).  Past either, the next MAIL
gets ``rate_limited`` (4xx).  Counts are kept in memory (a restart forgets them) and
a message counts once it is accepted (:meth:`RateControl.accepted`).
"""

from __future__ import annotations

from mailguard.checks.base import MAIL, Connection, Facts
from mailguard.core.checks import Refusal
from mailguard.core.ratelimit import Window
from mailguard.core.replies import Reply


class RateControl:
    """See the module docstring."""

    rule = "rate_limited"
    stage = MAIL
    for_trusted = True            # the per-account limit is for authenticated (trusted) clients

    def __init__(self, per_ip_per_minute: int, per_user_per_hour: int, reply: Reply) -> None:
        self.per_ip = Window(per_ip_per_minute, 60.0)
        self.per_user = Window(per_user_per_hour, 3600.0)
        self.reply = reply

    def connected(self, conn: Connection) -> None:
        pass

    async def check(self, facts: Facts) -> Refusal | None:
        if facts.authenticated:
            if self.per_user.full(facts.authenticated, facts.now):
                return Refusal(self.rule, self.reply, f"user={facts.authenticated} limit={self.per_user.limit}/hour")
        elif not facts.trusted and self.per_ip.full(facts.conn.client_ip, facts.now):
            return Refusal(self.rule, self.reply, f"ip={facts.conn.client_ip} limit={self.per_ip.limit}/minute")
        return None

    def accepted(self, facts: Facts) -> tuple[str, str] | None:
        """Count one accepted message; the window (``user``/``ip``) and key it counted in, if any."""
        if facts.authenticated:
            counted = ("user", facts.authenticated)
        elif not facts.trusted:
            counted = ("ip", facts.conn.client_ip)
        else:
            return None
        return counted if self.learn(*counted, facts.now) else None

    def learn(self, window: str, key: str, now: float) -> bool:
        """Count one message accepted here or in another process; False when that window has no limit."""
        counts = self.per_user if window == "user" else self.per_ip
        counts.add(key, now)
        return counts.limit > 0
