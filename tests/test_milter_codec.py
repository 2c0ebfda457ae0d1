"""The milter wire format and the message edits, as pure functions (no Twisted)."""

from __future__ import annotations

import struct

import pytest

from mailguard.core.replies import Reply
from mailguard.milter import codec, edit


def test_packet_is_length_command_data() -> None:
    """A packet is a network-order length counting the command byte, the command, the data."""
    assert codec.packet(b"H", b"me\0") == b"\x00\x00\x00\x04Hme\0"
    assert codec.simple(codec.EOH) == b"\x00\x00\x00\x01N"


def test_commands_carry_nul_terminated_strings() -> None:
    """MAIL/RCPT put the address in angle brackets; CONNECT has family, port and address."""
    assert codec.mail("joe@x.example", ["SIZE=10"]) == codec.packet(b"M", b"<joe@x.example>\0SIZE=10\0")
    assert codec.rcpt("") == codec.packet(b"R", b"<>\0")
    assert codec.connect("host.example", "4", 2525, "192.0.2.1") == codec.packet(
        b"C", b"host.example\x004" + struct.pack("!H", 2525) + b"192.0.2.1\0")
    assert codec.macros(b"C", {"j": "mx", "{client_addr}": "192.0.2.1"}) == codec.packet(
        b"D", b"Cj\0mx\0{client_addr}\x00192.0.2.1\0")


def test_optneg_offers_version_6_all_actions_and_steps() -> None:
    """The MTA offers protocol 6, every SMFIF action and every SMFIP step it implements."""
    assert codec.optneg() == codec.packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))


def test_body_chunks_are_at_most_64k() -> None:
    """A body chunk over 65535 octets cannot be built; bodies are cut to that size."""
    with pytest.raises(ValueError):
        codec.body(b"x" * 65536)
    chunks = edit.body_chunks(b"y" * 150000, codec.CHUNK)
    assert [len(c) for c in chunks] == [65535, 65535, 18930]


def test_reader_reassembles_split_packets() -> None:
    """Packets cut anywhere come out whole, in order."""
    stream = codec.packet(b"c") + codec.packet(b"h", b"X\0y\0") + codec.packet(b"a")
    r = codec.Reader()
    got = []
    for i in range(len(stream)):
        got.extend(r.feed(stream[i:i + 1]))
    assert got == [(b"c", b""), (b"h", b"X\0y\0"), (b"a", b"")]


@pytest.mark.parametrize("length", [0, codec.MAX_PACKET + 1])
def test_reader_refuses_nonsense_lengths(length: int) -> None:
    """A zero length or one past 1 MiB is not the milter protocol."""
    with pytest.raises(codec.ProtocolError):
        codec.Reader().feed(struct.pack("!I", length) + b"c")


def test_optneg_reply_with_macro_lists() -> None:
    """The milter's answer: version, actions, steps, then per-stage macro lists."""
    data = struct.pack("!III", 6, 0x21, 0x1000) + struct.pack("!I", 0) + b"j {client_addr}\0" \
        + struct.pack("!I", 2) + b"{auth_authen}\0"
    neg = codec.parse_optneg(data)
    assert (neg.version, neg.actions, neg.protocol) == (6, 0x21, 0x1000)
    assert neg.symlists == {0: ("j", "{client_addr}"), 2: ("{auth_authen}",)}
    assert not neg.replies_to(codec.CONNECT) and neg.replies_to(codec.HELO)
    assert neg.may(codec.F_QUARANTINE) and not neg.may(codec.F_CHGBODY)


@pytest.mark.parametrize("data", [
    b"\0\0\0\x06",                                               # short
    struct.pack("!III", 7, 0, 0),                                # a version this MTA does not speak
    struct.pack("!III", 1, 0, 0),
    struct.pack("!III", 6, 0x200, 0),                            # an action not offered
    struct.pack("!III", 6, 0, 0x200000),                         # a step not offered
    struct.pack("!III", 6, 0, 0) + struct.pack("!I", 9) + b"j\0",  # no such macro stage
    struct.pack("!III", 6, 0, 0) + struct.pack("!I", 0) + b"j",    # unterminated list
])
def test_optneg_reply_nonsense(data: bytes) -> None:
    """Every malformed negotiation answer is a ProtocolError, never a crash."""
    with pytest.raises(codec.ProtocolError):
        codec.parse_optneg(data)


def test_optneg_ignores_body_size_bits() -> None:
    """Sendmail 8.14 milters may announce SMFIP_MDS_256K/1M; that is not an error."""
    assert codec.parse_optneg(struct.pack("!III", 6, 1, 0x10000000)).protocol == 0


@pytest.mark.parametrize("text,reply", [
    ("554 5.7.1 Gtube pattern", Reply(554, "5.7.1", "Gtube pattern")),
    ("451 Try later", Reply(451, "4.7.1", "Try later")),
    ("550-5.7.1 first line\r\n550 5.7.1 second line", Reply(550, "5.7.1", "first line second line")),
    ("550", Reply(550, "5.7.1", "")),
])
def test_reply_code(text: str, reply: Reply) -> None:
    """SMFIR_REPLYCODE text becomes one reply; a missing enhanced code becomes X.7.1."""
    assert codec.reply_text(text.encode() + b"\0") == reply


@pytest.mark.parametrize("text", ["250 2.0.0 ok", "hello", "", "550-5.7.1 a\r\n451 4.7.1 b", "5501 x"])
def test_reply_code_nonsense(text: str) -> None:
    """Only 4xx and 5xx replies, consistent across lines, are taken."""
    with pytest.raises(codec.ProtocolError):
        codec.reply_text(text.encode() + b"\0")


def test_strings_need_their_nuls() -> None:
    """A header without its terminating NULs is refused."""
    with pytest.raises(codec.ProtocolError):
        codec.strings(b"X-Name\0value", 2)
    with pytest.raises(codec.ProtocolError):
        codec.indexed(b"\0\0")


@pytest.mark.parametrize("text,parsed", [
    ("inet:127.0.0.1:11332", ("inet", "127.0.0.1", 11332)),
    ("inet:[::1]:8891", ("inet", "::1", 8891)),
    ("inet:localhost:8891", ("inet", "localhost", 8891)),
    ("unix:/run/clamav/clamav-milter.ctl", ("unix", "/run/clamav/clamav-milter.ctl", 0)),
])
def test_addresses(text: str, parsed: tuple[str, str, int]) -> None:
    """Postfix's milter address forms."""
    assert codec.parse_address(text) == parsed


@pytest.mark.parametrize("text", ["127.0.0.1:11332", "inet:127.0.0.1", "inet::25", "inet:h:0", "unix:", "tcp:h:1"])
def test_bad_addresses(text: str) -> None:
    """Anything else is a ValueError (the configuration names the key)."""
    with pytest.raises(ValueError):
        codec.parse_address(text)


# -- edits -------------------------------------------------------------------------------------

MESSAGE = (b"Received: from a\r\n\tby b\r\nSubject: hello\r\nX-Spam: no\r\nx-spam: also\r\n\r\n"
           b"body\r\n")


def test_message_round_trips_byte_for_byte() -> None:
    """Parsing and writing back changes nothing, folds and odd spacing included."""
    for m in (MESSAGE, b"Subject:x\r\n\r\n", b"Subject: x\r\n", b"no header line\r\nbody\r\n", b""):
        assert edit.Message.parse(m).to_bytes() == m


def test_values_for_milters() -> None:
    """Leading blanks are dropped unless SMFIP_HDR_LEADSPC; folds are sent as LF."""
    h = edit.Message.parse(MESSAGE).headers[0]
    assert edit.value_for_milter(h, False) == "from a\n\tby b"
    assert edit.value_for_milter(h, True) == " from a\n\tby b"


def test_add_insert_change_delete() -> None:
    """Append, insert at a position, change the n-th of a name, delete with an empty value."""
    m = edit.Message.parse(MESSAGE)
    edit.add_header(m, "X-Added", "1", False)
    edit.insert_header(m, 1, "X-Inserted", "2", False)
    edit.change_header(m, 2, "X-SPAM", "yes", False)
    edit.change_header(m, 1, "Subject", "", False)
    edit.change_header(m, 3, "X-Spam", "new", True)      # no third one: added
    assert m.to_bytes() == (b"Received: from a\r\n\tby b\r\nX-Inserted: 2\r\nX-Spam: no\r\nx-spam: yes\r\n"
                            b"X-Added: 1\r\nX-Spam:new\r\n\r\nbody\r\n")


def test_header_value_cannot_start_a_header() -> None:
    """A line break in a milter's value is folded: it never injects a header of its own."""
    m = edit.Message.parse(b"A: b\r\n\r\n")
    edit.add_header(m, "X-Note", "one\nBcc: victim@example.com\r\n\tthree", False)
    assert m.to_bytes() == b"A: b\r\nX-Note: one\r\n\tBcc: victim@example.com\r\n\tthree\r\n\r\n"
    with pytest.raises(codec.ProtocolError):
        edit.add_header(m, "Bad Name", "x", False)


def test_crlf() -> None:
    """Replacement bodies get CRLF line ends whatever the milter sent."""
    assert edit.crlf(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd"
