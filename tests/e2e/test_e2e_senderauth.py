"""SPF, DKIM verification, DMARC and Authentication-Results against the real server.

``twistd -n mailguard`` asks a loopback DNS server run by the test (``sinks.DNSServer``)
for example.org's SPF record (``ip4:127.0.0.10``: that client passes, 127.0.0.20 fails),
its DKIM key and its DMARC record (``p=reject``).  Messages are signed by Perl's
Mail::DKIM and by dkimpy, outside mailguard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from dkim_doubles import key_pair, sign_dkimpy, sign_perl

from .conftest import DOMAIN, HOSTNAME, ServerFactory
from .harness import Dialog, MailguardServer, make_message, split_added_headers
from .sinks import DNSServer

RCPT = f"alice@{DOMAIN}"
GOOD_IP = "127.0.0.10"     # example.org's SPF record names it
BAD_IP = "127.0.0.20"      # not in example.org's SPF record
TRUSTED_IP = "127.0.0.30"  # relay.allow: skips the checks
SPF_FAIL = "550 5.7.23 SPF validation failed"
DMARC_REJECT = "550 5.7.1 Rejected by the sender domain's DMARC policy"


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    _, record = key_pair()
    server = DNSServer({
        "example.org": [("TXT", f"v=spf1 ip4:{GOOD_IP} -all")],
        "sel._domainkey.example.org": [("TXT", record.decode())],
        "_dmarc.example.org": [("TXT", "v=DMARC1; p=reject")],
    })
    yield server
    server.close()
    assert server.errors == []


def start(factory: ServerFactory, name: str, dns: DNSServer, **checks: object) -> MailguardServer:
    server = factory(name, {
        "domains": {DOMAIN: {"route": "inbound"}},
        "relay": {"allow": [TRUSTED_IP]},
        "dns": {"servers": [dns.address], "timeout": 2},
        "checks": dict(checks),
    })
    server.add_user(RCPT)
    return server


def send(server: MailguardServer, source: str, sender: str, message: bytes) -> tuple[str, str, str]:
    """(reply to MAIL, reply to RCPT or "", reply to the final dot or "") from ``source``."""
    with Dialog.connect(server.host, server.smtp_port, source=source) as d:
        d.cmd("EHLO client.example")
        mail = d.cmd(f"MAIL FROM:<{sender}>")
        if mail.code != 250:
            return str(mail), "", ""
        rcpt = d.cmd(f"RCPT TO:<{RCPT}>")
        if rcpt.code != 250:
            return str(mail), str(rcpt), ""
        return str(mail), str(rcpt), str(d.data(message))


def stored(server: MailguardServer, marker: bytes) -> bytes:
    (message,) = server.messages_containing(RCPT, marker)
    return message


def added_headers(server: MailguardServer, sent: bytes, marker: bytes) -> bytes:
    return split_added_headers(stored(server, marker), sent)


def test_results_recorded_and_forgeries_removed(server_factory: ServerFactory, dns_server: DNSServer,
                                                tmp_path: Path) -> None:
    """check mode: a Mail::DKIM-signed message from an SPF-allowed host is stored with
    spf=pass, dkim=pass, dmarc=pass; an incoming Authentication-Results naming our host is
    dropped, one naming another host stays."""
    server = start(server_factory, "sa-check", dns_server, spf="check", dkim_verify=True, dmarc="check")
    body = make_message("alice@example.org", RCPT, "signed-by-perl")
    signed = sign_perl(body, tmp_path / "key.pem")
    forged = (f"Authentication-Results: {HOSTNAME}; dmarc=pass header.from=example.org\r\n"
              "Authentication-Results: mx.elsewhere.example; spf=none\r\n").encode() + signed
    replies = send(server, GOOD_IP, "alice@example.org", forged)
    assert replies[2].startswith("250 2.0.0 Ok: queued as")
    added = added_headers(server, signed, b"signed-by-perl")
    text = stored(server, b"signed-by-perl")
    assert text.count(b"Authentication-Results: " + HOSTNAME.encode()) == 1
    assert b"Authentication-Results: mx.elsewhere.example; spf=none" in text
    assert (f"Authentication-Results: {HOSTNAME};\n"
            f"\tspf=pass (+ip4 matched at example.org) smtp.mailfrom=alice@example.org;\n"
            f"\tdkim=pass header.d=example.org header.s=sel header.a=rsa-sha256;\n"
            f"\tdmarc=pass (p=reject) header.from=example.org\n").encode() in added


def test_altered_message_recorded_as_failing(server_factory: ServerFactory, dns_server: DNSServer) -> None:
    """check mode: a signed message altered on the way, from a host SPF does not allow, is
    stored (check only records) with spf=fail, dkim=fail and dmarc=fail."""
    server = start(server_factory, "sa-altered", dns_server, spf="check", dkim_verify=True, dmarc="check")
    signed = sign_dkimpy(make_message("alice@example.org", RCPT, "altered-one"))
    altered = signed.replace(b"Regards", b"Cheers")
    assert send(server, BAD_IP, "alice@example.org", altered)[2].startswith("250 ")
    text = stored(server, b"altered-one")
    assert b"\tspf=fail" in text and b"\tdkim=fail (body hash mismatch" in text
    assert b"\tdmarc=fail (p=reject) header.from=example.org" in text


def test_dmarc_reject_after_data(server_factory: ServerFactory, dns_server: DNSServer) -> None:
    """dmarc = "reject": p=reject and nothing aligned passes -> dmarc_reject to the final dot,
    nothing stored, one decision line; a signed message from the same host is accepted."""
    server = start(server_factory, "sa-dmarc", dns_server, dmarc="reject")
    forged = make_message("alice@example.org", RCPT, "forged-ceo")
    mail, rcpt, dot = send(server, BAD_IP, "alice@example.org", forged)
    assert (mail[:3], rcpt[:3], dot) == ("250", "250", DMARC_REJECT)
    assert server.messages_containing(RCPT, b"forged-ceo") == []
    server.wait_for_log(rf"smtp decision: client={BAD_IP} .*rule=dmarc_reject")
    signed = sign_dkimpy(make_message("alice@example.org", RCPT, "genuine-ceo"))
    assert send(server, BAD_IP, "alice@example.org", signed)[2].startswith("250 ")
    assert b"dmarc=pass" in stored(server, b"genuine-ceo")


def test_spf_reject_at_mail(server_factory: ServerFactory, dns_server: DNSServer) -> None:
    """spf = "reject": an SPF fail is refused at MAIL with spf_fail; the allowed host passes;
    a trusted (relay.allow) client is not checked and gets no Authentication-Results."""
    server = start(server_factory, "sa-spf", dns_server, spf="reject")
    assert send(server, BAD_IP, "alice@example.org", b"")[0] == SPF_FAIL
    server.wait_for_log(rf"smtp decision: client={BAD_IP} .*rule=spf_fail")
    ok = make_message("alice@example.org", RCPT, "spf-ok")
    assert send(server, GOOD_IP, "alice@example.org", ok)[2].startswith("250 ")
    assert b"\tspf=pass" in stored(server, b"spf-ok")
    trusted = make_message("alice@example.org", RCPT, "from-trusted")
    assert send(server, TRUSTED_IP, "alice@example.org", trusted)[2].startswith("250 ")
    assert b"Authentication-Results" not in stored(server, b"from-trusted")


def test_explain_names_spf(server_factory: ServerFactory, dns_server: DNSServer) -> None:
    """mailguard explain runs SPF (DNS included) and names spf_fail, as the server would at MAIL."""
    server = start(server_factory, "sa-explain", dns_server, spf="reject")
    lines = server.cli_ok("explain", "--client", BAD_IP, "--helo", "client.example", "--from",
                          "alice@example.org", RCPT).stdout.splitlines()
    assert lines == [f"{RCPT}: {SPF_FAIL} (rule: spf_fail)"]
    lines = server.cli_ok("explain", "-v", "--client", GOOD_IP, "--helo", "client.example", "--from",
                          "alice@example.org", RCPT).stdout.splitlines()
    assert lines[0].startswith(f"{RCPT}: 250 2.1.5 Recipient ok (rule: inbound)")
