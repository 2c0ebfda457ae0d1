"""Sender domain verification (RFC 2505 section 2.9): ``[checks] sender_domain = true``.

MAIL FROM's domain must exist in DNS as a mail domain: an MX set that is not the
null MX (RFC 7505), or else an A or AAAA record (the implicit MX, RFC 5321 section
5.1).  NXDOMAIN, a null MX, or neither MX nor address records: ``sender_domain_unknown``.
DNS trouble: ``451 4.4.3`` (rule ``sender_domain_temperror``).  Never checked: the null
sender ``<>`` (RFC 2505 section 2.6.1), an address literal, and a domain in
``[domains]`` (a local domain is not refused for being local, section 2.6.2).
"""

from __future__ import annotations

from typing import Collection

from twisted.internet import defer

from mailguard.checks.base import MAIL, Connection, Facts
from mailguard.core.checks import DNS_TEMPFAIL, Refusal, null_mx
from mailguard.core.replies import Reply
from mailguard.dns.resolver import Lookup, TemporaryDNSError


class SenderDomain:
    """See the module docstring."""

    rule = "sender_domain_unknown"
    stage = MAIL
    for_trusted = False

    def __init__(self, lookup: Lookup, local_domains: Collection[str], reply: Reply) -> None:
        self.lookup = lookup
        self.local_domains = frozenset(local_domains)
        self.reply = reply

    def connected(self, conn: Connection) -> None:
        pass

    async def check(self, facts: Facts) -> Refusal | None:
        domain = facts.sender.rpartition("@")[2].lower().rstrip(".")
        if not facts.sender or not domain or domain.startswith("[") or domain in self.local_domains:
            return None
        try:
            mx = await self.lookup.lookup(domain, "MX")
        except TemporaryDNSError as e:
            return Refusal("sender_domain_temperror", DNS_TEMPFAIL, f"domain={domain} {e.type}={e.reason}")
        if mx.nxdomain:
            return Refusal(self.rule, self.reply, f"domain={domain} NXDOMAIN")
        if mx.exists:
            if null_mx([r.exchange for r in mx.records]):
                return Refusal(self.rule, self.reply, f"domain={domain} null MX")
            return None
        results = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(self.lookup.lookup(domain, t)) for t in ("A", "AAAA")],
            consumeErrors=True)
        if any(ok and answer.exists for ok, answer in results):
            return None
        if not all(ok for ok, _ in results):
            return Refusal("sender_domain_temperror", DNS_TEMPFAIL, f"domain={domain} A/AAAA lookup failed")
        return Refusal(self.rule, self.reply, f"domain={domain} no MX, A or AAAA")
