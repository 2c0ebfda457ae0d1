"""MTA-STS (RFC 8461) for MX delivery, end to end.

The real ``twistd -n mailguard`` delivers to a loopback SMTP sink named by MX in a
loopback DNS zone that also announces a policy (``_mta-sts`` TXT); the policy file
is served over HTTPS by a test server on ``127.0.3.1:443`` (the port RFC 8461 fixes)
with a certificate from the test CA, which the server trusts through
``[outbound] tls_ca_file``.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from .conftest import ServerFactory
from .harness import MailguardServer, make_message, toml_dumps
from .sinks import TEST_CA, DNSServer, SMTPSink, ca_file, wait_until
from .test_e2e_outbound import DELIVERY_TIMEOUT, marker, outbound_config, relay_send, wait_deferred

POLICY_HOST = "127.0.3.1"
DOMAIN = "sts.example"
MX = f"mx.{DOMAIN}"


class PolicyServer:
    """An HTTPS server for ``mta-sts.<domain>`` that serves one policy file."""

    def __init__(self, folder: Path, domain: str) -> None:
        self.body = b""
        self.requests: list[str] = []
        issued = TEST_CA.issue_cert(f"mta-sts.{domain}")
        cert, key = folder / "policy-cert.pem", folder / "policy-key.pem"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                server.requests.append(self.path)
                if self.path != "/.well-known/mta-sts.txt":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((POLICY_HOST, 443), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def zone() -> Iterator[DNSServer]:
    dns = DNSServer({
        DOMAIN: [("MX", (10, MX))],
        MX: [("A", "127.0.0.1")],
        f"mta-sts.{DOMAIN}": [("A", POLICY_HOST)],
    })
    yield dns
    dns.close()


@pytest.fixture
def policy_server(tmp_path: Path) -> Iterator[PolicyServer]:
    server = PolicyServer(tmp_path, DOMAIN)
    yield server
    server.close()


def sts_server(factory: ServerFactory, name: str, dns: DNSServer, sink: SMTPSink) -> MailguardServer:
    server = factory(name, outbound_config(dns, sink), start=False)
    server.config["outbound"]["tls_ca_file"] = str(ca_file(server.root))
    server.config_path.write_text(toml_dumps(server.config), encoding="utf-8")
    return server.start()


def announce(dns: DNSServer, policy: PolicyServer, mode: str, ident: str) -> None:
    dns.set(f"_mta-sts.{DOMAIN}", [("TXT", f"v=STSv1; id={ident}")])
    policy.body = f"version: STSv1\nmode: {mode}\nmx: {MX}\nmax_age: 86400\n".encode()


def send(server: MailguardServer) -> str:
    tag = marker()
    rcpt = f"ann-{tag}@{DOMAIN}"
    relay_send(server, "sender@outside.example", [rcpt], make_message("sender@outside.example", rcpt, tag))
    return rcpt


def test_enforce_with_a_bad_certificate_defers(fresh_server_factory: ServerFactory, zone: DNSServer,
                                               policy_server: PolicyServer) -> None:
    """enforce: an MX whose certificate does not name it gets no mail; the message waits with why."""
    sink = SMTPSink(tls=True, name=MX, cert_names=("impostor.example",))
    try:
        announce(zone, policy_server, "enforce", "e1")
        server = sts_server(fresh_server_factory, "sts-enforce-bad", zone, sink)
        rcpt = send(server)
        line = wait_deferred(server, rcpt)
        assert "4.7.5" in line and "name mismatch" in line, line
        assert sink.messages_for(rcpt) == []
        assert policy_server.requests == ["/.well-known/mta-sts.txt"]
        server.wait_for_log(rf"mailguard mta-sts: {DOMAIN}: policy id=e1 mode=enforce")
    finally:
        sink.close()


def test_enforce_with_a_good_certificate_delivers_verified(fresh_server_factory: ServerFactory,
                                                           zone: DNSServer, policy_server: PolicyServer) -> None:
    """enforce: a listed MX with a valid certificate gets the mail over verified TLS, and the log says so."""
    sink = SMTPSink(tls=True, name=MX, cert_names=(MX,))
    try:
        announce(zone, policy_server, "enforce", "e2")
        server = sts_server(fresh_server_factory, "sts-enforce-good", zone, sink)
        rcpt = send(server)
        (got,) = sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
        assert got.tls
        server.wait_for_log(r"tls=verified mta_sts=enforce")
    finally:
        sink.close()


def test_enforce_refuses_an_mx_outside_the_policy(fresh_server_factory: ServerFactory, zone: DNSServer,
                                                  policy_server: PolicyServer) -> None:
    """enforce: an MX host the policy does not list is never tried."""
    sink = SMTPSink(tls=True, name=MX, cert_names=(MX,))
    try:
        zone.set(f"_mta-sts.{DOMAIN}", [("TXT", "v=STSv1; id=e3")])
        policy_server.body = b"version: STSv1\nmode: enforce\nmx: other.example\nmax_age: 86400\n"
        server = sts_server(fresh_server_factory, "sts-enforce-list", zone, sink)
        rcpt = send(server)
        line = wait_deferred(server, rcpt)
        assert "allows none of its MX hosts" in line, line
        assert sink.commands() == []
    finally:
        sink.close()


def test_testing_mode_delivers_and_logs(fresh_server_factory: ServerFactory, zone: DNSServer,
                                        policy_server: PolicyServer) -> None:
    """testing: the same bad certificate is only reported; the mail is delivered."""
    sink = SMTPSink(tls=True, name=MX, cert_names=("impostor.example",))
    try:
        announce(zone, policy_server, "testing", "t1")
        server = sts_server(fresh_server_factory, "sts-testing", zone, sink)
        rcpt = send(server)
        sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
        server.wait_for_log(rf"mailguard mta-sts: {DOMAIN}: policy id=t1 mode=testing")
        server.wait_for_log(r"tls=unverified mta_sts=testing")
        wait_until(lambda: policy_server.requests != [], 5, "the policy fetch")
    finally:
        sink.close()
