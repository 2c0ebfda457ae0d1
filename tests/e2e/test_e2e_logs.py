"""End to end: the twistd log an administrator follows (issue 16 item 5).

One message relayed by a real ``twistd -n mailguard`` to a loopback MX that refuses
one recipient: ``grep <id>`` on the log shows it from RCPT to the bounce's own
delivery; the ``stored`` line names the local mailboxes; no Twisted factory noise;
``mailguard queue list`` says when a deferred message is tried next and that an empty
queue is empty; ``--logfile`` rotates as ``[log]`` says and keeps only
``max_rotated_files`` old files.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ServerFactory
from .harness import MailguardServer, make_message
from .sinks import DNSServer, SMTPSink, wait_until
from .test_e2e_outbound import (BOB, DELIVERY_TIMEOUT, DOMAIN, PASSWORD, RELAY_CLIENT, ZONE, marker,
                                outbound_config, queue_listing)

SENDER = "someone@far.example"      # remote: the bounce leaves through the queue too


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    server = DNSServer(ZONE)
    yield server
    server.close()


@pytest.fixture(scope="module")
def mx_sink() -> Iterator[SMTPSink]:
    sink = SMTPSink(name="mx.remote.example")
    yield sink
    sink.close()
    assert sink.errors == [], f"the SMTP sink failed: {sink.errors}"


def message_lines(server: MailguardServer, needle: str) -> list[str]:
    """The log lines that contain ``needle``, without twistd's time and namespace prefix."""
    return [line.split("] ", 1)[1] for line in server.log_text().splitlines() if needle in line]


def send(server: MailguardServer, sender: str, rcpts: list[str], msg: bytes) -> str:
    """Relay one message from ``RELAY_CLIENT``; returns the id of its ``250 ... queued as`` reply."""
    with server.smtp(source=RELAY_CLIENT) as client:
        client.ehlo("client.example")
        assert client.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250, rcpt
        code, text = client.data(msg)
    assert code == 250, text
    return text.decode().rpartition(" ")[2]


def test_grep_by_the_id_follows_a_message_to_its_bounce(server_factory: ServerFactory, dns_server: DNSServer,
                                                        mx_sink: SMTPSink) -> None:
    """RCPT lines, stored (with the mailbox), queued, failed, bounced, and the bounce's own queued and
    delivered lines all carry the message's id; Twisted's factory lines are not in the log."""
    server = server_factory("follow", outbound_config(dns_server, mx_sink))
    server.add_user(BOB, PASSWORD)
    tag = marker()
    gone = f"gone-{tag}@remote.example"
    mx_sink.script_rcpt(gone, "550 5.1.1 no such user")
    msg_id = send(server, SENDER, [gone, BOB], make_message(SENDER, gone, tag))
    mx_sink.wait_for_messages(SENDER, timeout=DELIVERY_TIMEOUT)
    wait_until(lambda: any("state=delivered" in line for line in message_lines(server, f"msg={msg_id} ")),
               DELIVERY_TIMEOUT, f"the bounce's delivered line\n{server.log_text()[-3000:]}")

    lines = message_lines(server, msg_id)
    queue_ids = re.findall(r"mailguard outbound: id=(\S+) msg=", "\n".join(lines))
    first, bounce = dict.fromkeys(queue_ids)
    expected = [
        rf'mailguard smtp decision: client={RELAY_CLIENT} local=127\.0\.0\.1 helo=client\.example '
        rf'from=<{SENDER}> rcpt=<{gone}> rule=allow reply="250 2\.1\.5 Recipient ok" id={msg_id}',
        rf'mailguard smtp decision: client={RELAY_CLIENT} local=127\.0\.0\.1 helo=client\.example '
        rf'from=<{SENDER}> rcpt=<{BOB}> rule=inbound reply="250 2\.1\.5 Recipient ok" id={msg_id}',
        rf"mailguard outbound: id={first} msg={msg_id} state=queued from=<{SENDER}> to=<{gone}>",
        rf"mailguard smtp stored: client={RELAY_CLIENT} id={msg_id} sender={SENDER} rcpts=2 size=\d+ "
        rf"mailboxes={BOB}",
        rf"mailguard outbound: id={first} msg={msg_id} to=<{gone}> state=failed relay=mx\.remote\.example\S* "
        rf"reply=550 5\.1\.1 no such user",
        rf"mailguard outbound: id={first} msg={msg_id} to=<{gone}> state=bounced relay=<{SENDER}> "
        rf"reply=550 5\.1\.1 no such user",
        rf"mailguard outbound: id={bounce} msg={msg_id} state=queued from=<> to=<{SENDER}>",
        rf"mailguard outbound: id={bounce} msg={msg_id} to=<{SENDER}> state=delivered relay=far\.example\S* "
        rf"reply=250 .*",
    ]
    assert len(lines) == len(expected), "\n".join(lines)
    # In this order up to the failure; the bounce's lines and the "bounced" one race each other.
    for pattern, line in zip(expected[:5], lines):
        assert re.fullmatch(pattern, line), f"{line!r} does not match {pattern!r}"
    for pattern in expected[5:]:
        assert len([line for line in lines[5:] if re.fullmatch(pattern, line)]) == 1, (pattern, lines[5:])
    log = server.log_text()
    for noise in ("Starting factory", "Stopping factory", "OneShotFactory"):
        assert noise not in log, f"{noise!r} in the log:\n{log[-3000:]}"


def test_queue_list_is_exact(server_factory: ServerFactory, dns_server: DNSServer, mx_sink: SMTPSink) -> None:
    """Empty: ``queue is empty``.  A deferred message: id, age, sender, recipient, reply and its next try."""
    server = server_factory("listing", outbound_config(dns_server, mx_sink, retry_schedule=[3600]))
    assert queue_listing(server) == "queue is empty\n"
    tag = marker()
    rcpt = f"later-{tag}@remote.example"
    mx_sink.script_rcpt(rcpt, "451 4.3.0 try later")
    send(server, "sender@outside.example", [rcpt], make_message("sender@outside.example", rcpt, tag))
    wait_until(lambda: "deferred" in queue_listing(server), DELIVERY_TIMEOUT, queue_listing(server))
    listing = queue_listing(server)
    assert re.fullmatch(rf"[0-9a-f]{{21}} 0m\d\ds <sender@outside\.example> {re.escape(rcpt)}="
                        rf"deferred\(451 4\.3\.0 try later, next try in 59m\d\ds\)\n", listing), listing


class LoggingToFile(MailguardServer):
    """The server started with ``--logfile=twistd.log`` in its folder (as a daemon would be)."""

    def command(self) -> list[str]:
        cmd = super().command()
        return cmd[:1 + cmd.index("-n")] + ["--logfile=mailguard.log"] + cmd[1 + cmd.index("-n"):]


def test_logfile_rotates_and_keeps_max_rotated_files(tmp_path: Path) -> None:
    """``[log] rotate_length`` and ``max_rotated_files`` apply to twistd's ``--logfile``: files
    left from before beyond the count are removed at the first rotation, and no more appear."""
    for n in range(1, 6):
        (tmp_path / f"mailguard.log.{n}").write_text(f"old file {n}\n")
    server = LoggingToFile(tmp_path, {"log": {"rotate_length": 10000, "max_rotated_files": 2}})
    server.start()
    try:
        for _ in range(8):                      # each refused RCPT is a ~190-byte decision line
            with server.smtp(source="127.0.0.5") as client:
                client.ehlo("client.example")
                client.mail("x@outside.example")
                for i in range(25):
                    assert client.rcpt(f"nobody{i}@elsewhere.example")[0] == 550
        deadline = time.monotonic() + 10
        while "old file" in "".join(p.read_text() for p in tmp_path.glob("mailguard.log.*")):
            assert time.monotonic() < deadline, sorted(p.name for p in tmp_path.glob("mailguard.log*"))
            time.sleep(0.1)
    finally:
        server.stop()
    assert sorted(p.name for p in tmp_path.glob("mailguard.log*")) == [
        "mailguard.log", "mailguard.log.1", "mailguard.log.2"]
    for rotated in ("mailguard.log.1", "mailguard.log.2"):
        text = (tmp_path / rotated).read_text()
        assert 10000 <= len(text.encode()) < 11000 and "mailguard smtp decision:" in text
    assert "mailguard smtp decision:" not in server.log_text()     # standard output got none of it
