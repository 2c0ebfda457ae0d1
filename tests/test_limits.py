"""Tests for mailguard.app.limits: connection counts per client, IPv6 per /64 (issue 17 item 4)."""

from __future__ import annotations

from mailguard.app.limits import PER_IP, TOTAL, ConnectionLimiter
from mailguard.core.clients import client_key


def test_ipv6_addresses_of_one_64_are_one_client() -> None:
    """520 sockets from one /64 are one client: refused past max_connections_per_ip."""
    limiter = ConnectionLimiter(1000, 20)
    outcomes = [limiter.admit(f"2001:db8:5:6::{i + 1:x}") for i in range(520)]
    assert outcomes[:20] == [None] * 20
    assert set(outcomes[20:]) == {PER_IP}
    assert limiter.admit("2001:db8:5:7::1") is None        # the next /64 is someone else
    limiter.release("2001:db8:5:6::1")
    assert limiter.admit("2001:db8:5:6:ffff:ffff:ffff:ffff") is None


def test_ipv4_and_mapped_addresses() -> None:
    """IPv4 addresses are counted one by one; an IPv4-mapped IPv6 address is its IPv4 address."""
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8::1") == "2001:db8::/64"
    limiter = ConnectionLimiter(2, 5)
    assert limiter.admit("192.0.2.7") is None and limiter.admit("192.0.2.8") is None
    assert limiter.admit("192.0.2.9") == TOTAL
