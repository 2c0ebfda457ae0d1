"""Where the SMTP session meets the inbound checks (:mod:`mailguard.checks`).

The session only says when: the client connected (:meth:`CheckedSession.admitted`,
which starts its DNSBL and reverse lookups), MAIL (:meth:`~CheckedSession.mail_checks`),
an accepted RCPT (:meth:`~CheckedSession.rcpt_checks`), the final dot
(:meth:`~CheckedSession.data_checks`) and a stored message
(:meth:`~CheckedSession.checks_accepted`).  Which checks run, in which order, is
:class:`~mailguard.checks.pipeline.InboundChecks`'s business: adding a check never
touches the session.  Each refusal is answered with its reply and logged as one
decision line naming the rule and what decided it.
"""

from __future__ import annotations

from mailguard.app import maillog
from mailguard.checks.base import MAIL, RCPT, Connection, Facts
from mailguard.checks.pipeline import trusted
from mailguard.checks.senderauth import Outcome
from mailguard.core import policy
from mailguard.core.checks import Refusal
from mailguard.smtp.session import Session


class CheckedSession(Session):
    """A session that runs the configured inbound checks (none when ``ctx.checks`` is None)."""

    check_conn: Connection | None = None

    def admitted(self) -> None:
        """A client was admitted: start its lookups (none for a client trusted by its address)."""
        checks = self.ctx.checks
        if checks is None:
            return
        by_address = policy.Client(self.client_ip_obj, self.local_ip_obj, None,
                                   self.ctx.pop_before_smtp.allowed(self.client_ip))
        self.check_conn = checks.connected(self.client_ip, self.local_ip,
                                           trusted_by_address=trusted(self.cfg, by_address))

    def trusted_client(self) -> bool:
        """May this client relay now (authenticated, allow, internal_address, pop_before_smtp)?"""
        return trusted(self.cfg, self.policy_client())

    def policy_client(self) -> policy.Client:
        """What the policy knows about this client now."""
        return policy.Client(self.client_ip_obj, self.local_ip_obj, self.authenticated,
                             self.ctx.pop_before_smtp.allowed(self.client_ip))

    def check_facts(self, sender: str, recipient: str | None = None) -> Facts | None:
        """The facts for the checks, or None when no check is configured."""
        checks, conn = self.ctx.checks, self.check_conn
        if checks is None or conn is None:
            return None
        conn.helo = self.helo
        return checks.facts(conn, self.trusted_client(), self.authenticated, sender, recipient)

    def stage_runs(self, stage: str) -> bool:
        return self.ctx.checks is not None and self.ctx.checks.runs(stage)

    async def mail_checks(self, sender: str) -> Refusal | None:
        """The MAIL-stage checks for ``sender``; a refusal is logged here and returned to answer."""
        facts = self.check_facts(sender)
        if facts is None or self.ctx.checks is None:
            return None
        return self._logged(await self.ctx.checks.at_mail(facts), sender, "", "")

    async def rcpt_checks(self, sender: str, recipient: str) -> Refusal | None:
        """The RCPT-stage checks (greylisting) for an accepted recipient."""
        facts = self.check_facts(sender, recipient)
        if facts is None or self.ctx.checks is None:
            return None
        return self._logged(await self.ctx.checks.at_rcpt(facts), sender, recipient, self.msg_id)

    async def received_name(self) -> str | None:
        """The name for Received: (forward-confirmed, or ``unknown``); None for a trusted client."""
        if self.ctx.checks is None or self.check_conn is None or self.trusted_client():
            return None
        return await self.ctx.checks.received_name(self.check_conn)

    async def data_checks(self, sender: str, message: bytes) -> Outcome:
        """At the final dot: the header to add, the message to store, and any refusal (logged)."""
        facts = self.check_facts(sender)
        if facts is None or self.ctx.checks is None:
            return Outcome(b"", message, None)
        outcome = await self.ctx.checks.at_data(facts, message)
        self._logged(outcome.refusal, sender, "", self.msg_id)
        return outcome

    def checks_accepted(self, sender: str) -> None:
        """A message from this client is being stored (rate control counts it)."""
        facts = self.check_facts(sender)
        if facts is not None and self.ctx.checks is not None:
            self.ctx.checks.accepted(facts)

    def _logged(self, refusal: Refusal | None, sender: str, recipient: str, msg_id: str) -> Refusal | None:
        if refusal is not None:
            maillog.decision(self.client_ip, self.local_ip, self.helo or "", sender, recipient, refusal.rule,
                             refusal.reply, refusal.detail, msg_id=msg_id)
        return refusal


__all__ = ["MAIL", "RCPT", "CheckedSession"]
