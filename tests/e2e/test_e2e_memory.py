"""End to end: clients that never read their replies cannot grow the server's memory (issue 17).

Each attack runs over one connection that sends without ever reading, against the
real ``twistd -n mailguard``; the server's resident memory is sampled from
``/proc/PID/status`` during the attack.  The bound is < 50 MiB added per attack, and
the connection ends closed by the server or throttled (the server stopped reading,
so the client's sends stall).  Each test prints its figures (run with ``-s``).
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import pytest

from .conftest import DOMAIN, OUTSIDER, ServerFactory
from .harness import MailguardServer
from .test_e2e_abuse import RssSampler

ALICE = f"alice@{DOMAIN}"
PASSWORD = "correct horse battery"
MIB = 1 << 20
BOUND_MIB = 50

MEMORY_CONFIG = {
    "domains": {DOMAIN: {"route": "inbound"}},
    "tls": {"auth_requires_tls": False},
}


@pytest.fixture(scope="module")
def server(server_factory: ServerFactory) -> MailguardServer:
    """A server with alice, whose mailbox holds a 60 KB and a 25 MB message."""
    srv = server_factory("memory", MEMORY_CONFIG)
    srv.add_user(ALICE)
    box = srv.maildir(ALICE)
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    line = b"x" * 76 + b"\n"
    small = b"Subject: sixty\n\n" + line * (60_000 // len(line))
    big = b"Subject: big\n\n" + line * (25_000_000 // len(line))
    _drop(box, "1000000001.M1P1Q1.e2e", small)
    _drop(box, "1000000002.M1P1Q2.e2e", big)
    return srv


def _drop(box: Path, name: str, content: bytes) -> None:
    """Deliver as a maildir delivery agent does: write under tmp/, rename into new/."""
    tmp = box / "tmp" / name
    tmp.write_bytes(content)
    tmp.rename(box / "new" / name)


def flood(sock: socket.socket, payload: bytes, stall: float = 1.5, limit: float = 30.0) -> tuple[int, str]:
    """Send ``payload`` without reading anything.

    Returns (octets sent, outcome): ``closed`` when the server closed the connection,
    ``throttled`` when no octet could be sent for ``stall`` seconds (the server stopped
    reading), ``sent`` when everything went out.
    """
    sock.setblocking(False)
    sent = 0
    view = memoryview(payload)
    deadline = time.monotonic() + limit
    while sent < len(payload) and time.monotonic() < deadline:
        _, writable, _ = select.select([], [sock], [], stall)
        if not writable:
            return sent, "throttled"
        try:
            sent += sock.send(view[sent:sent + 65536])
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent, "closed"
    return sent, "sent"


def pop3_session(server: MailguardServer, login: bool) -> socket.socket:
    """A raw POP3 connection from OUTSIDER, greeting read, optionally logged in as alice.

    A login waits (up to 10 s) for the previous test's session to release the mailbox.
    """
    deadline = time.monotonic() + 10
    while True:
        s = _connect(server, login)
        if s is not None or time.monotonic() > deadline:
            assert s is not None, "alice's mailbox stayed locked"
            return s
        time.sleep(0.2)


def _connect(server: MailguardServer, login: bool) -> socket.socket | None:
    s = socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10, source_address=(OUTSIDER, 0))
    buf = b""
    while b"\r\n" not in buf:
        buf += s.recv(1024)
    assert buf.startswith(b"+OK"), buf
    if login:
        s.sendall(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        buf = b""
        while buf.count(b"\r\n") < 2:
            buf += s.recv(1024)
        if b"[IN-USE]" in buf:
            s.close()
            return None
        assert b"+OK Logged in" in buf, buf
    return s


def attack(server: MailguardServer, name: str, payload: bytes, login: bool,
           then_read: int = 0) -> tuple[RssSampler, str, int]:
    """Run one never-reading attack; (memory figures, outcome, octets sent).

    With ``then_read``, the client finally reads: that many multi-line answers must arrive whole.
    """
    assert server.process is not None
    s = pop3_session(server, login)
    with RssSampler(server.process.pid) as rss:
        sent, outcome = flood(s, payload)
        time.sleep(3.0)                     # let the server work through what it read
    if then_read:
        assert count_terminators(s, then_read) == then_read
    s.close()
    print(f"\n[memory] {name}: RSS before {rss.before / 1024:.1f} MiB, peak {rss.peak / 1024:.1f} MiB, "
          f"added {rss.growth_mib:.1f} MiB; {outcome} after {sent / MIB:.1f} MiB sent")
    return rss, outcome, sent


def count_terminators(sock: socket.socket, wanted: int, timeout: float = 60.0) -> int:
    """Read until ``wanted`` multi-line terminators (CRLF.CRLF) arrived; how many did."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    seen, tail = 0, b""
    while seen < wanted:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data = tail + chunk
        seen += data.count(b"\r\n.\r\n")
        tail = data[-4:] if not data.endswith(b"\r\n.\r\n") else b""
    return seen


def assert_still_serves(server: MailguardServer) -> None:
    s = pop3_session(server, login=False)
    s.sendall(b"QUIT\r\n")
    s.close()


def test_pop3_empty_lines_unauthenticated(server: MailguardServer) -> None:
    """10 MiB of empty lines, never reading the -ERR replies: closed after the error limit."""
    rss, outcome, sent = attack(server, "pop3 10 MiB empty lines", b"\r\n" * (5 * MIB), login=False)
    assert rss.growth_mib < BOUND_MIB
    assert outcome == "closed", f"{outcome} after {sent} octets"
    assert_still_serves(server)


def test_pop3_capa_flood(server: MailguardServer) -> None:
    """20 MB of CAPA, never reading: the server stops reading (the sends stall)."""
    rss, outcome, sent = attack(server, "pop3 20 MB CAPA", b"CAPA\r\n" * (20_000_000 // 6), login=False)
    assert rss.growth_mib < BOUND_MIB
    assert outcome in ("throttled", "closed") and sent < 20_000_000 // 2, (outcome, sent)
    assert_still_serves(server)


def test_pop3_retr_flood(server: MailguardServer) -> None:
    """Logged in, 4,000 x RETR 1 of a 60 KB message, not reading: memory bounded; read later, all 4,000 arrive."""
    rss, outcome, sent = attack(server, "pop3 4000 x RETR 1 (60 KB)", b"RETR 1\r\n" * 4000, login=True,
                                then_read=4000)
    assert rss.growth_mib < BOUND_MIB
    assert_still_serves(server)


def test_pop3_top_flood(server: MailguardServer) -> None:
    """Logged in, 20 x TOP 2 999999999 of a 25 MB message, never reading: memory bounded."""
    rss, outcome, sent = attack(server, "pop3 20 x TOP 2 999999999 (25 MB)", b"TOP 2 999999999\r\n" * 20,
                                login=True)
    assert rss.growth_mib < BOUND_MIB
    assert_still_serves(server)


def test_smtp_pipelined_rcpt_flood(server: MailguardServer) -> None:
    """60 MB of pipelined RCPT past max_recipients, never reading the 452s: the server stops
    reading (the sends stall) and memory stays bounded."""
    assert server.process is not None
    s = socket.create_connection(("127.0.0.1", server.smtp_port), timeout=10, source_address=(OUTSIDER, 0))
    s.recv(1024)
    s.sendall(b"EHLO flood.example\r\nMAIL FROM:<flood@outside.example>\r\n")
    payload = f"RCPT TO:<{ALICE}>\r\n".encode() * (60_000_000 // len(f"RCPT TO:<{ALICE}>\r\n"))
    with RssSampler(server.process.pid) as rss:
        sent, outcome = flood(s, payload, stall=5.0, limit=40.0)
        time.sleep(3.0)
    s.close()
    print(f"\n[memory] smtp 60 MB pipelined RCPT: RSS before {rss.before / 1024:.1f} MiB, peak "
          f"{rss.peak / 1024:.1f} MiB, added {rss.growth_mib:.1f} MiB; {outcome} after {sent / MIB:.1f} MiB sent")
    assert rss.growth_mib < BOUND_MIB
    assert outcome in ("throttled", "closed"), (outcome, sent)


def test_smtp_forty_unfinished_25mb_datas(server: MailguardServer) -> None:
    """40 connections each sending 25 MB of DATA and never the final dot: the messages wait on
    disk (data_dir/spool), not in memory; RSS growth < 50 MiB; a message sent after still arrives."""
    assert server.process is not None
    with RssSampler(server.process.pid) as rss:
        socks = unfinished_datas(server, "127.0.3", 25_000_000)
        time.sleep(2.0)
    spooled = sum(p.stat().st_size for p in (server.data_dir / "spool").iterdir()) \
        if (server.data_dir / "spool").is_dir() else 0
    for s in socks:
        s.close()
    print(f"\n[memory] smtp 40 unfinished 25 MB DATAs: RSS before {rss.before / 1024:.1f} MiB, peak "
          f"{rss.peak / 1024:.1f} MiB, added {rss.growth_mib:.1f} MiB")
    assert rss.growth_mib < BOUND_MIB
    assert spooled == 0                                  # unlinked files: nothing to see or leave behind


BUDGET_MIB = 8


def test_smtp_forty_2mb_datas_without_a_spool_stay_within_memory_budget(server_factory: ServerFactory) -> None:
    """``[limits] memory_budget = 8 MiB`` and a spool that cannot be used (``data_dir/spool`` is a
    file): 40 connections each send 2 MB of DATA and wait.  The messages the budget can hold stay
    in memory; the rest are read and dropped, and their final dot is answered 452 4.3.1 on a
    connection that stays open.  RSS growth stays near the budget, not 80 MB; every dot gets 250
    or that 452, and a message sent after all of them is accepted."""
    srv = server_factory("memory-budget", {**MEMORY_CONFIG, "limits": {"memory_budget": BUDGET_MIB * MIB}})
    srv.add_user(ALICE)
    assert srv.process is not None
    (srv.data_dir / "spool").write_bytes(b"")              # mkdir fails: no message can be spooled
    with RssSampler(srv.process.pid) as rss:
        socks = unfinished_datas(srv, "127.0.4", 2_000_000)
        time.sleep(2.0)
    answers = []
    for s in socks:
        s.sendall(b".\r\n")
        answers.append(read_reply(s))
    print(f"\n[memory] smtp 40 unfinished 2 MB DATAs, no spool, memory_budget {BUDGET_MIB} MiB: RSS before "
          f"{rss.before / 1024:.1f} MiB, peak {rss.peak / 1024:.1f} MiB, added {rss.growth_mib:.1f} MiB; "
          f"{answers.count(b'452 4.3.1 Insufficient system storage, try again later')} x 452")
    assert rss.growth_mib < 3 * BUDGET_MIB
    refused = [a for a in answers if not a.startswith(b"250 ")]
    assert set(refused) == {b"452 4.3.1 Insufficient system storage, try again later"}
    assert 30 <= len(refused) < 40
    socks[-1].sendall(f"MAIL FROM:<big@outside.example>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode())
    assert [read_reply(socks[-1]) for _ in range(3)][-1].startswith(b"354 ")
    socks[-1].sendall(b"Subject: after\r\n\r\nsmall\r\n.\r\n")
    assert read_reply(socks[-1]).startswith(b"250 ")
    for s in socks:
        s.close()


def unfinished_datas(server: MailguardServer, network: str, size: int) -> list[socket.socket]:
    """40 SMTP connections from ``network``.1 to .40, each sending ``size`` octets of DATA, no dot."""
    chunk = (b"y" * 998 + b"\r\n") * 64
    socks = []
    for i in range(40):
        s = smtp_in_data(server, f"{network}.{i + 1}")
        sent = 0
        while sent < size:
            s.sendall(chunk)
            sent += len(chunk)
        socks.append(s)
    return socks


def smtp_in_data(server: MailguardServer, source: str) -> socket.socket:
    """An SMTP connection from ``source`` that got 354 to DATA for alice."""
    s = socket.create_connection(("127.0.0.1", server.smtp_port), timeout=30, source_address=(source, 0))
    s.sendall(f"EHLO budget.example\r\nMAIL FROM:<big@outside.example>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode())
    got = b""
    while b"354 " not in got:
        data = s.recv(4096)
        assert data, got
        got += data
    assert got.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"), got
    return s


def read_reply(s: socket.socket) -> bytes:
    """One reply line (the last line of a multi-line reply), without CRLF."""
    s.settimeout(30)
    line = b""
    while True:
        while not line.endswith(b"\r\n"):
            data = s.recv(1)
            assert data, line
            line += data
        if line[3:4] != b"-":
            return line[:-2]
        line = b""
