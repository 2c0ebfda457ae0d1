"""End to end: content filters through a real libmilter milter (pymilter), every action.

The milter (``tests/milters/action_milter.py``) runs under the system Python with
Debian's python3-milter; the message's ``X-Test-Action`` header tells it what to do.
Mail comes from an outsider (untrusted), so ``[filters]`` applies; a trusted client
is not filtered (``for_trusted = false``).
"""

from __future__ import annotations

import smtplib
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from mailguard.core import replies

from .conftest import ALLOWED_HOST, DOMAIN, OFFICE_CONFIG, OUTSIDER, ServerFactory, populate_office
from .harness import MailguardServer, deep_merge, free_port, make_message, split_added_headers, tls_context
from .milters import Process, action_milter
from .sinks import wait_until

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
REFUSED = f"refuse-me@{DOMAIN}"
SENDER = "joe@outside.example"
TEMPFAIL = str(replies.MILTER_TEMPFAIL)


@pytest.fixture(scope="module")
def milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    m = action_milter(tmp_path_factory.mktemp("milter"))
    yield m
    m.stop()


@pytest.fixture(scope="module")
def filtered(server_factory: ServerFactory, milter: Process) -> MailguardServer:
    """The office server with the test milter; replies past 5 s count as a failure."""
    cfg = deep_merge(OFFICE_CONFIG, {"filters": {"milters": [milter.address], "milter_timeout": 5}})
    server = server_factory("filtered", cfg)
    populate_office(server)
    server.add_user(REFUSED)
    return server


def send(server: MailguardServer, actions: str, rcpts: tuple[str, ...] = (ALICE,), source: str = OUTSIDER,
         body: list[str] | None = None) -> tuple[str, bytes, Any]:
    """Send one message asking for ``actions``; (marker, message, reply to the final dot)."""
    tag = "milter-" + uuid.uuid4().hex
    message = make_message(SENDER, rcpts[0], tag, body)
    message = message.replace(b"\r\n\r\n", f"\r\nX-Test-Action: {actions}\r\nX-Test-Secret: s\r\n\r\n".encode(), 1)
    with server.dialog(source=source) as d:
        assert d.cmd("EHLO client.outside.example").code == 250
        assert d.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        for r in rcpts:
            assert d.cmd(f"RCPT TO:<{r}>").code == 250
        reply = d.data(message)
        assert d.cmd("QUIT").code == 221, "the session must survive whatever the milter did"
    return tag, message, reply


def stored(server: MailguardServer, rcpt: str, tag: str) -> bytes:
    (m,) = server.messages_containing(rcpt, tag.encode())
    return m


def test_header_edits_and_macros(filtered: MailguardServer) -> None:
    """Add, insert, change and delete headers; the stored copy is exactly the filtered one."""
    tag, sent, reply = send(filtered, "add-header,insert-header,change-header,delete-header,macros")
    assert reply.code == 250 and "queued as" in reply.last, reply
    got = stored(filtered, ALICE, tag)
    head, _, body = got.partition(b"\n\n")
    lines = head.split(b"\n")
    assert lines[0] == b"Return-Path: <joe@outside.example>"
    # Index 0 of SMFIR_INSHEADER is the top, above this host's Received: (as in Postfix).
    assert lines[1] == b"X-Test-Inserted: first"
    # An untrusted client without a verified reverse name is shown as "unknown" (SPEC: Inbound checks).
    assert lines[2].startswith(b"Received: from client.outside.example (unknown [127.0.0.5])")
    assert b"Subject: changed by the test milter" in lines and f"Subject: {tag}".encode() not in lines
    assert b"X-Test-Secret: s" not in lines
    assert lines[-2] == b"X-Test-Added: yes"
    macros = lines[-1].decode()
    assert macros.startswith("X-Macros: ")
    for part in ("j=mx.realdomain.example", "{client_addr}=127.0.0.5", "{daemon_name}=smtp",
                 f"{{mail_addr}}={SENDER}", f"{{rcpt_addr}}={ALICE}", "{client_name}=unknown"):
        assert part in macros, macros
    assert f"i={reply.last.split()[-1]}" in macros
    assert body == sent.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")


@pytest.mark.parametrize("action,expected", [
    ("reject", "550 5.7.1 Rejected by the test milter"),
    ("reject-plain", str(replies.MILTER_REJECTED)),
    ("tempfail", "451 4.7.1 Try again later, says the test milter"),
    ("tempfail-plain", TEMPFAIL),
])
def test_refusals(filtered: MailguardServer, action: str, expected: str) -> None:
    """Reject and tempfail reach the client with the milter's own reply; nothing is stored."""
    tag, _, reply = send(filtered, action)
    assert reply.last == expected
    assert filtered.messages_containing(ALICE, tag.encode()) == []
    filtered.wait_for_log(rf"mailguard milter {action.split('-')[0]}: client=127.0.0.5 .*reply={expected}")


def test_discard(filtered: MailguardServer) -> None:
    """Discard: the client hears 250, nothing is stored or queued."""
    tag, _, reply = send(filtered, "discard")
    assert reply.code == 250 and "queued as" in reply.last, reply
    assert filtered.messages_containing(ALICE, tag.encode()) == []
    assert not any(tag in line for line in filtered.queue_lines())


def test_accept_stores_unchanged(filtered: MailguardServer) -> None:
    """Accept (at end of headers here): the message is stored as sent, even with later actions asked."""
    tag, sent, reply = send(filtered, "accept,add-header")
    assert reply.code == 250
    added = split_added_headers(stored(filtered, ALICE, tag), sent)
    assert added.startswith(b"Return-Path: <joe@outside.example>\nReceived: ")


def test_replace_body_and_change_sender(filtered: MailguardServer) -> None:
    """SMFIR_REPLBODY replaces the body; SMFIR_CHGFROM changes the envelope sender (Return-Path)."""
    tag, _, reply = send(filtered, "replace-body,change-from")
    assert reply.code == 250
    got = stored(filtered, ALICE, tag)
    assert got.startswith(b"Return-Path: <changed@sender.example>\n")
    assert got.endswith(b"\n\nThe test milter replaced this body.\n")


def test_add_and_delete_recipients(filtered: MailguardServer) -> None:
    """SMFIR_ADDRCPT adds bob (routed through the directory); SMFIR_DELRCPT removes alice."""
    tag, _, reply = send(filtered, f"add-rcpt:{BOB},del-rcpt:{ALICE}")
    assert reply.code == 250
    wait_until(lambda: filtered.messages_containing(BOB, tag.encode()) != [], 5, "bob's copy")
    assert filtered.messages_containing(ALICE, tag.encode()) == []


def test_recipient_refused_at_rcpt(filtered: MailguardServer) -> None:
    """A recipient the milter refuses is dropped; the others get the message."""
    tag, _, reply = send(filtered, "add-header", rcpts=(ALICE, REFUSED))
    assert reply.code == 250
    assert stored(filtered, ALICE, tag)
    assert filtered.messages_containing(REFUSED, tag.encode()) == []
    filtered.wait_for_log(rf"mailguard milter rcpt-refused: .* rcpt={REFUSED} reply=550 5.1.1 Recipient refused")


def test_quarantine_release_and_delete(filtered: MailguardServer) -> None:
    """Quarantine: stored held, not delivered; queue list shows the reason; release delivers;
    delete drops another."""
    tag, _, reply = send(filtered, "quarantine,add-header")
    assert reply.code == 250
    other, _, _ = send(filtered, "quarantine")
    held = [ln for ln in filtered.queue_lines() if "HELD(held by the test milter)" in ln]
    assert len(held) == 2, filtered.queue_lines()
    assert all(f"{ALICE}=pending" in ln for ln in held)
    assert filtered.messages_containing(ALICE, tag.encode()) == []
    ids = [ln.split()[0] for ln in held]
    first = next(i for i in ids if tag.encode() in (filtered.data_dir / "queue" / f"{i}.msg").read_bytes())
    second = next(i for i in ids if i != first)
    assert filtered.cli_ok("queue", "release", first).stdout.strip() == f"released {first}"
    wait_until(lambda: filtered.messages_containing(ALICE, tag.encode()) != [], 10, "the released message")
    got = stored(filtered, ALICE, tag)
    assert got.startswith(b"Return-Path: <joe@outside.example>\nReceived: ") and b"\nX-Test-Added: yes\n" in got
    assert filtered.cli_ok("queue", "delete", second).stdout.strip() == f"deleted {second}"
    wait_until(lambda: not any(i in ln for ln in filtered.queue_lines() for i in ids), 10, "an empty queue")
    assert filtered.messages_containing(ALICE, other.encode()) == []
    assert filtered.cli("queue", "release", second).returncode == 1


def test_trusted_client_not_filtered(filtered: MailguardServer) -> None:
    """for_trusted = false: mail from a relay-allowed client skips the milters."""
    tag, sent, reply = send(filtered, "reject", source=ALLOWED_HOST)
    assert reply.code == 250
    split_added_headers(stored(filtered, ALICE, tag), sent)


def test_slow_milter_follows_default_action(filtered: MailguardServer) -> None:
    """A milter silent past milter_timeout: tempfail, one log line, and the session goes on."""
    tag, _, reply = send(filtered, "sleep:8,add-header")
    assert reply.last == TEMPFAIL
    line = filtered.wait_for_log(r"mailguard milter failure: client=127.0.0.5 .*error=MilterTimeout")
    assert line.endswith("action=tempfail")
    assert filtered.messages_containing(ALICE, tag.encode()) == []


@pytest.mark.parametrize("default,expected", [("tempfail", TEMPFAIL), ("reject", str(replies.MILTER_REJECTED)),
                                              ("accept", None)])
def test_unreachable_milter(fresh_server_factory: ServerFactory, default: str, expected: str | None) -> None:
    """Nothing listening: milter_default_action decides; one log line names the milter."""
    dead = f"inet:127.0.0.1:{free_port()}"
    cfg = deep_merge(OFFICE_CONFIG, {"filters": {"milters": [dead], "milter_default_action": default}})
    server = fresh_server_factory(f"unreachable-{default}", cfg)
    server.add_user(ALICE)
    tag, _, reply = send(server, "add-header")
    if expected is None:
        assert reply.code == 250
        assert b"X-Test-Added" not in stored(server, ALICE, tag)
    else:
        assert reply.last == expected
    line = server.wait_for_log(rf"mailguard milter failure: client=127.0.0.5 milter={dead} ")
    assert line.endswith(f"action={default}")


def test_chain_with_no_reply_and_skip(fresh_server_factory: ServerFactory, tmp_path: Path) -> None:
    """Two milters in order: one that asked for every SMFIP_NR_* step, one that SKIPs the body.
    Both add their header; a 150 kB body reaches the first in 64 KiB chunks."""
    noreply, skip = action_milter(tmp_path, "--noreply"), action_milter(tmp_path, "--skip")
    try:
        cfg = deep_merge(OFFICE_CONFIG, {"filters": {"milters": [noreply.address, skip.address]}})
        server = fresh_server_factory("chain", cfg)
        server.add_user(ALICE)
        body = ["x" * 998] * 150
        tag, _, reply = send(server, "add-header,body-info", body=body)
        assert reply.code == 250, reply
        got = stored(server, ALICE, tag)
        size = len("\r\n".join(body) + "\r\n")
        chunks = -(-size // 65535)
        assert f"\nX-Test-Added: yes\nX-Body-Info: chunks={chunks} size={size}\nX-Test-Added: yes\n"\
               f"X-Body-Info: chunks=1 size=65535\n\n".encode() in got
    finally:
        noreply.stop()
        skip.stop()


@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_for_trusted_filters_authenticated_submissions(fresh_server_factory: ServerFactory, milter: Process,
                                                       listener: str) -> None:
    """for_trusted = true: a submission (STARTTLS, or implicit TLS) with AUTH goes through the
    milter, which is told who logged in ({auth_authen}) and the TLS version ({tls_version})."""
    cfg = deep_merge(OFFICE_CONFIG, {"filters": {"milters": [milter.address], "for_trusted": True}})
    server = fresh_server_factory(f"trusted-{listener}", cfg)
    server.add_user(ALICE, "correct horse battery")
    tag = "milter-" + uuid.uuid4().hex
    message = make_message(ALICE, ALICE, tag).replace(b"\r\n\r\n", b"\r\nX-Test-Action: macros\r\n\r\n", 1)
    port = server.ports[listener]
    client = (smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=tls_context()) if listener == "submissions"
              else smtplib.SMTP("127.0.0.1", port, timeout=30))
    with client as c:
        c.ehlo("laptop.example")
        if listener == "submission":
            assert c.starttls(context=tls_context())[0] == 220
            c.ehlo("laptop.example")
        assert c.login(ALICE, "correct horse battery")[0] == 235
        assert c.mail(ALICE)[0] == 250 and c.rcpt(ALICE)[0] == 250
        code, _ = c.data(message)
        assert code == 250
    macros = next(ln for ln in stored(server, ALICE, tag).split(b"\n") if ln.startswith(b"X-Macros: ")).decode()
    assert f"{{auth_authen}}={ALICE}" in macros and f"{{daemon_name}}={listener}" in macros, macros
    assert "{tls_version}=TLSv1." in macros, macros
