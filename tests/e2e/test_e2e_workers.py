"""End to end: ``[server] workers`` runs several reactor processes on the same sockets.

Which process serves a connection is read from ``/proc``: the server's end of the
TCP connection is a socket inode, and exactly one process of the server holds it.
"""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import socket
import threading
import uuid
from pathlib import Path

import pytest

from mailguard import config
from mailguard.core import replies

from .conftest import DOMAIN, ServerFactory
from .harness import Dialog, MailguardServer, deep_merge, free_port, tcp_end, tls_context, toml_dumps, wait_for
from .test_e2e_metrics import delta, scrape
from .test_e2e_systemd import SocketActivated

PASSWORD = "correct horse battery"
INBOUND = {"domains": {DOMAIN: {"route": "inbound"}}}


def addr(user: str) -> str:
    return f"{user}@{DOMAIN}"


def children(server: MailguardServer) -> list[int]:
    """The worker processes: the children of the twistd process."""
    assert server.process is not None
    parent, found = server.process.pid, []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def serving(server: MailguardServer, count: int) -> None:
    """Wait until ``count`` processes have started serving (each logs ``mailguard starting``)."""
    wait_for(lambda: server.log_text().count("mailguard starting:") >= count, 20, f"{count} serving processes")


def _hex(host: str, port: int) -> str:
    return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"


def owner(server: MailguardServer, client: socket.socket) -> int | None:
    """The process of ``server`` that holds the server's end of ``client``'s connection (None: not accepted yet)."""
    assert server.process is not None
    mine, theirs = client.getsockname()[:2], client.getpeername()[:2]
    want = (_hex(*theirs), _hex(*mine))
    inode = next((line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                  if tuple(line.split()[1:3]) == want), None)
    if inode is None:
        return None
    for pid in [server.process.pid, *children(server)]:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def sessions_in(pid: int, port: int) -> int:
    """How many established connections to local ``port`` process ``pid`` holds."""
    inodes = {line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
              if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "01"}
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        held += link.startswith("socket:[") and link[8:-1] in inodes
    return held


def closed_by_server(sock: socket.socket) -> bool:
    end = tcp_end(sock.getpeername()[:2], sock.getsockname()[:2])
    return end is None or end.state != "01"


def connect_via(server: MailguardServer, port: int, pid: int | None, source: str = "127.0.0.1") -> socket.socket:
    """A connection accepted by the server process ``pid`` (any when None): the server's
    other processes are stopped (SIGSTOP) until that one has accepted it."""
    assert server.process is not None
    sock = None
    others = [p for p in [server.process.pid, *children(server)] if pid is not None and p != pid]
    for p in others:
        os.kill(p, signal.SIGSTOP)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        if pid is not None:
            # Accepted there, or already closed (a refusal): only ``pid`` could have done either.
            wait_for(lambda: owner(server, sock) == pid or closed_by_server(sock), 10, f"process {pid} to accept")
    finally:
        for p in others:
            os.kill(p, signal.SIGCONT)
    return sock


def greeted(server: MailguardServer, port: int, source: str = "127.0.0.1") -> tuple[socket.socket, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock, first_line(sock)


def first_line(sock: socket.socket) -> str:
    return sock.makefile("rb").readline().decode().rstrip("\r\n")


@pytest.mark.parametrize("workers", [1, 2])
def test_per_ip_limit_counts_every_process(fresh_server_factory: ServerFactory, workers: int) -> None:
    """20 connections from one address are greeted, the 21st refused with the same 421 whatever
    the number of workers.  With 2, half of the 20 are accepted by each process, and the
    21st is refused by either; once the 20 are closed, 20 are admitted again (the counts
    were released in the first process)."""
    server = fresh_server_factory(f"limit{workers}", {"server": {"workers": workers},
                                                      "limits": {"max_connections_per_ip": 20}})
    serving(server, workers)
    assert server.process is not None
    pids: list[int | None] = [server.process.pid, *children(server)] if workers > 1 else [None]
    assert len(pids) == workers
    refused = 0                         # 421s sent, each logged once
    for _round in range(2):
        held = [connect_via(server, server.smtp_port, pids[i % len(pids)]) for i in range(20)]
        assert [first_line(s) for s in held] == [f"220 {server.hostname} ESMTP mailguard"] * 20
        if workers > 1:
            assert sorted(owner(server, s) or 0 for s in held) == sorted(pids * 10)  # type: ignore[operator]
        for pid in pids:
            extra = connect_via(server, server.smtp_port, pid)
            assert first_line(extra) == str(replies.TOO_MANY_FROM_IP)
            extra.close()
            refused += 1
        # Another address is not refused: the counts are per address.
        other, line = greeted(server, server.smtp_port, source="127.0.0.9")
        assert line.startswith("220 ")
        other.close()
        for s in held:
            s.close()
        wait_for(lambda: len(server.log_lines("mailguard smtp refused")) == refused, 5,
                 "the refusals logged")
        if _round == 0:
            # The 20 closed connections are released (asynchronously, from each process):
            # a probe that comes before the release is refused, and that refusal is logged too.
            def admits_20() -> bool:
                nonlocal refused
                probes = [greeted(server, server.smtp_port) for _ in range(20)]
                ok = all(line.startswith("220 ") for _s, line in probes)
                refused += sum(1 for _s, line in probes if not line.startswith("220 "))
                for s, _l in probes:
                    s.close()
                return ok
            wait_for(admits_20, 10, "the closed connections to be released")


def pop3_login(server: MailguardServer, user: str) -> poplib.POP3:
    p = OnSocket(connect_via(server, server.ports["pop3"], None))
    p.stls(tls_context())
    p.user(addr(user))
    p.pass_(PASSWORD)
    return p


class OnSocket(poplib.POP3):
    """A POP3 client on a connection already made."""

    def __init__(self, sock: socket.socket) -> None:
        self._made = sock
        super().__init__("127.0.0.1", 0)

    def _create_socket(self, timeout: float) -> socket.socket:
        return self._made


def pop3_login_via(server: MailguardServer, user: str, pid: int, source: str) -> poplib.POP3:
    p = OnSocket(connect_via(server, server.ports["pop3"], pid, source))
    p.stls(tls_context())
    p.user(addr(user))
    p.pass_(PASSWORD)
    return p


def relay_reply_via(server: MailguardServer, pid: int, source: str) -> str:
    """The reply to a RCPT for a remote domain from ``source``, in process ``pid``."""
    with Dialog(connect_via(server, server.smtp_port, pid, source)) as d:
        assert d.read_reply().code == 220
        d.cmd("EHLO client.example")
        d.cmd("MAIL FROM:<alice@realdomain.example>")
        r = d.cmd("RCPT TO:<friend@elsewhere.example>")
        d.cmd("QUIT")
    return r.last


def test_pop_before_smtp_holds_in_every_process(fresh_server_factory: ServerFactory) -> None:
    """A POP3 login served by one process lets that IP relay through the other, both ways."""
    server = fresh_server_factory("pbs", {"server": {"workers": 2}, "relay": {"pop_before_smtp": 600},
                                          **INBOUND})
    server.add_user(addr("alice"), PASSWORD)
    serving(server, 2)
    assert server.process is not None
    first, [worker] = server.process.pid, children(server)
    denied = str(config.defaults().replies.relay_denied)
    for login_in, relay_in, source in ((worker, first, "127.0.0.30"), (first, worker, "127.0.0.31")):
        assert relay_reply_via(server, relay_in, source) == denied
        pop3_login_via(server, "alice", login_in, source).quit()
        # Told over the processes' pipe: a moment after the +OK at most.
        wait_for(lambda: relay_reply_via(server, relay_in, source) == str(replies.RECIPIENT_OK), 5,
                 f"the login in {login_in} to be known in {relay_in}")
    assert relay_reply_via(server, worker, "127.0.0.32") == denied


def in_use(server: MailguardServer, user: str, pid: int | None = None) -> tuple[poplib.POP3, bytes]:
    """A session (accepted by process ``pid``) whose login is refused; its reply."""
    p = OnSocket(connect_via(server, server.ports["pop3"], pid))
    p.stls(tls_context())
    p.user(addr(user))
    with pytest.raises(poplib.error_proto) as info:
        p.pass_(PASSWORD)
    return p, info.value.args[0]


def test_pop3_in_use_lock_across_workers_and_a_second_server(fresh_server_factory: ServerFactory) -> None:
    """A mailbox open in one process is IN-USE in the other worker and in a second mailguard on
    the same data_dir; after QUIT the second server opens it."""
    a = fresh_server_factory("popa", {"server": {"workers": 2}, **INBOUND})
    serving(a, 2)
    a.add_user(addr("frank"), PASSWORD)
    assert a.process is not None
    first, [worker] = a.process.pid, children(a)
    holder = OnSocket(connect_via(a, a.ports["pop3"], worker))
    holder.stls(tls_context())
    holder.user(addr("frank"))
    holder.pass_(PASSWORD)
    for pid in (first, worker):
        p, reply = in_use(a, "frank", pid)
        assert reply == b"-ERR [IN-USE] Mailbox is locked by another session"
        assert owner(a, p.sock) == pid
        p.close()
    b = fresh_server_factory("popb", {"server": {"data_dir": str(a.data_dir)}, **INBOUND})
    _p, reply = in_use(b, "frank")
    assert reply == b"-ERR [IN-USE] Mailbox is locked by another session"
    _p.close()
    assert holder.quit().startswith(b"+OK")
    second = pop3_login(b, "frank")
    assert second.stat() == (0, 0)
    second.quit()


def test_killed_worker_is_replaced_and_acknowledged_mail_is_kept(fresh_server_factory: ServerFactory) -> None:
    """kill -9 of a worker while four clients send: a new worker starts (one log line), serves,
    and every message that got 250 is in the maildir."""
    server = fresh_server_factory("kill", {"server": {"workers": 2}, **INBOUND})
    server.add_user(addr("alice"), PASSWORD)
    serving(server, 2)
    [victim] = children(server)
    acked: list[str] = []
    stop = threading.Event()

    def send(source: str) -> None:
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10,
                                  source_address=(source, 0)) as s:
                    for _ in range(5):
                        mark = "w-" + uuid.uuid4().hex
                        s.sendmail("a@outside.example", [addr("alice")],
                                   f"Subject: {mark}\r\n\r\n{mark}\r\n" + "x" * 2000 + "\r\n")
                        acked.append(mark)
            except (smtplib.SMTPException, OSError):
                continue                    # the connection was on the killed worker

    threads = [threading.Thread(target=send, args=(f"127.0.0.{10 + i}",)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 40, 30, "40 messages accepted")
        wait_for(lambda: sessions_in(victim, server.smtp_port) > 0, 10, "the worker to be serving a client")
        os.kill(victim, signal.SIGKILL)
        server.wait_for_log(rf"mailguard worker ended: pid={victim} ", 10)
        wait_for(lambda: len(children(server)) == 1 and children(server) != [victim], 10, "a new worker")
        [replacement] = children(server)
        serving(server, 3)
        before = len(acked)
        wait_for(lambda: len(acked) >= before + 40, 30, "40 more messages accepted")
        # The new worker serves too.
        sock = connect_via(server, server.smtp_port, replacement)
        assert first_line(sock) == f"220 {server.hostname} ESMTP mailguard"
        sock.close()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    stored = b"".join(server.messages(addr("alice")))
    missing = [m for m in acked if m.encode() not in stored]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages are not in the maildir"
    assert server.log_lines(rf"mailguard worker started: pid={replacement}$")


def test_reload_reaches_every_process(fresh_server_factory: ServerFactory) -> None:
    """``mailguard reload`` (SIGHUP to the first process) reloads the workers too: a changed
    reply is given by both processes; the reload line is logged once per process."""
    server = fresh_server_factory("reload", {"server": {"workers": 2}, **INBOUND})
    serving(server, 2)
    assert server.process is not None
    first, [worker] = server.process.pid, children(server)
    new = "550 5.7.1 Ask the office to send it for you"
    server.config = deep_merge(server.config, {"replies": {"relay_denied": new}})
    server.config_path.write_text(toml_dumps(server.config), encoding="utf-8")
    assert server.cli_ok("reload").stdout.startswith(f"SIGHUP sent to mailguard (process {first});")
    wait_for(lambda: len(server.log_lines(r"mailguard reload: .* in use for new connections$")) == 2, 10,
             "both processes to reload")
    assert relay_reply_via(server, first, "127.0.0.40") == new
    assert relay_reply_via(server, worker, "127.0.0.40") == new


def test_rate_limit_counts_messages_of_every_process(fresh_server_factory: ServerFactory) -> None:
    """messages_per_ip_per_minute = 2: one message accepted by each process, then MAIL from that
    address is rate_limited in both."""
    server = fresh_server_factory("rates", {"server": {"workers": 2}, "limits": {"messages_per_ip_per_minute": 2},
                                            **INBOUND})
    server.add_user(addr("alice"), PASSWORD)
    serving(server, 2)
    assert server.process is not None
    first, [worker] = server.process.pid, children(server)
    limited = str(config.defaults().checks.replies.rate_limited)

    def mail_reply(pid: int, message: bool) -> str:
        with Dialog(connect_via(server, server.smtp_port, pid, "127.0.0.50")) as d:
            assert d.read_reply().code == 220
            d.cmd("EHLO client.example")
            reply = d.cmd("MAIL FROM:<a@outside.example>")
            if message and reply.code == 250:
                assert d.cmd(f"RCPT TO:<{addr('alice')}>").code == 250
                assert d.data(b"Subject: rate\r\n\r\nrate\r\n").code == 250
            d.cmd("QUIT")
        return reply.last

    assert mail_reply(first, True) == str(replies.SENDER_OK)
    assert mail_reply(worker, True) == str(replies.SENDER_OK)
    # Told over the processes' pipe: a moment after the 250 at most.
    wait_for(lambda: mail_reply(first, False) == limited, 5, "the first process to count the worker's message")
    wait_for(lambda: mail_reply(worker, False) == limited, 5, "the worker to count the first process's message")


def test_workers_serve_systemd_sockets(tmp_path: Path) -> None:
    """Sockets passed by systemd-socket-activate are served by both processes: a message
    accepted by each is stored."""
    server = SocketActivated(tmp_path / "sa")
    server.config = deep_merge(server.config, {"server": {"workers": 2}})
    server.config_path.write_text(toml_dumps(server.config), encoding="utf-8")
    server.add_user(addr("alice"), PASSWORD)
    server.start()
    try:
        serving(server, 2)
        assert server.process is not None
        marks = []
        for pid in (server.process.pid, *children(server)):
            mark = "sd-" + uuid.uuid4().hex
            with Dialog(connect_via(server, server.smtp_port, pid)) as d:
                assert d.read_reply().code == 220
                d.cmd("EHLO client.example")
                assert d.cmd("MAIL FROM:<a@outside.example>").code == 250
                assert d.cmd(f"RCPT TO:<{addr('alice')}>").code == 250
                assert d.data(f"Subject: {mark}\r\n\r\n{mark}\r\n".encode()).code == 250
            marks.append(mark)
        assert len(marks) == 2
        stored = b"".join(server.messages(addr("alice")))
        assert all(m.encode() in stored for m in marks)
    finally:
        server.stop()


def send_via(server: MailguardServer, pid: int, mark: str) -> None:
    """One message to alice over a connection that process ``pid`` accepted."""
    sock = connect_via(server, server.smtp_port, pid)
    d = Dialog(sock)
    try:
        assert d.read_reply().code == 220
        assert d.cmd("EHLO client.example").code == 250
        assert d.cmd("MAIL FROM:<a@outside.example>").code == 250
        assert d.cmd(f"RCPT TO:<{addr('alice')}>").code == 250
        assert d.data(f"Subject: {mark}\r\n\r\n{mark}\r\n".encode()).code == 250
        d.cmd("QUIT")
    finally:
        sock.close()


def test_metrics_add_up_every_process(fresh_server_factory: ServerFactory) -> None:
    """/metrics (served by the first process) counts the connections, decisions and stores of
    both processes: two messages through each move every counter by four.  Killing the
    worker keeps what it counted in the totals."""
    port = free_port()
    server = fresh_server_factory("metrics2", {"server": {"workers": 2},
                                               "metrics": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
                                               **INBOUND})
    server.add_user(addr("alice"), PASSWORD)
    serving(server, 2)
    assert server.process is not None
    first, [worker] = server.process.pid, children(server)
    before = scrape(port)
    for i, pid in enumerate([first, worker, first, worker]):
        send_via(server, pid, f"m{i}")
    after = scrape(port)
    assert delta(before, after, "mailguard_connections_total", service="smtp") == 4
    assert delta(before, after, "mailguard_smtp_decisions_total", rule="inbound", result="accepted") == 4
    assert delta(before, after, "mailguard_store_seconds_count") == 4
    os.kill(worker, signal.SIGKILL)
    server.wait_for_log(rf"mailguard worker ended: pid={worker} ", 10)
    assert delta(before, scrape(port), "mailguard_connections_total", service="smtp") == 4
