"""End to end: the core mail host of issue 2, driven over loopback like an administrator would.

Every test talks to a real ``twistd -n mailguard`` (see ``harness.py``) through the wire,
the admin CLI, the maildirs and the log.  Exact replies come from the reply catalogue
(``mailguard.core.replies``) and the ``[replies]`` defaults, unless a test configures its own.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mailguard import config
from mailguard.core import replies

from .conftest import (
    ALLOWED_HOST,
    ALLOWED_NET_HOST,
    DOMAIN,
    HOSTNAME,
    INTERNAL_IFACE,
    NEVER_HOST,
    OUTSIDER,
    ServerFactory,
)
from .harness import (
    MailguardServer,
    child_env,
    free_port,
    header_names,
    make_message,
    port_accepts,
    split_added_headers,
    swaks,
    twistd_command,
)

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
SALES = f"sales@{DOMAIN}"  # alias of alice
TEAM = f"team@{DOMAIN}"  # list: alice, bob
JOE = "joe@compaq.example"

# The servers here keep the default [replies]: the configuration's defaults are what they send.
DEFAULT_REPLIES = config.defaults().replies
RELAY_DENIED = str(DEFAULT_REPLIES.relay_denied)
UNKNOWN_RECIPIENT = str(DEFAULT_REPLIES.unknown_recipient)
NEVER_HOST_REPLY = str(DEFAULT_REPLIES.never_host)


def marker() -> str:
    """A string unique to one message, to find it in a shared mailbox."""
    return "e2e-" + uuid.uuid4().hex


# --------------------------------------------------------------------------- the classic check


def test_classic_manual_check(office: MailguardServer) -> None:
    """The telnet check an administrator types, reply for reply, without angle brackets."""
    with office.dialog() as d:
        assert d.banner.code == 220, d.banner
        assert HOSTNAME in d.banner.last, d.banner
        r = d.cmd("HELO me")
        assert r.code == 250, r
        r = d.cmd("MAIL FROM: someaddress@somedomain.com")
        assert r.code == 250, r
        r = d.cmd("RCPT TO: nobody@afakedomain.com")
        assert r.last == RELAY_DENIED, r
        r = d.cmd(f"RCPT TO: {ALICE}")
        assert r.code == 250, r
        r = d.cmd("QUIT")
        assert r.code == 221, r


def test_relay_decision_is_logged(office: MailguardServer) -> None:
    """A refused RCPT writes one log line with client IP, sender, recipient, rule and reply."""
    rcpt = f"{marker()}@afakedomain.com"
    with office.dialog(source=OUTSIDER) as d:
        d.cmd("HELO me")
        d.cmd("MAIL FROM:<logged@somedomain.com>")
        r = d.cmd(f"RCPT TO:<{rcpt}>")
        assert r.last == RELAY_DENIED, r
        d.cmd("QUIT")
    line = office.wait_for_log(re.escape(rcpt))
    for part in (OUTSIDER, "logged@somedomain.com", "relay_denied", "550"):
        assert part in line, f"{part!r} missing from the log line {line!r}"


def test_data_without_accepted_recipient(office: MailguardServer) -> None:
    """DATA after only refused recipients is a 503 5.5.1, never a 354."""
    with office.dialog(source=OUTSIDER) as d:
        assert d.cmd("EHLO client.example").code == 250
        assert d.cmd("MAIL FROM:<someone@somedomain.com>").code == 250
        r = d.cmd("RCPT TO:<nobody@afakedomain.com>")
        assert r.last == RELAY_DENIED, r
        r = d.cmd("DATA")
        assert r.last == str(replies.NO_VALID_RCPT), r
        d.cmd("QUIT")


def test_data_without_any_recipient(office: MailguardServer) -> None:
    """DATA straight after MAIL FROM is a 503 5.5.1."""
    with office.dialog(source=OUTSIDER) as d:
        assert d.cmd("EHLO client.example").code == 250
        assert d.cmd("MAIL FROM:<someone@somedomain.com>").code == 250
        r = d.cmd("DATA")
        assert r.last == str(replies.NO_VALID_RCPT), r
        d.cmd("QUIT")


@pytest.mark.parametrize("source", [OUTSIDER, ALLOWED_HOST], ids=["outsider", "allowed-client"])
def test_unknown_local_user(office: MailguardServer, source: str) -> None:
    """An unknown user of an inbound domain is refused at RCPT, even for a client that may relay."""
    with office.dialog(source=source) as d:
        d.cmd("EHLO client.example")
        assert d.cmd("MAIL FROM:<someone@somedomain.com>").code == 250
        r = d.cmd(f"RCPT TO:<nosuchuser@{DOMAIN}>")
        assert r.last == UNKNOWN_RECIPIENT, r
        d.cmd("QUIT")


def test_null_sender_to_local_user(office: MailguardServer) -> None:
    """``MAIL FROM:<>`` (a bounce) to a local mailbox is accepted and delivered."""
    tag = marker()
    msg = make_message("MAILER-DAEMON@somedomain.com", ALICE, tag)
    with office.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO client.example")
        r = d.cmd("MAIL FROM:<>")
        assert r.code == 250, r
        r = d.cmd(f"RCPT TO:<{ALICE}>")
        assert r.code == 250, r
        r = d.data(msg)
        assert r.code == 250, r
        d.cmd("QUIT")
    stored = office.messages_containing(ALICE, tag.encode())
    assert len(stored) == 1
    assert stored[0].startswith(b"Return-Path: <>\n"), stored[0][:200]


# --------------------------------------------------------------------------- relay rules


@pytest.mark.parametrize(
    "source, interface, rcpt, expected",
    [
        (ALLOWED_HOST, "127.0.0.1", "someone@remote.example", "250"),
        (ALLOWED_NET_HOST, "127.0.0.1", "someone@remote.example", "250"),
        (OUTSIDER, INTERNAL_IFACE, "someone@remote.example", "250"),
        (OUTSIDER, "127.0.0.1", "someone@remote.example", RELAY_DENIED),
        (NEVER_HOST, "127.0.0.1", "someone@remote.example", NEVER_HOST_REPLY),
        (NEVER_HOST, INTERNAL_IFACE, "someone@remote.example", NEVER_HOST_REPLY),
        (OUTSIDER, "127.0.0.1", "someone@partner.example", "250"),
        (OUTSIDER, INTERNAL_IFACE, f"nosuchuser@{DOMAIN}", UNKNOWN_RECIPIENT),
    ],
    ids=[
        "allowed-address-relays",
        "allowed-network-relays",
        "internal-address-relays",
        "outsider-denied",
        "never-beats-allowed-network",
        "never-beats-internal-address",
        "relay-domain-from-anyone",
        "internal-address-still-checks-local-users",
    ],
)
def test_relay_rules(office: MailguardServer, source: str, interface: str, rcpt: str, expected: str) -> None:
    """Who may relay depends on the client's address and the local address it connected to."""
    with office.dialog(source=source, interface=interface) as d:
        assert d.cmd("EHLO client.example").code == 250
        r = d.cmd("MAIL FROM:<someone@somedomain.com>")
        assert r.code == 250, r
        r = d.cmd(f"RCPT TO:<{rcpt}>")
        if expected == "250":
            assert r.code == 250, r
        else:
            assert r.last == expected, r
        d.cmd("QUIT")


def test_relay_domain_is_queued(office: MailguardServer) -> None:
    """Mail for a relay domain from anyone is accepted and shows up in ``mailguard queue list``."""
    tag = marker()
    rcpt = "someone@partner.example"
    with office.smtp(source=OUTSIDER) as c:
        c.ehlo("client.example")
        refused = c.sendmail("sender@outside.example", [rcpt], make_message("sender@outside.example", rcpt, tag))
        assert refused == {}
    assert office.queue_lines(), "mailguard queue list shows nothing"
    assert not (office.data_dir / "mail" / "partner.example").exists()


def test_reroute(office: MailguardServer) -> None:
    """``joe@dec.example`` is rewritten to ``joe@compaq.example`` and stored in that mailbox."""
    tag = marker()
    rcpt = "joe@dec.example"
    with office.smtp(source=OUTSIDER) as c:
        c.ehlo("client.example")
        refused = c.sendmail("sender@outside.example", [rcpt], make_message("sender@outside.example", rcpt, tag))
        assert refused == {}
    stored = office.messages_containing(JOE, tag.encode())
    assert len(stored) == 1, office.message_files(JOE)
    assert not (office.data_dir / "mail" / "dec.example").exists()


@pytest.fixture(scope="module")
def custom_replies(server_factory: ServerFactory) -> MailguardServer:
    """A server whose ``[replies]`` are not the defaults."""
    server = server_factory(
        "replies",
        {
            "domains": {DOMAIN: {"route": "inbound"}},
            "replies": {
                "relay_denied": "451 4.7.1 Try later",
                "unknown_recipient": "550 5.1.1 No such mailbox here",
            },
        },
    )
    server.add_user(ALICE)
    return server


@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("someone@remote.example", "451 4.7.1 Try later"),
        (f"nosuchuser@{DOMAIN}", "550 5.1.1 No such mailbox here"),
    ],
    ids=["relay_denied", "unknown_recipient"],
)
def test_configured_replies(custom_replies: MailguardServer, rcpt: str, expected: str) -> None:
    """The reply a rule gives is exactly the one configured in ``[replies]`` (RFC 2505)."""
    with custom_replies.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO client.example")
        assert d.cmd("MAIL FROM:<someone@somedomain.com>").code == 250
        r = d.cmd(f"RCPT TO:<{rcpt}>")
        assert r.last == expected, r
        r = d.cmd(f"RCPT TO:<{ALICE}>")
        assert r.code == 250, r
        d.cmd("QUIT")


@pytest.fixture(scope="module")
def soft_bounce(server_factory: ServerFactory) -> MailguardServer:
    """A server with ``replies.soft_bounce = true``."""
    server = server_factory(
        "softbounce",
        {
            "domains": {DOMAIN: {"route": "inbound"}},
            "relay": {"allow": ["127.0.1.0/24"], "never": [NEVER_HOST]},
            "replies": {"soft_bounce": True},
        },
    )
    server.add_user(ALICE)
    return server


@pytest.mark.parametrize(
    "source, rcpt, enhanced, text",
    [
        (OUTSIDER, "someone@remote.example", "4.7.1", "Relaying prohibited"),
        (OUTSIDER, f"nosuchuser@{DOMAIN}", "4.1.1", "User unknown"),
        (NEVER_HOST, "someone@remote.example", "4.7.1", "Relaying prohibited for this host"),
    ],
    ids=["relay_denied", "unknown_recipient", "never_host"],
)
def test_soft_bounce(soft_bounce: MailguardServer, source: str, rcpt: str, enhanced: str, text: str) -> None:
    """With soft_bounce every 550 policy reply goes out as 450 with a 4.x.x code; 250 stays 250."""
    with soft_bounce.dialog(source=source) as d:
        d.cmd("EHLO client.example")
        assert d.cmd("MAIL FROM:<someone@somedomain.com>").code == 250
        r = d.cmd(f"RCPT TO:<{rcpt}>")
        assert r.code == 450, r
        assert r.enhanced == enhanced, r
        assert r.last.endswith(text), r
        r = d.cmd(f"RCPT TO:<{ALICE}>")
        assert r.code == 250, r
        d.cmd("QUIT")


# --------------------------------------------------------------------------- delivery


def test_mailbox_alias_list_delivered_once_per_mailbox(office: MailguardServer) -> None:
    """A mailbox, its alias and a list holding it get one copy each mailbox, intact."""
    tag = marker()
    sender = "sender@outside.example"
    body = [
        "Plain line.",
        "Trailing spaces   ",
        "\tA tabbed line",
        "",
        "From the start of a line (no mbox quoting in a maildir)",
        ">Quoted",
        "Last line.",
    ]
    msg = make_message(sender, TEAM, tag, body)
    with office.smtp(source=OUTSIDER) as c:
        c.ehlo("client.example")
        refused = c.sendmail(sender, [ALICE, SALES, TEAM], msg)
        assert refused == {}
    for mailbox in (ALICE, BOB):
        stored = office.messages_containing(mailbox, tag.encode())
        assert len(stored) == 1, f"{mailbox}: {len(stored)} copies"
        added = split_added_headers(stored[0], msg)
        assert header_names(added) == ["Return-Path", "Received"], added
        assert added.startswith(f"Return-Path: <{sender}>\n".encode()), added
        assert b"\r" not in stored[0], "maildir files are stored with LF line endings"
    assert not office.maildir(SALES).exists()
    assert not office.maildir(TEAM).exists()


def test_received_header_names_client(office: MailguardServer) -> None:
    """The added Received: header names the client's address and its HELO."""
    tag = marker()
    msg = make_message("sender@outside.example", BOB, tag)
    with office.smtp(source=OUTSIDER) as c:
        c.ehlo("helo-name.example")
        assert c.sendmail("sender@outside.example", [BOB], msg) == {}
    (stored,) = office.messages_containing(BOB, tag.encode())
    added = split_added_headers(stored, msg).decode("ascii", "replace")
    received = added.split("Received:", 1)[1]
    assert OUTSIDER in received, added
    assert "helo-name.example" in received, added


def test_thousand_lines_with_dots(office: MailguardServer) -> None:
    """A 1000-line body full of lines that start with dots is stored exactly."""
    tag = marker()
    shapes = [".", "..", "...", ".leading dot", ". space", "line {i}", "", "..two {i}"]
    body = [shapes[i % len(shapes)].format(i=i) for i in range(1000)]
    msg = make_message("sender@outside.example", BOB, tag, body)
    with office.smtp(source=OUTSIDER) as c:
        c.ehlo("client.example")
        assert c.sendmail("sender@outside.example", [BOB], msg) == {}
    stored = office.messages_containing(BOB, tag.encode())
    assert len(stored) == 1
    split_added_headers(stored[0], msg)


def test_bare_lf_in_data_is_refused(office: MailguardServer) -> None:
    """A bare LF inside DATA (header smuggling) is refused and nothing is stored."""
    tag = marker()
    with office.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO client.example")
        assert d.cmd("MAIL FROM:<sender@outside.example>").code == 250
        assert d.cmd(f"RCPT TO:<{BOB}>").code == 250
        r = d.cmd("DATA")
        assert r.code == 354, r
        d.send(f"Subject: {tag}\r\n\r\nline one\nX-Injected: yes\r\n.\r\n".encode())
        r = d.read_reply()
        assert r.last == str(replies.BARE_LINEFEED), r
    assert office.messages_containing(BOB, tag.encode()) == []


def test_size_advertised(office: MailguardServer) -> None:
    """EHLO advertises SIZE with the configured limit."""
    with office.dialog(source=OUTSIDER) as d:
        r = d.cmd("EHLO client.example")
        assert r.code == 250, r
        keywords = [ln[4:].upper() for ln in r.lines[1:]]
        assert "SIZE 200000" in keywords, r
        d.cmd("QUIT")


def test_size_parameter_over_limit(office: MailguardServer) -> None:
    """``MAIL FROM:<…> SIZE=`` above limits.max_message_size is a 552 5.3.4."""
    with office.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO client.example")
        r = d.cmd("MAIL FROM:<sender@outside.example> SIZE=300000")
        assert r.last == str(replies.TOO_BIG), r
        d.cmd("QUIT")


def test_message_over_limit_without_size_parameter(office: MailguardServer) -> None:
    """A message above the limit sent without SIZE= gets 552 at the final dot and is not stored."""
    tag = marker()
    body = ["x" * 998 for _ in range(300)]
    msg = make_message("sender@outside.example", BOB, tag, body)
    assert len(msg) > 200000
    with office.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO client.example")
        assert d.cmd("MAIL FROM:<sender@outside.example>").code == 250
        assert d.cmd(f"RCPT TO:<{BOB}>").code == 250
        r = d.data(msg)
        assert r.last == str(replies.TOO_BIG), r
    assert office.messages_containing(BOB, tag.encode()) == []


def test_message_under_limit_accepted(office: MailguardServer) -> None:
    """A message a little under the limit goes through with smtplib (which sends SIZE=)."""
    tag = marker()
    body = ["y" * 998 for _ in range(150)]
    msg = make_message("sender@outside.example", BOB, tag, body)
    assert 100000 < len(msg) < 200000
    with office.smtp(source=OUTSIDER) as c:
        c.ehlo("client.example")
        assert c.sendmail("sender@outside.example", [BOB], msg) == {}
    assert len(office.messages_containing(BOB, tag.encode())) == 1


def test_smtplib_over_limit_refused(office: MailguardServer) -> None:
    """smtplib, sending SIZE=, sees the oversized message refused with 552."""
    msg = make_message("sender@outside.example", BOB, marker(), ["z" * 998 for _ in range(300)])
    with office.smtp(source=OUTSIDER) as c:
        c.ehlo("client.example")
        with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPDataError)) as info:
            c.sendmail("sender@outside.example", [BOB], msg)
    assert info.value.smtp_code == 552


# --------------------------------------------------------------------------- crash safety


def test_kill9_after_final_dot_loses_nothing(fresh_server_factory: ServerFactory) -> None:
    """``kill -9`` right after the 250 to the final dot: after a restart each message is there once."""
    server = fresh_server_factory("kill9", {"domains": {DOMAIN: {"route": "inbound"}}})
    server.add_user(ALICE)
    tags = []
    for _ in range(3):
        tag = marker()
        tags.append(tag)
        msg = make_message("sender@outside.example", ALICE, tag, ["survives a crash"] * 50)
        with server.dialog(source=OUTSIDER) as d:
            d.cmd("EHLO client.example")
            assert d.cmd("MAIL FROM:<sender@outside.example>").code == 250
            assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
            r = d.data(msg)
            assert r.code == 250, r
            server.kill9()
        server.start()
    for tag in tags:
        assert len(server.messages_containing(ALICE, tag.encode())) == 1, tag
    assert not list((server.maildir(ALICE) / "tmp").glob("*")), "a half-written file stayed in tmp/"


# --------------------------------------------------------------------------- swaks


def test_swaks_delivery(office: MailguardServer) -> None:
    """The real swaks delivers a message to a local mailbox."""
    tag = marker()
    result = swaks(
        "--server", f"127.0.0.1:{office.smtp_port}",
        "--local-interface", OUTSIDER,
        "--helo", "swaks.example",
        "--from", "sender@outside.example",
        "--to", BOB,
        "--header", f"Subject: {tag}",
        "--body", "Sent by swaks.",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"<-\s+250", output), output
    assert len(office.messages_containing(BOB, tag.encode())) == 1


def test_swaks_relay_refused(office: MailguardServer) -> None:
    """swaks trying to relay from an outsider sees the relay_denied reply at RCPT (exit 24)."""
    result = swaks(
        "--server", f"127.0.0.1:{office.smtp_port}",
        "--local-interface", OUTSIDER,
        "--helo", "swaks.example",
        "--from", "sender@outside.example",
        "--to", "relaytest@remote.example",
        "--quit-after", "RCPT",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 24, output
    assert f"<** {RELAY_DENIED}" in output, output


# --------------------------------------------------------------------------- CLI


EXPLAIN_LINE = re.compile(r"^(?P<rcpt>\S+): (?P<reply>[2-5]\d\d(?: [^()]*)?) \(rule: (?P<rule>[a-z_]+)\)$")


def explain(server: MailguardServer, args: list[str], rcpts: list[str]) -> list[re.Match[str]]:
    """Run ``mailguard explain`` and parse its lines, one per recipient, in order."""
    result = server.cli_ok("explain", *args, *rcpts)
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == len(rcpts), result.stdout
    matches = []
    for line, rcpt in zip(lines, rcpts):
        m = EXPLAIN_LINE.match(line.strip())
        assert m, f"not '<rcpt>: <reply> (rule: <rule>)': {line!r}"
        assert m.group("rcpt").strip("<>").lower() == rcpt.lower(), line
        matches.append(m)
    return matches


@pytest.mark.parametrize(
    "args, rcpt, reply, rule",
    [
        (["--client", OUTSIDER], "nobody@afakedomain.com", RELAY_DENIED, "relay_denied"),
        (["--client", OUTSIDER], ALICE, "250", "inbound"),
        (["--client", OUTSIDER], f"nosuchuser@{DOMAIN}", UNKNOWN_RECIPIENT, "unknown_recipient"),
        (["--client", ALLOWED_NET_HOST], "someone@remote.example", "250", "allow"),
        (["--client", NEVER_HOST], "someone@remote.example", NEVER_HOST_REPLY, "never"),
        (["--client", OUTSIDER, "--local", INTERNAL_IFACE], "someone@remote.example", "250", "internal_address"),
        (["--client", OUTSIDER, "--auth", ALICE], "someone@remote.example", "250", "authenticated"),
        (["--client", OUTSIDER], "someone@partner.example", "250", "relay_domain"),
        (["--client", OUTSIDER], "joe@dec.example", "250", "reroute"),
    ],
    ids=["relay_denied", "inbound", "unknown_recipient", "allow", "never", "internal_address",
         "authenticated", "relay_domain", "reroute"],
)
def test_explain(office: MailguardServer, args: list[str], rcpt: str, reply: str, rule: str) -> None:
    """``mailguard explain`` prints the reply and the rule that decides each recipient."""
    (m,) = explain(office, args, [rcpt])
    if reply == "250":
        assert m.group("reply").startswith("250"), m.group(0)
    else:
        assert m.group("reply") == reply, m.group(0)
    assert m.group("rule") == rule, m.group(0)


def test_explain_one_line_per_recipient(office: MailguardServer) -> None:
    """Several recipients: one line each, in order."""
    rcpts = ["nobody@afakedomain.com", ALICE, f"nosuchuser@{DOMAIN}"]
    ms = explain(office, ["--client", OUTSIDER], rcpts)
    assert [m.group("reply")[:3] for m in ms] == ["550", "250", "550"]


def test_check_config_prints_routing_table(office: MailguardServer) -> None:
    """``mailguard check-config`` exits 0 and its routing table names every domain."""
    result = office.cli("check-config")
    assert result.returncode == 0, result.stdout + result.stderr
    for domain in (DOMAIN, "compaq.example", "dec.example", "partner.example"):
        assert domain in result.stdout, result.stdout


def write_bad_config(folder: Path, smtp_port: int) -> Path:
    """Write ``bad.toml``, whose only fault is the misspelt key ``relay.alow``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bad.toml"
    path.write_text(
        "[server]\n"
        'data_dir = "var"\n'
        "[listen]\n"
        f'smtp = ["tcp:{smtp_port}:interface=127.0.0.1"]\n'
        "submission = []\nsubmissions = []\npop3 = []\npop3s = []\n"
        "[relay]\n"
        "alow = []\n",
        encoding="utf-8",
    )
    return path


def error_lines(output: str) -> list[str]:
    """The output lines that name the bad key."""
    return [ln for ln in output.splitlines() if "relay.alow" in ln]


def test_check_config_bad_key(tmp_path: Path) -> None:
    """A misspelt key: check-config exits 1 with one line naming the file and ``relay.alow``."""
    path = write_bad_config(tmp_path, free_port())
    result = subprocess.run(
        [sys.executable, "-m", "mailguard", "--config", str(path), "check-config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=child_env(),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = error_lines(output)
    assert len(lines) == 1, output
    assert "bad.toml" in lines[0], output
    assert "Traceback" not in output, output


def test_twistd_bad_config_refuses_to_start(tmp_path: Path) -> None:
    """``twistd -n mailguard`` with a misspelt key exits non-zero, says why in one line, listens nowhere."""
    port = free_port()
    path = write_bad_config(tmp_path, port)
    result = subprocess.run(
        twistd_command() + ["-n", "--pidfile=", "mailguard", "--config", str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=30, env=child_env(),
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    lines = error_lines(output)
    assert lines, output
    assert any("bad.toml" in ln for ln in lines), output
    assert "Traceback" not in output, output
    assert not port_accepts("127.0.0.1", port)
