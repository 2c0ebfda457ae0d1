"""Client and sender access lists (RFC 2505 sections 2.5 and 2.7): ``reject_clients``, ``reject_senders``.

Both apply to every client, trusted or not: an administrator who lists a host or a
sender means it.
"""

from __future__ import annotations

from typing import Sequence

from mailguard.checks.base import MAIL, Connection, Facts
from mailguard.core.checks import IPNetwork, Refusal, matching_network, matching_sender
from mailguard.core.replies import Reply


class RejectClients:
    """Refuses clients whose address is in ``[checks] reject_clients`` (rule client_rejected)."""

    rule = "client_rejected"
    stage = MAIL
    for_trusted = True

    def __init__(self, networks: Sequence[IPNetwork], reply: Reply) -> None:
        self.networks = tuple(networks)
        self.reply = reply

    def connected(self, conn: Connection) -> None:
        pass

    async def check(self, facts: Facts) -> Refusal | None:
        net = matching_network(self.networks, facts.conn.ip)
        return Refusal(self.rule, self.reply, f"network={net}") if net is not None else None


class RejectSenders:
    """Refuses MAIL FROM addresses matching ``[checks] reject_senders`` (rule sender_rejected)."""

    rule = "sender_rejected"
    stage = MAIL
    for_trusted = True

    def __init__(self, patterns: Sequence[str], reply: Reply) -> None:
        self.patterns = tuple(patterns)
        self.reply = reply

    def connected(self, conn: Connection) -> None:
        pass

    async def check(self, facts: Facts) -> Refusal | None:
        pattern = matching_sender(self.patterns, facts.sender)
        return Refusal(self.rule, self.reply, f"pattern={pattern}") if pattern is not None else None
