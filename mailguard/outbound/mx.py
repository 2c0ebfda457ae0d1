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
- any other exception (a bug): temporary, and logged with its traceback;
- an address literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` is used as it is.

The smarthost (``[outbound] smarthost = "host:port"``) replaces all of this: every
domain goes to that one host (its name looked up with the same resolver unless it is
an IP address).

Every lookup goes through the shared cached resolver (:mod:`mailguard.dns`), whose
:class:`~mailguard.dns.resolver.TemporaryDNSError` is the temporary failure here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Sequence, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailguard.config import host_port
from mailguard.dns.resolver import Lookup, Resolver, TemporaryDNSError, from_config

log = Logger(namespace="mailguard.outbound.mx")

# Seconds one lookup may take when no [dns] timeout is given.
DNS_TIMEOUT = 5.0


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


def make_resolver(dns_servers: Sequence[tuple[str, int]], reactor: Any, timeout: float = DNS_TIMEOUT) -> Resolver:
    """A resolver of its own for these servers ([]: /etc/resolv.conf); the server shares one instead."""
    return from_config(dns_servers, timeout, reactor)


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


async def _addresses(resolver: Lookup, host: str) -> list[str]:
    """IPv4 then IPv6 addresses of ``host``; [] when it has none.

    :raises RouteError: the name does not exist (permanent) or DNS failed (temporary).
    """
    results = await defer.DeferredList(
        [defer.ensureDeferred(resolver.lookup(host, "A")), defer.ensureDeferred(resolver.lookup(host, "AAAA"))],
        consumeErrors=True)
    out: list[str] = []
    temporary = nxdomain = False
    for ok, value in results:
        if not ok:
            failure = cast(Failure, value)
            if not failure.check(TemporaryDNSError):
                failure.raiseException()      # a bug, not a DNS answer: route() logs it
            temporary = True
        elif value.nxdomain:
            nxdomain = True
        else:
            out.extend(value.records)
    if out:
        return out
    if temporary:
        raise RouteError(False, "4.4.3", f"DNS lookup failed for {host}")
    if nxdomain:
        raise RouteError(True, "5.1.2", f"Host or domain name not found: {host}")
    return out


async def resolve_mx(resolver: Lookup, domain: str, port: int) -> list[Relay]:
    """The hosts that take mail for ``domain``, in the order to try them.

    :raises RouteError: see the module docstring.
    """
    literal = _literal(domain)
    if literal is not None:
        return [Relay(literal, literal, port)]
    try:
        answer = await resolver.lookup(domain, "MX")
    except TemporaryDNSError as e:
        raise RouteError(False, "4.4.3", f"DNS lookup of MX for {domain} failed: {e.reason}") from None
    if answer.nxdomain:
        raise RouteError(True, "5.1.2", f"Domain not found: {domain}")
    mxs = list(answer.records)
    # RFC 7505 section 3: a single MX with preference 0 and the root as exchange.
    if any(mx.exchange in ("", ".") for mx in mxs):
        raise RouteError(True, "5.1.10", f"Domain {domain} does not accept mail (null MX, RFC 7505)")
    if not mxs:
        addresses = await _addresses(resolver, domain)
        if not addresses:
            raise RouteError(True, "5.1.2", f"No MX or address records for {domain}")
        return [Relay(domain, a, port) for a in addresses]
    relays: list[Relay] = []
    temporary: RouteError | None = None
    for mx in sorted(mxs, key=lambda m: m.preference):
        host = mx.exchange
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


async def route(resolver: Lookup, domain: str, port: int, smarthost: str = "") -> list[Relay]:
    """The relays for ``domain``: the smarthost when configured, otherwise its MX hosts.

    Any other exception than a DNS failure is a bug: it is logged with its traceback
    and becomes a temporary :class:`RouteError`, so the message stays queued.
    """
    try:
        return await _route(resolver, domain, port, smarthost)
    except RouteError:
        raise
    except Exception:
        log.failure("mailguard outbound: routing mail for {domain} failed with an unexpected error",
                    domain=domain)
        raise RouteError(False, "4.3.0", f"Local error routing mail for {domain} (logged)") from None


async def _route(resolver: Lookup, domain: str, port: int, smarthost: str) -> list[Relay]:
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
