"""End to end: ``mailguard relay-test HOST:PORT``, the admin's open-relay check.

The administrator's own open-relay check, run as a real command line against three
servers: mailguard from a client that may not relay (verdict: not open, exit 0),
mailguard from a client that may (exit 1: that client *can* relay), and a deliberately
accept-all SMTP server started here (verdict: open relay, exit 1).  Nothing listening
is exit 2.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from typing import Iterator

import pytest

from mailguard import config
from mailguard.app.relaytest import CATALOGUE
from mailguard.core import replies

from .conftest import ALLOWED_HOST, DOMAIN, OFFICE_CONFIG, OUTSIDER, ServerFactory, populate_office
from .harness import MailguardServer, child_env, free_port

TRICKS = 30
LINE = re.compile(r"^\s*(\d+)\s+(RELAYED|refused|error)\s+(\S+)\s+MAIL FROM:.* RCPT TO:.* -> ((\d{3}) .*)$")

# What mailguard must answer to each trick of the catalogue, by the rule that decides it:
# address forms that hide a route are refused before any routing (relay_trick), even for
# a client that may relay; an unqualified address, and an 8-bit domain sent without
# SMTPUTF8 (relay-test does not ask for it), are syntax errors; every other trick is a
# well-formed remote address, refused for a client that may not relay (relay_denied).
ROUTING_TRICKS = {"percent-at-literal", "percent-at-domain", "quoted-at", "quoted-percent", "double-at-literal",
                  "quoted-at-literal", "double-at-domain", "bang", "bang-at-literal", "bang-at-domain",
                  "quoted-at-domain", "percent-chain", "imceasmtp", "quoted-imcea"}
SYNTAX = {"unqualified", "idn-remote"}


def relay_test(target: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``python -m mailguard relay-test TARGET OPTIONS...`` (no configuration file needed)."""
    return subprocess.run([sys.executable, "-m", "mailguard", "relay-test", target, *options],
                          capture_output=True, text=True, timeout=120, env=child_env(), stdin=subprocess.DEVNULL)


def trick_lines(out: str) -> list[re.Match[str]]:
    """The per-trick lines of the output, parsed; fails on any other line but the verdict."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("verdict: "), out
    parsed = [LINE.match(ln) for ln in lines[:-1]]
    assert all(parsed), [ln for ln, m in zip(lines, parsed) if not m]
    return [m for m in parsed if m]


@pytest.fixture(scope="module")
def office(server_factory: ServerFactory) -> MailguardServer:
    """The office server of conftest (inbound, reroute and relay domains, IP rules)."""
    server = server_factory("relaytest-office", OFFICE_CONFIG)
    populate_office(server)
    server.add_user(f"relaytest@{DOMAIN}")  # a parser that drops the routing part would find someone
    return server


def expected(name: str, other: replies.Reply) -> str:
    """The reply a trick must get: relay_trick, the syntax error, or ``other`` for the rest."""
    if name in ROUTING_TRICKS:
        return str(replies.RELAY_TRICK)
    if name in SYNTAX:
        return str(replies.BAD_RCPT_SYNTAX)
    return str(other)


def test_expectations_name_real_tricks() -> None:
    """Every trick named above is in the catalogue the command runs."""
    names = {t.name for t in CATALOGUE}
    assert len(names) == TRICKS
    assert ROUTING_TRICKS | SYNTAX <= names


def test_mailguard_from_outsider_is_not_open(office: MailguardServer) -> None:
    """From a client no rule lets relay: 30 tricks refused, verdict 'not an open relay', exit 0."""
    done = relay_test(f"127.0.0.1:{office.smtp_port}", "--source", OUTSIDER, "--domain", DOMAIN)
    assert done.returncode == 0, done.stdout + done.stderr
    tricks = trick_lines(done.stdout)
    assert len(tricks) == TRICKS
    assert [int(m.group(1)) for m in tricks] == list(range(1, TRICKS + 1))
    assert {m.group(2) for m in tricks} == {"refused"}, done.stdout
    denied = config.load(office.config_path).replies.relay_denied
    wrong = [m.group(0) for m in tricks if m.group(4) != expected(m.group(3), denied)]
    assert wrong == [], "\n".join(wrong)
    assert done.stdout.splitlines()[-1].startswith("verdict: not an open relay"), done.stdout
    # Each session really reached the server from the chosen address.
    assert office.wait_for_log(rf"client={re.escape(OUTSIDER)}.*relaytest@relay-test\.mailguard\.invalid")


def test_mailguard_from_allowed_client_relays(office: MailguardServer) -> None:
    """From a client relay.allow names: the plain remote tricks get 250, exit 1, routing tricks still refused."""
    done = relay_test(f"127.0.0.1:{office.smtp_port}", "--source", ALLOWED_HOST, "--domain", DOMAIN)
    assert done.returncode == 1, done.stdout + done.stderr
    tricks = {m.group(3): m for m in trick_lines(done.stdout)}
    assert len(tricks) == TRICKS
    assert tricks["remote-sender"].group(2) == "RELAYED"
    wrong = [m.group(0) for name, m in tricks.items() if m.group(4) != expected(name, replies.RECIPIENT_OK)]
    assert wrong == [], "\n".join(wrong)
    assert done.stdout.splitlines()[-1].startswith("verdict: OPEN RELAY"), done.stdout
    assert not office.queue_lines(), "relay-test sent a message"


class AcceptAll:
    """A tiny SMTP server answering 2xx/3xx to everything: an open relay on purpose."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(50)
        self.port = int(self.sock.getsockname()[1])
        self.commands: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            try:
                conn.sendall(b"220 openrelay.example ESMTP\r\n")
                in_data = False
                for raw in f:
                    line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                    if in_data:
                        if line == ".":
                            in_data = False
                            conn.sendall(b"250 ok queued\r\n")
                        continue
                    self.commands.append(line)
                    verb = line.split(" ", 1)[0].upper()
                    if verb == "QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    if verb == "DATA":
                        in_data = True
                        conn.sendall(b"354 go ahead\r\n")
                    elif verb == "EHLO":
                        conn.sendall(b"250-openrelay.example\r\n250 PIPELINING\r\n")
                    else:
                        conn.sendall(b"250 ok\r\n")
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def accept_all() -> Iterator[AcceptAll]:
    server = AcceptAll()
    yield server
    server.close()


def test_accept_all_server_is_an_open_relay(accept_all: AcceptAll) -> None:
    """Against a server that takes everything: every trick RELAYED, verdict 'OPEN RELAY', exit 1, no DATA."""
    done = relay_test(f"127.0.0.1:{accept_all.port}")
    assert done.returncode == 1, done.stdout + done.stderr
    tricks = trick_lines(done.stdout)
    assert len(tricks) == TRICKS
    assert {m.group(2) for m in tricks} == {"RELAYED"}, done.stdout
    assert done.stdout.splitlines()[-1] == f"verdict: OPEN RELAY: {TRICKS} of {TRICKS} tricks accepted at RCPT"
    rcpts = [c for c in accept_all.commands if c.upper().startswith("RCPT TO:")]
    assert len(rcpts) == TRICKS
    assert not any(c.upper() == "DATA" for c in accept_all.commands), "relay-test sent a message"


def test_nothing_listening_is_not_tested() -> None:
    """A port where nothing listens: exit 2 and a verdict that says nothing was tested."""
    done = relay_test(f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not tested" in (done.stdout + done.stderr), done.stdout + done.stderr
