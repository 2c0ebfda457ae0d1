"""DKIM signing end to end: what the office sends carries signatures independent verifiers accept.

joe submits (AUTH over STARTTLS on the submission port) to a remote address; the
real server delivers by MX to a loopback sink.  The copy the sink received is
checked by dkimpy and by Perl's Mail::DKIM (the verifier SpamAssassin uses), both
fetching the keys from a loopback DNS server that serves exactly what
``mailguard dkim keygen`` printed.  Mail from an outsider is never signed, and a
submission without Date:/Message-ID: gets both.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
from pathlib import Path
from typing import Iterator

import dkim
import pytest

from .conftest import DOMAIN, OUTSIDER, ServerFactory
from .harness import MailguardServer, tls_context
from .sinks import DNSServer, SMTPSink
from .test_e2e_outbound import DELIVERY_TIMEOUT, marker, outbound_config

JOE = f"joe@{DOMAIN}"
PASSWORD = "joe's long password"
PERL_VERIFIER = Path(__file__).with_name("dkim_verify.pl")


@pytest.fixture(scope="module")
def zone() -> Iterator[DNSServer]:
    dns = DNSServer({"remote.example": [("MX", (10, "mx.remote.example"))],
                     "mx.remote.example": [("A", "127.0.0.1")]})
    yield dns
    dns.close()


@pytest.fixture(scope="module")
def sink() -> Iterator[SMTPSink]:
    s = SMTPSink(tls=True, name="mx.remote.example")
    yield s
    s.close()


@pytest.fixture(scope="module")
def signer(server_factory: ServerFactory, zone: DNSServer, sink: SMTPSink) -> MailguardServer:
    """A server with an RSA and an Ed25519 key for DOMAIN, both published in the zone."""
    server = server_factory("dkimsign", outbound_config(zone, sink), start=False)
    for args in ((), ("--algorithm", "ed25519")):
        line = server.cli_ok("dkim", "keygen", DOMAIN, *args).stdout.strip()
        name, text = re.match(r'^(\S+)\. IN TXT (.*)$', line).groups()  # type: ignore[union-attr]
        zone.set(name, [("TXT", "".join(re.findall(r'"([^"]*)"', text)))])
    server.start()
    server.add_user(JOE, PASSWORD)
    return server


def submit(server: MailguardServer, message: bytes, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as c:
        c.ehlo("laptop.example")
        c.starttls(context=tls_context())
        c.ehlo("laptop.example")
        c.login(JOE, PASSWORD)
        assert c.sendmail(JOE, [rcpt], message) == {}


def dnsfunc(zone: DNSServer):  # type: ignore[no-untyped-def]
    import dns.resolver  # dkimpy's own DNS library
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = zone.port

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = res.resolve(name.decode(), "TXT")
        except Exception:
            return None
        return b"".join(b"".join(r.strings) for r in answer)
    return lookup


def test_submitted_mail_is_signed_and_verifies(signer: MailguardServer, sink: SMTPSink, zone: DNSServer) -> None:
    """rsa-sha256 and ed25519-sha256 signatures, accepted by dkimpy and by Mail::DKIM."""
    tag = marker()
    rcpt = f"ann-{tag}@remote.example"
    message = (f"From: Joe <{JOE}>\r\nTo: <{rcpt}>\r\nSubject: quarterly {tag}\r\n"
               f"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@{DOMAIN}>\r\n\r\n"
               "Figures attached.\r\n.\r\n-- \r\nJoe\r\n").encode()
    submit(signer, message, rcpt)
    (got,) = sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
    assert got.data.count(b"DKIM-Signature:") == 2
    assert dkim.verify(got.data, dnsfunc=dnsfunc(zone))
    d = dkim.DKIM(got.data)
    assert d.verify(idx=1, dnsfunc=dnsfunc(zone))

    perl = shutil.which("perl")
    assert perl, "perl is needed for the Mail::DKIM verifier"
    out = subprocess.run([perl, str(PERL_VERIFIER), zone.address], input=got.data, capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    lines = out.stdout.decode().splitlines()
    assert any(ln.startswith(f"pass rsa-sha256 {DOMAIN} mail ") for ln in lines), lines
    # Debian's Mail::DKIM (1.20230212) predates its Ed25519 support: it must ignore the
    # second signature (RFC 8463 section 5), never fail on it; dkimpy verified it above.
    (ed,) = [ln for ln in lines if " ed25519-sha256 " in ln]
    assert ed.startswith(f"pass ed25519-sha256 {DOMAIN} mail-ed25519 ") or "unsupported algorithm" in ed, lines
    assert lines[-1] == "overall pass"

    tampered = got.data.replace(b"Figures attached.", b"Figures attached!")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc(zone))
    out = subprocess.run([perl, str(PERL_VERIFIER), zone.address], input=tampered, capture_output=True, timeout=60)
    assert out.stdout.decode().splitlines()[-1] == "overall fail"


def test_missing_date_and_message_id_are_added(signer: MailguardServer, sink: SMTPSink) -> None:
    """RFC 6409 section 8: the submission gets Date: and Message-ID: (inside the signature)."""
    tag = marker()
    rcpt = f"bob-{tag}@remote.example"
    submit(signer, f"From: {JOE}\r\nTo: {rcpt}\r\nSubject: {tag}\r\n\r\nhi\r\n".encode(), rcpt)
    (got,) = sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert re.search(rb"\r\nDate: \w{3}, \d+ \w{3} \d{4} ", head)
    assert re.search(rb"\r\nMessage-ID: <[^>]+@" + re.escape(signer.hostname.encode()) + rb">", head)
    signature = head.split(b"DKIM-Signature:")[1].split(b"\r\n", 1)[0] + head.split(b"DKIM-Signature:")[1]
    tags = re.sub(rb"\s+", b"", signature)
    signed = re.search(rb";h=([^;]+);", tags).group(1).split(b":")  # type: ignore[union-attr]
    assert b"date" in signed and b"message-id" in signed, signed


def test_outsiders_mail_is_not_signed(signer: MailguardServer) -> None:
    """Mail from an untrusted client, even with our domain in From:, is stored unsigned."""
    tag = marker()
    signer.add_user(f"alice-{tag}@{DOMAIN}")
    with smtplib.SMTP(signer.host, signer.smtp_port, source_address=(OUTSIDER, 0), timeout=30) as c:
        c.sendmail("someone@outside.example", [f"alice-{tag}@{DOMAIN}"],
                   f"From: {JOE}\r\nSubject: {tag}\r\n\r\nforged\r\n".encode())
    (stored,) = signer.messages(f"alice-{tag}@{DOMAIN}")
    assert b"DKIM-Signature" not in stored
