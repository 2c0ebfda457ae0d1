"""The client's forward-confirmed reverse name (RFC 2505 section 2.2): ``[checks] reverse_dns``.

The PTR records of the client address are looked up; a name counts when its A (or,
for an IPv6 client, AAAA) records contain the client address again.  The lookups
start when the client connects.  The name goes into the Received: header of mail
from untrusted clients (``unknown`` when there is none or DNS failed); with
``reverse_dns = "require"`` a client without one is refused with ``no_reverse_dns``,
and DNS trouble is ``451 4.4.3`` (rule ``reverse_dns_temperror``).
"""

from __future__ import annotations

from mailguard.checks.base import MAIL, Connection, Facts
from mailguard.core.checks import DNS_TEMPFAIL, Refusal, confirmed
from mailguard.core.replies import Reply
from mailguard.dns.names import reverse_name
from mailguard.dns.resolver import Lookup, TemporaryDNSError

MAX_PTR = 10          # PTR names tried (a client could publish hundreds)
UNKNOWN = "unknown"


async def forward_confirmed(lookup: Lookup, client_ip: str) -> str | None:
    """The first PTR name of ``client_ip`` whose addresses hold it again, or None.

    :raises TemporaryDNSError: DNS trouble kept every name from being confirmed.
    """
    conn_ip = Connection(client_ip).ip
    ptr = await lookup.lookup(reverse_name(client_ip), "PTR")
    if not ptr.exists:
        return None
    trouble: TemporaryDNSError | None = None
    for name in ptr.records[:MAX_PTR]:
        try:
            answer = await lookup.lookup(name, "A" if conn_ip.version == 4 else "AAAA")
        except TemporaryDNSError as e:
            trouble = e
            continue
        if confirmed(conn_ip, answer.records):
            return str(name)
    if trouble is not None:
        raise trouble
    return None


def started(lookup: Lookup, conn: Connection) -> None:
    """Start the reverse lookup for a new connection (its result is shared)."""
    conn.once("fcrdns", lambda: forward_confirmed(lookup, conn.client_ip)).addErrback(lambda _: None)


async def received_name(lookup: Lookup, conn: Connection) -> str:
    """The name for the Received: header: the forward-confirmed reverse name, or ``unknown``."""
    try:
        name = await conn.once("fcrdns", lambda: forward_confirmed(lookup, conn.client_ip))
    except TemporaryDNSError:
        return UNKNOWN
    return str(name) if name else UNKNOWN


class RequireReverseDNS:
    """``reverse_dns = "require"``: refuses clients without a forward-confirmed reverse name."""

    rule = "no_reverse_dns"
    stage = MAIL
    for_trusted = False

    def __init__(self, lookup: Lookup, reply: Reply) -> None:
        self.lookup = lookup
        self.reply = reply

    def connected(self, conn: Connection) -> None:
        started(self.lookup, conn)

    async def check(self, facts: Facts) -> Refusal | None:
        conn = facts.conn
        try:
            name = await conn.once("fcrdns", lambda: forward_confirmed(self.lookup, conn.client_ip))
        except TemporaryDNSError as e:
            return Refusal("reverse_dns_temperror", DNS_TEMPFAIL, f"{e.type} {e.name}: {e.reason}")
        if name:
            return None
        return Refusal(self.rule, self.reply, f"ptr={reverse_name(conn.client_ip)}")
