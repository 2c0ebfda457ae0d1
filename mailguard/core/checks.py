"""The pure decisions of the inbound checks (RFC 2505 sections 2.2-2.9, RFC 5782, RFC 7505).

Each function decides on facts already fetched (addresses, DNS answers as plain
values) and never calls out; :mod:`mailguard.checks` fetches the facts and speaks
the answer.  A check's outcome is None (pass) or a :class:`Refusal` naming its rule,
its reply and what decided it (the network, pattern, zone and code, record).

This module imports nothing from Twisted, sqlite3 or socket.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Sequence

from mailguard.core.replies import Reply

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: What every check answers when DNS could not answer now: never a 5xx, never a pass.
DNS_TEMPFAIL = Reply(451, "4.4.3", "Temporary DNS lookup failure, try again later")

# RFC 5782 section 2.1: a listing is an A record in 127.0.0.0/8, 127.0.0.2 by convention.
# Only 127.0.0.2-127.0.0.255 counts: the big lists answer 127.255.255.x to say "you are
# querying wrongly" (a public resolver, over quota), which must never refuse mail.
_LISTED_FIRST = ipaddress.IPv4Address("127.0.0.2")
_LISTED_LAST = ipaddress.IPv4Address("127.0.0.255")


@dataclass(frozen=True)
class Refusal:
    """A check's refusal: the rule (for the decision log line), the reply, what decided it."""

    rule: str
    reply: Reply
    detail: str = ""

    def softened(self, soft_bounce: bool) -> Refusal:
        """This refusal with ``[replies] soft_bounce`` applied (5xx sent as 4xx)."""
        return Refusal(self.rule, self.reply.soften(), self.detail) if soft_bounce else self


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str) -> IPAddress:
    """An IP address from a socket's text form (IPv4-mapped IPv6 and zone ids unwrapped).

    Remembered for the last few thousand texts: every connection asks for its client and
    local address several times, and the same clients come back (address objects are
    immutable, so sharing one is safe).  A text that is not an address raises ValueError.
    """
    addr = ipaddress.ip_address(text.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def matching_network(networks: Iterable[IPNetwork], ip: IPAddress) -> IPNetwork | None:
    """The first network that holds ``ip`` (``reject_clients``, RFC 2505 section 2.5), or None."""
    for net in networks:
        if ip.version == net.version and ip in net:
            return net
    return None


def matching_sender(patterns: Iterable[str], sender: str) -> str | None:
    """The first ``reject_senders`` pattern matching ``sender`` (RFC 2505 section 2.7), or None.

    Patterns (lower case): ``user@domain`` that address, ``@domain`` any address at that
    domain, ``@.domain`` any address at a subdomain of it.  Case-insensitive; the null
    sender ``<>`` matches nothing.
    """
    if not sender or "@" not in sender:
        return None
    address = sender.lower()
    domain = address.rpartition("@")[2].rstrip(".")
    for pattern in patterns:
        if pattern.startswith("@."):
            if domain.endswith(pattern[1:]):
                return pattern
        elif pattern.startswith("@"):
            if domain == pattern[1:]:
                return pattern
        elif address == pattern:
            return pattern
    return None


def dnsbl_listing(addresses: Sequence[str]) -> str | None:
    """The A record that says "listed" (RFC 5782 section 2.1): 127.0.0.2-127.0.0.255, else None.

    ``127.255.255.x`` (the lists' error codes) and anything outside the range never list.
    """
    for text in addresses:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(addr, ipaddress.IPv4Address) and _LISTED_FIRST <= addr <= _LISTED_LAST:
            return text
    return None


def dnsbl_errors(addresses: Sequence[str]) -> list[str]:
    """The answers that are not a listing (to be logged): 127.255.255.x and out-of-range codes."""
    return [a for a in addresses if dnsbl_listing([a]) is None]


def null_mx(exchanges: Sequence[str]) -> bool:
    """RFC 7505 section 3: the domain's MX set is the one exchange "." (written "" here)."""
    return any(e in ("", ".") for e in exchanges)


def confirmed(client: IPAddress, addresses: Iterable[str]) -> bool:
    """Forward confirmation (RFC 2505 section 2.2, "FCrDNS"): the name's A/AAAA hold the client."""
    for text in addresses:
        try:
            if parse_ip(text) == client:
                return True
        except ValueError:
            continue
    return False


def client_network(ip: IPAddress) -> str:
    """The greylisting key of a client: its /24 (IPv4) or /64 (IPv6) network."""
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def sanitize_helo(helo: str | None) -> str:
    """The HELO argument as shown in Received: without control characters or spaces, bounded."""
    if not helo:
        return "unknown"
    text = "".join(c if c.isprintable() and not c.isspace() and c not in "()" else "?" for c in helo)
    return text[:255] or "unknown"
