"""End to end: a catalogue of open-relay tricks, none of which may get a 2xx at RCPT.

The first sixteen cases are the MAIL FROM / RCPT TO pairs of nmap's ``smtp-open-relay``
script, with its placeholders filled in: the remote test domain ``nmap.scanme.org``,
the server's host name (from its banner) and the server's IP address.  The rest are
the tricks of issue 2 item 3 (``%`` and ``!`` routing, quoted local parts holding
``@``, several ``@``, Exchange-encapsulated addresses, source routes, address literals
of remote hosts, trailing dots, upper case, unqualified recipients), aimed at the
server's own inbound, reroute and relay domains, where a careless parser would take
them for local mail.

Every case runs from 127.0.0.5, a client no rule lets relay, on its own connection.
The directory holds a real ``relaytest`` mailbox so that a parser which drops the
routing part of an address would find someone to deliver to.

Each case names the rule that must refuse it, and the test asserts that rule's exact
reply: ``relay_trick`` (an address form that hides a route, refused before routing,
:data:`mailguard.core.replies.RELAY_TRICK`) or ``relay_denied`` (a well-formed remote
address, the server's ``[replies] relay_denied``).  A trick answered like an unknown
local user (``550 5.1.1``) would mean the parser took it for local mail.
"""

from __future__ import annotations

import pytest

from mailguard import config
from mailguard.core import replies

from .conftest import (
    ALLOWED_HOST,
    DOMAIN,
    HOSTNAME,
    INTERNAL_IFACE,
    OFFICE_CONFIG,
    OUTSIDER,
    ServerFactory,
    populate_office,
)
from .harness import MailguardServer

IP = "127.0.0.1"
REMOTE = "nmap.scanme.org"
REMOTE_ENC = "nmap+2Escanme+2Eorg"  # Exchange IMCEA encoding of the dots
SENDER_LITERAL = f"<antispam@[{IP}]>"
SENDER = "<someone@outside.example>"

TRICK, DENIED = "relay_trick", "relay_denied"

# (test id, MAIL FROM argument, RCPT TO argument, the rule that must refuse it)
CASES: list[tuple[str, str, str, str]] = [
    # nmap smtp-open-relay
    ("nmap-null-sender", "<>", f"<relaytest@{REMOTE}>", DENIED),
    ("nmap-sender-remote", f"<antispam@{REMOTE}>", f"<relaytest@{REMOTE}>", DENIED),
    ("nmap-sender-hostname", f"<antispam@{HOSTNAME}>", f"<relaytest@{REMOTE}>", DENIED),
    ("nmap-sender-ip-literal", SENDER_LITERAL, f"<relaytest@{REMOTE}>", DENIED),
    ("nmap-percent-at-ip-literal", SENDER_LITERAL, f"<relaytest%{REMOTE}@[{IP}]>", TRICK),
    ("nmap-percent-at-hostname", SENDER_LITERAL, f"<relaytest%{REMOTE}@{HOSTNAME}>", TRICK),
    ("nmap-quoted-at", SENDER_LITERAL, f'<"relaytest@{REMOTE}">', TRICK),
    ("nmap-quoted-percent", SENDER_LITERAL, f'<"relaytest%{REMOTE}">', TRICK),
    ("nmap-two-at-ip-literal", SENDER_LITERAL, f"<relaytest@{REMOTE}@[{IP}]>", TRICK),
    ("nmap-quoted-at-at-ip-literal", SENDER_LITERAL, f'<"relaytest@{REMOTE}"@[{IP}]>', TRICK),
    ("nmap-two-at-hostname", SENDER_LITERAL, f"<relaytest@{REMOTE}@{HOSTNAME}>", TRICK),
    ("nmap-source-route-ip-literal", SENDER_LITERAL, f"<@[{IP}]:relaytest@{REMOTE}>", DENIED),
    ("nmap-source-route-hostname", SENDER_LITERAL, f"<@{HOSTNAME}:relaytest@{REMOTE}>", DENIED),
    ("nmap-bang", SENDER_LITERAL, f"<{REMOTE}!relaytest>", TRICK),
    ("nmap-bang-at-ip-literal", SENDER_LITERAL, f"<{REMOTE}!relaytest@[{IP}]>", TRICK),
    ("nmap-bang-at-hostname", SENDER_LITERAL, f"<{REMOTE}!relaytest@{HOSTNAME}>", TRICK),
    # % and ! routing through the inbound domain
    ("percent-at-local-domain", SENDER, f"<relaytest%{REMOTE}@{DOMAIN}>", TRICK),
    ("percent-at-local-domain-no-brackets", SENDER, f"relaytest%{REMOTE}@{DOMAIN}", TRICK),
    ("percent-twice", SENDER, f"<relaytest%{REMOTE}%{DOMAIN}@{DOMAIN}>", TRICK),
    ("percent-upper-case", SENDER, f"<RELAYTEST%{REMOTE.upper()}@{DOMAIN.upper()}>", TRICK),
    ("percent-local-domain-trailing-dot", SENDER, f"<relaytest%{REMOTE}@{DOMAIN}.>", TRICK),
    ("percent-unqualified", SENDER, f"<relaytest%{REMOTE}>", TRICK),
    ("percent-postmaster", SENDER, f"<postmaster%{REMOTE}@{DOMAIN}>", TRICK),
    ("bang-at-local-domain", SENDER, f"<{REMOTE}!relaytest@{DOMAIN}>", TRICK),
    ("bang-path-two-hops", SENDER, f"<{DOMAIN}!{REMOTE}!relaytest>", TRICK),
    # quoted local parts and several @
    ("quoted-at-at-local-domain", SENDER, f'<"relaytest@{REMOTE}"@{DOMAIN}>', TRICK),
    ("quoted-pair-at-at-local-domain", SENDER, f'<"relaytest\\@{REMOTE}"@{DOMAIN}>', TRICK),
    ("two-at-local-domain", SENDER, f"<relaytest@{REMOTE}@{DOMAIN}>", TRICK),
    ("quoted-local-part-remote", SENDER, f'<"relaytest"@{REMOTE}>', DENIED),
    # Exchange encapsulation
    ("imceasmtp", SENDER, f"<IMCEASMTP-relaytest+40{REMOTE_ENC}@{DOMAIN}>", TRICK),
    ("imcea-quoted", SENDER, f'<"IMCEASMTP-relaytest@{REMOTE}"@{DOMAIN}>', TRICK),
    ("imceaex", SENDER, f"<IMCEAEX-_O=OFFICE_OU=SITE_CN=RECIPIENTS_CN=relaytest+40{REMOTE_ENC}@{DOMAIN}>", TRICK),
    # source routes: the final address is what counts
    ("source-route-via-local-domain", SENDER, f"<@{DOMAIN}:relaytest@{REMOTE}>", DENIED),
    ("source-route-two-hops", SENDER, f"<@{DOMAIN},@[{IP}]:relaytest@{REMOTE}>", DENIED),
    # address literals of remote hosts
    ("remote-ipv4-literal", SENDER, "<relaytest@[192.0.2.1]>", DENIED),
    ("remote-ipv6-literal", SENDER, "<relaytest@[IPv6:2001:db8::1]>", DENIED),
    # spellings of a remote domain
    ("remote-trailing-dot", SENDER, f"<relaytest@{REMOTE}.>", DENIED),
    ("remote-upper-case", SENDER, f"<relaytest@{REMOTE.upper()}>", DENIED),
    ("remote-no-brackets", SENDER, f"relaytest@{REMOTE}", DENIED),
    ("remote-postmaster", SENDER, f"<postmaster@{REMOTE}>", DENIED),
    ("subdomain-of-local-domain", SENDER, f"<relaytest@sub.{DOMAIN}>", DENIED),
    ("local-domain-as-prefix", SENDER, f"<relaytest@{DOMAIN}.{REMOTE}>", DENIED),
    # tricks through the reroute and relay domains
    ("percent-at-reroute-domain", SENDER, f"<relaytest%{REMOTE}@dec.example>", TRICK),
    ("percent-at-relay-domain", SENDER, f"<relaytest%{REMOTE}@partner.example>", TRICK),
    ("bang-at-relay-domain", SENDER, f"<{REMOTE}!relaytest@partner.example>", TRICK),
    ("two-at-relay-domain", SENDER, f"<relaytest@{REMOTE}@partner.example>", TRICK),
]


@pytest.fixture(scope="module")
def catalogue_server(server_factory: ServerFactory) -> MailguardServer:
    """The office server, with ``relaytest`` mailboxes in both inbound domains."""
    server = server_factory("catalogue", OFFICE_CONFIG)
    populate_office(server)
    server.add_user(f"relaytest@{DOMAIN}")
    server.add_user("relaytest@compaq.example")
    return server


def expected_reply(server: MailguardServer, rule: str) -> str:
    """The reply ``rule`` gives on ``server``: from the catalogue or the server's own configuration."""
    if rule == TRICK:
        return str(replies.RELAY_TRICK)
    assert rule == DENIED
    return str(config.load(server.config_path).replies.relay_denied)


@pytest.fixture(scope="module")
def trusted_catalogue_server(server_factory: ServerFactory) -> MailguardServer:
    """The office server with its internal listener, for clients that may relay."""
    server = server_factory("trusted", OFFICE_CONFIG, smtp_interfaces=("127.0.0.1", INTERNAL_IFACE))
    populate_office(server)
    server.add_user(f"relaytest@{DOMAIN}")
    return server


def test_catalogue_is_large_enough() -> None:
    """The issue asks for at least 25 cases, each with its own id and a rule that refuses it."""
    assert len(CASES) >= 25
    assert len({case[0] for case in CASES}) == len(CASES)
    assert {case[3] for case in CASES} == {TRICK, DENIED}


@pytest.mark.parametrize("mail_from, rcpt, rule", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_relay_trick_refused(catalogue_server: MailguardServer, mail_from: str, rcpt: str, rule: str) -> None:
    """The sender is accepted, the recipient gets its rule's reply, and DATA has nobody to go to."""
    with catalogue_server.dialog(source=OUTSIDER) as d:
        assert d.banner.code == 220, d.banner
        r = d.cmd(f"EHLO {REMOTE}")
        assert r.code == 250, r
        r = d.cmd(f"MAIL FROM:{mail_from}")
        assert r.last == str(replies.SENDER_OK), f"MAIL FROM:{mail_from} -> {r}"
        r = d.cmd(f"RCPT TO:{rcpt}")
        assert r.last == expected_reply(catalogue_server, rule), f"RCPT TO:{rcpt} -> {r}"
        r = d.cmd("DATA")
        assert r.last == str(replies.NO_VALID_RCPT), f"DATA after RCPT TO:{rcpt} -> {r}"
        d.cmd("QUIT")


def test_nothing_was_queued_or_delivered(catalogue_server: MailguardServer) -> None:
    """After the whole catalogue the outbound queue is empty and no mailbox got mail."""
    assert catalogue_server.queue_lines() == []
    mail = catalogue_server.data_dir / "mail"
    stored = [p for p in mail.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")] if mail.exists() else []
    assert stored == []


# Tricks that hide a remote address inside a local-looking one are refused outright
# ("refused, never routed"), even for clients that may relay.  Source routes are not
# among them: RFC 5321 section 3.6.1 has the final address judged, which such a client may relay to.
ROUTING_TRICKS = [c for c in CASES if c[3] == TRICK]


@pytest.mark.parametrize(
    "source, interface",
    [(ALLOWED_HOST, "127.0.0.1"), (OUTSIDER, INTERNAL_IFACE)],
    ids=["allowed-client", "internal-address"],
)
def test_routing_tricks_refused_for_relay_clients(
    trusted_catalogue_server: MailguardServer, source: str, interface: str
) -> None:
    """From a client that may relay, every routing trick still gets the relay_trick reply."""
    assert len(ROUTING_TRICKS) >= 20
    trick = str(replies.RELAY_TRICK)
    answered = []
    with trusted_catalogue_server.dialog(source=source, interface=interface) as d:
        assert d.cmd(f"EHLO {REMOTE}").code == 250
        r = d.cmd("MAIL FROM:<someone@outside.example>")
        assert r.last == str(replies.SENDER_OK), r
        for name, _, rcpt, _rule in ROUTING_TRICKS:
            r = d.cmd(f"RCPT TO:{rcpt}")
            if r.last != trick:
                answered.append(f"{name}: RCPT TO:{rcpt} -> {r.last}")
        d.cmd("QUIT")
    assert answered == []
