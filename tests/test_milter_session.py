"""The milter client over a StringTransport and a task.Clock: every action, the optimisations,
timeouts and garbage, and the chain's default action."""

from __future__ import annotations

import struct
from typing import Any, Callable

import pytest
from twisted.internet import defer, error, task
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from mailguard.core.replies import Reply
from mailguard.milter import codec
from mailguard.milter.chain import MilterChain
from mailguard.milter.client import Facts, MilterConnection, MilterGone, MilterTimeout, Verdict, converse

MESSAGE = (b"Received: from client.example ([192.0.2.9])\r\n\tby mx.example (mailguard) with ESMTP id X1\r\n"
           b"Subject: hello\r\nX-Secret: s\r\n\r\nline one\r\n.dot line\r\n")

Reply_ = list[bytes]
Script = Callable[[bytes, bytes], Reply_]


def facts(recipients: list[str] | None = None) -> Facts:
    return Facts(hostname="mx.example", daemon_name="smtp", client_addr="192.0.2.9", client_port=40000,
                 client_name="unknown", local_addr="192.0.2.1", local_port=25, helo="client.example",
                 sender="joe@sender.example", recipients=recipients or ["alice@office.example"],
                 queue_id="X1", auth_authen="")


def continue_all(command: bytes, data: bytes) -> Reply_:
    return [codec.packet(codec.CONTINUE)]


class FakeMilter:
    """Plays a milter: reads the client's packets off a StringTransport, answers by a script."""

    def __init__(self, script: Script = continue_all, actions: int = codec.ALL_ACTIONS, protocol: int = 0,
                 symlists: bytes = b"", clock: task.Clock | None = None, timeout: float = 30.0) -> None:
        self.script = script
        self.neg = struct.pack("!III", 6, actions, protocol) + symlists
        self.protocol = protocol
        self.clock = clock or task.Clock()
        self.conn = MilterConnection(self.clock, timeout)
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)
        self.reader = codec.Reader()
        self.sent: list[tuple[bytes, bytes]] = []      # every packet the client sent
        self.silent = False

    def run(self, message: bytes = MESSAGE, f: Facts | None = None) -> defer.Deferred[Verdict]:
        d = defer.ensureDeferred(converse(self.conn, f or facts(), message))
        self.pump()
        return d

    def pump(self) -> None:
        while not self.silent:
            data = self.transport.value()
            self.transport.clear()
            if not data:
                return
            answer = b""
            for command, payload in self.reader.feed(data):
                self.sent.append((command, payload))
                answer += b"".join(self.answer(command, payload))
            if answer:
                self.conn.dataReceived(answer)

    def answer(self, command: bytes, payload: bytes) -> Reply_:
        if command == codec.OPTNEG:
            return [codec.packet(codec.OPTNEG, self.neg)]
        if command in (codec.MACRO, codec.QUIT, codec.ABORT):
            return []
        step = codec.STEPS.get(command)
        if step is not None and self.protocol & step[1]:
            return []
        return self.script(command, payload)

    def commands(self) -> bytes:
        return b"".join(c for c, _ in self.sent if c != codec.MACRO)


def result(d: defer.Deferred[Verdict]) -> Verdict:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the exchange did not finish"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    v: Verdict = out[0]
    return v


def at_eom(*edits: bytes, final: bytes = codec.packet(codec.CONTINUE)) -> Script:
    def script(command: bytes, data: bytes) -> Reply_:
        if command == codec.BODYEOB:
            return [*edits, final]
        return [codec.packet(codec.CONTINUE)]
    return script


def z(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


def test_postfix_order_and_macros() -> None:
    """OPTNEG, CONNECT, HELO, MAIL, RCPT, DATA, each header, EOH, body, EOM, QUIT; macros first."""
    m = FakeMilter()
    v = result(m.run(f=facts(["a@office.example", "b@remote.example"])))
    assert v.action == "continue" and v.message == MESSAGE
    assert m.commands() == b"OCHMRRTLLLNBEQ"
    macros = {p[:1]: p[1:].split(b"\0") for c, p in m.sent if c == codec.MACRO}
    assert b"{client_addr}" in macros[b"C"] and b"192.0.2.9" in macros[b"C"]
    assert macros[b"M"][:2] == [b"i", b"X1"] and b"{mail_addr}" in macros[b"M"]
    assert b"{rcpt_addr}" in macros[b"R"]
    headers = [p for c, p in m.sent if c == codec.HEADER]
    assert headers[0] == b"Received\0from client.example ([192.0.2.9])\n\tby mx.example (mailguard) with ESMTP id X1\0"
    assert headers[1] == b"Subject\0hello\0"
    assert [p for c, p in m.sent if c == codec.BODY] == [b"line one\r\n.dot line\r\n"]
    assert m.transport.disconnecting


def test_symlist_limits_macros() -> None:
    """A milter that asked for {client_addr} at connect gets only that one."""
    m = FakeMilter(symlists=struct.pack("!I", codec.M_CONNECT) + b"{client_addr}\0")
    result(m.run())
    connect_macros = [p for c, p in m.sent if c == codec.MACRO and p[:1] == b"C"]
    assert connect_macros == [b"C{client_addr}\x00192.0.2.9\0"]


@pytest.mark.parametrize("final,action,reply", [
    (codec.packet(codec.REJECT), "reject", Reply(550, "5.7.1", "Command rejected")),
    (codec.packet(codec.TEMPFAIL), "tempfail", Reply(451, "4.7.1", "Service unavailable - try again later")),
    (codec.packet(codec.REPLYCODE, b"554 5.7.1 Gtube pattern\0"), "reject", Reply(554, "5.7.1", "Gtube pattern")),
    (codec.packet(codec.REPLYCODE, b"452 4.3.1 Busy\0"), "tempfail", Reply(452, "4.3.1", "Busy")),
    (codec.packet(codec.CONN_FAIL), "tempfail", Reply(451, "4.7.1", "Service unavailable - try again later")),
    (codec.packet(codec.SHUTDOWN), "tempfail", Reply(451, "4.7.1", "Service unavailable - try again later")),
    (codec.packet(codec.DISCARD), "discard", None),
    (codec.packet(codec.ACCEPT), "accept", None),
])
def test_final_replies_at_end_of_message(final: bytes, action: str, reply: Reply | None) -> None:
    """Reject, tempfail (plain, with the milter's own reply, or a connection failure or shutdown
    the milter announces), discard, accept."""
    v = result(FakeMilter(at_eom(final=final)).run())
    assert (v.action, v.reply) == (action, reply)


def test_refusal_before_data_stops_the_exchange() -> None:
    """A reject at MAIL ends the exchange there: no DATA, no body, QUIT."""
    def script(command: bytes, data: bytes) -> Reply_:
        return [codec.packet(codec.REPLYCODE if command == codec.MAIL else codec.CONTINUE,
                             b"550 5.7.1 No mail from you\0" if command == codec.MAIL else b"")]
    m = FakeMilter(script)
    v = result(m.run())
    assert (v.action, v.reply) == ("reject", Reply(550, "5.7.1", "No mail from you"))
    assert m.commands() == b"OCHMQ"


def test_accept_at_connect_passes_unchanged() -> None:
    """SMFIR_ACCEPT early: this milter is done with the message, which passes unchanged."""
    m = FakeMilter(lambda c, d: [codec.packet(codec.ACCEPT)])
    v = result(m.run())
    assert (v.action, v.message) == ("accept", MESSAGE)
    assert m.commands() == b"OCQ"


def test_recipient_refused_at_rcpt() -> None:
    """A refused recipient is dropped with its reply; the others go on."""
    def script(command: bytes, data: bytes) -> Reply_:
        if command == codec.RCPT and data.startswith(b"<b@"):
            return [codec.packet(codec.REPLYCODE, b"550 5.1.1 No such user here\0")]
        return [codec.packet(codec.CONTINUE)]
    v = result(FakeMilter(script).run(f=facts(["a@office.example", "b@office.example"])))
    assert v.action == "continue" and v.recipients == ["a@office.example"]
    assert v.refused == {"b@office.example": Reply(550, "5.1.1", "No such user here")}


def test_every_recipient_refused_is_a_refusal() -> None:
    """When no recipient is left the message is refused with the last reply."""
    def script(command: bytes, data: bytes) -> Reply_:
        return [codec.packet(codec.TEMPFAIL if command == codec.RCPT else codec.CONTINUE)]
    v = result(FakeMilter(script).run())
    assert (v.action, v.reply) == ("tempfail", Reply(451, "4.7.1", "Service unavailable - try again later"))


def test_header_edits() -> None:
    """Add (end), insert (index 0 is the top, above this host's Received:, as in Postfix), change, delete."""
    script = at_eom(
        codec.packet(codec.ADDHEADER, z("X-Spam-Score", "5.1")),
        codec.packet(codec.INSHEADER, struct.pack("!I", 0) + z("X-First", "1")),
        codec.packet(codec.CHGHEADER, struct.pack("!I", 1) + z("Subject", "[SPAM] hello")),
        codec.packet(codec.CHGHEADER, struct.pack("!I", 1) + z("X-Secret", "")),
    )
    v = result(FakeMilter(script).run())
    assert v.message == (b"X-First: 1\r\n"
                         b"Received: from client.example ([192.0.2.9])\r\n\tby mx.example (mailguard) with ESMTP id X1\r\n"
                         b"Subject: [SPAM] hello\r\nX-Spam-Score: 5.1\r\n\r\nline one\r\n.dot line\r\n")


def test_leading_space_negotiated() -> None:
    """With SMFIP_HDR_LEADSPC values go both ways exactly as after the colon."""
    m = FakeMilter(at_eom(codec.packet(codec.ADDHEADER, z("X-A", "\tx"))), protocol=codec.P_HDR_LEADSPC)
    v = result(m.run())
    assert [p for c, p in m.sent if c == codec.HEADER][1] == b"Subject\0 hello\0"
    assert b"\r\nX-A:\tx\r\n" in v.message


def test_replace_body_in_chunks() -> None:
    """SMFIR_REPLBODY chunks replace the body, line ends made CRLF."""
    v = result(FakeMilter(at_eom(codec.packet(codec.REPLBODY, b"new\nbo"), codec.packet(codec.REPLBODY, b"dy\n"))).run())
    assert v.message.endswith(b"X-Secret: s\r\n\r\nnew\r\nbody\r\n")


def test_envelope_edits_and_quarantine() -> None:
    """Change the sender, add and delete recipients, quarantine with a reason."""
    v = result(FakeMilter(at_eom(
        codec.packet(codec.CHGFROM, z("<new@sender.example>")),
        codec.packet(codec.ADDRCPT, z("<archive@office.example>")),
        codec.packet(codec.ADDRCPT_PAR, z("<copy@office.example>", "")),
        codec.packet(codec.DELRCPT, z("<ALICE@office.example>")),
        codec.packet(codec.QUARANTINE, z("virus found")))).run())
    assert v.sender == "new@sender.example"
    assert v.recipients == ["archive@office.example", "copy@office.example"]
    assert v.quarantine == "virus found"
    assert v.edits == ["change-sender", "add-rcpt", "add-rcpt", "delete-rcpt"]


def test_milter_cannot_grow_a_message_without_bound() -> None:
    """A replacement body, or headers, past max_size are nonsense (the default action follows)."""
    big = at_eom(*[codec.packet(codec.REPLBODY, b"x" * 60000)] * 3)
    m = FakeMilter(big)
    d = defer.ensureDeferred(converse(m.conn, facts(), MESSAGE, max_size=100000))
    m.pump()
    with pytest.raises(codec.ProtocolError, match="replacement body past 100000"):
        result(d)
    m = FakeMilter(at_eom(*[codec.packet(codec.ADDHEADER, z("X-Pad", "p" * 900))] * 3))
    d = defer.ensureDeferred(converse(m.conn, facts(), MESSAGE, max_size=len(MESSAGE) + 2000))
    m.pump()
    with pytest.raises(codec.ProtocolError, match="message grew past"):
        result(d)
    assert result(FakeMilter(big).run()).message.endswith(b"x" * 180000)      # no bound: kept


def test_edit_not_negotiated_is_nonsense() -> None:
    """A change the milter did not ask for in option negotiation is a protocol error."""
    m = FakeMilter(at_eom(codec.packet(codec.REPLBODY, b"x")), actions=codec.F_ADDHDRS)
    with pytest.raises(codec.ProtocolError, match="not negotiated"):
        result(m.run())


def test_edit_before_end_of_message_is_nonsense() -> None:
    """Modifications are allowed only at end of message."""
    m = FakeMilter(lambda c, d: [codec.packet(codec.ADDHEADER, z("X", "y"))])
    with pytest.raises(codec.ProtocolError):
        result(m.run())


def test_no_reply_steps_are_not_awaited() -> None:
    """SMFIP_NR_*: the commands go out without waiting, and the exchange still ends."""
    nr = (codec.P_NR_CONN | codec.P_NR_HELO | codec.P_NR_MAIL | codec.P_NR_RCPT | codec.P_NR_DATA
          | codec.P_NR_HDR | codec.P_NR_EOH | codec.P_NR_BODY)
    m = FakeMilter(at_eom(codec.packet(codec.ADDHEADER, z("X-NR", "1"))), protocol=nr)
    v = result(m.run())
    assert m.commands() == b"OCHMRTLLLNBEQ"
    assert b"X-NR: 1" in v.message


def test_left_out_steps_are_not_sent() -> None:
    """SMFIP_NO*: no connect, HELO, headers or body when the milter asked."""
    no = codec.P_NOCONNECT | codec.P_NOHELO | codec.P_NOHDRS | codec.P_NOBODY | codec.P_NOEOH | codec.P_NODATA
    m = FakeMilter(protocol=no)
    result(m.run())
    assert m.commands() == b"OMREQ"


def test_skip_ends_the_body() -> None:
    """SMFIR_SKIP after a chunk: no more body chunks, straight to end of message."""
    def script(command: bytes, data: bytes) -> Reply_:
        return [codec.packet(codec.SKIP if command == codec.BODY else codec.CONTINUE)]
    m = FakeMilter(script, protocol=codec.P_SKIP)
    result(m.run(MESSAGE + b"x" * 200000))
    assert m.commands().count(codec.BODY) == 1
    assert m.commands().endswith(b"BEQ")


def test_skip_not_negotiated_is_nonsense() -> None:
    """SMFIR_SKIP without SMFIP_SKIP is a protocol error."""
    m = FakeMilter(lambda c, d: [codec.packet(codec.SKIP if c == codec.BODY else codec.CONTINUE)])
    with pytest.raises(codec.ProtocolError):
        result(m.run())


def test_large_body_goes_in_64k_chunks() -> None:
    """A 150 000-octet body is sent as chunks of at most 65535 octets."""
    m = FakeMilter()
    result(m.run(b"Subject: big\r\n\r\n" + b"y" * 150000))
    assert [len(p) for c, p in m.sent if c == codec.BODY] == [65535, 65535, 18930]


def test_timeout_per_reply_and_progress() -> None:
    """Each reply gets milter_timeout; SMFIR_PROGRESS restarts it; silence past it fails."""
    clock = task.Clock()
    m = FakeMilter(at_eom(final=b""), clock=clock, timeout=30)
    d = m.run()
    clock.advance(29)
    assert not d.called
    m.conn.dataReceived(codec.packet(codec.PROGRESS))
    clock.advance(29)
    assert not d.called
    clock.advance(1.5)
    with pytest.raises(MilterTimeout):
        result(d)
    assert m.transport.disconnecting or m.transport.disconnected


@pytest.mark.parametrize("garbage", [b"\0\0\0\0", b"\xff\xff\xff\xffzzz", codec.packet(b"Z")])
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    """An impossible length, or an unknown reply, fails the exchange."""
    m = FakeMilter(lambda c, d: [garbage])
    with pytest.raises(codec.ProtocolError):
        result(m.run())


def test_connection_lost_mid_exchange() -> None:
    """A milter that hangs up fails the exchange (MilterGone)."""
    m = FakeMilter(at_eom(final=b""))
    d = m.run()
    m.conn.connectionLost(Failure(error.ConnectionDone()))
    with pytest.raises(MilterGone):
        result(d)


def test_wrong_optneg_reply() -> None:
    """Anything but OPTNEG in answer to OPTNEG is nonsense."""
    m = FakeMilter()
    m.neg = b""
    m.answer = lambda c, p: [codec.packet(codec.CONTINUE)]  # type: ignore[method-assign]
    with pytest.raises(codec.ProtocolError):
        result(m.run())


# -- the chain ---------------------------------------------------------------------------------


def chain_of(milters: dict[str, Script | Exception], default: str = "tempfail") -> MilterChain:
    def connect(address: str) -> defer.Deferred[MilterConnection]:
        behaviour = milters[address]
        if isinstance(behaviour, Exception):
            return defer.fail(behaviour)
        fake = FakeMilter(behaviour)
        pumps.append(fake)
        return defer.succeed(fake.conn)
    pumps: list[FakeMilter] = []
    chain = MilterChain(task.Clock(), tuple(milters), default, 30.0, connect=connect)
    chain.pumps = pumps  # type: ignore[attr-defined]
    return chain


def run_chain(chain: MilterChain) -> Any:
    d = chain.check(facts(), MESSAGE)
    for _ in range(5):
        for fake in list(chain.pumps):  # type: ignore[attr-defined]
            fake.pump()
    out: list[Any] = []
    d.addBoth(out.append)
    assert out
    return out[0]


def test_chain_in_order_each_sees_the_previous_result() -> None:
    """The second milter is sent the header the first one added."""
    seen: list[bytes] = []

    def second(command: bytes, data: bytes) -> Reply_:
        if command == codec.HEADER:
            seen.append(data)
        return [codec.packet(codec.CONTINUE)]
    chain = chain_of({"inet:127.0.0.1:1": at_eom(codec.packet(codec.ADDHEADER, z("X-First", "yes"))),
                      "inet:127.0.0.1:2": second})
    out = run_chain(chain)
    assert out.action == "pass" and b"X-First: yes\r\n" in out.message
    assert b"X-First\0yes\0" in seen


def test_chain_stops_at_a_refusal() -> None:
    """A reject ends the chain with that milter's reply; later milters are not asked."""
    chain = chain_of({"inet:127.0.0.1:1": at_eom(final=codec.packet(codec.REPLYCODE, b"554 5.7.1 Spam\0")),
                      "inet:127.0.0.1:2": continue_all})
    with capturedLogs() as events:
        out = run_chain(chain)
    assert (out.action, out.reply) == ("reject", Reply(554, "5.7.1", "Spam"))
    assert len(chain.pumps) == 1  # type: ignore[attr-defined]
    lines = [formatEvent(e) for e in events]
    assert any(ln.startswith("mailguard milter reject: client=192.0.2.9 milter=inet:127.0.0.1:1 id=X1")
               and 'reply=554 5.7.1 Spam' in ln for ln in lines), lines


@pytest.mark.parametrize("default,action,reply", [
    ("tempfail", "tempfail", Reply(451, "4.7.1", "Service unavailable - try again later")),
    ("reject", "reject", Reply(550, "5.7.1", "Command rejected")),
    ("accept", "pass", None),
])
def test_unreachable_milter_follows_default_action(default: str, action: str, reply: Reply | None) -> None:
    """Connection refused: milter_default_action decides, in one log line."""
    chain = chain_of({"inet:127.0.0.1:9": error.ConnectionRefusedError()}, default)
    with capturedLogs() as events:
        out = run_chain(chain)
    assert (out.action, out.reply) == (action, reply)
    lines = [formatEvent(e) for e in events if "milter" in formatEvent(e)]
    assert len(lines) == 1
    assert lines[0].startswith("mailguard milter failure: client=192.0.2.9 milter=inet:127.0.0.1:9 id=X1 "
                               "error=ConnectionRefusedError")
    assert lines[0].endswith(f"action={default}")


def test_nonsense_milter_skipped_with_accept() -> None:
    """With default accept, a milter that speaks nonsense is skipped and its changes dropped."""
    chain = chain_of({"inet:127.0.0.1:1": at_eom(codec.packet(codec.ADDHEADER, z("X-Half", "1")),
                                                 final=codec.packet(b"Z")),
                      "inet:127.0.0.1:2": at_eom(codec.packet(codec.ADDHEADER, z("X-Second", "1")))}, "accept")
    out = run_chain(chain)
    assert out.action == "pass"
    assert b"X-Half" not in out.message and b"X-Second: 1" in out.message
