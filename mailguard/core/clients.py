"""What counts as one client for limits and budgets.

This module imports nothing from Twisted.
"""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=4096)
def client_key(ip: str) -> str:
    """What counts as one client: an IPv4 address, or the /64 of an IPv6 address.

    One IPv6 subscriber gets a whole /64, so counting its addresses one by one would
    give it 2**64 budgets.  Anything that is not an IP address is its own key.
    Remembered for the last few thousand addresses: each connection asks at least
    twice (admitted, released) and the same clients come back.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return ip
