"""The DNS questions sender authentication asks, as one small asynchronous interface.

A :class:`Lookup` answers five questions.  Each answer is a list (empty: the name exists
but has no record of that type, "NODATA"); a name that does not exist raises
:class:`DomainNotFound` (NXDOMAIN); a timeout, SERVFAIL or any other trouble raises
:class:`TemporaryDNSError`.  The evaluators map these onto their own results
(RFC 7208 section 5: NXDOMAIN and NODATA are "void lookups", trouble is "temperror").

:class:`NamesLookup` implements it on a ``twisted.names`` resolver (``IResolver``).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

from twisted.internet import defer
from twisted.names import dns, error


class DomainNotFound(Exception):
    """The name does not exist (NXDOMAIN)."""


class TemporaryDNSError(Exception):
    """A timeout, SERVFAIL or another failure to get an answer: try again later."""


class Lookup(Protocol):
    """Asynchronous DNS lookups; see the module documentation for the error contract."""

    async def txt(self, name: str) -> list[bytes]:
        """Each TXT record of ``name``, its strings joined without separator."""

    async def a(self, name: str) -> list[str]:
        """The IPv4 addresses of ``name``."""

    async def aaaa(self, name: str) -> list[str]:
        """The IPv6 addresses of ``name``."""

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, exchange) for each MX record of ``name`` (exchange without final dot)."""

    async def ptr(self, address: str) -> list[str]:
        """The names in the PTR records of an IP address (``in-addr.arpa``/``ip6.arpa``)."""


def reverse_name(address: str) -> str:
    """``192.0.2.1`` -> ``1.2.0.192.in-addr.arpa`` (and the nibble form for IPv6)."""
    return ipaddress.ip_address(address).reverse_pointer


class NamesLookup:
    """:class:`Lookup` on a ``twisted.names`` resolver (an ``IResolver``)."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver

    async def _ask(self, method: str, name: str, rtype: int) -> list[Any]:
        try:
            answers, _auth, _add = await getattr(self.resolver, method)(name)
        except error.DNSNameError as e:
            raise DomainNotFound(name) from e
        except defer.CancelledError:
            raise
        except Exception as e:  # timeout, SERVFAIL, refused, malformed answer
            raise TemporaryDNSError(f"{name}: {e.__class__.__name__}") from e
        return [rr.payload for rr in answers if rr.type == rtype]

    async def txt(self, name: str) -> list[bytes]:
        return [b"".join(p.data) for p in await self._ask("lookupText", name, dns.TXT)]

    async def a(self, name: str) -> list[str]:
        return [p.dottedQuad() for p in await self._ask("lookupAddress", name, dns.A)]

    async def aaaa(self, name: str) -> list[str]:
        return [str(ipaddress.IPv6Address(p.address))
                for p in await self._ask("lookupIPV6Address", name, dns.AAAA)]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return [(p.preference, p.name.name.decode("ascii", "replace").rstrip("."))
                for p in await self._ask("lookupMailExchange", name, dns.MX)]

    async def ptr(self, address: str) -> list[str]:
        return [p.name.name.decode("ascii", "replace").rstrip(".")
                for p in await self._ask("lookupPointer", reverse_name(address), dns.PTR)]
