"""The DNS questions sender authentication asks, as one small asynchronous interface.

A :class:`Lookup` answers five questions.  Each answer is a list (empty: the name exists
but has no record of that type, "NODATA"); a name that does not exist raises
:class:`DomainNotFound` (NXDOMAIN); a timeout, SERVFAIL or any other trouble raises
:class:`TemporaryDNSError`.  The evaluators map these onto their own results
(RFC 7208 section 5: NXDOMAIN and NODATA are "void lookups", trouble is "temperror").

:class:`ResolverLookup` implements it on the shared cached resolver (:mod:`mailguard.dns`).
"""

from __future__ import annotations

from typing import Any, Protocol

from mailguard import dns
from mailguard.dns.names import reverse_name


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


class ResolverLookup:
    """:class:`Lookup` on the shared cached resolver (:mod:`mailguard.dns`)."""

    def __init__(self, resolver: dns.Lookup) -> None:
        self.resolver = resolver

    async def _records(self, name: str, type: str) -> list[Any]:
        try:
            answer = await self.resolver.lookup(name, type)
        except dns.TemporaryDNSError as e:
            raise TemporaryDNSError(str(e)) from e
        if answer.nxdomain:
            raise DomainNotFound(name)
        return list(answer.records)

    async def txt(self, name: str) -> list[bytes]:
        return [bytes(r) for r in await self._records(name, "TXT")]

    async def a(self, name: str) -> list[str]:
        return [str(r) for r in await self._records(name, "A")]

    async def aaaa(self, name: str) -> list[str]:
        return [str(r) for r in await self._records(name, "AAAA")]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return [(int(r.preference), str(r.exchange)) for r in await self._records(name, "MX")]

    async def ptr(self, address: str) -> list[str]:
        return [str(r) for r in await self._records(reverse_name(address), "PTR")]
