"""End to end: SMTP AUTH, TLS and mail submission (issue 3) against the real ``twistd -n mailguard``.

The office's users send through mailguard from their mail programs: ``smtplib``, the
real ``swaks`` and ``msmtp``, over STARTTLS (RFC 3207) on the ``smtp`` and
``submission`` listeners and over implicit TLS (RFC 8314) on ``submissions``.  Nobody
else may relay.  Replies come from the reply catalogue and the ``[replies]`` defaults.
Every server here uses the self-signed certificate mailguard makes under data_dir/tls,
so the clients do not verify it.
"""

from __future__ import annotations

import base64
import datetime
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mailguard import config
from mailguard.core import replies

from .conftest import DOMAIN, ServerFactory
from .harness import (Dialog, MailguardServer, Reply, make_message, split_added_headers, swaks, tls_context,
                      wait_server_read)

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
SALES = f"sales@{DOMAIN}"  # an alias of alice
PASSWORD = "correct horse battery"
WRONG = "wrong horse battery"

RELAY_DENIED = str(config.defaults().replies.relay_denied)

#: Client addresses used by single tests, so that their failed logins stay apart.
WRONG_PASSWORD_CLIENT = "127.0.0.31"
ATTACKER = "127.0.0.40"
OFFICE_CLIENT = "127.0.0.41"

#: The office with two users; alice also receives and sends as sales@.
AUTH_CONFIG = {"domains": {DOMAIN: {"route": "inbound"}}}


def marker() -> str:
    """A string unique to one message or recipient."""
    return "e2e-" + uuid.uuid4().hex



def plain(login: str, password: str, authzid: str = "") -> str:
    """The RFC 4616 PLAIN initial response, base64."""
    return base64.b64encode(f"{authzid}\0{login}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def populate(server: MailguardServer) -> None:
    """alice and bob with the same password; sales@ is an alias of alice."""
    server.add_user(ALICE, PASSWORD)
    server.add_user(BOB, PASSWORD)
    server.cli_ok("alias", "add", SALES, ALICE)


@pytest.fixture(scope="module")
def auth_office(server_factory: ServerFactory) -> MailguardServer:
    """A server with the default TLS/AUTH settings: AUTH only on an encrypted channel."""
    server = server_factory("auth", AUTH_CONFIG)
    populate(server)
    return server


@pytest.fixture(scope="module")
def cleartext_auth(server_factory: ServerFactory) -> MailguardServer:
    """A server with ``[tls] auth_requires_tls = false`` (AUTH allowed before STARTTLS)."""
    server = server_factory("cleartextauth", {**AUTH_CONFIG, "tls": {"auth_requires_tls": False}})
    populate(server)
    return server


# --------------------------------------------------------------------------- clients


def smtp_client(server: MailguardServer, listener: str = "smtp", source: str = "127.0.0.1") -> smtplib.SMTP:
    """``smtplib.SMTP`` on the ``smtp`` or ``submission`` listener, from ``source``."""
    port = server.smtp_port if listener == "smtp" else server.ports[listener]
    return smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30)


def smtps_client(server: MailguardServer, source: str = "127.0.0.1") -> smtplib.SMTP_SSL:
    """``smtplib.SMTP_SSL`` on the implicit-TLS ``submissions`` listener."""
    return smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], source_address=(source, 0),
                            timeout=30, context=tls_context())


def dialog(server: MailguardServer, listener: str = "smtp", source: str = "127.0.0.1") -> Dialog:
    """A raw cleartext dialog on ``smtp`` or ``submission``, banner read."""
    port = server.smtp_port if listener == "smtp" else server.ports[listener]
    return Dialog.connect("127.0.0.1", port, source, timeout=30)


def start_tls(d: Dialog) -> Reply:
    """Send STARTTLS; on 220 wrap the socket (the dialog goes on inside TLS)."""
    r = d.cmd("STARTTLS")
    if r.code == 220:
        assert d.buffer == b"", f"cleartext after the 220 to STARTTLS: {d.buffer!r}"
        d.sock = tls_context().wrap_socket(d.sock, server_hostname="mx.realdomain.example")
    return r


def tls_dialog(server: MailguardServer, listener: str = "smtp", source: str = "127.0.0.1") -> Dialog:
    """A dialog upgraded with STARTTLS and greeted with EHLO inside TLS."""
    d = dialog(server, listener, source)
    assert d.cmd("EHLO client.example").code == 250
    r = start_tls(d)
    assert r.code == 220, r
    assert d.cmd("EHLO client.example").code == 250
    return d


def implicit_tls_dialog(server: MailguardServer, source: str = "127.0.0.1") -> Dialog:
    """A raw dialog on ``submissions`` (TLS from the first byte), banner read."""
    raw = socket.create_connection(("127.0.0.1", server.ports["submissions"]), timeout=30,
                                   source_address=(source, 0))
    d = Dialog(tls_context().wrap_socket(raw, server_hostname="mx.realdomain.example"))
    d.banner = d.read_reply()
    return d


def ehlo_keywords(r: Reply) -> list[str]:
    """The extension keywords of an EHLO reply (first word of each line after the first)."""
    return [ln[4:].split(" ")[0].upper() for ln in r.lines[1:]]


def queued_for(server: MailguardServer, rcpt: str) -> list[str]:
    """Lines of ``mailguard queue list`` that name ``rcpt``."""
    return [ln for ln in server.queue_lines() if rcpt.lower() in ln.lower()]


# --------------------------------------------------------------------------- AUTH + relay


@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_starttls_login_relays(auth_office: MailguardServer, listener: str) -> None:
    """After STARTTLS and a correct login a user may relay: RCPT 250, and the message is queued."""
    rcpt = f"{marker()}@remote.example"
    with smtp_client(auth_office, listener) as c:
        c.ehlo("laptop.example")
        assert c.has_extn("starttls")
        code, _ = c.starttls(context=tls_context())
        assert code == 220
        c.ehlo("laptop.example")
        assert "PLAIN" in c.esmtp_features.get("auth", "").upper().split()
        code, text = c.login(ALICE, PASSWORD)
        assert code == 235, text
        assert c.mail(ALICE)[0] == 250
        code, text = c.rcpt(rcpt)
        assert code == 250, text
        code, text = c.data(make_message(ALICE, rcpt, marker()))
        assert code == 250, text
    lines = queued_for(auth_office, rcpt)
    assert len(lines) == 1, auth_office.queue_lines()


def test_relay_without_auth_refused(auth_office: MailguardServer) -> None:
    """The same client over TLS but without AUTH may not relay; AUTH on one connection does not carry over."""
    rcpt = f"{marker()}@remote.example"
    with smtp_client(auth_office) as c:
        c.ehlo("laptop.example")
        c.starttls(context=tls_context())
        c.ehlo("laptop.example")
        assert c.login(ALICE, PASSWORD)[0] == 235
    with smtp_client(auth_office) as c:  # a new connection from the same address, no AUTH
        c.ehlo("laptop.example")
        c.starttls(context=tls_context())
        c.ehlo("laptop.example")
        assert c.mail("someone@outside.example")[0] == 250
        code, text = c.rcpt(rcpt)
        assert f"{code} {text.decode()}" == RELAY_DENIED
    assert queued_for(auth_office, rcpt) == []


def test_wrong_password(auth_office: MailguardServer) -> None:
    """A wrong password gets 535 5.7.8 and the client still may not relay."""
    rcpt = f"{marker()}@remote.example"
    with smtp_client(auth_office, source=WRONG_PASSWORD_CLIENT) as c:
        c.ehlo("laptop.example")
        c.starttls(context=tls_context())
        c.ehlo("laptop.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            c.login(ALICE, WRONG)
        assert err.value.smtp_code == 535
        assert err.value.smtp_error.startswith(b"5.7.8"), err.value.smtp_error
        assert c.mail(ALICE)[0] == 250
        code, text = c.rcpt(rcpt)
        assert f"{code} {text.decode()}" == RELAY_DENIED
    assert queued_for(auth_office, rcpt) == []


@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_auth_on_cleartext_refused(auth_office: MailguardServer, listener: str) -> None:
    """Before TLS, EHLO does not offer AUTH and AUTH (even with the right password) gets 538 5.7.11."""
    with dialog(auth_office, listener) as d:
        r = d.cmd("EHLO client.example")
        assert r.code == 250, r
        assert "STARTTLS" in ehlo_keywords(r), r
        assert "AUTH" not in ehlo_keywords(r), r
        r = d.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert r.code == 538, r
        assert r.enhanced == "5.7.11", r
        r = d.cmd("AUTH LOGIN")
        assert r.code == 538, r
        r = d.cmd("MAIL FROM:<someone@outside.example>")
        if listener == "submission":
            assert r.last == str(replies.AUTH_REQUIRED), r
        else:
            assert r.code == 250, r
            r = d.cmd("RCPT TO:<someone@remote.example>")
            assert r.last == RELAY_DENIED, r
        d.cmd("QUIT")


def test_auth_exchange_replies(auth_office: MailguardServer) -> None:
    """RFC 4954 replies inside TLS: bare AUTH 501, cancel 501, malformed 501, AUTH in a transaction 503, second AUTH 503."""
    with tls_dialog(auth_office) as d:
        r = d.cmd("AUTH")
        assert r.code == 501, r
        r = d.cmd("AUTH LOGIN")
        assert r.code == 334, r
        r = d.cmd("*")
        assert r.code == 501, r
        r = d.cmd("AUTH PLAIN")
        assert r.code == 334, r
        r = d.cmd("not base64 !!")
        assert r.code == 501, r
        assert d.cmd("MAIL FROM:<someone@outside.example>").code == 250
        r = d.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert r.code == 503, r
        assert d.cmd("RSET").code == 250
        r = d.cmd("AUTH LOGIN")
        assert r.code == 334, r
        r = d.cmd(b64(ALICE))
        assert r.code == 334, r
        r = d.cmd(b64(PASSWORD))
        assert r.code == 235, r
        r = d.cmd("EHLO client.example")
        assert "AUTH" not in ehlo_keywords(r), r
        r = d.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert r.code == 503, r
        d.cmd("QUIT")


# --------------------------------------------------------------------------- STARTTLS


def test_starttls_injection_discarded(auth_office: MailguardServer) -> None:
    """``STARTTLS\\r\\nRSET\\r\\n`` in one write: the RSET is never answered; inside TLS the first reply is the NOOP's."""
    with dialog(auth_office) as d:
        assert d.cmd("EHLO client.example").code == 250
        d.send(b"STARTTLS\r\nRSET\r\n")
        r = d.read_reply()
        assert r.code == 220, r
        # Once the server has read the injected RSET, a server that wrongly ran it has
        # answered it; an answer still on its way would break the handshake below, or
        # come before the NOOP's reply inside TLS.
        wait_server_read(d.sock)
        d.sock.settimeout(0.0)
        try:
            early = d.sock.recv(4096)
        except BlockingIOError:
            early = b""
        d.sock.settimeout(30)
        assert d.buffer == b"" and early == b"", f"cleartext answer after STARTTLS: {d.buffer + early!r}"
        d.sock = tls_context().wrap_socket(d.sock, server_hostname="mx.realdomain.example")
        d.send(b"NOOP\r\n")
        r = d.read_reply()
        assert r.lines == [str(replies.NOOP_OK)], r
        r = d.cmd("HELP")  # no reply of the RSET is still queued behind the NOOP's
        assert r.code == 214, r
        d.cmd("QUIT")


def test_starttls_forgets_session_state(auth_office: MailguardServer) -> None:
    """After STARTTLS, HELO and the transaction begun in cleartext are forgotten: MAIL and RCPT get 503."""
    with dialog(auth_office) as d:
        assert d.cmd("EHLO client.example").code == 250
        assert d.cmd("MAIL FROM:<someone@outside.example>").code == 250
        assert start_tls(d).code == 220
        r = d.cmd(f"RCPT TO:<{BOB}>")
        assert r.code == 503, r
        r = d.cmd("MAIL FROM:<someone@outside.example>")
        assert r.code == 503, r
        r = d.cmd("EHLO client.example")
        assert r.code == 250, r
        r = d.cmd(f"RCPT TO:<{BOB}>")
        assert r.code == 503, r
        assert d.cmd("MAIL FROM:<someone@outside.example>").code == 250
        assert d.cmd(f"RCPT TO:<{BOB}>").code == 250
        d.cmd("QUIT")


def test_starttls_forgets_auth(cleartext_auth: MailguardServer) -> None:
    """AUTH done in cleartext (allowed by auth_requires_tls = false) is forgotten by STARTTLS."""
    server = cleartext_auth
    with dialog(server) as d:
        r = d.cmd("EHLO client.example")
        assert "AUTH" in ehlo_keywords(r), r
        r = d.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert r.code == 235, r
        assert start_tls(d).code == 220
        r = d.cmd("EHLO client.example")
        assert "AUTH" in ehlo_keywords(r), r  # offered again: nobody is logged in
        assert d.cmd("MAIL FROM:<someone@outside.example>").code == 250
        r = d.cmd("RCPT TO:<someone@remote.example>")
        assert r.last == RELAY_DENIED, r
        assert d.cmd("RSET").code == 250
        r = d.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert r.code == 235, r  # not 503 "already authenticated"
        assert d.cmd(f"MAIL FROM:<{ALICE}>").code == 250
        assert d.cmd(f"RCPT TO:<{marker()}@remote.example>").code == 250
        d.cmd("QUIT")


def test_starttls_not_offered_inside_tls(auth_office: MailguardServer) -> None:
    """Inside TLS, EHLO does not offer STARTTLS and STARTTLS gets 503 at once (no hang)."""
    with tls_dialog(auth_office) as d:
        d.sock.settimeout(5)
        r = d.cmd("EHLO client.example")
        assert "STARTTLS" not in ehlo_keywords(r), r
        assert "AUTH" in ehlo_keywords(r), r
        r = d.cmd("STARTTLS")
        assert r.code == 503, r
        assert d.cmd("NOOP").code == 250
        d.cmd("QUIT")
    with implicit_tls_dialog(auth_office) as d:
        d.sock.settimeout(5)
        r = d.cmd("EHLO client.example")
        assert "STARTTLS" not in ehlo_keywords(r), r
        assert "AUTH" in ehlo_keywords(r), r
        r = d.cmd("STARTTLS")
        assert r.code == 503, r
        d.cmd("QUIT")


def old_tls_context() -> ssl.SSLContext:
    """A client willing to speak only TLS 1.0/1.1 (legacy ciphers allowed on the client side)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def test_only_modern_tls(auth_office: MailguardServer) -> None:
    """TLS 1.2 or newer is negotiated; a client limited to TLS 1.1 gets no session (STARTTLS or implicit)."""
    with tls_dialog(auth_office, "submission") as d:
        assert isinstance(d.sock, ssl.SSLSocket)
        assert d.sock.version() in ("TLSv1.2", "TLSv1.3"), d.sock.version()
    with dialog(auth_office, "submission") as d:
        d.cmd("EHLO client.example")
        assert d.cmd("STARTTLS").code == 220
        with pytest.raises((ssl.SSLError, ConnectionError)):
            old_tls_context().wrap_socket(d.sock, server_hostname="mx.realdomain.example")
    raw = socket.create_connection(("127.0.0.1", auth_office.ports["submissions"]), timeout=30)
    with raw, pytest.raises((ssl.SSLError, ConnectionError)):
        old_tls_context().wrap_socket(raw, server_hostname="mx.realdomain.example")


@pytest.mark.parametrize("ciphers", ["ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA", "AES128-SHA256:AES256-SHA",
                                     "ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384"])
def test_tls12_offers_only_modern_suites(auth_office: MailguardServer, ciphers: str) -> None:
    """TLS 1.2 with only CBC or SHA-1 suites gets no session; an AEAD suite is negotiated
    (Mozilla "intermediate", issue 17 item 11)."""
    def tls12(suites: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(suites)
        return ctx

    raw = socket.create_connection(("127.0.0.1", auth_office.ports["submissions"]), timeout=30)
    with raw, pytest.raises((ssl.SSLError, ConnectionError)):
        tls12(ciphers).wrap_socket(raw, server_hostname="mx.realdomain.example")
    raw = socket.create_connection(("127.0.0.1", auth_office.ports["submissions"]), timeout=30)
    with tls12("ECDHE+AESGCM:ECDHE+CHACHA20:" + ciphers).wrap_socket(raw, server_hostname="x") as good:
        name, version, _ = good.cipher()
        assert version == "TLSv1.2" and ("GCM" in name or "CHACHA20" in name), name


def write_certificate(cert_path: Path, key_path: Path, common_name: str) -> bytes:
    """Write a self-signed certificate and key as an administrator would install them; the DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert.public_bytes(serialization.Encoding.DER)


def served_certificate(server: MailguardServer) -> bytes:
    """The DER certificate the ``submissions`` listener presents now."""
    raw = socket.create_connection(("127.0.0.1", server.ports["submissions"]), timeout=30)
    with tls_context().wrap_socket(raw, server_hostname="mx.realdomain.example") as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_configured_certificate_reloaded_on_sighup(fresh_server_factory: ServerFactory, tmp_path: Path) -> None:
    """The [tls] certificate is served; after replacing the files, SIGHUP makes new connections get the new one."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    first = write_certificate(cert, key, "first.realdomain.example")
    server = fresh_server_factory(
        "certreload", {**AUTH_CONFIG, "tls": {"certificate": str(cert), "key": str(key)}})
    assert served_certificate(server) == first
    second = write_certificate(cert, key, "second.realdomain.example")
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log("mailguard reload: .* in use for new connections")
    assert served_certificate(server) == second
    with tls_dialog(server, "submission") as d:  # STARTTLS uses the new one too
        assert d.sock.getpeercert(binary_form=True) == second
    assert server.running()


# --------------------------------------------------------------------------- submission


def test_implicit_tls_submissions(auth_office: MailguardServer) -> None:
    """On ``submissions`` TLS starts with the connection; login, relay and local delivery work."""
    remote = f"{marker()}@remote.example"
    tag = marker()
    with smtps_client(auth_office) as c:
        c.ehlo("laptop.example")
        assert not c.has_extn("starttls")
        assert c.login(ALICE, PASSWORD)[0] == 235
        refused = c.sendmail(ALICE, [remote, BOB], make_message(ALICE, BOB, tag))
        assert refused == {}
    assert len(queued_for(auth_office, remote)) == 1, auth_office.queue_lines()
    assert len(auth_office.messages_containing(BOB, tag.encode())) == 1


def test_submissions_requires_auth(auth_office: MailguardServer) -> None:
    """On ``submissions``, MAIL before AUTH gets 530 5.7.0, even for a local recipient's sender."""
    with implicit_tls_dialog(auth_office) as d:
        assert d.cmd("EHLO client.example").code == 250
        r = d.cmd(f"MAIL FROM:<{ALICE}>")
        assert r.last == str(replies.AUTH_REQUIRED), r
        d.cmd("QUIT")


def test_submission_without_auth(auth_office: MailguardServer) -> None:
    """On ``submission``, MAIL before AUTH gets 530 5.7.0 inside TLS; smtplib reports it as refused sender."""
    with tls_dialog(auth_office, "submission") as d:
        r = d.cmd(f"MAIL FROM:<{ALICE}>")
        assert r.last == str(replies.AUTH_REQUIRED), r
        r = d.cmd(f"RCPT TO:<{BOB}>")
        assert r.code == 503, r
        d.cmd("QUIT")
    with smtp_client(auth_office, "submission") as c:
        c.ehlo("laptop.example")
        c.starttls(context=tls_context())
        c.ehlo("laptop.example")
        with pytest.raises(smtplib.SMTPSenderRefused) as err:
            c.sendmail(ALICE, [BOB], make_message(ALICE, BOB, marker()))
        assert err.value.smtp_code == 530


def test_enforce_sender(auth_office: MailguardServer) -> None:
    """enforce_sender (default true): alice may send as alice@ and her alias sales@, not as bob@ (553 5.7.1)."""
    tag = marker()
    with smtp_client(auth_office, "submission") as c:
        c.ehlo("laptop.example")
        c.starttls(context=tls_context())
        c.ehlo("laptop.example")
        c.login(ALICE, PASSWORD)
        code, text = c.mail(BOB)
        assert code == 553, text
        assert text.startswith(b"5.7.1"), text
        code, text = c.mail("ceo@outside.example")
        assert code == 553, text
        code, text = c.mail(SALES)
        assert code == 250, text
        assert c.rcpt(BOB)[0] == 250
        code, text = c.data(make_message(SALES, BOB, tag))
        assert code == 250, text
    stored = auth_office.messages_containing(BOB, tag.encode())
    assert len(stored) == 1
    assert stored[0].startswith(f"Return-Path: <{SALES}>\n".encode()), stored[0][:200]


def test_received_header_names_authentication(auth_office: MailguardServer) -> None:
    """The Received: header of an authenticated submission says ESMTPSA and authenticated, never the password."""
    tag = marker()
    sent = make_message(ALICE, BOB, tag)
    with smtp_client(auth_office, "submission") as c:
        c.ehlo("laptop.example")
        c.starttls(context=tls_context())
        c.ehlo("laptop.example")
        c.login(ALICE, PASSWORD)
        assert c.sendmail(ALICE, [BOB], sent) == {}
    stored = auth_office.messages_containing(BOB, tag.encode())
    assert len(stored) == 1
    added = split_added_headers(stored[0], sent)
    received = re.search(rb"^Received:.*?(?=^\S|\Z)", added, re.M | re.S)
    assert received, added
    header = received.group(0)
    assert b"with ESMTPSA" in header, header
    assert b"authenticated" in header, header
    for secret in (PASSWORD.encode(), plain(ALICE, PASSWORD).encode(), b64(PASSWORD).encode()):
        assert secret not in stored[0]
        assert secret.decode() not in auth_office.log_text()


# --------------------------------------------------------------------------- real clients


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth(auth_office: MailguardServer, mechanism: str) -> None:
    """swaks with --tls and --auth PLAIN or LOGIN on submission: 235, then 250 for relay and data."""
    rcpt = f"{marker()}@remote.example"
    result = swaks(
        "--server", f"127.0.0.1:{auth_office.ports['submission']}",
        "--helo", "swaks.example",
        "--tls",
        "--auth", mechanism,
        "--auth-user", ALICE,
        "--auth-password", PASSWORD,
        "--from", ALICE,
        "--to", rcpt,
        "--header", f"Subject: {marker()}",
        "--body", "Sent by swaks.",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^<~\s+235 ", output, re.M), output
    assert re.search(r"^<~\s+250 .*Recipient ok", output, re.M), output
    assert re.search(r"^<~\s+250 .*queued", output, re.M), output
    assert len(queued_for(auth_office, rcpt)) == 1, auth_office.queue_lines()


def test_msmtp_sends(auth_office: MailguardServer, tmp_path: Path) -> None:
    """msmtp set up as a user would (STARTTLS on submission, auth on) delivers to a local maildir."""
    exe = shutil.which("msmtp")
    assert exe is not None, "msmtp is not installed"
    tag = marker()
    conf = tmp_path / "msmtprc"
    conf.write_text(
        "defaults\n"
        f"logfile {tmp_path / 'msmtp.log'}\n"
        "\n"
        "account office\n"
        "host 127.0.0.1\n"
        f"port {auth_office.ports['submission']}\n"
        f"from {ALICE}\n"
        "tls on\n"
        "tls_starttls on\n"
        "tls_certcheck off\n"
        "auth on\n"
        f"user {ALICE}\n"
        f"password {PASSWORD}\n"
        "\n"
        "account default : office\n",
        encoding="utf-8",
    )
    conf.chmod(0o600)
    message = make_message(ALICE, BOB, tag).replace(b"\r\n", b"\n")
    result = subprocess.run([exe, "-C", str(conf), BOB], input=message, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    stored = auth_office.messages_containing(BOB, tag.encode())
    assert len(stored) == 1, auth_office.message_files(BOB)
    assert b"ESMTPSA" in stored[0]


# --------------------------------------------------------------------------- password guessing


def attempt(d: Dialog, login: str, password: str) -> tuple[Reply, float]:
    """One AUTH PLAIN attempt on an open TLS dialog; the reply and how long it took."""
    start = time.monotonic()
    r = d.cmd(f"AUTH PLAIN {plain(login, password)}")
    return r, time.monotonic() - start


def test_password_guessing_slows_that_ip_only(fresh_server_factory: ServerFactory) -> None:
    """50 wrong passwords from one IP: growing delays, then 454 4.7.0; alice, from the address she
    logs in from, still gets in within 2 s (a client known to the account is exempt from its budget)."""
    server = fresh_server_factory(
        "guessing", {**AUTH_CONFIG, "limits": {"login_failures": 3, "login_lockout": 300}})
    populate(server)
    with tls_dialog(server, "submission", OFFICE_CLIENT) as d:
        assert attempt(d, ALICE, PASSWORD)[0].last == str(replies.AUTH_OK)
    total, workers = 50, 6
    conns = [tls_dialog(server, "submission", ATTACKER) for _ in range(workers)]
    try:
        # One after the other: three failures are free, then each guess waits longer.
        seq = [attempt(conns[0], ALICE, f"{WRONG} {i}") for i in range(5)]
        assert [r.code for r, _ in seq] == [535] * 5, seq
        assert seq[3][1] >= 1.0, f"4th wrong password not delayed: {seq}"
        assert seq[4][1] >= 2.0, f"5th wrong password not delayed more: {seq}"

        # The rest in rounds of concurrent guesses: the first on the open connections, the
        # later ones each on a new connection (three throttled AUTHs close a session).
        def fresh_attempt(password: str) -> tuple[Reply, float]:
            with tls_dialog(server, "submission", ATTACKER) as fresh:
                return attempt(fresh, ALICE, password)

        rounds: list[list[tuple[Reply, float]]] = []
        done = len(seq)
        with ThreadPoolExecutor(workers) as pool:
            while done < total:
                n = min(workers, total - done)
                if not rounds:
                    futures = [pool.submit(attempt, d, ALICE, f"{WRONG} {done + i}") for i, d in enumerate(conns[:n])]
                else:
                    futures = [pool.submit(fresh_attempt, f"{WRONG} {done + i}") for i in range(n)]
                rounds.append([f.result(timeout=120) for f in futures])
                done += n
    finally:
        for d in conns:
            d.close()

    first, later = rounds[0], [x for rnd in rounds[1:] for x in rnd]
    assert len(seq) + len(first) + len(later) == total
    # After 5 failures the hard limit (3 x 3 = 9) leaves room for 4 more checks; guesses
    # still being checked count, so of 6 concurrent guesses 4 are checked (slowly) and
    # 2 are refused at once.
    assert sorted(r.code for r, _ in first) == [454] * 2 + [535] * 4, first
    assert min(took for r, took in first if r.code == 535) >= 4.0, f"guesses past the 5th failure not delayed: {first}"
    assert [r.code for r, _ in later] == [454] * len(later), later
    assert all(r.last == str(replies.AUTH_THROTTLED) for r, _ in later), later
    assert max(took for _, took in later) < 2.0, later

    # The guessing address is now refused at once, even with the right password ...
    with tls_dialog(server, "submission", ATTACKER) as d:
        r, took = attempt(d, ALICE, PASSWORD)
    assert r.code == 454, r
    assert took < 2.0, took
    # ... while alice, from her own address, logs in promptly and may relay.
    with tls_dialog(server, "submission", OFFICE_CLIENT) as d:
        r, took = attempt(d, ALICE, PASSWORD)
        assert r.code == 235, r
        assert took < 2.0, f"a correct login from a clean address took {took:.2f} s"
        assert d.cmd(f"MAIL FROM:<{ALICE}>").code == 250
        assert d.cmd(f"RCPT TO:<{marker()}@remote.example>").code == 250
        d.cmd("QUIT")
