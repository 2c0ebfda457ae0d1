"""The configured inbound checks, run in order: what the SMTP adapter and ``mailguard explain`` call.

:meth:`InboundChecks.connected` makes the :class:`~mailguard.checks.base.Connection`
of a new client and starts its lookups (DNSBL zones, reverse name) at once, in
parallel.  :meth:`InboundChecks.at_mail` and :meth:`InboundChecks.at_rcpt` run the
checks of that stage in order and answer the first refusal (``soft_bounce`` applied)
or None.  A check that fails unexpectedly (a broken greylist file, say) answers
``451 4.3.0`` under the rule ``<rule>_error``: never a 5xx, never a pass.
:meth:`InboundChecks.accepted` counts an accepted message for rate control, and
:meth:`InboundChecks.received_name` is the name for the Received: header.

Order, cheapest and most certain first: reject_clients, reject_senders, rate control,
dnsbl, reverse_dns (``require``), sender_domain, spf at MAIL; greylist at RCPT.
:meth:`InboundChecks.at_data` runs at the final dot: DKIM, DMARC and the
Authentication-Results header (:mod:`mailguard.checks.senderauth`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from twisted.internet import threads
from twisted.logger import Logger

from mailguard.checks import access, dnsbl, greylist, rate, reverse, senderauth, senderdomain
from mailguard.checks.base import MAIL, RCPT, Check, Connection, Facts
from mailguard.config import Config
from mailguard.core import replies
from mailguard.core.checks import Refusal
from mailguard.core.policy import Client, relay_permission
from mailguard.dns.resolver import Lookup
from mailguard.senderauth.inbound import Modes

log = Logger(namespace="mailguard.checks")
CHECK_ERROR = replies.Reply(451, "4.3.0", "Temporary local problem checking this mail, try again later")


def trusted(cfg: Config, who: Client) -> bool:
    """May this client relay (authenticated, allow, internal_address, pop_before_smtp)?"""
    return relay_permission(cfg, who)[0]


class InboundChecks:
    """The checks ``cfg`` turns on, over the shared resolver; see the module docstring.

    :param run_in_thread: runs the greylist store's blocking calls (default ``deferToThread``).
    """

    def __init__(self, cfg: Config, lookup: Lookup, clock: Any, *,
                 run_in_thread: greylist.RunInThread = threads.deferToThread,
                 greylist_path: Path | None = None) -> None:
        c, r = cfg.checks, cfg.checks.replies
        self.cfg = cfg
        self.lookup = lookup
        self.clock = clock
        self.rate: rate.RateControl | None = None
        #: Told of each message rate control counted (``[server] workers``: the other processes count it too).
        self.share: Callable[[str, str], None] | None = None
        self.greylist_store: greylist.GreylistStore | None = None
        checks: list[Check] = []
        if c.reject_clients:
            checks.append(access.RejectClients(c.reject_clients, r.client_rejected))
        if c.reject_senders:
            checks.append(access.RejectSenders(c.reject_senders, r.sender_rejected))
        if c.messages_per_ip_per_minute or c.messages_per_user_per_hour:
            self.rate = rate.RateControl(c.messages_per_ip_per_minute, c.messages_per_user_per_hour, r.rate_limited)
            checks.append(self.rate)
        if c.dnsbl:
            checks.append(dnsbl.DNSBL(lookup, c.dnsbl, r.dnsbl_listed))
        if c.reverse_dns == "require":
            checks.append(reverse.RequireReverseDNS(lookup, r.no_reverse_dns))
        if c.sender_domain:
            checks.append(senderdomain.SenderDomain(lookup, cfg.domains, r.sender_domain_unknown))
        modes = Modes(c.spf, c.dkim_verify, c.dmarc)
        if modes.runs_spf:
            checks.append(senderauth.SPF(lookup, modes, r.spf_fail, cfg.server.hostname))
        self.after_data = senderauth.AfterData(lookup, modes, r.spf_fail, r.dmarc_reject, cfg.server.hostname,
                                               reactor=clock if hasattr(clock, "callFromThread") else None)
        if c.greylist:
            self.greylist_store = greylist.GreylistStore(
                greylist_path or cfg.server.data_dir / "greylist.sqlite")
            checks.append(greylist.Greylist(self.greylist_store, c.greylist, r.greylisted, run_in_thread))
        self.checks: tuple[Check, ...] = tuple(checks)

    @property
    def rules(self) -> list[str]:
        """The rules of the configured checks, in the order they run."""
        return [c.rule for c in self.checks]

    def runs(self, stage: str) -> bool:
        """Whether any configured check runs at ``stage`` (MAIL, RCPT, or "data" for DKIM/DMARC)."""
        if stage == "data":
            return self.after_data.modes.on
        return any(c.stage == stage for c in self.checks)

    def connected(self, client_ip: str, local_ip: str = "", *, trusted_by_address: bool = False) -> Connection:
        """A new client: its Connection, with its DNS lookups started (none for a trusted address)."""
        conn = Connection(client_ip, local_ip)
        if not trusted_by_address:
            for check in self.checks:
                check.connected(conn)
            reverse.started(self.lookup, conn)
        return conn

    def facts(self, conn: Connection, trusted: bool, authenticated: str | None, sender: str,
              recipient: str | None = None, dry_run: bool = False) -> Facts:
        return Facts(conn, trusted, authenticated, sender, recipient, self.clock.seconds(), dry_run)

    async def at_mail(self, facts: Facts) -> Refusal | None:
        """Run the MAIL-stage checks; the first refusal, or None."""
        return await self._run(MAIL, facts)

    async def at_rcpt(self, facts: Facts) -> Refusal | None:
        """Run the RCPT-stage checks; the first refusal, or None."""
        return await self._run(RCPT, facts)

    async def _run(self, stage: str, facts: Facts) -> Refusal | None:
        for check in self.checks:
            if check.stage != stage or (facts.trusted and not check.for_trusted):
                continue
            try:
                refusal = await check.check(facts)
            except Exception:
                log.failure("mailguard check {rule} failed", rule=check.rule)
                refusal = Refusal(f"{check.rule}_error", CHECK_ERROR, "internal error")
            if refusal is not None:
                return refusal.softened(self.cfg.replies.soft_bounce)
        return None

    async def at_data(self, facts: Facts, message: bytes) -> senderauth.Outcome:
        """At the final dot: DKIM, DMARC and the Authentication-Results header to add
        (``spf``/``dkim_verify``/``dmarc``, untrusted clients only) and any refusal."""
        try:
            outcome = await self.after_data.check(facts, message)
        except Exception:
            log.failure("mailguard check {rule} failed", rule="dmarc")
            return senderauth.Outcome(b"", message, Refusal("dmarc_error", CHECK_ERROR, "internal error"))
        if outcome.refusal is not None:
            return senderauth.Outcome(outcome.header, outcome.message,
                                      outcome.refusal.softened(self.cfg.replies.soft_bounce))
        return outcome

    def accepted(self, facts: Facts) -> None:
        """One message was accepted from this client (rate control counts it)."""
        if self.rate is not None:
            counted = self.rate.accepted(facts)
            if counted is not None and self.share is not None:
                self.share(*counted)

    def learn_accepted(self, window: str, key: str, now: float) -> None:
        """A message another process accepted (see :meth:`rate.RateControl.learn`)."""
        if self.rate is not None:
            self.rate.learn(window, key, now)

    async def received_name(self, conn: Connection) -> str:
        """The client's forward-confirmed reverse name for Received:, or ``unknown``."""
        return await reverse.received_name(self.lookup, conn)

    def carry_over(self, old: InboundChecks) -> None:
        """After a reload: keep what the running checks learnt when the new ones count alike.

        Rate counts stay when a limit is unchanged; the greylist store stays when it is the
        same file.  The old store is closed otherwise (a session still using it reopens it).
        """
        self.share = old.share
        if self.rate is not None and old.rate is not None:
            if self.rate.per_ip.limit == old.rate.per_ip.limit:
                self.rate.per_ip = old.rate.per_ip
            if self.rate.per_user.limit == old.rate.per_user.limit:
                self.rate.per_user = old.rate.per_user
        kept = old.greylist_store
        if kept is not None and self.greylist_store is not None and kept.path == self.greylist_store.path:
            for check in self.checks:
                if isinstance(check, greylist.Greylist):
                    check.store = kept
            self.greylist_store = kept
        elif kept is not None:
            kept.close()

    def close(self) -> None:
        self.after_data.close()
        if self.greylist_store is not None:
            self.greylist_store.close()


def explain_lines(refusal: Refusal | None, rcpts: Sequence[str]) -> list[str]:
    """``mailguard explain`` lines for a refusal that applies to every recipient."""
    if refusal is None:
        return []
    detail = f"; {refusal.detail}" if refusal.detail else ""
    return [f"{r}: {refusal.reply} (rule: {refusal.rule}{detail})" for r in rcpts]
