"""End to end: the inbound checks (issue 11) of a real ``twistd -n mailguard``, DNS from a loopback server.

The DNS server (``sinks.DNSServer``) serves PTR, A, MX, TXT, NXDOMAIN and SERVFAIL for
the clients and sender domains below; the server under test asks it through
``[dns] servers``.  Clients connect from chosen 127.0.0.x source addresses.  Every
refusal is checked with its exact reply and its decision log line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mailguard import config
from mailguard.core import checks as core_checks

from .conftest import DOMAIN, ServerFactory
from .harness import MailguardServer
from .sinks import DNSServer

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"

GOOD = "127.0.0.21"         # PTR good.client.test, whose A is 127.0.0.21 again
NOPTR = "127.0.0.22"        # no PTR record (NXDOMAIN)
LIAR = "127.0.0.23"         # PTR liar.client.test, whose A is another address
LISTED = "127.0.0.24"       # listed in bl.test (127.0.0.2)
LISTERR = "127.0.0.25"      # bl.test answers 127.255.255.254: "you are querying wrongly", not a listing
BADBL = "127.0.0.26"        # bl.test SERVFAILs for it
BADPTR = "127.0.0.27"       # its PTR SERVFAILs
REJECTED = "127.0.0.28"     # in reject_clients
TRUSTED = "127.0.1.29"      # in [relay] allow (and listed, and without PTR)


def _ptr(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


def _bl(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".bl.test"


ZONE: dict[str, list[tuple[str, object]]] = {
    _ptr(GOOD): [("PTR", "good.client.test")],
    "good.client.test": [("A", GOOD)],
    _ptr(LIAR): [("PTR", "liar.client.test")],
    "liar.client.test": [("A", "127.0.0.99")],
    _bl(LISTED): [("A", "127.0.0.2"), ("TXT", "listed for testing")],
    _bl(LISTERR): [("A", "127.255.255.254")],
    _bl(BADBL): [("SERVFAIL", None)],
    _bl(TRUSTED): [("A", "127.0.0.2")],
    _ptr(BADPTR): [("SERVFAIL", None)],
    **{_ptr(ip): [("PTR", f"host{ip.split('.')[-1]}.client.test")] for ip in (LISTED, LISTERR, BADBL, REJECTED)},
    **{f"host{ip.split('.')[-1]}.client.test": [("A", ip)] for ip in (LISTED, LISTERR, BADBL, REJECTED)},
    "real.test": [("MX", (10, "mx.real.test"))],
    "mx.real.test": [("A", "127.0.0.1")],
    "aonly.test": [("A", "127.0.0.1")],
    "nullmx.test": [("MX", (0, ""))],
    "broken.test": [("SERVFAIL", None)],
    "spam.test": [("MX", (10, "mx.real.test"))],
}

# The servers here keep the default [replies] of the checks; DNS trouble has a fixed reply.
_REPLIES = config.defaults().checks.replies
CLIENT_REJECTED = str(_REPLIES.client_rejected)
SENDER_REJECTED = str(_REPLIES.sender_rejected)
DOMAIN_UNKNOWN = str(_REPLIES.sender_domain_unknown)
NO_REVERSE = str(_REPLIES.no_reverse_dns)
LISTED_REPLY = str(_REPLIES.dnsbl_listed)
DNS_TEMPFAIL = str(core_checks.DNS_TEMPFAIL)
GREYLISTED = str(_REPLIES.greylisted)
RATE_LIMITED = str(_REPLIES.rate_limited)


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    server = DNSServer(ZONE)
    yield server
    server.close()


def checks_config(dns: DNSServer, **checks: Any) -> dict[str, Any]:
    return {
        "domains": {DOMAIN: {"route": "inbound"}},
        "relay": {"allow": [TRUSTED]},
        "dns": {"servers": [dns.address], "timeout": 2},
        "checks": checks,
    }


ALL_CHECKS = {"reject_clients": [REJECTED], "reject_senders": ["@spam.test", "boss@spoof.test"],
              "sender_domain": True, "dnsbl": ["bl.test"], "reverse_dns": "require"}


@pytest.fixture(scope="module")
def guarded(server_factory: ServerFactory, dns: DNSServer) -> MailguardServer:
    """A server with every MAIL-stage check on."""
    server = server_factory("guarded", checks_config(dns, **ALL_CHECKS))
    server.add_user(ALICE)
    server.add_user(BOB)
    return server


# -- explain ---------------------------------------------------------------------------------

def explain(server: MailguardServer, *args: str) -> list[str]:
    return server.cli_ok("explain", *args).stdout.splitlines()


def test_explain_runs_the_checks_with_dns(guarded: MailguardServer) -> None:
    """explain names the deciding check, DNS included; -v adds the zone and code."""
    assert explain(guarded, "--client", LISTED, "--from", "a@real.test", ALICE, BOB) == [
        f"{ALICE}: {LISTED_REPLY} (rule: dnsbl_listed)", f"{BOB}: {LISTED_REPLY} (rule: dnsbl_listed)"]
    assert explain(guarded, "-v", "--client", LISTED, "--from", "a@real.test", ALICE) == [
        f"{ALICE}: {LISTED_REPLY} (rule: dnsbl_listed) -> zone=bl.test code=127.0.0.2"]
    assert explain(guarded, "--client", GOOD, "--helo", "good.client.test", "--from", "a@broken.test", ALICE) == [
        f"{ALICE}: {DNS_TEMPFAIL} (rule: sender_domain_temperror)"]
    assert explain(guarded, "--client", GOOD, "--from", "a@real.test", ALICE) == [
        f"{ALICE}: 250 2.1.5 Recipient ok (rule: inbound)"]
    assert explain(guarded, "--client", TRUSTED, "--from", "a@gone.test", ALICE) == [
        f"{ALICE}: 250 2.1.5 Recipient ok (rule: inbound)"]


def test_explain_applies_enforce_sender(guarded: MailguardServer) -> None:
    """--auth with a sender the account does not own: 553, as the server answers at MAIL."""
    assert explain(guarded, "--client", NOPTR, "--auth", ALICE, "--from", BOB, "x@remote.example") == [
        "x@remote.example: 553 5.7.1 Sender address not owned by authenticated user (rule: enforce_sender)"]
    assert explain(guarded, "--client", NOPTR, "--auth", ALICE, "--from", ALICE, "x@remote.example") == [
        "x@remote.example: 250 2.1.5 Recipient ok (rule: authenticated)"]
