"""DNS block lists (RFC 5782): ``[checks] dnsbl = ["zone", ...]``.

When an untrusted-looking client connects, its address is looked up in every zone at
once (``1.2.0.192.zone`` for 192.0.2.1, nibbles for IPv6).  At MAIL the answers are
read in zone order: the first A record in 127.0.0.2-127.0.0.255 refuses the client
with ``dnsbl_listed``, logging the zone and the code.  127.255.255.x answers (a list
saying it refuses our queries) and other codes are logged, never taken as listings;
NXDOMAIN is "not listed".  A zone that could not be asked (timeout, SERVFAIL) gives
``451 4.4.3`` (rule ``dnsbl_temperror``) unless another zone already lists the client.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet import defer

from mailguard.app import maillog
from mailguard.checks.base import MAIL, Connection, Facts
from mailguard.core.checks import DNS_TEMPFAIL, Refusal, dnsbl_errors, dnsbl_listing
from mailguard.core.replies import Reply
from mailguard.dns.names import dnsbl_name
from mailguard.dns.resolver import Answer, Lookup


class DNSBL:
    """See the module docstring."""

    rule = "dnsbl_listed"
    stage = MAIL
    for_trusted = False

    def __init__(self, lookup: Lookup, zones: Sequence[str], reply: Reply) -> None:
        self.lookup = lookup
        self.zones = tuple(zones)
        self.reply = reply

    def _query(self, conn: Connection, zone: str) -> defer.Deferred[Answer]:
        name = dnsbl_name(conn.client_ip, zone)
        return conn.once(f"dnsbl:{zone}", lambda: self.lookup.lookup(name, "A"))

    def connected(self, conn: Connection) -> None:
        for zone in self.zones:
            self._query(conn, zone).addErrback(lambda _: None)

    async def check(self, facts: Facts) -> Refusal | None:
        conn = facts.conn
        results = await defer.DeferredList([self._query(conn, z) for z in self.zones], consumeErrors=True)
        failed: list[str] = []
        for zone, (ok, answer) in zip(self.zones, results):
            if not ok:
                failed.append(zone)
                continue
            if not answer.exists:
                continue
            code = dnsbl_listing(answer.records)
            if code is not None:
                return Refusal(self.rule, self.reply, f"zone={zone} code={code}")
            if not facts.dry_run:
                maillog.event("smtp", "dnsbl-error", conn.client_ip, zone=zone,
                              code=",".join(dnsbl_errors(answer.records)))
        if failed:
            return Refusal("dnsbl_temperror", DNS_TEMPFAIL, f"zone={failed[0]} lookup failed")
        return None
