"""Property tests (hypothesis): hostile input against live protocol objects, the parser and the config loader.

Issue 6 item 3.  A live :class:`mailguard.smtp.server.SMTPServer` and a live
:class:`mailguard.pop3.server.POP3Server` run over ``StringTransport`` with a ``task.Clock``;
random command sequences, random bytes, over-long arguments, 8-bit and NUL bytes are
fed to them one line at a time, and after every line the output is checked:

- SMTP: exactly one reply per complete line (``NNN text``; ``NNN-`` continuation lines
  only in the reply to EHLO), none for lines inside DATA except the final dot; a
  ``421`` may follow the reply that used up the error limit, and then the connection
  closes.  Closing happens only right after a reply.  An unauthenticated client on a
  public address never gets a recipient accepted whose mail would leave the host,
  except for the configured relay domain.
- POP3: exactly one ``+OK``/``-ERR`` (or SASL ``+ ``) per line; multi-line answers
  end with ``.CRLF`` and are dot-stuffed.

The address parser may only raise ``AddressError``; the configuration parser and
loader only ``ConfigError`` with a one-line message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from conftest import OFFICE, FakeContext, Session, make_config
from delivery_helpers import deliver
from mailguard import config
from mailguard.core import replies as catalogue
from mailguard.core.address import AddressError, parse_mail_arg, parse_path
from mailguard.storage.maildir import LockTable, maildir_path
from mailguard.pop3.server import ERR_TOO_MANY_ERRORS, POP3Factory

EXAMPLES = settings(max_examples=150, deadline=None)

# --------------------------------------------------------------------------- strategies

LOCAL_DOMAINS = ("office.example", "compaq.example", "dec.example")
RELAY_DOMAIN = "partner.example"
ADDRESSES = (
    "alice@office.example", "a.smith@office.example", "joe@compaq.example", "joe@dec.example",
    "nobody@office.example", "someone@partner.example", "x@remote.example", "x@oldname.example",
    "x%remote.example@office.example", "remote.example!x@office.example", '"x@remote.example"@office.example',
    "x@remote.example@office.example", "@office.example:x@remote.example", "x@[192.0.2.1]",
    "x@remote.example.", "X@REMOTE.EXAMPLE", "postmaster", "x", "", "x@office.example\x00.remote.example",
    "ALICE@OFFICE.EXAMPLE", "x@b\u00fccher.example",
)
octets = st.binary(max_size=80).map(lambda b: b.replace(b"\n", b""))
words = st.text(st.characters(blacklist_characters="\n"), max_size=40)
address_text = st.one_of(st.sampled_from(ADDRESSES), words)


def _line(parts: tuple[str, Any]) -> bytes:
    verb, arg = parts
    text = verb if arg is None else f"{verb} {arg}"
    return text.encode("utf-8", "surrogatepass")


smtp_command = st.one_of(
    st.tuples(st.sampled_from(["EHLO", "HELO", "ehlo"]),
              st.one_of(st.none(), st.sampled_from(["client.example", "[192.0.2.1]"]), words)),
    st.tuples(st.sampled_from(["MAIL FROM:", "mail from:"]),
              st.one_of(address_text.map(lambda a: f"<{a}>"), address_text,
                        address_text.map(lambda a: f"<{a}> SIZE=100 BODY=8BITMIME"),
                        address_text.map(lambda a: f"<{a}> SIZE=99999999999"))).map(lambda t: (t[0] + t[1], None)),
    st.tuples(st.sampled_from(["RCPT TO:", "rcpt to:", "RCPT TO: "]),
              st.one_of(address_text.map(lambda a: f"<{a}>"), address_text,
                        address_text.map(lambda a: f"<{a}> NOTIFY=NEVER"))).map(lambda t: (t[0] + t[1], None)),
    st.tuples(st.sampled_from(["DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP", "BDAT", "TURN",
                               "ETRN", "STARTTLS", "XYZZY", ""]),
              st.one_of(st.none(), words)),
    st.tuples(st.sampled_from(["AUTH PLAIN", "AUTH LOGIN", "AUTH", "AUTH CRAM-MD5"]),
              st.one_of(st.none(), st.sampled_from(["=", "*", "AGFsaWNlAHdyb25n", "!!!"]), words)),
    st.tuples(st.sampled_from(["MAIL FROM:<", "RCPT TO:<", "EHLO ", "NOOP "]),
              st.integers(500, 3000).map(lambda n: "a" * n + ">")).map(lambda t: (t[0] + t[1], None)),
).map(_line)

body_line = st.one_of(
    st.sampled_from([b".", b"..", b".x", b"Subject: hi", b"", b"\x00", b"\xff\xfe", b"\r"]),
    octets,
)

#: A whole transaction in order (so that RCPT and DATA are reached), with a random recipient and body.
transaction = st.tuples(address_text, st.lists(body_line, max_size=5), st.booleans()).map(
    lambda t: [b"EHLO client.example", b"MAIL FROM:<someone@outside.example>",
               f"RCPT TO:<{t[0]}>".encode("utf-8", "surrogatepass"), b"RCPT TO:<alice@office.example>", b"DATA",
               *t[1], *([b"."] if t[2] else [])])

smtp_step = st.one_of(
    smtp_command.map(lambda b: [("line", b)]),
    octets.map(lambda b: [("line", b)]),
    body_line.map(lambda b: [("line", b)]),
    transaction.map(lambda lines: [("line", b) for b in lines]),
    st.integers(1, 2000).map(lambda s: [("advance", s)]),
).map(list)
smtp_steps = st.lists(smtp_step, max_size=25).map(lambda groups: [step for g in groups for step in g])


# --------------------------------------------------------------------------- SMTP

REPLY_LINE = re.compile(r"^[2-5]\d\d[ -]")


def new_output(session: Session, seen: int) -> tuple[bytes, int]:
    """What the server wrote since ``seen`` (decrypted, after STARTTLS), and the new mark."""
    value = session.raw_output()
    return value[seen:], len(value)


def split_replies(out: bytes) -> list[list[str]]:
    """Reply lines grouped into replies (a reply ends with its ``NNN `` line)."""
    text = out.decode("utf-8", "replace")
    assert text == "" or text.endswith("\r\n"), f"output not ending in CRLF: {text!r}"
    replies: list[list[str]] = []
    current: list[str] = []
    for line in text.split("\r\n")[:-1]:
        assert REPLY_LINE.match(line), f"malformed reply line {line!r}"
        assert not current or line[:3] == current[0][:3], f"code changes inside a reply: {current + [line]}"
        current.append(line)
        if line[3] == " ":
            replies.append(current)
            current = []
    assert not current, f"reply without a final line: {current}"
    return replies


def remote_accepted(session: Session) -> list[str]:
    """Targets of accepted recipients that would leave the host other than as the administrator routed.

    Mail may leave for an outsider only through the relay domain or a reroute to a
    remote domain (SPEC: a reroute is carried for any client); never by a relay rule.
    """
    bad = []
    for d in session.proto.envelope.decisions:
        for r in d.remote:
            domain = r.rpartition("@")[2]
            carried = (d.rule == "relay_domain" and domain == RELAY_DOMAIN) or d.rule == "reroute"
            if not carried:
                bad.append(r)
        for m in d.mailboxes:
            if m.rpartition("@")[2] not in LOCAL_DOMAINS:
                bad.append(m)
    return bad


def smtp_session(auth_ok: bool = False) -> Session:
    host = FakeContext(make_config(**OFFICE))
    host.directory.add_mailbox("alice@office.example", "a.smith@office.example")
    host.directory.add_mailbox("joe@compaq.example")
    if auth_ok:
        host.authenticator.users["alice@office.example"] = ("secret", "alice@office.example")
    return Session(host, client_ip="203.0.113.9", local_ip="10.0.0.1")


@EXAMPLES
@given(smtp_steps)
def test_smtp_one_reply_per_line(steps: list[tuple[str, Any]]) -> None:
    """Random commands, bytes and clock jumps: one well-formed reply per line, never a relay, close after a reply."""
    s = smtp_session()
    seen = len(s.raw_output())
    in_data = False
    auth_pending = False
    for kind, value in steps:
        was_closed = s.closed
        if kind == "advance":
            s.host.clock.advance(value)
            out, seen = new_output(s, seen)
            replies = split_replies(out)
            if was_closed:
                assert replies == []
            elif replies:
                assert len(replies) == 1 and replies[0][-1] == str(catalogue.TIMEOUT), replies
                assert s.closed
            continue
        line: bytes = value
        s.send(line + b"\r\n")
        out, seen = new_output(s, seen)
        replies = split_replies(out)
        if was_closed:
            assert replies == [], f"output after close: {replies}"
            continue
        if in_data and line != b".":
            assert replies == [] or (len(replies) == 1 and s.closed), (line, replies)
            continue
        if in_data:
            in_data = False
            assert len(replies) == 1, (line, replies)
            assert replies[0][-1][:3] in ("250", "550", "552", "554", "451"), replies
            continue
        assert 1 <= len(replies) <= 2, f"{line!r} got {len(replies)} replies: {replies}"
        if len(replies) == 2:
            # Only the error limit adds a second reply: the 421 that closes the connection.
            assert replies[1][-1].startswith("421") and s.closed, replies
        first = replies[0]
        verb = line.split(b" ", 1)[0].upper()
        if len(first) > 1:
            assert verb == b"EHLO" and first[0].startswith("250-"), (line, first)
        code = first[-1][:3]
        if code == "354":
            in_data = True
        if auth_pending:
            auth_pending = False
        elif code == "334":
            auth_pending = True
        if s.closed:
            assert replies[-1][-1][:3] in ("221", "421", "500"), replies
        assert remote_accepted(s) == [], f"unauthenticated client relayed: {remote_accepted(s)}"
        assert code[0] != "2" or verb not in (b"RCPT",) or s.proto.envelope.decisions, (line, first)
    s.lose()


@EXAMPLES
@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=12))
def test_smtp_random_bytes(chunks: list[bytes]) -> None:
    """Arbitrary bytes in arbitrary chunks: well-formed replies only, no exception, never a relay."""
    s = smtp_session()
    for chunk in chunks:
        s.send(chunk)
        assert remote_accepted(s) == []
    out = s.raw_output()
    complete = out[: out.rfind(b"\r\n") + 2] if b"\r\n" in out else b""
    assert complete == out, f"a partial reply line: {out[-100:]!r}"
    replies = split_replies(out)
    assert replies[0][-1].startswith("220")
    if s.closed:
        assert replies[-1][-1][:3] in ("221", "421", "500"), replies[-1]
    s.lose()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([b"EHLO x", b"NOOP", b"RSET", b"VRFY a", b"HELP", b"XYZ", b"MAIL FROM:<>",
                                 b"RCPT TO:<x@remote.example>", b"DATA"]), min_size=1, max_size=400))
def test_smtp_pipelined_floods_answered_in_order(lines: list[bytes]) -> None:
    """Hundreds of pipelined commands in one write: one reply each, in order, until a closing 421."""
    s = smtp_session()
    s.send(b"".join(ln + b"\r\n" for ln in lines))
    replies = split_replies(s.raw_output())[1:]
    if s.closed:
        assert replies[-1][-1].startswith("421"), replies[-1]
        body = replies[:-1]
        # The reply that used up a limit is followed by the closing 421, nothing else.
        assert len(body) <= len(lines)
    else:
        assert len(replies) == len(lines), (len(replies), len(lines))
    for ln, r in zip(lines, replies):
        if ln == b"EHLO x" and r[-1].startswith("250"):
            assert len(r) > 1
        else:
            assert len(r) == 1 or r[-1].startswith("421"), (ln, r)
    assert remote_accepted(s) == []
    s.lose()


# --------------------------------------------------------------------------- POP3

PASSWORD = "s3cret pass"


class PopAuth:
    """alice/s3cret pass; answers at once."""

    def check(self, login: str, password: str, client_ip: str, service: str) -> defer.Deferred[str | None]:
        ok = login in ("alice", "alice@example.com") and password == PASSWORD
        return defer.succeed("alice@example.com" if ok else None)


class PopRecord:
    def record(self, ip: str) -> None:
        pass


def sync(f: Any, *args: Any, **kw: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kw)


@pytest.fixture(scope="module")
def pop_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data_dir of the POP3 sessions (shared by the examples of a module)."""
    return tmp_path_factory.mktemp("fuzzpop3")


def pop3_factory(root: Path) -> POP3Factory:
    """A factory over a maildir with three messages (one with dot lines), cleartext login allowed.

    Messages deleted by an earlier example are delivered again.
    """
    cfg = config.parse({"server": {"data_dir": str(root), "hostname": "mail.example.com"},
                        "tls": {"auth_requires_tls": False}}, "test", root)
    box = maildir_path(cfg.mail_dir, "alice@example.com")
    if not (box / "new").is_dir() or len(list((box / "new").iterdir())) + len(list((box / "cur").iterdir())) < 3:
        for body in (b"Subject: one\r\n\r\nhello\r\n", b"Subject: two\r\n\r\n.\r\n..\r\n.x\r\nend\r\n",
                     b"Subject: three\r\n\r\n" + b"line\r\n" * 200):
            deliver(box, body)
    return POP3Factory(cfg, PopAuth(), PopRecord(), None, clock=task.Clock(), run_in_thread=sync, locks=LockTable())


pop3_command = st.one_of(
    st.tuples(st.sampled_from(["USER", "PASS", "APOP", "user"]),
              st.one_of(st.none(), st.sampled_from(["alice", PASSWORD, "bob"]), words)),
    st.tuples(st.sampled_from(["STAT", "LIST", "UIDL", "RETR", "DELE", "TOP", "NOOP", "RSET", "QUIT", "CAPA",
                               "STLS", "LAST", "RPOP", ""]),
              st.one_of(st.none(), st.sampled_from(["1", "2", "3", "4", "0", "-1", "1 0", "2 1", "1 x",
                                                    "99999999999"]), words)),
    st.tuples(st.sampled_from(["AUTH", "AUTH PLAIN", "AUTH LOGIN"]),
              st.one_of(st.none(), st.sampled_from(["=", "*", "AGFsaWNlAHMzY3JldCBwYXNz"]), words)),
    st.integers(200, 9000).map(lambda n: ("NOOP", "a" * n)),
).map(_line)

MULTI = {b"CAPA", b"LIST", b"UIDL", b"RETR", b"TOP", b"AUTH"}


def check_pop3_answer(line: bytes, out: bytes, sasl: bool) -> None:
    """One +OK/-ERR/+ answer; multi-line ones terminated and dot-stuffed."""
    assert out.endswith(b"\r\n"), (line, out[-80:])
    first, _, rest = out.partition(b"\r\n")
    assert first.startswith((b"+OK", b"-ERR", b"+ ")), (line, first)
    if first.startswith(b"+ "):
        assert rest == b"" and not sasl, (line, out)
        return
    words_ = line.split(b" ")
    verb = words_[0].upper()
    multi = first.startswith(b"+OK") and not sasl and (
        verb in (b"CAPA", b"RETR", b"TOP") or (verb in (b"LIST", b"UIDL", b"AUTH") and line.strip().upper() == verb))
    if not multi:
        assert rest == b"", f"{line!r}: more than one line: {out[:300]!r}"
        return
    assert rest.endswith(b".\r\n") and (rest == b".\r\n" or rest.endswith(b"\r\n.\r\n")), (line, out[-80:])
    body = rest[:-3].split(b"\r\n")[:-1] if rest != b".\r\n" else []
    assert all(not ln.startswith(b".") or ln.startswith(b"..") for ln in body), f"unstuffed dot line in {line!r}"


pop3_login = st.sampled_from([
    [b"USER alice", b"PASS " + PASSWORD.encode()],
    [b"AUTH PLAIN", b"AGFsaWNlAHMzY3JldCBwYXNz"],
    [b"AUTH PLAIN AGFsaWNlAHMzY3JldCBwYXNz"],
    [b"USER alice", b"PASS wrong"],
])
pop3_valid = st.one_of(
    st.sampled_from([b"STAT", b"LIST", b"UIDL", b"CAPA", b"RSET", b"NOOP", b"AUTH"]),
    st.tuples(st.sampled_from([b"RETR", b"DELE", b"LIST", b"UIDL"]), st.integers(0, 4)).map(
        lambda t: b"%s %d" % t),
    st.tuples(st.integers(0, 4), st.integers(0, 3)).map(lambda t: b"TOP %d %d" % t),
)
pop3_lines = st.lists(st.one_of(pop3_command.map(lambda b: [b]), octets.map(lambda b: [b]), pop3_login,
                                st.lists(pop3_valid, min_size=1, max_size=6)),
                      max_size=30).map(lambda groups: [ln for g in groups for ln in g])


@EXAMPLES
@given(pop3_lines)
def test_pop3_one_answer_per_line(pop_root: Path, lines: list[bytes]) -> None:
    """Random POP3 commands and bytes: exactly one well-formed answer per line; closes only after one."""
    factory = pop3_factory(pop_root)
    proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
    proto.makeConnection(transport)
    assert transport.value().startswith(b"+OK")
    transport.clear()
    sasl = False
    try:
        for line in lines:
            was_closed = transport.disconnecting
            proto.dataReceived(line + b"\r\n")
            proto.resumeProducing()             # a client that reads everything
            out = transport.value()
            transport.clear()
            closing = ERR_TOO_MANY_ERRORS + b"\r\n"
            if transport.disconnecting and out.endswith(closing) and out != closing:
                out = out[:-len(closing)]       # the error limit's own last line
            if was_closed:
                assert out == b"", f"output after close: {out[:100]!r}"
                continue
            check_pop3_answer(line, out, sasl)
            sasl = out.startswith(b"+ ")
            if transport.disconnecting:
                assert out.startswith((b"+OK Bye", b"-ERR")), out
    finally:
        proto.connectionLost(None)


@EXAMPLES
@given(st.lists(st.binary(min_size=1, max_size=10000), max_size=8))
def test_pop3_random_bytes(pop_root: Path, chunks: list[bytes]) -> None:
    """Arbitrary bytes: the answers are +OK/-ERR lines ending in CRLF; no exception."""
    factory = pop3_factory(pop_root)
    proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 40000))
    proto.makeConnection(transport)
    try:
        for chunk in chunks:
            proto.dataReceived(chunk)
            proto.resumeProducing()
        out = transport.value()
        assert out.endswith(b"\r\n")
        assert out.startswith(b"+OK")
    finally:
        proto.connectionLost(None)


# --------------------------------------------------------------------------- address parser

path_like = st.one_of(
    words,
    st.builds(lambda a, b, c: f"{a}<{b}@{c}>", st.sampled_from(["", " ", "@x:", "<"]), words, words),
    st.lists(st.sampled_from(['"', "\\", "@", "%", "!", ":", ",", "<", ">", "[", "]", ".", "a", "b", " ", "\x00",
                              "IPv6:", "::1", "192.0.2.1", "\u00fc", "\udcff"]), max_size=30).map("".join),
)


@settings(max_examples=400, deadline=None)
@given(path_like, st.booleans())
def test_parse_path_raises_only_address_error(text: str, null_ok: bool) -> None:
    """Any text: parse_path returns an Address (or None for <>) or raises AddressError, nothing else."""
    try:
        result = parse_path(text, null_ok=null_ok, bare_ok=frozenset({"postmaster"}))
    except AddressError:
        return
    if result is None:
        assert null_ok
    else:
        assert "@" in str(result) or result.domain == ""


@settings(max_examples=300, deadline=None)
@given(path_like, st.sampled_from(["FROM", "TO"]))
def test_parse_mail_arg_raises_only_address_error(text: str, keyword: str) -> None:
    """Any MAIL/RCPT argument: a (path, params) pair or AddressError."""
    for arg in (text, f"{keyword}:{text}", f"{keyword}:<{text}> {text}"):
        try:
            path, params = parse_mail_arg(arg, keyword)
        except AddressError:
            continue
        assert isinstance(path, str) and isinstance(params, dict)


# --------------------------------------------------------------------------- configuration

SECTIONS = ("server", "tls", "listen", "domains", "relay", "replies", "limits", "submission", "outbound",
            "directory", "bogus")
KEYS = ("hostname", "data_dir", "postmaster", "certificate", "key", "auth_requires_tls", "smtp", "pop3",
        "allow", "never", "internal_addresses", "pop_before_smtp", "authenticated", "relay_denied",
        "directory_failure", "soft_bounce", "max_message_size", "max_recipients", "max_connections",
        "idle_timeout", "smarthost", "smarthost_tls", "dns_servers", "port", "retry_schedule", "backend",
        "path", "route", "to", "enforce_sender", "x")
scalar = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), words,
                   st.sampled_from(["inbound", "relay", "reroute", "550 5.7.1 no", "451 4.3.0 later", "2 x",
                                    "tcp:25", "127.0.0.1:53", "10.0.0.0/8", "::1", "starttls", "sqlite", ""]))
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                     max_leaves=12)
section = st.dictionaries(st.one_of(st.sampled_from(KEYS), words), value, max_size=6)
domains = st.dictionaries(st.one_of(st.sampled_from(["a.example", "A.EXAMPLE", "", "..", "b.example"]), words),
                          st.one_of(value, st.fixed_dictionaries({"route": st.sampled_from(
                              ["inbound", "relay", "reroute", "x"])}, optional={"to": words})), max_size=3)
config_data = st.dictionaries(st.sampled_from(SECTIONS), st.one_of(section, value), max_size=6).flatmap(
    lambda d: domains.map(lambda dm: {**d, "domains": dm}) if "domains" in d else st.just(d))


def check_config_error(e: config.ConfigError) -> None:
    text = str(e)
    assert text and "\n" not in text, f"not one line: {text!r}"
    assert "Traceback" not in text


@settings(max_examples=300, deadline=None)
@given(config_data)
def test_config_parse_raises_only_config_error(data: dict[str, Any]) -> None:
    """Random TOML-shaped tables: a Config or a one-line ConfigError, never another exception."""
    base = Path("/nonexistent-mailguard-fuzz")
    try:
        cfg = config.parse(data, "fuzz.toml", base)
    except config.ConfigError as e:
        check_config_error(e)
        return
    assert isinstance(cfg, config.Config)


toml_bytes = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from([b"[server]", b"[limits]", b"[domains.\"a.example\"]", b"hostname = \"x\"",
                              b"max_recipients = -1", b"max_recipients = \"many\"", b"idle_timeout = 0",
                              b"[relay]", b"allow = [\"300.1.1.1\"]", b"never = [1, 2]", b"route = \"relay\"",
                              b"[[x]]", b"a = [[[[", b"\xff\xfe", b"\x00", b"key = 1e400", b"= 3", b"[tls]",
                              b"auth_requires_tls = \"yes\"", b"[outbound]", b"smarthost_tls = \"maybe\""]),
             max_size=12).map(lambda ls: b"\n".join(ls)),
)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzzconfig")


@settings(max_examples=300, deadline=None)
@given(toml_bytes)
def test_config_load_random_bytes(config_dir: Path, raw: bytes) -> None:
    """Random file contents: config.load gives a Config or a one-line ConfigError."""
    path = config_dir / "mailguard.toml"
    path.write_bytes(raw)
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        check_config_error(e)
        return
    assert isinstance(cfg, config.Config)
