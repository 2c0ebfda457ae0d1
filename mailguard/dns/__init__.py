"""DNS for every part of mailguard: one resolver, one cache.

Every lookup mailguard makes (outbound MX and address lookups, the inbound checks'
PTR, A/AAAA, MX and DNSBL lookups, SPF, DKIM and DMARC TXT records) goes through one
:class:`~mailguard.dns.resolver.Resolver`, built from ``[dns] servers`` and
``[dns] timeout`` (``[outbound] dns_servers`` is the older spelling) by
:func:`~mailguard.dns.resolver.from_config` and held by the running mail host.

The interface::

    answer = await resolver.lookup("example.com", "MX")   # never blocks the reactor
    answer.status      # RECORDS, NXDOMAIN (the name does not exist) or NODATA (no such type)
    answer.records     # the values, typed by record type (see resolver.Answer)

A timeout, SERVFAIL, REFUSED or any other failure to get an authoritative answer raises
:class:`~mailguard.dns.resolver.TemporaryDNSError`: the caller answers 4xx (or retries),
never 5xx and never "pass".  Answers, including NXDOMAIN and NODATA, are cached for
their TTL (negative answers for the SOA minimum, RFC 2308); concurrent lookups of the
same name and type share one query.  Tests substitute any object with the same
``lookup`` coroutine.

:mod:`mailguard.dns.names` builds reverse and DNSBL query names from addresses.
"""

from mailguard.dns.resolver import MX, NODATA, NXDOMAIN, RECORDS, Answer, Lookup, Resolver, TemporaryDNSError

__all__ = ["MX", "NODATA", "NXDOMAIN", "RECORDS", "Answer", "Lookup", "Resolver", "TemporaryDNSError"]
