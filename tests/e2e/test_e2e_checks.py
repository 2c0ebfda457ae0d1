"""End to end: the inbound checks (issue 11) of a real ``twistd -n mailguard``, DNS from a loopback server.

The DNS server (``sinks.DNSServer``) serves PTR, A, MX, TXT, NXDOMAIN and SERVFAIL for
the clients and sender domains below; the server under test asks it through
``[dns] servers``.  Clients connect from chosen 127.0.0.x source addresses.  Every
refusal is checked with its exact reply and its decision log line.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mailguard import config
from mailguard.core import checks as core_checks
from mailguard.core import replies

from .conftest import DOMAIN, HOSTNAME, ServerFactory
from .harness import MailguardServer, make_message, tls_context
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


def mail_reply(server: MailguardServer, source: str, sender: str, helo: str = "client.test") -> str:
    """EHLO then MAIL FROM from ``source``: the last line of the reply to MAIL."""
    with server.dialog(source=source) as d:
        assert d.cmd(f"EHLO {helo}").code == 250
        return d.cmd(f"MAIL FROM:<{sender}>").last


def decision_line(server: MailguardServer, client: str, sender: str, rule: str) -> str:
    return server.wait_for_log(rf"(?i)mailguard smtp decision: client={re.escape(client)} .*"
                               rf"from=<{re.escape(sender)}> .*rule={rule}\b.*")


@pytest.mark.parametrize("source,sender,reply,rule,detail", [
    (REJECTED, "a@real.test", CLIENT_REJECTED, "client_rejected", "network=127.0.0.28/32"),
    (GOOD, "anyone@spam.test", SENDER_REJECTED, "sender_rejected", "pattern=@spam.test"),
    (GOOD, "Boss@Spoof.Test", SENDER_REJECTED, "sender_rejected", "pattern=boss@spoof.test"),
    (LISTED, "a@real.test", LISTED_REPLY, "dnsbl_listed", "zone=bl.test code=127.0.0.2"),
    (BADBL, "a@real.test", DNS_TEMPFAIL, "dnsbl_temperror", "zone=bl.test"),
    (NOPTR, "a@real.test", NO_REVERSE, "no_reverse_dns", "ptr=22.0.0.127.in-addr.arpa"),
    (LIAR, "a@real.test", NO_REVERSE, "no_reverse_dns", "ptr=23.0.0.127.in-addr.arpa"),
    (BADPTR, "a@real.test", DNS_TEMPFAIL, "reverse_dns_temperror", "PTR"),
    (GOOD, "a@gone.test", DOMAIN_UNKNOWN, "sender_domain_unknown", "NXDOMAIN"),
    (GOOD, "a@nullmx.test", DOMAIN_UNKNOWN, "sender_domain_unknown", "null MX"),
    (GOOD, "a@broken.test", DNS_TEMPFAIL, "sender_domain_temperror", "SERVFAIL"),
], ids=["reject_clients", "reject_senders_domain", "reject_senders_user", "dnsbl", "dnsbl_servfail",
        "no_ptr", "ptr_not_confirmed", "ptr_servfail", "sender_nxdomain", "sender_null_mx", "sender_servfail"])
def test_check_refuses_at_mail(guarded: MailguardServer, source: str, sender: str, reply: str, rule: str,
                               detail: str) -> None:
    """Each check refuses with its exact reply at MAIL, and logs one decision line naming rule and detail."""
    assert mail_reply(guarded, source, sender) == reply
    line = decision_line(guarded, source, sender, rule)
    assert f'reply="{reply}"' in line and detail in line, line


@pytest.mark.parametrize("source,sender", [
    (GOOD, "a@real.test"), (GOOD, "a@aonly.test"), (GOOD, ""), (LISTERR, "a@real.test"), (GOOD, f"x@{DOMAIN}"),
], ids=["mx", "a_only", "null_sender", "dnsbl_error_code_is_not_a_listing", "local_domain"])
def test_checks_pass_good_mail(guarded: MailguardServer, source: str, sender: str) -> None:
    """A client with a confirmed reverse name, not listed, with a real sender domain: mail is stored."""
    body = make_message(sender or "mailer-daemon@real.test", ALICE, f"pass {source} {sender}")
    with guarded.dialog(source=source) as d:
        assert d.cmd("EHLO client.test").code == 250
        assert d.cmd(f"MAIL FROM:<{sender}>").code == 250
        assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert d.data(body).code == 250
    if source == LISTERR:
        guarded.wait_for_log(r"mailguard smtp dnsbl-error: client=127\.0\.0\.25 zone=bl\.test code=127\.255\.255\.254")


def test_trusted_client_skips_all_but_the_access_lists(guarded: MailguardServer) -> None:
    """An allow-listed client that is DNS-listed, has no PTR and a dead sender domain: accepted.

    reject_senders still applies to it.
    """
    with guarded.dialog(source=TRUSTED) as d:
        assert d.cmd("EHLO inside.test").code == 250
        assert d.cmd("MAIL FROM:<someone@gone.test>").code == 250
        assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert d.cmd("RSET").code == 250
        assert d.cmd("MAIL FROM:<x@spam.test>").last == SENDER_REJECTED


def test_received_names_the_confirmed_reverse_name(guarded: MailguardServer) -> None:
    """Received: from HELO (NAME [IP]): the forward-confirmed name; the HELO without control characters."""
    mark = f"received-{time.monotonic_ns()}"
    with guarded.dialog(source=GOOD) as d:
        assert d.cmd("EHLO odd\x07helo.test").code == 250
        assert d.cmd("MAIL FROM:<a@real.test>").code == 250
        assert d.cmd(f"RCPT TO:<{BOB}>").code == 250
        assert d.data(make_message("a@real.test", BOB, mark)).code == 250
    (stored,) = guarded.messages_containing(BOB, mark.encode())
    assert stored.startswith(b"Return-Path: <a@real.test>\nReceived: from odd?helo.test "
                             b"(good.client.test [127.0.0.21])\n\tby " + HOSTNAME.encode()), stored[:200]


def test_received_says_unknown_without_a_confirmed_name(server_factory: ServerFactory, dns: DNSServer) -> None:
    """reverse_dns = "log" (the default): a client without a confirmed name is accepted, shown as unknown."""
    server = server_factory("logonly", checks_config(dns))
    server.add_user(ALICE)
    mark = f"unknown-{time.monotonic_ns()}"
    for source in (LIAR, NOPTR):
        with server.dialog(source=source) as d:
            assert d.cmd("EHLO liar.client.test").code == 250
            assert d.cmd("MAIL FROM:<a@real.test>").code == 250
            assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
            assert d.data(make_message("a@real.test", ALICE, f"{mark} {source}")).code == 250
        (stored,) = server.messages_containing(ALICE, f"{mark} {source}".encode())
        assert f"Received: from liar.client.test (unknown [{source}])".encode() in stored, stored[:200]


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


# -- authenticated clients, greylisting, rate control ------------------------------------------

PASSWORD = "correct horse battery"


def submit(server: MailguardServer, source: str, user: str, rcpt: str, subject: str) -> tuple[int, str]:
    """Log in on the submission port from ``source`` (STARTTLS, AUTH) and send one message.

    Returns the first refused reply (code, text) of MAIL/RCPT/DATA, or (250, "") when all passed.
    """
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], source_address=(source, 0), timeout=30) as c:
        c.ehlo("laptop.example")
        c.starttls(context=tls_context())
        c.ehlo("laptop.example")
        assert c.login(user, PASSWORD)[0] == 235
        for code, text in (c.mail(user), c.rcpt(rcpt)):
            if code != 250:
                return code, text.decode()
        code, text = c.data(make_message(user, rcpt, subject))
        return (250, "") if code == 250 else (code, text.decode())


def test_authenticated_client_skips_the_dns_checks(guarded: MailguardServer) -> None:
    """An authenticated client from an address without PTR and on no list: not checked, mail sent."""
    assert submit(guarded, NOPTR, ALICE, BOB, "from-the-road") == (250, "")
    (stored,) = guarded.messages_containing(BOB, b"from-the-road")
    assert b"(unknown [" not in stored        # trusted: no reverse name in Received:


def rcpt_reply(server: MailguardServer, source: str, sender: str, rcpt: str) -> str:
    with server.dialog(source=source) as d:
        assert d.cmd("EHLO client.test").code == 250
        assert d.cmd(f"MAIL FROM:<{sender}>").code == 250
        return d.cmd(f"RCPT TO:<{rcpt}>").last


def test_greylisting_survives_a_restart(fresh_server_factory: ServerFactory, dns: DNSServer) -> None:
    """First try: greylisted at RCPT; a retry too soon: greylisted again; after a restart and the
    delay: accepted (the triplet was kept on disk), and the client's network is then whitelisted."""
    server = fresh_server_factory("greylist", checks_config(dns, greylist=3))
    server.add_user(ALICE)
    server.add_user(BOB)
    assert rcpt_reply(server, GOOD, "a@real.test", ALICE) == GREYLISTED
    line = decision_line(server, GOOD, "a@real.test", "greylisted")
    assert "triplet=127.0.0.0/24,<a@real.test>,<alice@realdomain.example> new" in line, line
    assert rcpt_reply(server, GOOD, "a@real.test", ALICE) == GREYLISTED
    assert rcpt_reply(server, TRUSTED, "a@real.test", ALICE) == str(replies.RECIPIENT_OK)   # trusted: never greylisted
    started = time.monotonic()
    server.restart()
    time.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
    assert rcpt_reply(server, GOOD, "a@real.test", ALICE) == str(replies.RECIPIENT_OK)
    assert rcpt_reply(server, LIAR, "other@real.test", BOB) == str(replies.RECIPIENT_OK)     # same /24: whitelisted


def test_rate_limits_per_ip_and_per_user(server_factory: ServerFactory, dns: DNSServer) -> None:
    """messages_per_ip_per_minute: the third MAIL from one address is rate_limited, another address
    is not; messages_per_user_per_hour: the third message of one account is refused, whatever its address."""
    server = server_factory("rates", {**checks_config(dns), "limits": {"messages_per_ip_per_minute": 2,
                                                                        "messages_per_user_per_hour": 2}})
    server.add_user(ALICE, PASSWORD)
    server.add_user(BOB, PASSWORD)
    for i in range(2):
        with server.dialog(source=GOOD) as d:
            assert d.cmd("EHLO client.test").code == 250
            assert d.cmd("MAIL FROM:<a@real.test>").code == 250
            assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
            assert d.data(make_message("a@real.test", ALICE, f"rate {i}")).code == 250
    assert mail_reply(server, GOOD, "a@real.test") == RATE_LIMITED
    assert "limit=2/minute" in decision_line(server, GOOD, "a@real.test", "rate_limited")
    assert mail_reply(server, LIAR, "a@real.test") == str(replies.SENDER_OK)
    assert submit(server, NOPTR, ALICE, BOB, "user-rate-1") == (250, "")
    assert submit(server, LIAR, ALICE, BOB, "user-rate-2") == (250, "")
    assert submit(server, LISTED, ALICE, BOB, "user-rate-3") == (451, RATE_LIMITED[4:])
    assert "user=alice@realdomain.example limit=2/hour" in decision_line(server, LISTED, ALICE, "rate_limited")
    assert submit(server, LISTED, BOB, ALICE, "other-user") == (250, "")
