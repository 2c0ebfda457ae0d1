"""The ``[dns]`` section: the resolvers every lookup uses (MX, PTR, DNSBL, SPF, DKIM, DMARC).

Format
======
::

    [dns]
    servers = []    # "ip:port" resolvers ("ip" alone: port 53); [] = /etc/resolv.conf
    timeout = 5     # seconds for one lookup; a timeout is a temporary error (4xx)

``[outbound] dns_servers`` is the older spelling of ``servers``: it is used when
``[dns] servers`` is empty.  This module imports nothing from Twisted.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from mailguard.config.reader import Reader, host_port

DEFAULTS: dict[str, Any] = {"servers": [], "timeout": 5}


@dataclass(frozen=True)
class DNSConfig:
    """Where lookups go: ``servers`` as (host, port) pairs, () meaning the system's resolv.conf."""

    servers: tuple[tuple[str, int], ...] = ()
    timeout: int = 5


def parse(reader: Reader, legacy_servers: tuple[tuple[str, int], ...]) -> DNSConfig:
    """Read ``[dns]`` through the section reader; ``legacy_servers`` is ``[outbound] dns_servers``."""

    def server(text: str) -> tuple[str, int]:
        host, port = host_port(text, 53)
        ipaddress.ip_address(host)          # a resolver is given by its address
        return host, port

    servers: tuple[tuple[str, int], ...] = reader.each("servers", server)
    timeout = reader.integer("timeout", 1, 60)
    return DNSConfig(servers or legacy_servers, timeout)
