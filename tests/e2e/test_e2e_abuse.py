"""End to end: hostile clients against the real server (issue 6 items 1 and 2).

SMTP smuggling (the CVE-2023-51764/5/6 class), over-long lines, 10 MiB without a line
end, recipient and command floods, slow-drip clients and connection floods, all
thrown at a real ``twistd -n mailguard`` over loopback.  What is checked is what an
attacker or an administrator would see: the replies, when the connection closes,
the files in the maildir and the server process's resident memory.

mailguard refuses rather than normalises: a message holding a bare CR or LF gets
``550 5.6.2`` and is not stored, and only ``CRLF.CRLF`` ends DATA.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from mailguard.core import replies as catalogue

from .conftest import DOMAIN, OUTSIDER, ServerFactory
from .harness import MailguardServer, make_message, wait_server_closed, wait_server_read

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
MAX_RECIPIENTS = 40
MIB = 1 << 20

ABUSE_CONFIG = {
    "domains": {DOMAIN: {"route": "inbound"}},
    "limits": {"max_recipients": MAX_RECIPIENTS, "max_message_size": 2 * MIB},
}


def marker() -> str:
    """A string unique to one test message."""
    return "abuse-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def abuse(server_factory: ServerFactory) -> MailguardServer:
    """One server with alice and bob; the recipient limit lowered to keep floods short."""
    server = server_factory("abuse", ABUSE_CONFIG)
    server.add_user(ALICE)
    server.add_user(BOB)
    return server


# --------------------------------------------------------------------------- helpers


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; (data, closed-within-timeout)."""
    sock.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def reply_lines(data: bytes) -> list[str]:
    """The final lines of each SMTP reply in ``data`` (continuation lines dropped)."""
    lines = data.decode("utf-8", "replace").split("\r\n")
    return [ln for ln in lines if ln and ln[3:4] != "-"]


def send_flood(sock: socket.socket, total: int, chunk: bytes) -> int:
    """Send ``total`` octets made of ``chunk``; stop when the server closes.  Returns octets sent."""
    sent = 0
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class RssSampler:
    """Samples a process's VmRSS every 20 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_kib(pid)
        self.hwm_before = rss_kib(pid, "VmHWM")
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.pid))
        hwm = rss_kib(self.pid, "VmHWM")
        if hwm > self.hwm_before:           # a new high-water mark was set during the flood
            self.peak = max(self.peak, hwm)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / 1024


def pipelined_message(rcpt: str, tag: str) -> bytes:
    """MAIL, RCPT, DATA, a message and its dot, as one pipelined burst."""
    msg = make_message("legit@outside.example", rcpt, tag)
    return (f"MAIL FROM:<legit@outside.example>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n").encode() + msg + b".\r\n"


# --------------------------------------------------------------------------- SMTP smuggling

# (id, the fake end of data a vulnerable server would take for CRLF.CRLF)
SMUGGLING = [
    ("lf-dot-lf", b"\n.\n"),
    ("lf-dot-crlf", b"\n.\r\n"),
    ("crlf-dot-lf", b"\r\n.\n"),
    ("cr-dot-crlf", b"\r.\r\n"),
    ("crlf-dot-cr", b"\r\n.\r"),
    ("cr-dot-cr", b"\r.\r"),
    ("lf-dot-cr", b"\n.\r"),
    ("crlf-nul-dot-crlf", b"\r\n\x00.\r\n"),
    ("crlf-dot-nul-crlf", b"\r\n.\x00\r\n"),
    ("lf-nul-dot-lf", b"\n\x00.\n"),
    ("crlf-dot-nul-lf", b"\r\n.\x00\n"),
]
#: Fake ends with only CRLF line ends: the message is one message (stored whole, or refused).
CRLF_ONLY = {"crlf-nul-dot-crlf", "crlf-dot-nul-crlf"}


@pytest.mark.parametrize("fake_end", [s for _, s in SMUGGLING], ids=[i for i, _ in SMUGGLING])
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "fake-end-in-own-segment"])
def test_smuggling_never_delivers_a_second_message(abuse: MailguardServer, fake_end: bytes, split: bool) -> None:
    """A fake end of data followed by a smuggled transaction: never a second message, always in sync.

    The body carries, after the fake end, a complete MAIL/RCPT/DATA transaction whose
    message names a smuggled marker and ends with a real CRLF.CRLF.  Afterwards a
    legitimate pipelined transaction must get its own 250 and be stored once.
    """
    first, smuggled, legit = marker(), marker(), marker()
    before = len(abuse.message_files(ALICE))
    head = make_message("first@outside.example", ALICE, first).rstrip(b"\r\n") + b"\r\nlast line of first"
    tail = (
        b"MAIL FROM:<evil@outside.example>\r\n"
        + f"RCPT TO:<{BOB}>\r\n".encode()
        + b"DATA\r\n"
        + f"Subject: {smuggled}\r\n\r\nsmuggled body {smuggled}\r\n".encode()
        + b".\r\n"
    )
    with abuse.dialog(source=OUTSIDER) as d:
        assert d.cmd("EHLO attacker.example").code == 250
        assert d.cmd("MAIL FROM:<first@outside.example>").code == 250
        assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert d.cmd("DATA").code == 354
        if split:
            d.send(head + fake_end)
            wait_server_read(d.sock)          # the fake end and the rest arrive in two reads
            d.send(tail)
        else:
            d.send(head + fake_end + tail)
        verdict = d.read_reply()
        # The legitimate transaction, pipelined in one burst after the verdict.
        d.send(pipelined_message(ALICE, legit))
        replies = [d.read_reply() for _ in range(4)]
        d.cmd("QUIT")
    name = [i for i, s in SMUGGLING if s == fake_end][0]
    if name in CRLF_ONLY:
        assert verdict.code == 250 or 500 <= verdict.code < 600, verdict
    else:
        assert verdict.last == str(catalogue.BARE_LINEFEED), f"fake end {fake_end!r}: {verdict}"
    assert [r.code for r in replies] == [250, 250, 354, 250], [str(r) for r in replies]
    assert not abuse.messages_containing(BOB, smuggled.encode()), "the smuggled transaction was executed"
    new_files = len(abuse.message_files(ALICE)) - before
    legit_copies = abuse.messages_containing(ALICE, legit.encode())
    assert len(legit_copies) == 1, legit_copies
    first_copies = abuse.messages_containing(ALICE, first.encode())
    if verdict.code == 250:
        # Stored whole: one message that carries the smuggled text as body, never as a transaction.
        assert len(first_copies) == 1 and smuggled.encode() in first_copies[0], first_copies
        assert new_files == 2
    else:
        assert first_copies == [] and new_files == 1, (first_copies, new_files)
    assert [m for m in abuse.messages(ALICE) if smuggled.encode() in m and first.encode() not in m] == []


def test_long_data_line_then_commands_never_run(abuse: MailguardServer) -> None:
    """A DATA line past 65536 octets, then a pipelined transaction: 500, closed, nothing stored."""
    smuggled = marker()
    before_alice, before_bob = len(abuse.message_files(ALICE)), len(abuse.message_files(BOB))
    with abuse.dialog(source=OUTSIDER) as d:
        assert d.cmd("EHLO attacker.example").code == 250
        assert d.cmd("MAIL FROM:<first@outside.example>").code == 250
        assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert d.cmd("DATA").code == 354
        payload = (
            b"Subject: long\r\n\r\nshort line\r\n" + b"x" * 70000 + b"\r\n.\r\n"
            + pipelined_message(BOB, smuggled) + b"QUIT\r\n"
        )
        try:
            d.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed = read_until_closed(d.sock, 10)
        data = d.buffer + data
    lines = reply_lines(data)
    assert closed, f"connection still open after the over-long line: {lines}"
    assert lines and lines[0] == str(catalogue.LINE_TOO_LONG), lines
    assert len(lines) == 1, f"commands after the long line were answered: {lines}"
    assert len(abuse.message_files(ALICE)) == before_alice
    assert len(abuse.message_files(BOB)) == before_bob
    assert not abuse.messages_containing(BOB, smuggled.encode())


def test_long_command_line_is_refused_and_session_goes_on(abuse: MailguardServer) -> None:
    """A terminated command line past 2048 octets gets 500; the next command is served normally."""
    with abuse.dialog(source=OUTSIDER) as d:
        assert d.cmd("EHLO attacker.example").code == 250
        r = d.cmd("MAIL FROM:<" + "a" * 3000 + "@outside.example>")
        assert r.last == str(catalogue.LINE_TOO_LONG), r
        assert d.cmd("NOOP").code == 250
        d.cmd("QUIT")


# --------------------------------------------------------------------------- 10 MiB floods


def test_smtp_10mib_without_crlf(abuse: MailguardServer) -> None:
    """10 MiB with no line end as a command: 500, the connection closes, memory stays bounded."""
    assert abuse.process is not None
    with RssSampler(abuse.process.pid) as rss:
        for _ in range(3):
            with abuse.dialog(source=OUTSIDER) as d:
                sent = send_flood(d.sock, 10 * MIB, b"A" * 65536)
                data, closed = read_until_closed(d.sock, 10)
            assert closed, "the server kept reading a line with no end"
            assert reply_lines(d.buffer + data)[:1] == [str(catalogue.LINE_TOO_LONG)], data[:200]
            assert sent < 10 * MIB or closed
    assert rss.growth_mib < 40, f"RSS grew by {rss.growth_mib:.1f} MiB"
    with abuse.dialog(source=OUTSIDER) as d:  # and it still serves
        assert d.cmd("EHLO after.example").code == 250


def test_smtp_10mib_data_line_without_crlf(abuse: MailguardServer) -> None:
    """10 MiB with no line end inside DATA: 500 5.5.2, closed, nothing stored, memory bounded."""
    assert abuse.process is not None
    before = len(abuse.message_files(ALICE))
    with RssSampler(abuse.process.pid) as rss:
        with abuse.dialog(source=OUTSIDER) as d:
            d.cmd("EHLO flood.example")
            d.cmd("MAIL FROM:<flood@outside.example>")
            assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
            assert d.cmd("DATA").code == 354
            send_flood(d.sock, 10 * MIB, b"B" * 65536)
            data, closed = read_until_closed(d.sock, 10)
        lines = reply_lines(d.buffer + data)
    assert closed
    assert lines and lines[0] == str(catalogue.LINE_TOO_LONG), lines
    assert len(abuse.message_files(ALICE)) == before
    assert rss.growth_mib < 40, f"RSS grew by {rss.growth_mib:.1f} MiB"


def test_smtp_10mib_message_over_size_limit(abuse: MailguardServer) -> None:
    """10 MiB of proper lines in DATA (limit 2 MiB): 552 at the dot, nothing stored, memory bounded."""
    assert abuse.process is not None
    before = len(abuse.message_files(ALICE))
    line = b"C" * 998 + b"\r\n"
    with RssSampler(abuse.process.pid) as rss:
        with abuse.dialog(source=OUTSIDER) as d:
            d.cmd("EHLO flood.example")
            d.cmd("MAIL FROM:<flood@outside.example>")
            assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
            assert d.cmd("DATA").code == 354
            d.send(b"Subject: big\r\n\r\n")
            chunk = line * 64
            for _ in range(10 * MIB // len(chunk)):
                d.send(chunk)
            d.send(b".\r\n")
            r = d.read_reply()
            assert r.code == 552, r
            assert d.cmd("NOOP").code == 250
            d.cmd("QUIT")
    assert len(abuse.message_files(ALICE)) == before
    assert rss.growth_mib < 40, f"RSS grew by {rss.growth_mib:.1f} MiB"


def test_pop3_10mib_without_crlf(abuse: MailguardServer) -> None:
    """10 MiB with no line end on POP3: -ERR, the connection closes, memory stays bounded."""
    assert abuse.process is not None
    with RssSampler(abuse.process.pid) as rss:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", abuse.ports["pop3"]), timeout=10,
                                          source_address=(OUTSIDER, 0)) as s:
                greeting = s.recv(1024)
                assert greeting.startswith(b"+OK"), greeting
                send_flood(s, 10 * MIB, b"U" * 65536)
                data, closed = read_until_closed(s, 10)
            assert closed, "POP3 kept reading a line with no end"
            assert data.startswith(b"-ERR"), data[:200]
    assert rss.growth_mib < 40, f"RSS grew by {rss.growth_mib:.1f} MiB"


# --------------------------------------------------------------------------- recipient and command floods


def test_5000_pipelined_rcpt(abuse: MailguardServer) -> None:
    """5,000 pipelined RCPTs: 250 up to max_recipients, 452 4.5.3 after; the message is stored once."""
    tag = marker()
    before = len(abuse.message_files(ALICE))
    with abuse.dialog(source=OUTSIDER) as d:
        assert d.cmd("EHLO flood.example").code == 250
        assert d.cmd("MAIL FROM:<flood@outside.example>").code == 250
        d.send(f"RCPT TO:<{ALICE}>\r\n".encode() * 5000)
        replies = [d.read_reply() for _ in range(5000)]
        codes = [r.code for r in replies]
        assert codes[:MAX_RECIPIENTS] == [250] * MAX_RECIPIENTS
        assert set(codes[MAX_RECIPIENTS:]) == {452}, sorted(set(codes))
        assert replies[-1].last == str(catalogue.TOO_MANY_RCPT), replies[-1]
        r = d.data(make_message("flood@outside.example", ALICE, tag))
        assert r.code == 250, r
        d.cmd("QUIT")
    assert len(abuse.messages_containing(ALICE, tag.encode())) == 1
    assert len(abuse.message_files(ALICE)) == before + 1


@pytest.mark.parametrize("command", ["NOOP", "RSET", "VRFY alice", "HELP", "EHLO again.example"])
def test_junk_command_flood_is_cut_off(abuse: MailguardServer, command: str) -> None:
    """1,000 pipelined NOOP/RSET/VRFY/HELP/EHLO without mail: 421 and the connection closes."""
    with abuse.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO flood.example")
        try:
            d.send(f"{command}\r\n".encode() * 1000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed = read_until_closed(d.sock, 10)
    lines = reply_lines(d.buffer + data)
    assert closed, "still open after a command flood"
    assert lines[-1].startswith("421"), lines[-3:]
    assert 50 <= len(lines) <= 101, len(lines)


def test_error_flood_is_cut_off(abuse: MailguardServer) -> None:
    """Relay attempts and unknown commands without end: 421 after 50 errors, then closed."""
    with abuse.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO flood.example")
        d.cmd("MAIL FROM:<flood@outside.example>")
        burst = b"".join(f"RCPT TO:<victim{i}@remote.example>\r\nXYZZY {i}\r\n".encode() for i in range(500))
        try:
            d.send(burst)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed = read_until_closed(d.sock, 10)
    lines = reply_lines(d.buffer + data)
    assert closed
    assert lines[-1].startswith("421"), lines[-3:]
    assert all(ln.startswith(("5", "421")) for ln in lines), [ln for ln in lines if not ln.startswith("5")][:3]
    assert len(lines) <= 52, len(lines)


def test_mail_transaction_flood_without_data_is_cut_off(abuse: MailguardServer) -> None:
    """MAIL/RCPT/RSET over and over (never DATA) ends with 421 and a closed connection."""
    with abuse.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO flood.example")
        burst = f"MAIL FROM:<x@outside.example>\r\nRCPT TO:<{ALICE}>\r\nRSET\r\n".encode() * 400
        try:
            d.send(burst)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed = read_until_closed(d.sock, 10)
    lines = reply_lines(d.buffer + data)
    assert closed, f"still open after {len(lines)} replies"
    assert lines[-1].startswith("421"), lines[-3:]


# --------------------------------------------------------------------------- slow clients


@pytest.fixture(scope="module")
def deadline_server(server_factory: ServerFactory) -> MailguardServer:
    """A server with idle_timeout 2 s and session_timeout 3 s."""
    server = server_factory(
        "deadlines",
        {"domains": {DOMAIN: {"route": "inbound"}}, "limits": {"idle_timeout": 2, "session_timeout": 3}},
    )
    server.add_user(ALICE)
    return server


def drip(sock: socket.socket, text: bytes, interval: float, limit: float) -> tuple[bytes, float]:
    """Send ``text`` one byte every ``interval`` seconds until the server closes; (received, seconds)."""
    start = time.monotonic()
    received = b""
    sock.settimeout(interval)
    i = 0
    while time.monotonic() - start < limit:
        try:
            sock.send(text[i % len(text): i % len(text) + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
        i += 1
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - start


def test_smtp_slow_drip_is_cut_off_by_session_timeout(deadline_server: MailguardServer) -> None:
    """One byte per second (never idle 2 s): 421 4.4.2 and closed at the 3 s session deadline."""
    with deadline_server.dialog(source=OUTSIDER) as d:
        received, took = drip(d.sock, b"EHLO slow.example\r\nNOOP\r\n", 1.0, 15)
    lines = reply_lines(d.buffer + received)
    assert took < 7, f"still connected after {took:.1f} s"
    assert took >= 2.5, f"cut off after {took:.1f} s, before the session deadline"
    assert lines and lines[-1] == str(catalogue.TIMEOUT), lines


def test_smtp_idle_client_is_cut_off(deadline_server: MailguardServer) -> None:
    """A client that says nothing after the banner gets 421 4.4.2 at the 2 s idle timeout."""
    start = time.monotonic()
    with deadline_server.dialog(source=OUTSIDER) as d:
        data, closed = read_until_closed(d.sock, 10)
    took = time.monotonic() - start
    assert closed and took < 6, took
    assert reply_lines(d.buffer + data)[-1] == str(catalogue.TIMEOUT), data


def test_pop3_busy_slow_client_is_cut_off_by_session_timeout(deadline_server: MailguardServer) -> None:
    """POP3: a client completing a NOOP line every 1.5 s (never idle 2 s) is closed by session_timeout."""
    with socket.create_connection(("127.0.0.1", deadline_server.ports["pop3"]), timeout=10,
                                  source_address=(OUTSIDER, 0)) as s:
        received, took = drip(s, b"NOOP\r\n", 0.25, 12)
    assert took < 7, f"POP3 session still open after {took:.1f} s with session_timeout = 3"
    assert received.startswith(b"+OK"), received[:100]


# --------------------------------------------------------------------------- connection floods

PER_IP = 3
TOTAL = 5


@pytest.fixture(scope="module")
def limited(server_factory: ServerFactory) -> MailguardServer:
    """A server allowing 3 connections per client IP and 5 in total."""
    server = server_factory(
        "connlimits",
        {
            "domains": {DOMAIN: {"route": "inbound"}},
            "limits": {"max_connections_per_ip": PER_IP, "max_connections": TOTAL},
        },
    )
    server.add_user(ALICE)
    return server


def close_and_wait(sock: socket.socket) -> None:
    """Close a held connection and wait until the server has closed its end (its slot is free)."""
    client, server = sock.getsockname()[:2], sock.getpeername()[:2]
    sock.close()
    wait_server_closed(client, server)


def raw_connect(host: str, port: int, source: str) -> tuple[socket.socket, bytes]:
    """Connect from ``source`` and read the first line the server sends."""
    s = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    return s, data


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    """Sockets a test keeps open; closed at the end."""
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


@pytest.mark.parametrize("service", ["smtp", "pop3"])
def test_per_ip_connection_limit(limited: MailguardServer, held: list[socket.socket], service: str) -> None:
    """Past max_connections_per_ip from 127.0.0.7: refused at connect, while 127.0.0.8 is served."""
    port = limited.smtp_port if service == "smtp" else limited.ports["pop3"]
    ok = b"220" if service == "smtp" else b"+OK"
    for _ in range(PER_IP):
        s, banner = raw_connect("127.0.0.1", port, "127.0.0.7")
        held.append(s)
        assert banner.startswith(ok), banner
    s, refusal = raw_connect("127.0.0.1", port, "127.0.0.7")
    data, closed = read_until_closed(s, 5)
    s.close()
    assert refusal.startswith(b"421" if service == "smtp" else b"-ERR"), refusal
    assert closed
    other, banner = raw_connect("127.0.0.1", port, "127.0.0.8")
    held.append(other)
    assert banner.startswith(ok), banner
    if service == "smtp":
        other.sendall(b"EHLO other.example\r\n")
        assert b"250 " in other.recv(4096)
    # A slot freed is a slot usable again.
    close_and_wait(held.pop(0))
    s, banner = raw_connect("127.0.0.1", port, "127.0.0.7")
    held.append(s)
    assert banner.startswith(ok), banner


@pytest.mark.parametrize("service", ["smtp", "pop3"])
def test_total_connection_limit(limited: MailguardServer, held: list[socket.socket], service: str) -> None:
    """Past max_connections in total (from several IPs): refused at connect; freed slots serve again."""
    port = limited.smtp_port if service == "smtp" else limited.ports["pop3"]
    ok = b"220" if service == "smtp" else b"+OK"
    sources = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14", "127.0.0.15"]
    for src in sources[:TOTAL]:
        s, banner = raw_connect("127.0.0.1", port, src)
        held.append(s)
        assert banner.startswith(ok), banner
    s, refusal = raw_connect("127.0.0.1", port, "127.0.0.16")
    s.close()
    assert refusal.startswith(b"421" if service == "smtp" else b"-ERR"), refusal
    close_and_wait(held.pop())
    s, banner = raw_connect("127.0.0.1", port, "127.0.0.16")
    held.append(s)
    assert banner.startswith(ok), banner


def test_port_25_flood_leaves_submission_free(limited: MailguardServer, held: list[socket.socket]) -> None:
    """max_connections idle connections to port 25 do not lock staff out of submission (issue 17 item 4)."""
    sources = ["127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24", "127.0.0.25"]
    for src in sources[:TOTAL]:
        s, banner = raw_connect("127.0.0.1", limited.smtp_port, src)
        held.append(s)
        assert banner.startswith(b"220"), banner
    s, refusal = raw_connect("127.0.0.1", limited.smtp_port, "127.0.0.26")
    s.close()
    assert refusal.startswith(b"421"), refusal
    staff, banner = raw_connect("127.0.0.1", limited.ports["submission"], "127.0.0.26")
    held.append(staff)
    assert banner.startswith(b"220"), banner
