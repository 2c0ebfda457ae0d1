"""End to end: outbound mail (issue 5) leaves a real ``twistd -n mailguard`` for loopback doubles.

The outside world is simulated in this process (``sinks.py``): a DNS server answering
MX / A / AAAA for ``remote.example`` and ``far.example``, and SMTP sinks standing in for
the remote host and for the office's smarthost.  The server under test is pointed at
them with ``[outbound] dns_servers`` and ``port`` (or ``smarthost``); everything else is
observed like an administrator would: the wire, the maildirs, ``mailguard queue ...``.

Clients that may relay connect from ``RELAY_CLIENT`` (``[relay] allow``) or log in on
the submission port (AUTH over STARTTLS).
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import ssl
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from .conftest import HOSTNAME, OUTSIDER, ServerFactory
from .harness import MailguardServer, header_names, make_message, toml_dumps
from .sinks import DNSServer, SMTPSink, ca_file, received_prefix_and_rest, wait_until

DOMAIN = "realdomain.example"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
PASSWORD = "correct horse battery"

#: The client address ``[relay] allow`` names.
RELAY_CLIENT = "127.0.0.50"

#: ``remote.example`` has an MX; ``far.example`` only an A record (the implicit MX).
ZONE = {
    "remote.example": [("MX", (10, "mx.remote.example"))],
    "mx.remote.example": [("A", "127.0.0.1")],
    "far.example": [("A", "127.0.0.1")],
    # the preferred MX refuses connections (nothing listens on 127.0.0.9), the backup takes mail
    "backup.example": [("MX", (20, "mx.remote.example")), ("MX", (10, "dead.backup.example"))],
    "dead.backup.example": [("A", "127.0.0.9")],
    # RFC 7505: this domain accepts no mail at all
    "nullmx.example": [("MX", (0, ""))],
}

#: A contact and a list of the outbound server whose targets are remote.
CONTACT = f"carol@{DOMAIN}"
CONTACT_TARGET = "carol.external@remote.example"
LIST = f"team@{DOMAIN}"
LIST_REMOTE_MEMBER = "dave@far.example"

SMARTHOST_USER = "office-account"
SMARTHOST_PASSWORD = "isp pass word"

#: Seconds allowed for one delivery to reach a sink (a retry is 1 s away, the flush poll 2 s).
DELIVERY_TIMEOUT = 15.0


def marker() -> str:
    """A string unique to one message."""
    return "e2e-" + uuid.uuid4().hex[:16]


def outbound_config(dns: DNSServer, sink: SMTPSink, **outbound: Any) -> dict[str, Any]:
    """A server that relays for ``RELAY_CLIENT`` and sends remote mail by MX to the sink."""
    return {
        "domains": {
            DOMAIN: {"route": "inbound"},
            "dec.example": {"route": "reroute", "to": "remote.example"},
        },
        "relay": {"allow": [RELAY_CLIENT]},
        "outbound": {
            "smarthost": "",
            "smarthost_tls": "opportunistic",
            "dns_servers": [dns.address],
            "port": sink.port,
            "retry_schedule": [1],
            "connect_timeout": 5,
            "command_timeout": 30,
            **outbound,
        },
    }


def relay_send(server: MailguardServer, sender: str, rcpts: list[str], msg: bytes,
               source: str = RELAY_CLIENT) -> None:
    """Hand a message to the server's smtp listener; every recipient must be accepted."""
    with server.smtp(source=source) as client:
        client.ehlo("client.example")
        refused = client.sendmail(sender, rcpts, msg)
    assert refused == {}, refused


def queue_listing(server: MailguardServer) -> str:
    """What ``mailguard queue list`` prints."""
    return server.cli_ok("queue", "list").stdout


def queue_lines_for(server: MailguardServer, rcpt: str) -> list[str]:
    return [ln for ln in queue_listing(server).splitlines() if rcpt in ln]


def wait_queue_clear(server: MailguardServer, rcpt: str | None = None, timeout: float = DELIVERY_TIMEOUT) -> None:
    """Wait until ``queue list`` shows nothing (or nothing for ``rcpt``)."""
    def clear() -> bool:
        listing = queue_listing(server)
        return (rcpt not in listing) if rcpt is not None else listing == "queue is empty\n"
    wait_until(clear, timeout, f"an empty queue{' for ' + rcpt if rcpt else ''}:\n{queue_listing(server)}"
               f"\n{server.log_text()[-3000:]}")


def assert_recorded_once(server: MailguardServer, rcpt: str, state: str) -> None:
    """Wait for the runner's log line recording ``rcpt``'s final ``state``; it must be the only one.

    The line is written after the envelope is updated, so once it is there the runner
    has finished with that recipient: checks that nothing more happened can follow.
    """
    pattern = rf"mailguard outbound: id=\S+ msg=\S+ to=<{re.escape(rcpt)}> state={state} "
    server.wait_for_log(pattern, timeout=DELIVERY_TIMEOUT)
    assert len(server.log_lines(pattern)) == 1, server.log_lines(rf"to=<{re.escape(rcpt)}>")


def all_mail_files(server: MailguardServer) -> set[Path]:
    """Every file in every maildir of the server."""
    root = server.data_dir / "mail"
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def unverified_tls() -> ssl.SSLContext:
    """A client context for mailguard's self-signed certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    """The loopback DNS server with ``ZONE``."""
    server = DNSServer(ZONE)
    yield server
    server.close()
    assert server.errors == [], f"the loopback DNS server failed: {server.errors}"


@pytest.fixture(scope="module")
def mx_sink() -> Iterator[SMTPSink]:
    """The remote host every MX of ``ZONE`` points at; it offers STARTTLS."""
    sink = SMTPSink(tls=True, name="mx.remote.example")
    yield sink
    sink.close()
    assert sink.errors == [], f"the SMTP sink failed: {sink.errors}"


@pytest.fixture(scope="module")
def outbound(server_factory: ServerFactory, dns_server: DNSServer, mx_sink: SMTPSink) -> MailguardServer:
    """A server that delivers remote mail by MX lookup, retrying after 1 s."""
    server = server_factory("outbound", outbound_config(dns_server, mx_sink))
    for user in (ALICE, BOB):
        server.add_user(user, PASSWORD)
    server.cli_ok("contact", "add", CONTACT, CONTACT_TARGET)
    server.cli_ok("list", "add", LIST, BOB, LIST_REMOTE_MEMBER)
    return server


# --------------------------------------------------------------------------- MX delivery


def dotted_message(sender: str, rcpt: str, tag: str) -> bytes:
    """A ~66 KB message full of ``.`` lines, one of them at offset 16384.

    Chunked senders go wrong where a ``.`` line starts exactly at a chunk boundary of
    what they send, which is the queued copy: this message plus the relay's own
    ``Received:`` header, whose length the test cannot know.  So around each multiple
    of 16384 up to 65536 there is a run of ``.`` lines (3 bytes each), the runs offset
    by 0, 1 and 2 bytes against each other: whatever the length of the added header
    (under 1200 bytes), some boundary falls on the start of a ``.`` line.  Lines that
    would be SMTP commands follow each run, so a message cut short would show at the
    sink as a smuggled transaction.
    """
    msg = bytearray(make_message(sender, rcpt, tag, body_lines=[]))
    filler_no = 0

    def pad_to(offset: int) -> None:
        nonlocal filler_no
        shapes = ["..two dots {n}", ". dot space {n}", "plain line {n}", ".QUIT {n}", "x{n}"]
        while len(msg) < offset:
            rest = offset - len(msg)
            width = 78 if rest > 80 else rest
            text = shapes[filler_no % len(shapes)].format(n=filler_no)
            text = (text + " " + "y" * width)[: width - 2]
            msg.extend(text.encode("ascii") + b"\r\n")
            filler_no += 1
        assert len(msg) == offset

    run_bytes = 1200
    for k, phase in zip((1, 2, 3, 4), (0, 1, 2, 0)):
        boundary = k * 16384 + phase
        pad_to(boundary - run_bytes)
        msg.extend(b".\r\n" * (run_bytes // 3 + 2))
        msg.extend(b"MAIL FROM:<smuggler@evil.example>\r\nRCPT TO:<victim@remote.example>\r\nDATA\r\n"
                   b"Subject: smuggled\r\n\r\n")
    msg.extend(b"the end\r\n")
    return bytes(msg)


def test_authenticated_message_arrives_intact(outbound: MailguardServer, mx_sink: SMTPSink) -> None:
    """A user logged in over STARTTLS sends to a remote address; the MX sink gets it byte for byte.

    The message has a ``.`` line at offset 16384 (and many more around every 16 KiB
    boundary); the copy at the sink is the message as sent with only a ``Received:``
    header before it, and nothing after a ``.`` line ever reached the sink as a command.
    """
    tag = marker()
    rcpt = f"intact-{tag}@remote.example"
    msg = dotted_message(ALICE, rcpt, tag)
    assert msg[16382:16387] == b"\r\n.\r\n", "the test message lost its dot line at 16384"
    with smtplib.SMTP("127.0.0.1", outbound.ports["submission"], timeout=30) as client:
        client.ehlo("laptop.example")
        client.starttls(context=unverified_tls())
        client.ehlo("laptop.example")
        client.login(ALICE, PASSWORD)
        assert client.sendmail(ALICE, [rcpt], msg) == {}

    (got,) = mx_sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
    prefix = received_prefix_and_rest(got.data, msg)
    assert header_names(prefix.replace(b"\r\n", b"\n")) == ["Received"], prefix
    on_boundary = [b for b in range(16384, len(got.data), 16384) if got.data[b - 2:b + 3] == b"\r\n.\r\n"]
    assert on_boundary, f"no '.' line on a 16 KiB boundary of the relayed copy (Received: is {len(prefix)} bytes)"
    assert got.sender == ALICE
    assert got.recipients == [rcpt]
    assert got.tls, "the sink offered STARTTLS and the relay did not use it"
    assert re.search(rf"(?i)\bSIZE={len(got.data)}\b", got.mail_params), got.mail_params
    smuggled = [c for c in mx_sink.commands() if "smuggler" in c or "victim@" in c]
    assert smuggled == [], smuggled
    wait_queue_clear(outbound, rcpt)
    assert_recorded_once(outbound, rcpt, "delivered")
    assert len(mx_sink.messages_for(rcpt)) == 1


@pytest.mark.parametrize("stage", ["rcpt", "data"])
def test_451_then_250_is_retried(outbound: MailguardServer, mx_sink: SMTPSink, stage: str) -> None:
    """A 451 (to RCPT, or to the final dot) is tried again (retry_schedule = [1]) and then delivered once."""
    tag = marker()
    rcpt = f"greylisted-{stage}-{tag}@remote.example"
    if stage == "rcpt":
        mx_sink.script_rcpt(rcpt, "451 4.7.1 Greylisted, please try again later")
    else:
        mx_sink.script_data(rcpt, "451 4.3.0 Queue file write error, try again")
    msg = make_message(ALICE, rcpt, tag)
    relay_send(outbound, ALICE, [rcpt], msg)

    (got,) = mx_sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
    received_prefix_and_rest(got.data, msg)
    assert mx_sink.rcpt_commands(rcpt) == 2, mx_sink.commands()
    wait_queue_clear(outbound, rcpt)
    assert len(mx_sink.messages_for(rcpt)) == 1
    assert outbound.messages_containing(ALICE, tag.encode()) == [], "a delivered message was bounced"


def test_backup_mx_when_preferred_refuses(outbound: MailguardServer, mx_sink: SMTPSink,
                                          dns_server: DNSServer) -> None:
    """The MX hosts are tried by preference: the first refuses the connection, the second gets the mail.

    The zone lists the backup (preference 20) before the preferred host (10), so a
    runner that kept the DNS order would reach the backup first and never try the
    preferred one: the log must show the preferred host refused before the delivery.
    """
    tag = marker()
    rcpt = f"someone-{tag}@backup.example"
    msg = make_message(ALICE, rcpt, tag)
    relay_send(outbound, ALICE, [rcpt], msg)
    (got,) = mx_sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
    received_prefix_and_rest(got.data, msg)
    assert dns_server.asked("dead.backup.example"), "the preferred MX was not looked up"
    wait_queue_clear(outbound, rcpt)
    log = outbound.log_text()
    delivered = log.find(f"to=<{rcpt}> state=delivered relay=mx.remote.example[127.0.0.1]")
    refused = log.find("mailguard outbound: connect to dead.backup.example[127.0.0.9]")
    assert delivered >= 0, "the delivery to the backup MX was not logged"
    assert 0 <= refused < delivered, "the preferred MX (preference 10) was not tried before the backup"


def _dsn_fields(block: email.message.Message) -> dict[str, str]:
    """The fields of one delivery-status block, names lower-cased, folding undone."""
    return {name.lower(): " ".join(str(value).split()) for name, value in block.items()}


def test_550_produces_rfc3464_bounce(outbound: MailguardServer, mx_sink: SMTPSink) -> None:
    """A 550 from the remote host puts one RFC 3464 report into the local sender's maildir."""
    tag = marker()
    rcpt = f"gone-{tag}@remote.example"
    reply_text = f"5.1.1 <{rcpt}>: mailbox {tag} does not exist"
    mx_sink.script_rcpt(rcpt, "550 " + reply_text)
    msg = make_message(ALICE, rcpt, tag)
    relay_send(outbound, ALICE, [rcpt], msg)

    wait_until(lambda: outbound.messages_containing(ALICE, tag.encode()) != [], DELIVERY_TIMEOUT,
               f"a bounce in {ALICE}'s maildir\n{outbound.log_text()[-3000:]}")
    wait_queue_clear(outbound, rcpt)
    (stored,) = outbound.messages_containing(ALICE, tag.encode())
    assert mx_sink.messages_for(rcpt) == []
    assert mx_sink.rcpt_commands(rcpt) == 1, "a 5xx must not be retried"

    assert stored.startswith(b"Return-Path: <>\n"), stored[:300]
    dsn = email.message_from_bytes(stored, policy=email.policy.default)
    assert isinstance(dsn, EmailMessage)
    assert dsn.get_content_type() == "multipart/report", dsn.get_content_type()
    assert dsn.get_param("report-type") == "delivery-status", dsn["Content-Type"]
    assert ALICE in str(dsn["To"]), dsn["To"]
    assert dsn["From"], "a bounce needs a From: field"
    assert dsn["Date"] and dsn["Subject"], "a bounce needs Date: and Subject:"

    parts = list(dsn.iter_parts())
    types = [p.get_content_type() for p in parts]
    assert len(parts) == 3, types
    assert types[0] == "text/plain", types
    assert types[1] == "message/delivery-status", types
    assert types[2] in ("text/rfc822-headers", "message/rfc822"), types
    assert rcpt in parts[0].get_content(), parts[0].get_content()

    blocks = parts[1].get_payload()
    assert isinstance(blocks, list) and len(blocks) == 2, blocks
    per_message, per_recipient = (_dsn_fields(b) for b in blocks)
    assert re.fullmatch(rf"(?i)dns;\s*{re.escape(HOSTNAME)}", per_message.get("reporting-mta", "")), per_message
    final = per_recipient.get("final-recipient", "")
    assert re.fullmatch(rf"(?i)rfc822;\s*{re.escape(rcpt)}", final), per_recipient
    assert per_recipient.get("action", "").lower() == "failed", per_recipient
    assert per_recipient.get("status") == "5.1.1", per_recipient
    diagnostic = per_recipient.get("diagnostic-code", "")
    assert diagnostic.lower().startswith("smtp;"), per_recipient
    assert reply_text in diagnostic, per_recipient

    original = parts[2].as_bytes() if types[2] == "message/rfc822" else parts[2].get_payload(decode=True)
    assert isinstance(original, bytes)
    assert f"Subject: {tag}".encode() in original, original
    assert f"Message-ID: <{tag}@e2e.test>".encode() in original, original
    assert b"Body of " not in original, "only the original headers are attached"


def bounce_for(server: MailguardServer, sender: str, tag: str) -> tuple[EmailMessage, list[dict[str, str]]]:
    """The one bounce in ``sender``'s maildir about message ``tag``: the report and its per-recipient blocks."""
    wait_until(lambda: server.messages_containing(sender, tag.encode()) != [], DELIVERY_TIMEOUT,
               f"a bounce in {sender}'s maildir\n{server.log_text()[-3000:]}")
    (stored,) = server.messages_containing(sender, tag.encode())
    dsn = email.message_from_bytes(stored, policy=email.policy.default)
    assert isinstance(dsn, EmailMessage)
    assert dsn.get_content_type() == "multipart/report", dsn.get_content_type()
    parts = list(dsn.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status", [p.get_content_type() for p in parts]
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list), blocks
    return dsn, [_dsn_fields(b) for b in blocks[1:]]


def test_null_mx_bounces(outbound: MailguardServer, mx_sink: SMTPSink) -> None:
    """A domain with a null MX (RFC 7505) fails at once with a 5.1.10 bounce; nothing is tried."""
    tag = marker()
    rcpt = f"nobody-{tag}@nullmx.example"
    relay_send(outbound, ALICE, [rcpt], make_message(ALICE, rcpt, tag))
    _dsn, (block,) = bounce_for(outbound, ALICE, tag)
    assert re.fullmatch(rf"(?i)rfc822;\s*{re.escape(rcpt)}", block.get("final-recipient", "")), block
    assert block.get("action", "").lower() == "failed", block
    assert block.get("status") == "5.1.10", block
    wait_queue_clear(outbound, rcpt)
    assert mx_sink.rcpt_commands(rcpt) == 0


def test_partial_failure(outbound: MailguardServer, mx_sink: SMTPSink) -> None:
    """One message, two recipients at one host: the accepted one is delivered once, only the refused one bounces."""
    tag = marker()
    good, bad = f"good-{tag}@remote.example", f"bad-{tag}@remote.example"
    mx_sink.script_rcpt(bad, f"550 5.1.1 <{bad}>: unknown")
    msg = make_message(ALICE, good, tag)
    relay_send(outbound, ALICE, [good, bad], msg)

    _dsn, blocks = bounce_for(outbound, ALICE, tag)
    assert [b.get("final-recipient", "").split(";")[-1].strip() for b in blocks] == [bad], blocks
    (got,) = mx_sink.wait_for_messages(good, timeout=DELIVERY_TIMEOUT)
    assert got.recipients == [good]
    wait_queue_clear(outbound, good)
    assert mx_sink.rcpt_commands(bad) == 1
    assert len(mx_sink.messages_for(good)) == 1


def test_bounce_to_remote_sender_goes_out_with_null_sender(outbound: MailguardServer, mx_sink: SMTPSink) -> None:
    """The bounce for a remote sender is queued like any mail and leaves with ``MAIL FROM:<>``."""
    tag = marker()
    author, rcpt = f"author-{tag}@remote.example", f"gone-{tag}@far.example"
    mx_sink.script_rcpt(rcpt, f"550 5.1.1 <{rcpt}>: unknown")
    relay_send(outbound, author, [rcpt], make_message(author, rcpt, tag))

    (got,) = mx_sink.wait_for_messages(author, timeout=DELIVERY_TIMEOUT)
    assert got.sender == "", got.sender
    dsn = email.message_from_bytes(got.data, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert tag in got.data.decode("ascii", "replace")
    wait_queue_clear(outbound, author)
    wait_queue_clear(outbound, rcpt)


def test_null_sender_failure_is_dropped(outbound: MailguardServer, mx_sink: SMTPSink) -> None:
    """A ``MAIL FROM:<>`` message refused with 550 is dropped: no bounce anywhere, queue empty."""
    wait_queue_clear(outbound)
    tag = marker()
    rcpt = f"gone-{tag}@remote.example"
    mx_sink.script_rcpt(rcpt, f"550 5.1.1 <{rcpt}>: no such user")
    before = all_mail_files(outbound)
    relay_send(outbound, "", [rcpt], make_message("MAILER-DAEMON@" + DOMAIN, rcpt, tag))

    wait_until(lambda: mx_sink.rcpt_commands(rcpt) >= 1, DELIVERY_TIMEOUT, "the attempt at the sink")
    wait_queue_clear(outbound)
    assert queue_listing(outbound) == "queue is empty\n"
    # The runner logs "dropped" once it has decided not to bounce a bounce: only then
    # does an unchanged mail folder show that no bounce was made.
    assert_recorded_once(outbound, rcpt, "dropped")
    assert all_mail_files(outbound) == before, "a bounce of a bounce was stored"
    assert mx_sink.messages_for(rcpt) == []
    assert mx_sink.rcpt_commands(rcpt) == 1


@pytest.mark.parametrize(
    "address, arrives_as",
    [
        ("joe@dec.example", "joe@remote.example"),
        (CONTACT, CONTACT_TARGET),
        (LIST, LIST_REMOTE_MEMBER),
    ],
    ids=["rerouted-domain", "contact", "list-remote-member"],
)
def test_directory_targets_go_out(outbound: MailguardServer, mx_sink: SMTPSink, dns_server: DNSServer,
                                  address: str, arrives_as: str) -> None:
    """Mail from an outsider for a rerouted domain, a contact or a list leaves for the remote address."""
    tag = marker()
    msg = make_message("sender@outside.example", address, tag)
    relay_send(outbound, "sender@outside.example", [address], msg, source=OUTSIDER)

    wait_until(lambda: any(tag.encode() in m.data for m in mx_sink.messages_for(arrives_as)),
               DELIVERY_TIMEOUT, f"{arrives_as} at the sink\n{outbound.log_text()[-3000:]}")
    (got,) = [m for m in mx_sink.messages_for(arrives_as) if tag.encode() in m.data]
    received_prefix_and_rest(got.data, msg)
    # A forward of an outsider's mail carries an SRS sender in our domain (SPF at the next hop).
    assert got.sender.startswith("SRS0=") and got.sender.endswith(f"=outside.example=sender@{DOMAIN}"), got.sender
    assert got.recipients == [arrives_as]
    assert dns_server.asked(arrives_as.rpartition("@")[2]), "no DNS lookup for the remote domain"
    if address == LIST:
        assert len(outbound.messages_containing(BOB, tag.encode())) == 1, "the local member got no copy"
    wait_queue_clear(outbound, arrives_as)


@pytest.fixture(scope="module")
def short_lived(server_factory: ServerFactory, dns_server: DNSServer, mx_sink: SMTPSink) -> MailguardServer:
    """A server that gives up on a message after 3 s in the queue."""
    server = server_factory("shortlived", outbound_config(dns_server, mx_sink, max_queue_time=3))
    server.add_user(ALICE, PASSWORD)
    return server


def test_max_queue_time_bounces(short_lived: MailguardServer, mx_sink: SMTPSink) -> None:
    """A recipient that only ever gets 4xx fails once ``max_queue_time`` has passed, with a bounce
    carrying the last reply, and is not tried any more."""
    tag = marker()
    rcpt = f"always-later-{tag}@remote.example"
    reply = f"451 4.2.0 Mailbox {tag} busy"
    mx_sink.script_rcpt(rcpt, *[reply] * 100)
    relay_send(short_lived, ALICE, [rcpt], make_message(ALICE, rcpt, tag))

    _dsn, (block,) = bounce_for(short_lived, ALICE, tag)
    assert block.get("action", "").lower() == "failed", block
    assert reply in block.get("diagnostic-code", ""), block
    wait_queue_clear(short_lived, rcpt)
    # "bounced" is the runner's last word on the entry (after the failure is recorded and
    # the bounce stored); the entry is gone from the queue, so nothing can try it again.
    assert_recorded_once(short_lived, rcpt, "bounced")
    tries = mx_sink.rcpt_commands(rcpt)
    assert tries >= 2, "the 4xx was not retried before giving up"
    assert mx_sink.rcpt_commands(rcpt) == tries, "tried again after giving up"
    assert mx_sink.messages_for(rcpt) == []


# --------------------------------------------------------------------------- smarthost


@pytest.fixture(scope="module")
def smart_sink() -> Iterator[SMTPSink]:
    """The office's ISP relay: STARTTLS, then AUTH required before MAIL."""
    sink = SMTPSink(tls=True, auth=(SMARTHOST_USER, SMARTHOST_PASSWORD), name="smtp.isp.example")
    yield sink
    sink.close()
    assert sink.errors == [], f"the SMTP sink failed: {sink.errors}"


@pytest.fixture(scope="module")
def via_smarthost(server_factory: ServerFactory, dns_server: DNSServer, mx_sink: SMTPSink,
                  smart_sink: SMTPSink) -> MailguardServer:
    """A server that sends all remote mail through ``smart_sink`` with AUTH over STARTTLS."""
    server = server_factory("smarthost", outbound_config(
        dns_server, mx_sink,
        smarthost=smart_sink.address, smarthost_tls="starttls",
        smarthost_user=SMARTHOST_USER, smarthost_password=SMARTHOST_PASSWORD), start=False)
    server.config["outbound"]["tls_ca_file"] = str(ca_file(server.root))
    server.config_path.write_text(toml_dumps(server.config), encoding="utf-8")
    return server.start()


def smarthost_server(factory: ServerFactory, name: str, dns_server: DNSServer, mx_sink: SMTPSink,
                     sink: SMTPSink, trust_ca: bool, **outbound: Any) -> MailguardServer:
    """A server sending through ``sink`` by its name smtp.isp.example (served by ``dns_server``)."""
    dns_server.set("smtp.isp.example", [("A", "127.0.0.1")])
    server = factory(name, outbound_config(
        dns_server, mx_sink, smarthost=f"smtp.isp.example:{sink.port}", smarthost_tls="starttls",
        smarthost_user=SMARTHOST_USER, smarthost_password=SMARTHOST_PASSWORD, **outbound), start=False)
    if trust_ca:
        server.config["outbound"]["tls_ca_file"] = str(ca_file(server.root))
        server.config_path.write_text(toml_dumps(server.config), encoding="utf-8")
    return server.start()


@pytest.mark.parametrize(("case", "cert_names", "trust_ca", "reason"), [
    ("unknown-ca", ("smtp.isp.example",), False, "certificate verify failed"),
    ("wrong-name", ("mitm.example",), True, "certificate name mismatch"),
])
def test_smarthost_certificate_not_verified(fresh_server_factory: ServerFactory, dns_server: DNSServer,
                                            mx_sink: SMTPSink, case: str, cert_names: tuple[str, ...],
                                            trust_ca: bool, reason: str) -> None:
    """A smarthost that cannot prove its name gets no AUTH and no mail; queue list says why."""
    impostor = SMTPSink(tls=True, auth=(SMARTHOST_USER, SMARTHOST_PASSWORD), name="smtp.isp.example",
                        cert_names=cert_names)
    try:
        server = smarthost_server(fresh_server_factory, f"verify-{case}", dns_server, mx_sink, impostor, trust_ca)
        tag = marker()
        rcpt = f"ann-{tag}@remote.example"
        relay_send(server, "sender@outside.example", [rcpt], make_message("sender@outside.example", rcpt, tag))
        line = wait_deferred(server, rcpt)
        assert "4.7.5" in line and reason in line, line
        assert impostor.messages_for(rcpt) == []
        commands = impostor.commands()
        assert not any(c.upper().startswith("AUTH") for c in commands), commands
        assert not any(SMARTHOST_PASSWORD in c for c in commands)
    finally:
        impostor.close()


def test_smarthost_verification_can_be_turned_off(fresh_server_factory: ServerFactory, dns_server: DNSServer,
                                                  mx_sink: SMTPSink) -> None:
    """smarthost_tls_verify = false: the admin accepts any certificate, and mail flows with AUTH."""
    sink = SMTPSink(tls=True, auth=(SMARTHOST_USER, SMARTHOST_PASSWORD), name="smtp.isp.example",
                    cert_names=("mitm.example",))
    try:
        server = smarthost_server(fresh_server_factory, "verify-off", dns_server, mx_sink, sink, False,
                                  smarthost_tls_verify=False)
        tag = marker()
        rcpt = f"ann-{tag}@remote.example"
        relay_send(server, "sender@outside.example", [rcpt], make_message("sender@outside.example", rcpt, tag))
        (got,) = sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
        assert got.tls and got.auth_user == SMARTHOST_USER
    finally:
        sink.close()


def test_smarthost_auth_over_starttls(via_smarthost: MailguardServer, smart_sink: SMTPSink,
                                      mx_sink: SMTPSink, dns_server: DNSServer) -> None:
    """Remote mail goes to the smarthost, over TLS, logged in; no MX lookup is made."""
    tag = marker()
    rcpts = [f"ann-{tag}@remote.example", f"ben-{tag}@elsewhere-{tag}.example"]
    msg = make_message("sender@outside.example", rcpts[0], tag)
    relay_send(via_smarthost, "sender@outside.example", rcpts, msg)

    for rcpt in rcpts:
        (got,) = smart_sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
        received_prefix_and_rest(got.data, msg)
        assert got.tls, "credentials went over a cleartext channel"
        assert got.auth_user == SMARTHOST_USER
        assert got.sender == "sender@outside.example"
    assert dns_server.asked(f"elsewhere-{tag}.example") == []
    assert all(mx_sink.messages_for(r) == [] for r in rcpts)
    wait_queue_clear(via_smarthost)


# --------------------------------------------------------------------------- queue CLI


@pytest.fixture(scope="module")
def slow_retry(server_factory: ServerFactory, dns_server: DNSServer, mx_sink: SMTPSink) -> MailguardServer:
    """A server whose next retry is an hour away: only ``queue flush`` brings mail out sooner."""
    return server_factory("slowretry", outbound_config(dns_server, mx_sink, retry_schedule=[3600]))


def wait_deferred(server: MailguardServer, rcpt: str) -> str:
    """The ``queue list`` line of the message for ``rcpt`` once it is deferred."""
    def deferred() -> bool:
        lines = queue_lines_for(server, rcpt)
        return len(lines) == 1 and "deferred" in lines[0]
    wait_until(deferred, DELIVERY_TIMEOUT, f"{rcpt} deferred in the queue:\n{queue_listing(server)}")
    (line,) = queue_lines_for(server, rcpt)
    return line


def test_queue_list_and_flush(slow_retry: MailguardServer, mx_sink: SMTPSink) -> None:
    """``queue list`` shows the deferred message (id first, sender, state, reply); ``queue flush`` sends it now."""
    tag = marker()
    rcpt = f"flushed-{tag}@remote.example"
    reply = f"451 4.7.1 Greylisted {tag}"
    mx_sink.script_rcpt(rcpt, reply)
    msg = make_message("sender@outside.example", rcpt, tag)
    relay_send(slow_retry, "sender@outside.example", [rcpt], msg)

    line = wait_deferred(slow_retry, rcpt)
    queue_id = line.split()[0]
    assert re.fullmatch(r"[0-9A-Za-z._-]{8,}", queue_id), line
    assert "<sender@outside.example>" in line, line
    assert reply in line, line
    assert mx_sink.rcpt_commands(rcpt) == 1

    assert slow_retry.cli_ok("queue", "flush").returncode == 0
    (got,) = mx_sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
    received_prefix_and_rest(got.data, msg)
    assert mx_sink.rcpt_commands(rcpt) == 2
    wait_queue_clear(slow_retry, rcpt)


def test_queue_delete(slow_retry: MailguardServer, mx_sink: SMTPSink) -> None:
    """``queue delete ID`` removes one deferred message: a flush afterwards sends only the other one."""
    tag = marker()
    doomed, kept = f"doomed-{tag}@remote.example", f"kept-{tag}@remote.example"
    for rcpt in (doomed, kept):
        mx_sink.script_rcpt(rcpt, "451 4.3.0 Try again later")
        relay_send(slow_retry, "sender@outside.example", [rcpt], make_message("sender@outside.example", rcpt, tag))
    doomed_id = wait_deferred(slow_retry, doomed).split()[0]
    wait_deferred(slow_retry, kept)

    slow_retry.cli_ok("queue", "delete", doomed_id)
    assert queue_lines_for(slow_retry, doomed) == []
    assert len(queue_lines_for(slow_retry, kept)) == 1
    again = slow_retry.cli("queue", "delete", doomed_id)
    assert again.returncode != 0, "deleting a message that is gone must fail"

    slow_retry.cli_ok("queue", "flush")
    mx_sink.wait_for_messages(kept, timeout=DELIVERY_TIMEOUT)
    wait_queue_clear(slow_retry)
    assert mx_sink.messages_for(doomed) == []
    assert mx_sink.rcpt_commands(doomed) == 1


# --------------------------------------------------------------------------- crash


def test_crash_during_delivery(fresh_server_factory: ServerFactory, dns_server: DNSServer) -> None:
    """``kill -9`` while the remote host holds its answer to the final dot; after a restart the
    message is delivered once the host accepts, exactly once, and the queue is empty."""
    sink = SMTPSink(name="mx.remote.example")
    try:
        sink.hold()
        server = fresh_server_factory("crash", outbound_config(dns_server, sink))
        tag = marker()
        rcpt = f"crash-{tag}@remote.example"
        msg = make_message("sender@outside.example", rcpt, tag)
        relay_send(server, "sender@outside.example", [rcpt], msg)

        wait_until(sink.holding.is_set, DELIVERY_TIMEOUT, f"the delivery to reach the final dot\n{server.log_text()}")
        assert len(queue_lines_for(server, rcpt)) == 1, queue_listing(server)
        server.kill9()
        wait_until(lambda: sink.abandoned == 1, 10, "the sink to see the killed server go")
        assert sink.messages_for(rcpt) == []

        server.start()
        sink.release()
        (got,) = sink.wait_for_messages(rcpt, timeout=DELIVERY_TIMEOUT)
        received_prefix_and_rest(got.data, msg)
        wait_queue_clear(server)
        assert_recorded_once(server, rcpt, "delivered")
        assert len(sink.messages_for(rcpt)) == 1, "delivered more than once"
    finally:
        sink.close()
    assert sink.errors == [], f"the SMTP sink failed: {sink.errors}"
