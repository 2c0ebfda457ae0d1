"""Tests for mailguard.smtp.server: the hardened ESMTP server over a StringTransport and a task.Clock."""

from __future__ import annotations

import base64
from typing import Any, Callable

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent

from mailguard.core import replies
from mailguard.core.entries import Expansion
from mailguard.directory.base import DirectoryError
from mailguard.smtp import server as smtp
from mailguard.smtp import wire
from mailguard.auth.authenticator import Throttled

from conftest import FakeContext, LogCapture, Session, office_config, server_tls

Open = Callable[..., Session]
OUTSIDER = "203.0.113.9"
REPLIES = office_config().replies       # the office configuration's [replies]
ALLOWED = "192.168.10.5"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def ehlo(s: Session) -> list[str]:
    lines = s.cmd("EHLO client.example")
    assert lines[-1].startswith("250 "), lines
    return lines


def transaction(s: Session, rcpts: tuple[str, ...] = ("<alice@office.example>",),
                sender: str = "<joe@sender.example>") -> None:
    """EHLO (if needed), MAIL, RCPT... each answered 250, then DATA answered 354."""
    assert s.cmd(f"MAIL FROM:{sender}")[0].startswith("250 "), s.lines()
    for r in rcpts:
        assert s.cmd(f"RCPT TO:{r}")[0].startswith("250 "), s.lines()
    assert s.cmd("DATA")[0].startswith("354 ")


def host(**changes: dict[str, Any]) -> FakeContext:
    """A FakeContext for the office configuration with changes, alice in the directory."""
    h = FakeContext(office_config(**changes))
    h.directory.add_mailbox("alice@office.example", "a.smith@office.example")
    h.authenticator.users["alice@office.example"] = ("secret", "alice@office.example")
    return h


# -- greeting and EHLO ----------------------------------------------------------------------------


def test_banner(session_factory: Open) -> None:
    """The session opens with 220, the configured hostname and ESMTP."""
    s = session_factory()
    assert s.lines() == ["220 mx.office.example ESMTP mailguard"]


def test_helo_required_before_mail(session_factory: Open) -> None:
    """MAIL without HELO/EHLO is 503 5.5.1; an empty HELO is 501."""
    s = session_factory()
    assert s.cmd("MAIL FROM:<joe@sender.example>") == [str(replies.HELO_FIRST)]
    assert s.cmd("HELO")[0].startswith("501 ")
    assert s.cmd("HELO client.example") == ["250 mx.office.example"]
    assert s.cmd("MAIL FROM:<joe@sender.example>") == [str(replies.SENDER_OK)]


def test_ehlo_keywords_cleartext_without_tls(ctx: FakeContext) -> None:
    """EHLO lists PIPELINING, SIZE n, 8BITMIME, ENHANCEDSTATUSCODES; no STARTTLS without TLS, no AUTH in clear."""
    ctx.tls = None
    assert ehlo(Session(ctx)) == ["250-mx.office.example", "250-PIPELINING", "250-SIZE 26214400", "250-8BITMIME",
                                  "250 ENHANCEDSTATUSCODES"]


def test_ehlo_offers_starttls_not_auth_on_cleartext(ctx: FakeContext) -> None:
    """With TLS available on a cleartext channel: STARTTLS offered, AUTH not (auth_requires_tls)."""
    lines = ehlo(Session(ctx))
    assert "250-STARTTLS" in lines or "250 STARTTLS" in lines
    assert not any("AUTH" in ln for ln in lines)


def test_ehlo_on_encrypted_channel_offers_auth_not_starttls(ctx: FakeContext) -> None:
    """On an encrypted channel STARTTLS is not offered again and AUTH PLAIN LOGIN is."""
    lines = ehlo(Session(ctx, encrypted=True))
    assert not any("STARTTLS" in ln for ln in lines)
    assert lines[-1] == "250 AUTH PLAIN LOGIN"


def test_ehlo_offers_auth_in_clear_when_configured() -> None:
    """auth_requires_tls = false: AUTH is offered on cleartext too."""
    h = host(tls={"auth_requires_tls": False})
    assert ehlo(Session(h))[-1] == "250 AUTH PLAIN LOGIN"


def test_size_advertised_from_config() -> None:
    """SIZE shows limits.max_message_size."""
    assert "250-SIZE 4096" in ehlo(Session(host(limits={"max_message_size": 4096})))


# -- the classic manual check and the mail transaction ---------------------------------------------


def test_classic_manual_relay_check(session_factory: Open, logs: LogCapture) -> None:
    """Reply for reply: HELO, unbracketed MAIL, relay refused, local accepted, QUIT — and a log line each."""
    s = session_factory()
    assert s.cmd("HELO me") == ["250 mx.office.example"]
    assert s.cmd("MAIL FROM: someaddress@somedomain.com") == [str(replies.SENDER_OK)]
    assert s.cmd("RCPT TO: nobody@afakedomain.com") == [str(REPLIES.relay_denied)]
    assert s.cmd("RCPT TO: alice@office.example") == [str(replies.RECIPIENT_OK)]
    assert s.cmd("QUIT")[0].startswith("221 ")
    assert s.closed
    lines = logs.matching("mailguard smtp decision:")
    assert len(lines) == 2
    msg_id = lines[0].rpartition(" id=")[2]
    assert lines[0] == (f'mailguard smtp decision: client={OUTSIDER} local=10.0.0.1 helo=me '
                        f'from=<someaddress@somedomain.com> rcpt=<nobody@afakedomain.com> rule=relay_denied '
                        f'reply="550 5.7.1 Relaying prohibited" id={msg_id}')
    assert "rule=inbound" in lines[1] and lines[1].endswith(f'reply="250 2.1.5 Recipient ok" id={msg_id}')


def test_one_id_from_rcpt_to_the_stored_line(session_factory: Open, logs: LogCapture) -> None:
    """The id of the 250 reply ends each RCPT line of its transaction; its stored line names the mailboxes."""
    s = session_factory()
    ehlo(s)
    transaction(s, rcpts=("<alice@office.example>", "<a.smith@office.example>"))
    s.send("Subject: hi\r\n\r\nHello\r\n.\r\n")
    msg_id = s.lines()[-1].rpartition(" ")[2]
    assert s.lines()[-1] == f"{replies.QUEUED} {msg_id}"
    decisions = logs.matching("mailguard smtp decision:")
    assert [line.rpartition(" ")[2] for line in decisions] == [f"id={msg_id}", f"id={msg_id}"]
    assert logs.matching("mailguard smtp stored:") == [
        f"mailguard smtp stored: client={OUTSIDER} id={msg_id} sender=joe@sender.example rcpts=2 size=22 "
        f"mailboxes=alice@office.example"]
    transaction(s)
    s.send("Subject: two\r\n\r\n.\r\n")
    second = s.lines()[-1].rpartition(" ")[2]
    assert second != msg_id and logs.matching("mailguard smtp decision:")[-1].endswith(f" id={second}")


def test_relay_allowed_by_network(session_factory: Open) -> None:
    """A client in relay.allow may relay; one on relay.never may not even so."""
    s = session_factory(client_ip=ALLOWED)
    ehlo(s)
    s.cmd("MAIL FROM:<joe@office.example>")
    assert s.cmd("RCPT TO:<friend@remote.example>")[0].startswith("250 ")
    s = session_factory(client_ip="192.168.10.66")
    ehlo(s)
    s.cmd("MAIL FROM:<joe@office.example>")
    assert s.cmd("RCPT TO:<friend@remote.example>") == [str(REPLIES.never_host)]


def test_internal_address_from_local_ip(session_factory: Open) -> None:
    """A connection to one of relay.internal_addresses may relay."""
    s = session_factory(local_ip="10.9.9.9")
    ehlo(s)
    s.cmd("MAIL FROM:<joe@office.example>")
    assert s.cmd("RCPT TO:<friend@remote.example>")[0].startswith("250 ")


def test_pop_before_smtp_from_the_shared_record(ctx: FakeContext) -> None:
    """An IP that just logged in over POP3 may relay; the permission ends with the window."""
    ctx.pop_before_smtp.record(OUTSIDER)
    s = Session(ctx)
    ehlo(s)
    s.cmd("MAIL FROM:<joe@office.example>")
    assert s.cmd("RCPT TO:<a@remote.example>")[0].startswith("250 ")
    for _ in range(3):                       # keep the session alive past the 600 s window
        ctx.clock.advance(201)
        s.cmd("NOOP")
    assert s.cmd("RCPT TO:<b@remote.example>") == [str(REPLIES.relay_denied)]


def test_relay_trick_refused_at_rcpt(session_factory: Open) -> None:
    """A relay trick at RCPT is 550 5.7.1, from an allowed client too."""
    s = session_factory(client_ip=ALLOWED)
    ehlo(s)
    s.cmd("MAIL FROM:<joe@office.example>")
    assert s.cmd("RCPT TO:<victim%remote.example@office.example>") == [str(replies.RELAY_TRICK)]
    assert s.cmd('RCPT TO:<"victim@remote.example"@office.example>') == [str(replies.RELAY_TRICK)]


def test_unknown_local_user(session_factory: Open) -> None:
    """Unknown recipient in an inbound domain: 550 5.1.1 at RCPT."""
    s = session_factory()
    ehlo(s)
    s.cmd("MAIL FROM:<>")
    assert s.cmd("RCPT TO:<nobody@office.example>") == [str(REPLIES.unknown_recipient)]


def test_directory_failure_at_rcpt_is_451(ctx: FakeContext) -> None:
    """A directory that cannot answer gives the configured 4xx, never 5xx."""
    ctx.directory.broken = True
    s = Session(ctx)
    ehlo(s)
    s.cmd("MAIL FROM:<joe@sender.example>")
    assert s.cmd("RCPT TO:<alice@office.example>") == [str(REPLIES.directory_failure)]


def test_rcpt_waits_for_the_directory_and_pipelined_commands_wait_too(ctx: FakeContext) -> None:
    """The directory answers later (a thread, a network backend): RCPT's reply, and the replies to
    everything pipelined behind it, go out only then and in order (RFC 2920)."""
    s = Session(ctx)
    ehlo(s)
    s.cmd("MAIL FROM:<joe@sender.example>")
    ctx.directory.hold = True
    s.send("RCPT TO:<alice@office.example>\r\nRCPT TO:<friend@remote.example>\r\nNOOP\r\n")
    assert s.new_lines() == []
    assert len(ctx.directory.held) == 1
    ctx.directory.held.pop().callback(Expansion(mailboxes=("alice@office.example",)))
    assert s.new_lines() == [str(replies.RECIPIENT_OK), str(ctx.cfg.replies.relay_denied),
                             str(replies.NOOP_OK)]


def test_directory_failure_after_a_wait_is_451(ctx: FakeContext) -> None:
    """A lookup that fails later still gives the configured 4xx, and the session goes on."""
    s = Session(ctx)
    ehlo(s)
    s.cmd("MAIL FROM:<joe@sender.example>")
    ctx.directory.hold = True
    s.send("RCPT TO:<alice@office.example>\r\nRSET\r\n")
    ctx.directory.held.pop().errback(DirectoryError("locked"))
    assert s.new_lines() == [str(ctx.cfg.replies.directory_failure), str(replies.RESET_OK)]


def test_list_member_that_is_no_address_is_logged_and_dropped(ctx: FakeContext, logs: LogCapture) -> None:
    """A list in the directory holding a member that does not parse: the other members get the
    mail, and the bad one is named in one mail-log line (not dropped silently)."""
    ctx.directory.entries["staff@office.example"] = Expansion(
        mailboxes=("alice@office.example",), others=("bob", "joe@compaq.example"))
    s = Session(ctx)
    ehlo(s)
    s.cmd("MAIL FROM:<joe@sender.example>")
    assert s.cmd("RCPT TO:<staff@office.example>") == [str(replies.RECIPIENT_OK)]
    assert s.cmd("DATA")[0].startswith("354 ")
    s.send("Subject: hi\r\n\r\nhello\r\n.\r\n")
    [call] = ctx.store.calls
    assert [d.mailboxes for d in call.decisions] == [("alice@office.example", "joe@compaq.example")]
    assert logs.matching("mailguard directory") == [
        "mailguard directory unusable-address: expanding=staff@office.example address=bob "
        "reason=address must be fully qualified (local@domain)"]


def test_mail_sequence_errors(session_factory: Open) -> None:
    """RCPT before MAIL, a second MAIL, DATA without MAIL or without recipients: 503 each."""
    s = session_factory()
    ehlo(s)
    assert s.cmd("RCPT TO:<alice@office.example>") == [str(replies.MAIL_FIRST)]
    assert s.cmd("DATA") == [str(replies.MAIL_FIRST)]
    s.cmd("MAIL FROM:<joe@sender.example>")
    assert s.cmd("MAIL FROM:<joe@sender.example>") == [str(replies.NESTED_MAIL)]
    s.cmd("RCPT TO:<friend@remote.example>")
    assert s.cmd("DATA") == [str(replies.NO_VALID_RCPT)]
    assert s.cmd("RSET")[0].startswith("250 ")
    assert s.cmd("RCPT TO:<alice@office.example>")[0].startswith("503 ")


def test_null_sender_to_local_user(session_factory: Open) -> None:
    """MAIL FROM:<> to a local user is accepted and stored with an empty sender."""
    s = session_factory()
    ehlo(s)
    transaction(s, sender="<>")
    s.send("Subject: bounce\r\n\r\nbody\r\n.\r\n")
    assert s.lines()[-1].startswith("250 2.0.0")
    assert s.host.store.calls[0].sender == ""


@pytest.mark.parametrize("arg, reply", [
    ("FROM:<joe@sender.example> SIZE=26214400", "250 "),
    ("FROM:<joe@sender.example> SIZE=26214401", "552 5.3.4"),
    ("FROM:<joe@sender.example> BODY=8BITMIME", "250 "),
    ("FROM:<joe@sender.example> BODY=BINARYMIME", "555 5.5.4"),
    ("FROM:<joe@sender.example> XFOO=1", "555 5.5.4"),
    ("FROM:<joe@sender.example> SIZE=abc", "555 5.5.4"),
    ("FROM:joe@sender.example SIZE=100", "250 "),
    ("FROM:<joe@sender.example", "501 5.1.7"),
    ("FROM:<a%b@sender.example>", "501 5.1.7"),
    ("TO:<joe@sender.example>", "501 5.1.7"),
])
def test_mail_parameters(session_factory: Open, arg: str, reply: str) -> None:
    """SIZE= over the limit is 552; unknown parameters 555; bad paths 501."""
    s = session_factory()
    ehlo(s)
    assert s.cmd(f"MAIL {arg}")[0].startswith(reply)


def test_rcpt_parameters_refused(session_factory: Open) -> None:
    """RCPT TO with an unsupported parameter (NOTIFY=) is 555."""
    s = session_factory()
    ehlo(s)
    s.cmd("MAIL FROM:<joe@sender.example>")
    assert s.cmd("RCPT TO:<alice@office.example> NOTIFY=NEVER") == [str(replies.BAD_PARAM)]


def test_max_recipients() -> None:
    """Past limits.max_recipients accepted recipients the answer is 452 4.5.3."""
    h = host(limits={"max_recipients": 3})
    s = Session(h, client_ip=ALLOWED)
    ehlo(s)
    s.cmd("MAIL FROM:<joe@office.example>")
    for i in range(3):
        assert s.cmd(f"RCPT TO:<r{i}@remote.example>")[0].startswith("250 ")
    assert s.cmd("RCPT TO:<r3@remote.example>") == [str(replies.TOO_MANY_RCPT)]
    assert s.cmd("DATA")[0].startswith("354 ")
    s.send("x\r\n.\r\n")
    assert len(h.store.calls[0].decisions) == 3


def test_noop_vrfy_help(session_factory: Open) -> None:
    """NOOP 250, VRFY 252 (or 501 without argument), HELP 214, EXPN 502, unknown 500."""
    s = session_factory()
    assert s.cmd("NOOP")[0].startswith("250 ")
    assert s.cmd("VRFY alice")[0].startswith("252 ")
    assert s.cmd("VRFY")[0].startswith("501 ")
    assert s.cmd("HELP")[0].startswith("214 ")
    assert s.cmd("EXPN staff")[0].startswith("502 ")
    assert s.cmd("FROB") == [str(replies.SYNTAX_ERROR)]


# -- DATA: storing, dot-unstuffing, sizes, bare CR/LF, smuggling --------------------------------


def test_message_stored_with_received_header(session_factory: Open) -> None:
    """The message reaches the store as sent (CRLF), with a Received: header naming client and HELO."""
    s = session_factory()
    ehlo(s)
    transaction(s)
    s.send("Subject: hi\r\n\r\nHello\r\n.\r\n")
    last = s.lines()[-1]
    assert last.startswith(str(replies.QUEUED) + " ")
    call = s.host.store.calls[0]
    assert call.message == b"Subject: hi\r\n\r\nHello\r\n"
    assert last.endswith(call.msg_id)
    assert call.sender == "joe@sender.example"
    assert [d.recipient for d in call.decisions] == ["alice@office.example"]
    received = call.received.decode()
    assert received.startswith("Received: from client.example ([203.0.113.9])")
    assert "by mx.office.example" in received and f"id {call.msg_id}" in received and "with ESMTP " in received
    assert received.endswith("\r\n")


def test_dot_unstuffing(session_factory: Open) -> None:
    """A leading dot is removed once (RFC 5321 4.5.2); a first line of '..' becomes '.'."""
    s = session_factory()
    ehlo(s)
    transaction(s)
    s.send("..\r\n..leading\r\n...\r\nmid.dle\r\n .\r\n.\r\n")
    assert s.host.store.calls[0].message == b".\r\n.leading\r\n..\r\nmid.dle\r\n .\r\n"


def test_mail_loop_is_refused(session_factory: Open) -> None:
    """A message carrying more than MAX_HOPS Received: headers is a loop: 554 5.4.6, not stored."""
    s = session_factory()
    ehlo(s)
    transaction(s)
    hops = "".join(f"Received: from hop{i}.example by x; date\r\n" for i in range(51))
    s.send(hops + "Subject: loop\r\n\r\nReceived: in the body does not count\r\n.\r\n")
    assert s.lines()[-1] == str(replies.TOO_MANY_HOPS)
    assert s.host.store.calls == []
    transaction(s)
    hops = "".join(f"received: from hop{i}.example by x; date\r\n" for i in range(50))
    s.send(hops + "Subject: far\r\n\r\n" + "Received: x\r\n" * 10 + ".\r\n")
    assert s.lines()[-1].startswith("250 ")
    assert len(s.host.store.calls) == 1


def test_thousand_line_message_with_dot_lines(session_factory: Open) -> None:
    """A 1000-line message with dot lines, sent in odd-sized chunks, is stored exactly."""
    lines = [f"line {i}" if i % 7 else "." * (i % 3 + 1) for i in range(1000)]
    original = "".join(f"{ln}\r\n" for ln in lines).encode()
    stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in original.split(b"\r\n")[:-1])
    s = session_factory()
    ehlo(s)
    transaction(s)
    wire = stuffed + b".\r\n"
    for i in range(0, len(wire), 997):
        s.send(wire[i:i + 997])
    assert s.lines()[-1].startswith("250 ")
    assert s.host.store.calls[0].message == original


def test_message_over_size_is_552() -> None:
    """A message larger than max_message_size is refused 552 5.3.4 and not stored; the session goes on."""
    h = host(limits={"max_message_size": 2048})
    s = Session(h)
    ehlo(s)
    transaction(s)
    s.send(("x" * 100 + "\r\n") * 40 + ".\r\n")
    assert s.lines()[-1] == str(replies.TOO_BIG)
    assert h.store.calls == []
    assert s.cmd("NOOP")[0].startswith("250 ")


@pytest.mark.parametrize("body", [
    "Subject: x\r\n\r\nbare\nlinefeed\r\n",
    "Subject: x\r\n\r\nbare\rcarriage return\r\n",
    "Subject: x\nX-Injected: yes\r\n\r\nbody\r\n",
    "Subject: x\r\n\r\nends with bare LF\n\r\n",
    "\n\r\n",
])
def test_bare_cr_or_lf_refused(session_factory: Open, body: str) -> None:
    """A bare CR or LF anywhere in DATA is 550 5.6.2 and nothing is stored."""
    s = session_factory()
    ehlo(s)
    transaction(s)
    s.send(body + ".\r\n")
    assert s.lines()[-1] == str(replies.BARE_LINEFEED)
    assert s.host.store.calls == []


@settings(max_examples=300)
@given(st.lists(st.sampled_from(["a", ".", "\r", "\n", "\r\n", "\r\n.", "..", "\r\r\n", "\n\r"]),
                max_size=30))
def test_line_ends_and_dots_as_rfc_5321_says(pieces: list[str]) -> None:
    """Any mix of CR, LF and dots: stored, unstuffed, exactly when every CR and LF is a CRLF;
    550 5.6.2 otherwise."""
    body = ("".join(pieces) + "\r\n").encode()
    assume((b"\r\n" + body + b".\r\n").find(b"\r\n.\r\n") == len(body))    # no early end of data
    s = Session(host())
    ehlo(s)
    transaction(s)
    s.send(body + b".\r\n")
    crlf = body.count(b"\r\n")
    if body.count(b"\r") == crlf == body.count(b"\n"):
        assert s.lines()[-1].startswith("250 ")
        assert s.host.store.calls[0].message == (b"\r\n" + body).replace(b"\r\n.", b"\r\n")[2:]
    else:
        assert s.lines()[-1] == str(replies.BARE_LINEFEED)
        assert s.host.store.calls == []


SMUGGLED = ("MAIL FROM:<ceo@office.example>\r\nRCPT TO:<alice@office.example>\r\nDATA\r\n"
            "Subject: smuggled\r\n\r\nwire money\r\n")


@pytest.mark.parametrize("separator", ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\r\n.\r", "\r\n\x00.\r\n",
                                       "\r\n.\x00\r\n"])
def test_smuggling_never_stores_a_second_message(session_factory: Open, separator: str) -> None:
    """A fake end-of-data followed by pipelined MAIL/RCPT/DATA never yields a second message."""
    s = session_factory()
    ehlo(s)
    transaction(s)
    s.send("Subject: first\r\n\r\nhello" + separator + SMUGGLED + ".\r\nQUIT\r\n")
    stored = s.host.store.calls
    assert len(stored) <= 1
    assert not any(b"Subject: smuggled" in c.message.split(b"\r\n\r\n")[0] for c in stored)
    after_data = s.lines()[s.lines().index("354 End data with <CR><LF>.<CR><LF>") + 1:]
    assert len(after_data) == 2 and after_data[1].startswith("221 "), after_data
    if "\x00" not in separator:
        assert after_data[0] == str(replies.BARE_LINEFEED) and stored == []


def test_data_line_over_limit_closes_and_later_commands_never_run(session_factory: Open) -> None:
    """A DATA line past the limit: 500 and the connection closed; what follows is never executed."""
    s = session_factory()
    ehlo(s)
    transaction(s)
    s.send("Subject: x\r\n\r\n" + "A" * (wire.MAX_DATA_LINE + 10) + "\r\n.\r\nMAIL FROM:<x@y.example>\r\nNOOP\r\n")
    assert s.closed
    after = s.lines()[s.lines().index("354 End data with <CR><LF>.<CR><LF>") + 1:]
    assert after == [str(replies.LINE_TOO_LONG)]
    assert s.host.store.calls == []


def test_data_line_over_limit_across_chunks(session_factory: Open) -> None:
    """The same when the long line arrives in many small writes."""
    s = session_factory()
    ehlo(s)
    transaction(s)
    s.send("ok line\r\n")
    for _ in range(wire.MAX_DATA_LINE // 4096 + 2):
        if s.closed:
            break
        s.send("B" * 4096)
    assert s.closed
    s.send("\r\n.\r\nNOOP\r\n")
    assert s.lines()[-1] == str(replies.LINE_TOO_LONG) and s.host.store.calls == []


def test_command_line_too_long_is_500_and_session_goes_on(session_factory: Open) -> None:
    """A complete command line over the limit is answered 500; the next command works."""
    s = session_factory()
    assert s.cmd("NOOP " + "x" * (wire.MAX_COMMAND + 10)) == [str(replies.LINE_TOO_LONG)]
    assert not s.closed
    assert s.cmd("NOOP")[0].startswith("250 ")


def test_unterminated_command_line_closes(session_factory: Open) -> None:
    """A command line with no end past the limit: 500, then the connection is closed."""
    s = session_factory()
    s.new_lines()
    s.send("MAIL FROM:<" + "a" * (wire.MAX_COMMAND + 100))
    assert s.new_lines() == [str(replies.LINE_TOO_LONG)]
    assert s.closed
    s.send(">\r\nNOOP\r\n")
    assert s.new_lines() == []


# -- pipelining and the store --------------------------------------------------------------------


def test_pipelined_replies_wait_for_a_slow_store(ctx: FakeContext) -> None:
    """'.' and QUIT in one write with a slow store: 250 comes before 221, and only after the store."""
    ctx.store.auto = False
    s = Session(ctx)
    ehlo(s)
    s.new_lines()
    s.send("MAIL FROM:<joe@sender.example>\r\nRCPT TO:<alice@office.example>\r\nDATA\r\n"
           "Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert [ln[:3] for ln in s.new_lines()] == ["250", "250", "354"]
    assert not s.closed and len(ctx.store.calls) == 1
    ctx.clock.advance(5)
    assert s.new_lines() == []
    ctx.store.calls[0].deferred.callback("ok")
    replies = s.new_lines()
    assert [ln[:3] for ln in replies] == ["250", "221"]
    assert s.closed


def test_two_pipelined_messages_each_answered_in_order(ctx: FakeContext) -> None:
    """Two whole transactions in one write: two stores, replies strictly in command order."""
    ctx.store.auto = False
    s = Session(ctx)
    ehlo(s)
    s.new_lines()
    one = "MAIL FROM:<a@sender.example>\r\nRCPT TO:<alice@office.example>\r\nDATA\r\nfirst\r\n.\r\n"
    s.send(one + one.replace("first", "second") + "QUIT\r\n")
    assert [ln[:3] for ln in s.new_lines()] == ["250", "250", "354"]
    ctx.store.calls[0].deferred.callback("ok")
    assert [ln[:3] for ln in s.new_lines()] == ["250", "250", "250", "354"]
    assert len(ctx.store.calls) == 2 and ctx.store.calls[1].message == b"second\r\n"
    ctx.store.calls[1].deferred.callback("ok")
    assert [ln[:3] for ln in s.new_lines()] == ["250", "221"]


def test_failing_store_is_451(ctx: FakeContext) -> None:
    """A store failure (disk full) is 451 4.3.0, never 550; the session continues."""
    ctx.store.fail = True
    s = Session(ctx)
    ehlo(s)
    transaction(s)
    s.send("x\r\n.\r\n")
    assert s.lines()[-1] == str(replies.STORE_FAILED)
    assert s.cmd("NOOP")[0].startswith("250 ")


def test_store_that_raises_at_once_is_451(ctx: FakeContext) -> None:
    """A store raising before it returns a Deferred (an address it cannot make a path of) is
    still answered 451, and the session goes on, never a dropped connection (issue 17 item 10)."""
    def unusable(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("unsafe mailbox address: 'a/b@office.example'")
    ctx.store.store = unusable  # type: ignore[method-assign]
    s = Session(ctx)
    ehlo(s)
    transaction(s)
    s.send("x\r\n.\r\n")
    assert s.lines()[-1] == str(replies.STORE_FAILED)
    assert not s.closed
    assert s.cmd("NOOP")[0].startswith("250 ")


# -- timeouts and connection limits ----------------------------------------------------------------


def test_idle_timeout(ctx: FakeContext) -> None:
    """No input for idle_timeout seconds: 421 4.4.2 then close; input resets the timer."""
    s = Session(ctx)
    ctx.clock.advance(299)
    s.cmd("NOOP")
    ctx.clock.advance(299)
    assert not s.closed
    ctx.clock.advance(1)
    assert s.lines()[-1] == str(replies.TIMEOUT) and s.closed


def test_session_deadline(ctx: FakeContext) -> None:
    """A busy but endless session is cut at session_timeout even though it is never idle."""
    s = Session(ctx)
    for _ in range(8):
        ctx.clock.advance(200)
        assert s.cmd("NOOP")[0].startswith("250 ")
    ctx.clock.advance(200)
    assert s.lines()[-1] == str(replies.TIMEOUT) and s.closed


def test_timers_cancelled_on_close(ctx: FakeContext) -> None:
    """After the connection is lost no timer is left on the clock."""
    s = Session(ctx)
    s.cmd("QUIT")
    s.lose()
    assert ctx.clock.getDelayedCalls() == []


def test_connection_limit_per_ip() -> None:
    """Past max_connections_per_ip the newcomer gets 421 and is closed; other IPs are still served."""
    h = host(limits={"max_connections_per_ip": 2, "max_connections": 3})
    first, _second = Session(h), Session(h)
    third = Session(h)
    assert third.lines() == [str(replies.TOO_MANY_FROM_IP)]
    assert third.closed and not first.closed
    other = Session(h, client_ip="198.51.100.1")
    assert other.lines()[0].startswith("220 ")
    fourth = Session(h, client_ip="198.51.100.2")
    assert fourth.lines() == [str(replies.TOO_MANY_CONNECTIONS)]
    third.lose()
    fourth.lose()
    first.lose()
    assert Session(h).lines()[0].startswith("220 ")


# -- STARTTLS --------------------------------------------------------------------------------------


def test_starttls_works_over_the_fake(ctx: FakeContext) -> None:
    """STARTTLS: 220, then a real TLS handshake with the server's certificate (verified by the
    client for mx.office.example); the session goes on encrypted, AUTH is offered, and a
    message sent inside TLS is stored with ESMTPS in its Received: header."""
    s = Session(ctx)
    assert ehlo(s)[-1] == "250 STARTTLS"
    assert s.cmd("STARTTLS") == [str(replies.TLS_READY)]
    assert s.transport.tls_started == [ctx.tls.options()]
    lines = s.cmd("EHLO client.example")
    assert s.handshake_done
    assert lines[-1] == "250 AUTH PLAIN LOGIN" and not any("STARTTLS" in ln for ln in lines)
    assert b"EHLO" not in s.transport.cipher.value() + s.client_wire.value()
    transaction(s)
    s.send("Subject: secret\r\n\r\nsealed\r\n.\r\n")
    assert s.new_lines()[-1].startswith(str(replies.QUEUED) + " ")
    [call] = ctx.store.calls
    assert call.message == b"Subject: secret\r\n\r\nsealed\r\n"
    assert b"with ESMTPS id" in call.received
    assert s.cmd("STARTTLS") == [str(replies.TLS_ALREADY)]


def test_starttls_discards_pipelined_cleartext_and_resets_state(ctx: FakeContext) -> None:
    """Commands pipelined in cleartext behind STARTTLS are never executed (RFC 3207 section 4.2,
    the command-injection class); HELO and the open transaction are forgotten."""
    s = Session(ctx)
    ehlo(s)
    assert s.cmd("MAIL FROM:<joe@sender.example>") == [str(replies.SENDER_OK)]
    s.send("STARTTLS\r\nRSET\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<alice@office.example>\r\n")
    assert s.new_lines() == [str(replies.TLS_READY)]
    assert s.cmd("RCPT TO:<alice@office.example>") == [str(replies.MAIL_FIRST)]
    assert s.handshake_done
    assert s.cmd("MAIL FROM:<joe@sender.example>") == [str(replies.HELO_FIRST)]
    lines = ehlo(s)
    assert not any("STARTTLS" in ln for ln in lines) and "AUTH PLAIN LOGIN" in lines[-1]
    assert s.cmd("STARTTLS") == [str(replies.TLS_ALREADY)]


def test_starttls_without_tls_configured(ctx: FakeContext) -> None:
    """STARTTLS when no TLS is available is 454, the session continues in clear."""
    ctx.tls = None
    s = Session(ctx)
    ehlo(s)
    assert s.cmd("STARTTLS") == [str(replies.TLS_UNAVAILABLE)]
    assert s.cmd("NOOP") == [str(replies.NOOP_OK)]


# -- AUTH ------------------------------------------------------------------------------------------


@pytest.fixture
def tls_session(ctx: FakeContext) -> Session:
    """An encrypted session after EHLO."""
    s = Session(ctx, encrypted=True)
    ehlo(s)
    return s


def test_auth_plain_initial_response_then_relay(tls_session: Session, logs: LogCapture) -> None:
    """AUTH PLAIN with the right password: 235; then relaying is allowed by rule authenticated."""
    s = tls_session
    assert s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}") == [str(replies.AUTH_OK)]
    s.cmd("MAIL FROM:<alice@office.example>")
    assert s.cmd("RCPT TO:<friend@remote.example>")[0].startswith("250 ")
    assert any("rule=authenticated" in ln for ln in logs.matching("smtp decision"))
    assert not any("secret" in ln or plain("alice@office.example", "secret") in ln for ln in logs.lines())


def test_auth_plain_continuation(tls_session: Session) -> None:
    """AUTH PLAIN without an initial response: 334, then the credentials."""
    s = tls_session
    assert s.cmd("AUTH PLAIN") == ["334 "]
    assert s.cmd(plain("alice@office.example", "secret"))[0].startswith("235 ")


@pytest.mark.parametrize("authzid", ["", "alice@office.example", "ALICE@OFFICE.EXAMPLE", "Alice@Office.example"])
def test_auth_plain_authzid_empty_or_the_login_in_any_case(tls_session: Session, authzid: str) -> None:
    """RFC 4616: the authorization identity may be empty or the login itself, compared
    without regard to case (the rule POP3 AUTH follows too: one decoder for both)."""
    assert tls_session.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret', authzid)}") == \
        [str(replies.AUTH_OK)]


def test_auth_plain_proxy_login_is_refused(tls_session: Session, logs: LogCapture) -> None:
    """An authorization identity other than the login (acting for someone else) is a failed
    login, logged for fail2ban, and the password is never checked."""
    s = tls_session
    assert s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret', 'bob@office.example')}") == \
        [str(replies.AUTH_FAILED)]
    assert s.host.authenticator.calls == []
    assert logs.matching("mailguard auth failure") == [
        "mailguard auth failure: service=smtp client=203.0.113.9 user=alice@office.example"]


def test_auth_wrong_password(tls_session: Session) -> None:
    """Wrong password: 535 5.7.8, and relaying stays refused."""
    s = tls_session
    assert s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'guess')}") == \
        [str(replies.AUTH_FAILED)]
    s.cmd("MAIL FROM:<alice@office.example>")
    assert s.cmd("RCPT TO:<friend@remote.example>") == [str(REPLIES.relay_denied)]


def test_auth_login_flow(tls_session: Session) -> None:
    """AUTH LOGIN: Username: and Password: prompts, then 235."""
    s = tls_session
    assert s.cmd("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    assert s.cmd(b64("alice@office.example")) == ["334 UGFzc3dvcmQ6"]
    assert s.cmd(b64("secret"))[0].startswith("235 ")
    assert s.host.authenticator.calls == [("alice@office.example", "secret", OUTSIDER, "smtp")]


def test_auth_login_with_initial_username(tls_session: Session) -> None:
    """AUTH LOGIN <user> goes straight to the password prompt."""
    s = tls_session
    assert s.cmd(f"AUTH LOGIN {b64('alice@office.example')}") == ["334 UGFzc3dvcmQ6"]
    assert s.cmd(b64("secret"))[0].startswith("235 ")


@pytest.mark.parametrize("dialogue", [
    ["AUTH PLAIN", "*"],
    ["AUTH LOGIN", "*"],
    ["AUTH LOGIN", b64("alice@office.example"), "*"],
])
def test_auth_cancel_is_501(tls_session: Session, dialogue: list[str]) -> None:
    """'*' cancels the exchange: 501, and the session goes on."""
    s = tls_session
    for line in dialogue[:-1]:
        assert s.cmd(line)[0].startswith("334")
    assert s.cmd(dialogue[-1]) == [str(replies.AUTH_CANCELLED)]
    assert s.cmd("NOOP")[0].startswith("250 ") and not s.closed


@pytest.mark.parametrize("dialogue", [
    ["AUTH PLAIN !!!notbase64"],
    ["AUTH PLAIN " + b64("no-nul-separators")],
    ["AUTH PLAIN", "%%%"],
    ["AUTH LOGIN", "???"],
    ["AUTH LOGIN", b64("alice@office.example"), "@@@"],
    ["AUTH PLAIN " + b64("\0\0secret")],
])
def test_auth_malformed_is_501(tls_session: Session, dialogue: list[str]) -> None:
    """Malformed base64 or SASL data: 501, never a dropped connection, no credentials checked."""
    s = tls_session
    for line in dialogue[:-1]:
        s.cmd(line)
    assert s.cmd(dialogue[-1])[0].startswith("501 ")
    assert not s.closed and s.host.authenticator.calls == []


def test_bare_auth_is_501_not_a_drop(tls_session: Session) -> None:
    """AUTH with no mechanism gets a 501 reply and the connection stays."""
    assert tls_session.cmd("AUTH")[0].startswith("501 ")
    assert not tls_session.closed


def test_overlong_auth_line_ends_the_exchange(tls_session: Session) -> None:
    """An AUTH response line past the limit is answered 500 and ends the exchange: the next
    line is a command again, not taken as the username."""
    s = tls_session
    assert s.cmd("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    assert s.cmd("A" * (wire.MAX_AUTH_LINE + 10)) == [str(replies.LINE_TOO_LONG)]
    assert s.cmd("NOOP")[0].startswith("250 ")
    assert s.host.authenticator.calls == []


def test_auth_unknown_mechanism(tls_session: Session) -> None:
    """An unsupported mechanism is 504."""
    assert tls_session.cmd("AUTH CRAM-MD5")[0].startswith("504 ")


def test_auth_in_transaction_is_503(tls_session: Session) -> None:
    """AUTH after MAIL is 503 (RFC 4954 section 4)."""
    s = tls_session
    s.cmd("MAIL FROM:<joe@sender.example>")
    assert s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}") == \
        [str(replies.AUTH_IN_TRANSACTION)]


def test_second_auth_is_503(tls_session: Session) -> None:
    """AUTH after a successful AUTH is 503."""
    s = tls_session
    s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}")
    assert s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}")[0].startswith("503 ")


def test_auth_on_cleartext_is_538(session_factory: Open) -> None:
    """With auth_requires_tls, AUTH on a cleartext channel is 538 5.7.11 and no check is made."""
    s = session_factory()
    ehlo(s)
    assert s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}") == [str(replies.AUTH_NEEDS_TLS)]
    assert s.host.authenticator.calls == []


def test_auth_throttled_is_454(tls_session: Session) -> None:
    """An authenticator that says Throttled gives 454 4.7.0."""
    tls_session.host.authenticator.outcome = Throttled("198.51.100.66")
    assert tls_session.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}") == \
        [str(replies.AUTH_THROTTLED)]


def test_throttled_auth_flood_is_closed(tls_session: Session) -> None:
    """100,000 pipelined AUTH PLAIN against a throttled client: the third 454 ends the session."""
    s = tls_session
    s.host.authenticator.outcome = Throttled("198.51.100.66")
    s.new_lines()
    s.send(f"AUTH PLAIN {plain('alice@office.example', 'secret')}\r\n" * 1000)
    assert s.new_lines() == [str(replies.AUTH_THROTTLED)] * 3 + [str(replies.AUTH_THROTTLED_CLOSE)]
    assert s.closed
    assert len(s.host.authenticator.calls) == 3


def test_auth_initial_response_of_12288_octets(tls_session: Session) -> None:
    """RFC 4954 section 4: an initial response may be 12,288 octets; it is decoded, not refused as too long."""
    s = tls_session
    s.host.authenticator.outcome = None
    long_password = "p" * 9000                      # base64 of the PLAIN message: ~12,040 octets
    reply = s.cmd(f"AUTH PLAIN {plain('alice@office.example', long_password)}")
    assert reply == [str(replies.AUTH_FAILED)]
    assert s.host.authenticator.calls[-1][1] == long_password


def test_auth_waits_and_holds_pipelined_commands(tls_session: Session) -> None:
    """While the password check runs, pipelined commands wait; replies stay in order."""
    s = tls_session
    s.host.authenticator.outcome = "pending"
    s.new_lines()
    s.send(f"AUTH PLAIN {plain('alice@office.example', 'secret')}\r\nNOOP\r\n")
    assert s.new_lines() == []
    s.host.authenticator.pending[0].callback("alice@office.example")
    assert [ln[:3] for ln in s.new_lines()] == ["235", "250"]


def test_auth_relay_permission_lasts_for_the_connection_only(ctx: FakeContext) -> None:
    """A new connection from the same client is not authenticated."""
    s = Session(ctx, encrypted=True)
    ehlo(s)
    s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}")
    s.cmd("QUIT")
    s.lose()
    again = Session(ctx, encrypted=True)
    ehlo(again)
    again.cmd("MAIL FROM:<joe@sender.example>")
    assert again.cmd("RCPT TO:<friend@remote.example>") == [str(REPLIES.relay_denied)]


def test_received_header_says_authenticated(tls_session: Session) -> None:
    """An authenticated, encrypted session's Received: says ESMTPSA and 'authenticated', never the password."""
    s = tls_session
    s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}")
    transaction(s, rcpts=("<friend@remote.example>",), sender="<alice@office.example>")
    s.send("x\r\n.\r\n")
    received = s.host.store.calls[0].received.decode()
    assert "with ESMTPSA" in received and "authenticated" in received and "secret" not in received


# -- submission (RFC 6409) ----------------------------------------------------------------------------


@pytest.fixture
def submission(ctx: FakeContext) -> Session:
    """An encrypted submission session after EHLO."""
    ctx.directory.owned["alice@office.example"] = {"alice@office.example", "a.smith@office.example"}
    s = Session(ctx, kind="submission", encrypted=True)
    ehlo(s)
    return s


def test_submission_requires_auth_before_mail(submission: Session) -> None:
    """MAIL before AUTH on submission: 530 5.7.0."""
    assert submission.cmd("MAIL FROM:<alice@office.example>") == [str(replies.AUTH_REQUIRED)]


def test_submission_enforces_sender(submission: Session) -> None:
    """After AUTH, MAIL FROM must be one of the mailbox's addresses (aliases count), else 553 5.7.1."""
    s = submission
    s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}")
    assert s.cmd("MAIL FROM:<ceo@office.example>") == [str(replies.SENDER_NOT_OWNED)]
    assert s.cmd("MAIL FROM:<A.Smith@office.example>")[0].startswith("250 ")
    assert s.cmd("RCPT TO:<friend@remote.example>")[0].startswith("250 ")


def test_submission_without_enforce_sender() -> None:
    """enforce_sender = false: any sender after AUTH."""
    h = host(submission={"enforce_sender": False})
    s = Session(h, kind="submission", encrypted=True)
    ehlo(s)
    s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}")
    assert s.cmd("MAIL FROM:<ceo@office.example>")[0].startswith("250 ")


def test_enforce_sender_directory_failure_is_4xx(submission: Session) -> None:
    """If the directory cannot say which addresses the user owns, MAIL gets the 4xx directory reply."""
    s = submission
    s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}")
    s.host.directory.broken = True
    assert s.cmd("MAIL FROM:<alice@office.example>") == [str(REPLIES.directory_failure)]


def test_smtp_port_enforces_sender_for_authenticated_clients_too(tls_session: Session) -> None:
    """On the MX port an authenticated client is held to its own addresses as well."""
    s = tls_session
    s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}")
    assert s.cmd("MAIL FROM:<ceo@office.example>") == [str(replies.SENDER_NOT_OWNED)]



# -- floods, error limits, byte-at-a-time input ----------------------------------------------------


def test_command_flood_without_mail_is_cut(session_factory: Open) -> None:
    """Hundreds of NOOPs with no mail end with 421 and a closed connection."""
    s = session_factory()
    for _ in range(smtp.MAX_JUNK + 5):
        if s.closed:
            break
        s.send("NOOP\r\n")
    assert s.closed and s.lines()[-1].startswith("421 ")


def test_error_flood_is_cut(session_factory: Open) -> None:
    """More than MAX_ERRORS error replies end the session with 421."""
    s = session_factory()
    s.send("FROB\r\n" * (wire.MAX_ERRORS + 5))
    assert s.closed and s.lines()[-1].startswith("421 ")
    assert s.codes().count("500") == wire.MAX_ERRORS + 1


def test_many_messages_with_rset_on_one_connection(ctx: FakeContext) -> None:
    """A client that sends RSET before every message (Postfix's connection cache does) is served
    for as long as it delivers mail: RSET before a transaction is not a flood."""
    s = Session(ctx)
    ehlo(s)
    for i in range(smtp.MAX_JUNK + 20):
        s.send(f"RSET\r\nMAIL FROM:<joe@sender.example>\r\nRCPT TO:<alice@office.example>\r\nDATA\r\n"
               f"Subject: {i}\r\n\r\nbody\r\n.\r\n")
    assert not s.closed, s.lines()[-3:]
    assert len(ctx.store.calls) == smtp.MAX_JUNK + 20


def test_message_sent_one_byte_at_a_time(session_factory: Open) -> None:
    """End-of-data split over single-byte writes is still found; the message is exact."""
    s = session_factory()
    ehlo(s)
    transaction(s)
    for byte in b"Subject: x\r\n\r\n.dot\r\nend\r\n.\r\nNOOP\r\n":
        s.send(bytes([byte]))
    assert s.host.store.calls[0].message == b"Subject: x\r\n\r\ndot\r\nend\r\n"
    assert [ln[:3] for ln in s.lines()[-2:]] == ["250", "250"]


# -- malformed input (hypothesis) ---------------------------------------------------------------------

VERBS = ["HELO", "EHLO", "MAIL FROM:", "RCPT TO:", "RSET", "NOOP", "VRFY", "HELP", "AUTH", "STARTTLS", "EXPN",
         "BDAT", "ETRN", "mail from:", "rcpt to:", "ehlo", "FROB", ""]
ARGS = ["", "client.example", "<joe@sender.example>", "<>", "<alice@office.example>", "<friend@remote.example>",
        "friend@remote.example", "<victim%remote.example@office.example>", "<@office.example:v@remote.example>",
        "<v@[192.0.2.1]>", "PLAIN", "LOGIN", "PLAIN " + plain("alice@office.example", "secret"), "<postmaster>",
        "<joe@sender.example> SIZE=99999999999", "<a@b.example> BODY=8BITMIME", "<\"x@y\"@office.example>"]
noise = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
command_lines = st.one_of(
    st.builds(lambda v, a: f"{v} {a}".strip().encode(), st.sampled_from(VERBS), st.sampled_from(ARGS)),
    st.builds(lambda v, b: v.encode() + b" " + b, st.sampled_from(VERBS), noise),
    noise,
    st.builds(lambda v, n: f"{v} ".encode() + b"x" * n, st.sampled_from(VERBS), st.integers(500, 3000)),
    st.just("\u00e9\u00e8 8-bit \x00 nul".encode()),
)


@settings(max_examples=150)
@given(st.lists(command_lines, max_size=25), st.integers(1, 64))
def test_random_command_sequences(lines: list[bytes], chunk: int) -> None:
    """Random commands, bytes, 8-bit, NUL and over-long lines from an outsider, in random chunking:
    every line gets exactly one well-formed reply, in order, until the server closes (or STARTTLS
    discards what followed it) — and it closes only after a reply; no exception escapes; no
    remote recipient is ever accepted."""
    h = host()
    with capturedLogs() as events:
        s = Session(h)
        wire = b"".join(line + b"\r\n" for line in lines)
        for i in range(0, len(wire), chunk):
            s.send(wire[i:i + chunk])
    out = s.lines()[1:]
    for line in out:
        assert line[:3].isdigit() and line[3:4] in (" ", "-"), line
    finals = [ln for ln in out if ln[3:4] == " "]
    if s.closed:
        assert finals and finals[-1][:3] in ("221", "421", "500"), finals[-3:]
        assert len(finals) <= len(lines)
    elif str(replies.TLS_READY) in finals:
        # What was pipelined behind STARTTLS in cleartext is discarded, unanswered (RFC 3207).
        assert len(finals) <= len(lines), (lines, finals)
    else:
        assert len(finals) == len(lines), (lines, finals)
    for event in events:
        text = formatEvent(event) or ""
        remote = "remote.example" in text or "[192.0.2.1]" in text
        if "smtp decision" in text and remote:
            assert 'reply="250' not in text, text
    assert h.store.calls == []


def test_client_that_does_not_read_stops_the_session() -> None:
    """While the transport's write buffer is full (pauseProducing) no pipelined command is
    answered, and past MAX_PENDING_INPUT reading stops; once the client reads, all are answered."""
    s = Session(host())
    s.cmd("EHLO client.example")
    s.proto.pauseProducing()                    # what the transport does when its buffer is full
    before = len(s.lines())
    s.send(b"NOOP\r\n" * 20)
    assert len(s.lines()) == before
    s.send(b"RSET\r\n" * (wire.MAX_PENDING_INPUT // 6 + 1))
    assert s.transport.producerState == "paused"
    s.proto.resumeProducing()
    out = s.lines()[before:]
    assert out[:20] == [str(replies.NOOP_OK)] * 20
    assert s.transport.producerState == "producing" or s.closed


def test_deleted_user_cannot_start_another_transaction(tls_session: Session, logs: LogCapture) -> None:
    """A mailbox deleted while its session is open: the next MAIL FROM is 530 and relaying stops
    (the login is checked again at every MAIL, issue 17 item 9)."""
    s = tls_session
    assert s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}") == [str(replies.AUTH_OK)]
    s.cmd("MAIL FROM:<alice@office.example>")
    assert s.cmd("RCPT TO:<friend@remote.example>")[0].startswith("250 ")
    s.cmd("RSET")
    del s.host.directory.entries["alice@office.example"]
    assert s.cmd("MAIL FROM:<alice@office.example>") == [str(replies.AUTH_REQUIRED)]
    assert s.cmd("MAIL FROM:<someone@outside.example>")[0].startswith("250 ")
    assert s.cmd("RCPT TO:<friend@remote.example>")[0].startswith("550 5.7.1")
    assert logs.matching("mailguard smtp login-revoked: client=")


def test_directory_failure_at_mail_recheck_is_4xx(tls_session: Session) -> None:
    """The re-check at MAIL cannot reach the directory: the configured 4xx, never a pass."""
    s = tls_session
    assert s.cmd(f"AUTH PLAIN {plain('alice@office.example', 'secret')}") == [str(replies.AUTH_OK)]
    s.host.directory.broken = True
    assert s.cmd("MAIL FROM:<alice@office.example>") == [str(s.host.cfg.replies.directory_failure)]


def test_big_data_waits_on_disk_not_in_memory(ctx: FakeContext, tmp_path: Any) -> None:
    """An unfinished DATA past 256 KiB is held in a file under data_dir/spool, keeping at most a
    few octets in memory; the stored message is whole, dots unstuffed (issue 17 item 2)."""
    s = Session(ctx)
    s.proto.spool_dir = tmp_path / "spool"
    ehlo(s)
    transaction(s)
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + b"..dot\r\n" + line * 1000
    s.send(body[:700_000])
    assert s.proto._body is not None and len(s.proto._body) <= 4
    assert s.proto._spooled > 600_000
    s.send(body[700_000:] + b".\r\n")
    assert s.lines()[-1].startswith("250 ")
    assert ctx.store.calls[-1].message == body.replace(b"\r\n..", b"\r\n.")
    assert list((tmp_path / "spool").iterdir()) == []          # the file is gone with the message


@pytest.mark.parametrize("fail_at", [1, 2])
def test_full_disk_while_spooling_keeps_the_message_in_memory(ctx: FakeContext, tmp_path: Any,
                                                             monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    """The spool disk refusing a write (first or later) loses nothing and drops nothing: the
    message goes on in memory and reaches the store whole."""
    import tempfile

    class Refusing:
        def __init__(self) -> None:
            self.calls = 0
            self.data = bytearray()
            self.closed = False

        def write(self, data: Any) -> int:
            self.calls += 1
            if self.calls >= fail_at:
                self.data += bytes(data)[:100]          # a short write, then the error
                raise OSError(28, "No space left on device")
            self.data += bytes(data)
            return len(data)

        def seek(self, pos: int) -> None:
            self.pos = pos

        def read(self, n: int) -> bytes:
            return bytes(self.data[:n])

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: Refusing())
    s = Session(ctx)
    s.proto.spool_dir = tmp_path / "spool"
    ehlo(s)
    transaction(s)
    line = b"z" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 1000
    for i in range(0, len(body), 300_000):
        s.send(body[i:i + 300_000])
    s.send(b".\r\n")
    assert s.lines()[-1].startswith("250 ")
    assert ctx.store.calls[-1].message == body


def test_trusted_clients_bare_lf_is_normalised(session_factory: Open) -> None:
    """A scan-to-email printer in ``allow`` sends bare LFs: stored with CRLF, answered 250."""
    s = session_factory(client_ip=ALLOWED)
    ehlo(s)
    transaction(s)
    s.send("Subject: scan\nX-Printer: yes\n\nscanned page\r\n.\r\n")
    assert s.lines()[-1].startswith("250 ")
    (call,) = s.host.store.calls
    assert call.message.endswith(b"Subject: scan\r\nX-Printer: yes\r\n\r\nscanned page\r\n")


def test_trusted_clients_bare_cr_still_refused(session_factory: Open) -> None:
    """Only bare LF is normalised: a bare CR from a trusted client is still 550 5.6.2."""
    s = session_factory(client_ip=ALLOWED)
    ehlo(s)
    transaction(s)
    s.send("Subject: x\r\n\r\nbare\rcarriage return\r\n.\r\n")
    assert s.lines()[-1] == str(replies.BARE_LINEFEED)
    assert s.host.store.calls == []


def test_bare_lf_normalisation_can_be_turned_off(office_cfg: Any) -> None:
    """normalize_bare_newlines = false: trusted clients are refused like everyone else."""
    import dataclasses

    from conftest import FakeContext as Ctx
    cfg = dataclasses.replace(office_cfg, submission=dataclasses.replace(office_cfg.submission,
                                                                         normalize_bare_newlines=False))
    host = Ctx(cfg)
    host.directory.add_mailbox("alice@office.example")
    s = Session(host, client_ip=ALLOWED)
    ehlo(s)
    transaction(s)
    s.send("Subject: scan\n\npage\r\n.\r\n")
    assert s.lines()[-1] == str(replies.BARE_LINEFEED)
