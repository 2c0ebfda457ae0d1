"""DNS names built from IP addresses: reverse (PTR) names and DNSBL query names.

This module imports nothing from Twisted.
"""

from __future__ import annotations

import functools
import ipaddress


def _reversed_labels(ip: str) -> str:
    """``192.0.2.1`` -> ``1.2.0.192``; IPv6 as 32 reversed nibbles (RFC 3596 section 2.5)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    pointer = addr.reverse_pointer
    return pointer.rsplit(".", 2)[0]       # drop in-addr.arpa / ip6.arpa


@functools.lru_cache(maxsize=4096)
def reverse_name(ip: str) -> str:
    """The PTR name of an address: ``1.2.0.192.in-addr.arpa`` or ``….ip6.arpa``.

    Remembered for the last few thousand addresses (every connection asks, and clients
    come back).

    :raises ValueError: not an IP address.
    """
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.reverse_pointer


def dnsbl_name(ip: str, zone: str) -> str:
    """The name to look up for ``ip`` in a DNS block list (RFC 5782 sections 2.1, 2.4).

    :raises ValueError: not an IP address.
    """
    return f"{_reversed_labels(ip)}.{zone.rstrip('.')}"
