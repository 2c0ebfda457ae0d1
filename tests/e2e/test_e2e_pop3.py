"""End to end: POP3 and POP-before-SMTP (issue 4) against the real ``twistd -n mailguard``.

Mail goes in over SMTP and comes out with ``poplib`` and the real clients
``fetchmail`` and ``getmail6``, over STLS (RFC 2595) and implicit TLS (pop3s).
"""

from __future__ import annotations

import os
import poplib
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from mailguard import config
from mailguard.core import replies

from .conftest import DOMAIN, ServerFactory
from .harness import MailguardServer, SourcePOP3, tls_context, wait_for

PASSWORD = "correct horse battery"
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan")
RELAY_DENIED = str(config.defaults().replies.relay_denied)


def marker() -> str:
    """A string unique to one message."""
    return "e2e-" + uuid.uuid4().hex


def addr(user: str) -> str:
    return f"{user}@{DOMAIN}"




def pop3(server: MailguardServer, user: str | None = None, source: str = "127.0.0.1") -> poplib.POP3:
    """A session on the pop3 listener upgraded with STLS, logged in as ``user`` when given."""
    p = SourcePOP3("127.0.0.1", server.ports["pop3"], source)
    p.stls(tls_context())
    if user is not None:
        p.user(addr(user))
        p.pass_(PASSWORD)
    return p


def pop3s(server: MailguardServer, user: str) -> poplib.POP3_SSL:
    """A logged-in session on the implicit-TLS pop3s listener."""
    p = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=30)
    p.user(addr(user))
    p.pass_(PASSWORD)
    return p


def send(server: MailguardServer, user: str, body: bytes, subject: str = "test") -> None:
    """Deliver one message to ``user`` over SMTP (smtplib dot-stuffs it)."""
    msg = b"From: sender@outside.example\r\nTo: " + addr(user).encode() + b"\r\nSubject: " \
        + subject.encode() + b"\r\n\r\n" + body
    with server.smtp() as s:
        s.sendmail("sender@outside.example", [addr(user)], msg)


def stored_crlf(server: MailguardServer, user: str) -> list[bytes]:
    """The stored messages (LF on disk) as the CRLF octets POP3 must send, in delivery order."""
    files = server.message_files(addr(user))
    files.sort(key=lambda p: p.name.split(",")[0])
    return [p.read_bytes().replace(b"\n", b"\r\n") for p in files]


@pytest.fixture(scope="module")
def popserver(server_factory: ServerFactory) -> MailguardServer:
    """A server with one mailbox per test, so tests do not see each other's mail."""
    server = server_factory("pop", {"domains": {DOMAIN: {"route": "inbound"}},
                                    "limits": {"max_message_size": 2_000_000}})
    for user in USERS:
        server.add_user(addr(user), PASSWORD)
    return server


# --------------------------------------------------------------------------- poplib


def test_retrieve_delete_keep(popserver: MailguardServer) -> None:
    """RETR returns each message; DELE + QUIT removes only the deleted one; the rest stays."""
    marks = [marker() for _ in range(3)]
    for m in marks:
        send(popserver, "alice", m.encode() + b"\r\n")
    p = pop3(popserver, "alice")
    count, _ = p.stat()
    assert count == 3
    bodies = [b"\r\n".join(p.retr(i)[1]) for i in (1, 2, 3)]
    assert [m.encode() in b for m, b in zip(marks, bodies)] == [True, True, True]
    assert p.dele(2).startswith(b"+OK")
    assert p.quit().startswith(b"+OK")
    left = b"".join(popserver.messages(addr("alice")))
    assert marks[0].encode() in left and marks[2].encode() in left
    assert marks[1].encode() not in left


def test_list_sizes_equal_retr_octets(popserver: MailguardServer) -> None:
    """LIST's size of each message equals the octets RETR delivers (after un-stuffing)."""
    send(popserver, "bob", b"short\r\n")
    send(popserver, "bob", b".leading dot\r\n..two\r\n.\r\nx" * 5000 + b"\r\n")
    send(popserver, "bob", b"\xc3\xa9t\xc3\xa9 8bit\r\n" * 3000)
    p = pop3(popserver, "bob")
    _, listing, _ = p.list()
    sizes = {int(n): int(s) for n, s in (line.split() for line in listing)}
    for n, size in sizes.items():
        _, lines, octets = p.retr(n)
        assert octets == size == sum(len(line) + 2 for line in lines)
    assert [b"\r\n".join(p.retr(n)[1]) + b"\r\n" for n in sorted(sizes)] == stored_crlf(popserver, "bob")
    p.quit()


def filler(n: int) -> bytes:
    """Exactly ``n`` octets (LF form) of lines no longer than 900, none starting with '.'."""
    out = b""
    while n > 900:
        out += b"f" * 899 + b"\n"
        n -= 900
    return out + b"f" * (n - 1) + b"\n" if n else out


def test_dot_lines_at_chunk_boundaries(popserver: MailguardServer) -> None:
    """'.' lines at the body start and at 16 KiB / 64 KiB chunk boundaries of the stored file
    come out of RETR intact (the "16 KiB hole" of docs/twisted.rst)."""
    boundaries = (16384, 32768, 65536, 131072)
    send(popserver, "carol", b"probe\r\n")
    (probe,) = popserver.messages(addr("carol"))
    header = len(probe) - len(b"probe\n")  # trace headers + our headers + blank line, as stored
    body = b".\n"
    for boundary in boundaries:
        body += filler(boundary - header - len(body)) + b".\n"
    body += b"end\n"
    send(popserver, "carol", body.replace(b"\n", b"\r\n"))
    stored = max(popserver.message_files(addr("carol")), key=lambda p: p.stat().st_size).read_bytes()
    assert stored[header:header + 2] == b".\n"
    for boundary in boundaries:
        assert stored[boundary:boundary + 2] == b".\n", boundary
    p = pop3(popserver, "carol")
    n = max((1, 2), key=lambda i: int(p.list(i).split()[2]))
    _, lines, octets = p.retr(n)
    assert b"\r\n".join(lines) + b"\r\n" == stored.replace(b"\n", b"\r\n")
    assert lines.count(b".") == 5
    assert octets == int(p.list(n).split()[2])
    p.quit()


def test_uidl_stable_across_sessions(popserver: MailguardServer) -> None:
    """UIDLs stay the same across sessions, also after RETR moved messages from new/ to cur/."""
    for _ in range(3):
        send(popserver, "dave", marker().encode() + b"\r\n")
    p = pop3(popserver, "dave")
    first = p.uidl()[1]
    p.retr(1)
    p.retr(3)
    p.quit()
    box = popserver.maildir(addr("dave"))
    assert len(os.listdir(box / "cur")) == 2
    assert all(name.endswith(":2,S") for name in os.listdir(box / "cur"))
    q = pop3s(popserver, "dave")
    assert q.uidl()[1] == first
    q.dele(1)
    q.quit()
    r = pop3(popserver, "dave")
    assert r.uidl()[1] == [b"%d %s" % (i, line.split()[1]) for i, line in enumerate(first[1:], 1)]
    r.quit()


def test_dele_without_quit_deletes_nothing(popserver: MailguardServer) -> None:
    """DELE then a dropped connection (no QUIT): every message is still there."""
    for _ in range(2):
        send(popserver, "erin", marker().encode() + b"\r\n")
    before = popserver.messages(addr("erin"))
    p = pop3(popserver, "erin")
    p.dele(1)
    p.dele(2)
    p.close()  # drop the connection without QUIT
    q = login_when_unlocked(popserver, "erin")
    assert popserver.messages(addr("erin")) == before
    assert q.stat()[0] == 2
    q.quit()


def login_when_unlocked(server: MailguardServer, user: str, timeout: float = 5.0) -> poplib.POP3:
    """Log in, retrying while the server has not yet noticed a dropped session (IN-USE)."""
    deadline = time.monotonic() + timeout
    while True:
        p = pop3(server)
        try:
            p.user(addr(user))
            p.pass_(PASSWORD)
            return p
        except poplib.error_proto as e:
            p.close()
            if not e.args[0].startswith(b"-ERR [IN-USE]") or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_in_use_lock(popserver: MailguardServer) -> None:
    """A second session on a mailbox gets -ERR [IN-USE]; after the first QUITs it gets in."""
    first = pop3(popserver, "frank")
    second = pop3(popserver)
    second.user(addr("frank"))
    with pytest.raises(poplib.error_proto) as info:
        second.pass_(PASSWORD)
    assert info.value.args[0].startswith(b"-ERR [IN-USE]")
    first.quit()
    second.user(addr("frank"))  # RFC 1939: after a failed PASS, USER again
    assert second.pass_(PASSWORD).startswith(b"+OK")
    second.quit()


def test_login_requires_tls(popserver: MailguardServer) -> None:
    """On cleartext, CAPA offers STLS but not USER, and USER is refused with -ERR [AUTH]."""
    p = poplib.POP3("127.0.0.1", popserver.ports["pop3"], timeout=30)
    caps = p.capa()
    assert "STLS" in caps and "USER" not in caps and "PIPELINING" in caps
    with pytest.raises(poplib.error_proto) as info:
        p.user(addr("grace"))
    assert info.value.args[0].startswith(b"-ERR [AUTH]")
    p.stls(tls_context())
    caps = p.capa()
    assert "USER" in caps and caps.get("SASL") == ["PLAIN"] and "STLS" not in caps
    p.user(addr("grace"))
    assert p.pass_(PASSWORD).startswith(b"+OK")
    p.quit()


def recv_line(sock: socket.socket) -> bytes:
    """One CRLF line, read a byte at a time so that nothing after it is consumed."""
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def test_stls_discards_pipelined_cleartext(popserver: MailguardServer) -> None:
    """A USER pipelined in the clear behind STLS is not executed inside TLS (RFC 2595 section 4)."""
    raw = socket.create_connection(("127.0.0.1", popserver.ports["pop3"]), timeout=30)
    assert recv_line(raw).startswith(b"+OK")
    raw.sendall(b"STLS\r\nUSER " + addr("grace").encode() + b"\r\n")
    assert recv_line(raw).startswith(b"+OK")
    with tls_context().wrap_socket(raw) as tls:
        tls.sendall(b"PASS " + PASSWORD.encode() + b"\r\n")
        assert recv_line(tls) == b"-ERR USER first\r\n"
        tls.sendall(b"QUIT\r\n")
        assert recv_line(tls).startswith(b"+OK")


def test_pop3s_and_auth_plain(popserver: MailguardServer) -> None:
    """Implicit TLS: no STLS offered; AUTH PLAIN with an initial response logs in; bad password fails."""
    p = poplib.POP3_SSL("127.0.0.1", popserver.ports["pop3s"], context=tls_context(), timeout=30)
    assert "STLS" not in p.capa()
    import base64
    bad = base64.b64encode(f"\0{addr('grace')}\0wrong".encode()).decode()
    with pytest.raises(poplib.error_proto) as info:
        p._shortcmd(f"AUTH PLAIN {bad}")
    assert info.value.args[0].startswith(b"-ERR [AUTH]")
    good = base64.b64encode(f"\0{addr('grace')}\0{PASSWORD}".encode()).decode()
    assert p._shortcmd(f"AUTH PLAIN {good}").startswith(b"+OK")
    p.quit()
    assert popserver.wait_for_log(r"mailguard auth failure: service=pop3 client=127\.0\.0\.1 user=grace@")


def test_malformed_commands_keep_the_session(popserver: MailguardServer) -> None:
    """Garbage, a long line and odd arguments get -ERR; the same session then works."""
    p = pop3(popserver, "grace")
    for line in ("DELE abc", "LIST -1", "TOP 1", "XYZZY", "RETR 1 2", "NOOP " + "x" * 300):
        with pytest.raises(poplib.error_proto):
            p._shortcmd(line)
    assert p.noop().startswith(b"+OK")
    p.quit()


# --------------------------------------------------------------------------- real clients


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


def test_fetchmail_keep_then_fetch(popserver: MailguardServer, tmp_path: Path) -> None:
    """fetchmail over STLS: 'keep' + UIDL fetches once, a second run finds nothing new, then
    a run without 'keep' deletes from the server."""
    marks = [marker() for _ in range(2)]
    for m in marks:
        send(popserver, "heidi", m.encode() + b"\r\n")
    out = tmp_path / "out"
    out.mkdir()

    def rc(keep: bool) -> Path:
        path = tmp_path / "fetchmailrc"
        path.write_text(
            "set no syslog\n"
            f"poll 127.0.0.1 with proto POP3 service {popserver.ports['pop3']} uidl auth password\n"
            f"  user \"{addr('heidi')}\" there with password \"{PASSWORD}\" is root here\n"
            f"  options {'keep' if keep else 'nokeep'} sslproto 'tls1.2+' no sslcertck\n"
            f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n")
        path.chmod(0o600)
        return path

    env = dict(os.environ, HOME=str(tmp_path))
    idfile = str(tmp_path / "fetchids")
    first = run(["fetchmail", "-f", str(rc(True)), "--idfile", idfile, "-v"], env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "STLS" in first.stdout + first.stderr
    got = "".join(p.read_text() for p in out.iterdir())
    assert all(m in got for m in marks)
    assert len(popserver.messages(addr("heidi"))) == 2
    again = run(["fetchmail", "-f", str(rc(True)), "--idfile", idfile], env=env)
    assert again.returncode == 1, again.stdout + again.stderr  # 1: no new mail
    assert len(list(out.iterdir())) == 2
    gone = run(["fetchmail", "-f", str(rc(False)), "--idfile", idfile, "--all"], env=env)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert popserver.messages(addr("heidi")) == []


# getmail 6.18 loses the wake-up of its delivery child when the child exits before the
# parent waits (ForkingBase._wait_for_child: Condition.notify before Condition.wait), and
# then hangs for its whole socket timeout; about one delivery in seventy on this machine.
# The tests run the real getmail with that one wait made race-free.
_GETMAIL_FIX = """
import os
from getmailcore import baseclasses
from getmailcore.exceptions import getmailOperationError

def _wait_for_child(self, childpid):
    cond = self._ForkingBase__child_exited
    with cond:
        if not cond.wait_for(lambda: self._ForkingBase__child_pid, 60):
            raise getmailOperationError('waiting child pid %d timed out' % childpid)
    if self._ForkingBase__child_pid != childpid:
        raise getmailOperationError('got child pid %d, not %d' % (self._ForkingBase__child_pid, childpid))
    status = self._ForkingBase__child_status
    if not os.WIFEXITED(status):
        raise getmailOperationError('child pid %d failed to exit' % childpid)
    return os.WEXITSTATUS(status)

baseclasses.ForkingBase._wait_for_child = _wait_for_child
"""


def getmail_env(tmp_path: Path) -> dict[str, str]:
    """Environment for getmail with the race fix above loaded through sitecustomize."""
    fix = tmp_path / "getmail-fix"
    fix.mkdir()
    (fix / "sitecustomize.py").write_text(_GETMAIL_FIX)
    return dict(os.environ, PYTHONPATH=str(fix))


@pytest.fixture
def nobody_maildir() -> Iterator[Path]:
    """A maildir the user ``nobody`` owns: getmail refuses to deliver as root."""
    import pwd
    import shutil
    import tempfile

    pw = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="mailguard-getmail-", dir="/tmp"))
    top.chmod(0o755)
    maildir = top / "Maildir"
    for sub in ("", "tmp", "new", "cur"):
        (maildir / sub).mkdir(exist_ok=True)
        os.chown(maildir / sub, pw.pw_uid, pw.pw_gid)
    try:
        yield maildir
    finally:
        shutil.rmtree(top)


def test_getmail_pop3s_keep_and_delete(popserver: MailguardServer, tmp_path: Path, nobody_maildir: Path) -> None:
    """getmail6 over pop3s: fetches into a maildir, keeps on the server, fetches nothing twice, deletes."""
    marks = [marker() for _ in range(2)]
    for m in marks:
        send(popserver, "ivan", m.encode() + b"\r\n")
    maildir = nobody_maildir
    gdir = tmp_path / "getmail"
    gdir.mkdir()

    def rc(delete: bool) -> Path:
        path = gdir / "getmailrc"
        path.write_text(
            "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
            f"port = {popserver.ports['pop3s']}\nusername = {addr('ivan')}\npassword = {PASSWORD}\n"
            f"[destination]\ntype = Maildir\npath = {maildir}/\nuser = nobody\n"
            f"[options]\nread_all = false\ndelete = {'true' if delete else 'false'}\nverbose = 2\n")
        return path

    def fetched() -> str:
        return "".join(p.read_text() for p in (maildir / "new").iterdir())

    env = getmail_env(tmp_path)

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    first = run(["getmail", "--getmaildir", str(gdir), "--rcfile", str(rc(False))])
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(m in fetched() for m in marks)
    assert len(popserver.messages(addr("ivan"))) == 2
    again = run(["getmail", "--getmaildir", str(gdir), "--rcfile", str(rc(False))])
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(list((maildir / "new").iterdir())) == 2  # UIDLs unchanged: nothing new
    send(popserver, "ivan", b"third\r\n")
    last = run(["getmail", "--getmaildir", str(gdir), "--rcfile", str(rc(True))])
    assert last.returncode == 0, last.stdout + last.stderr
    assert len(list((maildir / "new").iterdir())) == 3
    # delete = true: getmail deletes the new message and the ones it kept before.
    assert popserver.messages(addr("ivan")) == []


# --------------------------------------------------------------------------- POP-before-SMTP


WINDOW = 4


@pytest.fixture
def pbs_server(fresh_server_factory: ServerFactory) -> Iterator[MailguardServer]:
    server = fresh_server_factory("pbs", {"domains": {DOMAIN: {"route": "inbound"}},
                                          "relay": {"pop_before_smtp": WINDOW}})
    server.add_user(addr("alice"), PASSWORD)
    yield server


def relay_reply(server: MailguardServer, source: str) -> str:
    """The reply to a RCPT for a remote domain from ``source``."""
    with server.dialog(source=source) as d:
        d.cmd("EHLO client.example")
        d.cmd("MAIL FROM:<alice@realdomain.example>")
        r = d.cmd("RCPT TO:<friend@elsewhere.example>")
        d.cmd("QUIT")
    return r.last


def test_pop_before_smtp(pbs_server: MailguardServer) -> None:
    """A POP3 login from 127.0.0.30 lets that IP relay for the window; 127.0.0.31 never could."""
    assert relay_reply(pbs_server, "127.0.0.30") == RELAY_DENIED
    p = pop3(pbs_server, "alice", source="127.0.0.30")
    logged_in = time.monotonic()
    p.quit()
    assert relay_reply(pbs_server, "127.0.0.30") == str(replies.RECIPIENT_OK)
    assert relay_reply(pbs_server, "127.0.0.31") == RELAY_DENIED
    assert pbs_server.wait_for_log(r"rule=pop_before_smtp")
    # The window closes: polled, and not before WINDOW seconds after the login.
    wait_for(lambda: relay_reply(pbs_server, "127.0.0.30") == RELAY_DENIED, WINDOW + 10,
             "the pop_before_smtp window to close")
    assert time.monotonic() - logged_in >= WINDOW


def test_failed_login_grants_nothing(pbs_server: MailguardServer) -> None:
    """A wrong password over POP3 does not open the relay."""
    p = pop3(pbs_server, source="127.0.0.32")
    p.user(addr("alice"))
    with pytest.raises(poplib.error_proto):
        p.pass_("wrong")
    p.quit()
    assert relay_reply(pbs_server, "127.0.0.32") == RELAY_DENIED



# --------------------------------------------------------------------------- Dovecot


DOVECOT_POP3 = "/usr/lib/dovecot/pop3"  # Debian dovecot-pop3d


class _Pipes:
    """The little of a socket that poplib uses, over a child's stdin/stdout pipes."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def makefile(self, mode: str) -> object:
        return self.process.stdout

    def sendall(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()


class PipePOP3(poplib.POP3):
    """``poplib.POP3`` speaking to a preauthenticated Dovecot ``pop3`` process over pipes
    (Dovecot refuses a socket on stdin: it takes that for inetd)."""

    def __init__(self, maildir: Path, conf: Path) -> None:
        self.process = subprocess.Popen(
            [DOVECOT_POP3, "-c", str(conf)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env={"USER": "alice", "HOME": str(maildir.parent), "PATH": "/usr/bin:/bin"})
        self.welcome_pending = True
        super().__init__("dovecot", 0, timeout=30)

    def _create_socket(self, timeout: float) -> socket.socket:
        return _Pipes(self.process)  # type: ignore[return-value]

    def _getresp(self) -> bytes:
        # Preauthenticated: Dovecot sends no greeting, so the constructor must not wait for one.
        if self.welcome_pending:
            self.welcome_pending = False
            return b"+OK preauthenticated"
        return super()._getresp()

    def finish(self) -> None:
        self.quit()
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.process.wait(30)


@pytest.fixture
def dovecot_copy(tmp_path: Path) -> Iterator[Callable[[Path], tuple[Path, Path]]]:
    """Copies a maildir where Dovecot (running as nobody) may read it, with a minimal config."""
    import pwd
    import shutil
    import tempfile

    pw = pwd.getpwnam("nobody")
    tops: list[Path] = []

    def copy(source: Path) -> tuple[Path, Path]:
        top = Path(tempfile.mkdtemp(prefix="mailguard-dovecot-", dir="/tmp"))
        tops.append(top)
        top.chmod(0o755)
        box = top / "Maildir"
        shutil.copytree(source, box)
        for path in [box, *box.rglob("*")]:
            os.chown(path, pw.pw_uid, pw.pw_gid)
        conf = top / "dovecot.conf"
        conf.write_text(f"log_path = /dev/null\nssl = no\nmail_location = maildir:{box}\n"
                        "mail_uid = nobody\nmail_gid = nogroup\n")
        return box, conf

    try:
        yield copy
    finally:
        for top in tops:
            shutil.rmtree(top)


def test_dovecot_reads_what_mailguard_wrote(popserver: MailguardServer,
                                            dovecot_copy: Callable[[Path], tuple[Path, Path]]) -> None:
    """Dovecot, pointed at a maildir mailguard wrote (after a mailguard session moved some
    messages to cur/), lists the same messages with the same sizes and the same contents."""
    user = "judy"
    popserver.add_user(addr(user), PASSWORD)
    send(popserver, user, b"plain\r\n")
    send(popserver, user, b".dot first\r\n..\r\n.\r\n" * 200)
    send(popserver, user, "\u00e9t\u00e9 \u2603\r\n".encode() * 50)
    send(popserver, user, filler(70000).replace(b"\n", b"\r\n"))
    p = pop3(popserver, user)
    p.retr(2)
    p.quit()
    p = pop3(popserver, user)
    ours = [line.split() for line in p.list()[1]]
    our_msgs = [p.retr(int(n))[1] for n, _ in ours]
    p.quit()
    box, conf = dovecot_copy(popserver.maildir(addr(user)))
    d = PipePOP3(box, conf)
    theirs = [line.split() for line in d.list()[1]]
    their_msgs = [d.retr(int(n))[1] for n, _ in theirs]
    d.finish()
    assert theirs == ours and len(ours) == 4
    assert their_msgs == our_msgs
    # Dovecot takes W= from the name; what it actually sends must agree with it.
    assert [int(size) for _, size in theirs] == [sum(len(line) + 2 for line in m) for m in their_msgs]
