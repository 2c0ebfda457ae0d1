"""Where mail for a domain goes: MX lookup (RFC 5321 section 5.1) or the smarthost.

:func:`route` answers with the list of :class:`Relay` hosts to try in order, or fails
with :class:`RouteError`, which says whether the failure is permanent (the message
bounces) or temporary (it is retried):

- every MX host by preference (equal preferences keep the DNS order), each host's
  IPv4 then IPv6 addresses;
- no MX records: the implicit MX, the domain's own A/AAAA addresses;
- a null MX (RFC 7505: one MX of preference 0 whose exchange is ".") or a
  non-existent domain (NXDOMAIN): permanent;
- a DNS timeout or server failure: temporary;
- an address literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` is used as it is.

The smarthost (``[outbound] smarthost = "host:port"``) replaces all of this: every
domain goes to that one host (its name looked up with the same resolver unless it is
an IP address).

:func:`make_resolver` builds the ``twisted.names`` resolver from ``[outbound]
dns_servers`` (empty: ``/etc/hosts``, then the servers in ``/etc/resolv.conf``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Sequence, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorUDP, IResolver
from twisted.names import client, dns, error
from twisted.python.failure import Failure

from mailguard.config import host_port

# Per-query retransmission timeouts (seconds): at most 6 s for one lookup.
DNS_TIMEOUT = (1, 2, 3)


class RouteError(Exception):
    """No host to deliver to.  ``permanent`` decides bounce versus retry."""

    def __init__(self, permanent: bool, status: str, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.status = status
        self.text = text

    def reply(self) -> str:
        """The failure as an SMTP-style reply line for the queue and the DSN."""
        code = 550 if self.permanent else 451
        return f"{code} {self.status} {self.text}"


@dataclass(frozen=True)
class Relay:
    """One host to try: its name (for logs and TLS), an IP address and a port."""

    host: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


def make_resolver(dns_servers: Sequence[tuple[str, int]], reactor: IReactorUDP) -> IResolver:
    """A ``twisted.names`` resolver for ``[outbound] dns_servers`` ([]: /etc/resolv.conf)."""
    resolver: IResolver
    if dns_servers:
        resolver = client.Resolver(servers=list(dns_servers), reactor=reactor)
    else:
        # /etc/hosts first, then the servers in /etc/resolv.conf.
        resolver = client.createResolver()
    return resolver


Records = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


def _records(lookup: defer.Deferred[Any]) -> defer.Deferred[Records]:
    """An ``IResolver`` lookup as what it fires with: answer, authority and additional lists.

    Twisted annotates the lookups as firing with three ``RRHeader``; they fire with three
    lists of them (see docs/twisted.rst).
    """
    return cast("defer.Deferred[Records]", lookup)


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``"host"`` -> (host, port) (validated with the config)."""
    return host_port(text, default_port)


def _literal(domain: str) -> str | None:
    """The IP address inside an address literal (RFC 5321 section 4.1.3), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _temporary(f: Failure) -> bool:
    return not f.check(error.DNSNameError)


async def _addresses(resolver: IResolver, host: str) -> list[str]:
    """IPv4 then IPv6 addresses of ``host``; [] when it has none.

    :raises RouteError: the name does not exist (permanent) or DNS failed (temporary).
    """
    results = await defer.DeferredList(
        [_records(resolver.lookupAddress(host, DNS_TIMEOUT)),
         _records(resolver.lookupIPV6Address(host, DNS_TIMEOUT))],
        consumeErrors=True)
    out: list[str] = []
    failures: list[Failure] = []
    for _ok, value in results:
        if isinstance(value, Failure):
            failures.append(value)
            continue
        answers = value[0]
        for rr in answers:
            if isinstance(rr.payload, dns.Record_A):
                out.append(rr.payload.dottedQuad())
            elif isinstance(rr.payload, dns.Record_AAAA):
                out.append(str(ipaddress.ip_address(rr.payload.address)))
    if out:
        return out
    if failures and all(not _temporary(f) for f in failures):
        raise RouteError(True, "5.1.2", f"Host or domain name not found: {host}")
    if any(_temporary(f) for f in failures):
        raise RouteError(False, "4.4.3", f"DNS lookup failed for {host}")
    return out


async def resolve_mx(resolver: IResolver, domain: str, port: int) -> list[Relay]:
    """The hosts that take mail for ``domain``, in the order to try them.

    :raises RouteError: see the module docstring.
    """
    literal = _literal(domain)
    if literal is not None:
        return [Relay(literal, literal, port)]
    try:
        answers, _auth, _add = await _records(resolver.lookupMailExchange(domain, DNS_TIMEOUT))
    except error.DNSNameError:
        raise RouteError(True, "5.1.2", f"Domain not found: {domain}") from None
    except Exception as e:
        raise RouteError(False, "4.4.3", f"DNS lookup of MX for {domain} failed: {type(e).__name__}") from None
    mxs: list[dns.Record_MX] = []
    for rr in answers:
        if isinstance(rr.payload, dns.Record_MX):
            mxs.append(rr.payload)
    # RFC 7505 section 3: a single MX with preference 0 and the root as exchange.
    if any(str(mx.name) in ("", ".") for mx in mxs):
        raise RouteError(True, "5.1.10", f"Domain {domain} does not accept mail (null MX, RFC 7505)")
    if not mxs:
        addresses = await _addresses(resolver, domain)
        if not addresses:
            raise RouteError(True, "5.1.2", f"No MX or address records for {domain}")
        return [Relay(domain, a, port) for a in addresses]
    relays: list[Relay] = []
    temporary: RouteError | None = None
    for mx in sorted(mxs, key=lambda m: m.preference):
        host = str(mx.name).rstrip(".")
        try:
            addresses = [host] if _is_ip(host) else await _addresses(resolver, host)
        except RouteError as e:
            if not e.permanent:
                temporary = e
            continue
        relays.extend(Relay(host, a, port) for a in addresses)
    if not relays:
        if temporary is not None:
            raise temporary
        raise RouteError(True, "5.4.4", f"No address for any MX host of {domain}")
    return relays


async def route(resolver: IResolver, domain: str, port: int, smarthost: str = "") -> list[Relay]:
    """The relays for ``domain``: the smarthost when configured, otherwise its MX hosts."""
    if smarthost:
        host, shport = split_host_port(smarthost, 25)
        if _is_ip(host):
            return [Relay(host, host, shport)]
        # A smarthost that cannot be found is a local configuration problem: retry, never bounce.
        try:
            addresses = await _addresses(resolver, host)
        except RouteError as e:
            raise RouteError(False, "4.4.4", f"Smarthost {host}: {e.text}") from None
        if not addresses:
            raise RouteError(False, "4.4.4", f"No address for smarthost {host}")
        return [Relay(host, a, shport) for a in addresses]
    return await resolve_mx(resolver, domain, port)
