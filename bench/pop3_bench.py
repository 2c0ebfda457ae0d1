"""Maildir and POP3 benchmark: mailguard beside Dovecot on the same maildir, in the same run.

Measures, for a mailbox of ``--messages`` messages (default 20,000):

- delivery through the group commit (the server's only delivery path: tmp/, sync,
  rename into new/, sync) in messages per second, from one thread and from
  ``--threads`` threads at once (concurrent SMTP sessions), and to ten mailboxes;
- ``Mailbox.open`` (the scan a POP3 login runs in a thread) and a commit deleting
  ``--retr`` messages, in process;
- over the wire: login + STAT (mailguard: the scan; Dovecot: cold, building its
  index, then warm), UIDL and LIST of the whole mailbox, RETR of ``--retr`` messages
  (default 5,000) in one session.  mailguard's login includes the password hash check
  (argon2), which Dovecot's preauthenticated session does not do: the login to an empty
  mailbox is shown as the baseline to subtract.

``bench/pop3_compare.py`` compares full sessions with passwords on both sides.

mailguard runs as the real ``twistd -n mailguard`` (through the end-to-end harness) on
loopback TCP; Dovecot's ``pop3`` binary (Debian ``dovecot-pop3d``) runs preauthenticated
over pipes on a copy of the same maildir, as the user ``nobody``.  The same ``poplib``
client code drives both.  Run from the repository root::

    python bench/pop3_bench.py [--messages 20000] [--retr 5000]
"""

from __future__ import annotations

import argparse
import os
import poplib
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twisted.python.failure import Failure  # noqa: E402

from mailguard.storage import maildir  # noqa: E402
from mailguard.storage.groupcommit import GroupCommit  # noqa: E402
from tests.e2e.harness import MailguardServer  # noqa: E402

DOVECOT_POP3 = "/usr/lib/dovecot/pop3"
USER = "bench@bench.example"
PASSWORD = "bench password"


def message(i: int) -> bytes:
    """A plausible 2-4 KiB message in CRLF form, some lines starting with a dot."""
    head = (f"Return-Path: <sender{i % 97}@outside.example>\r\n"
            f"Received: from client.outside.example by mx.bench.example (mailguard) id B{i:08d}\r\n"
            f"From: Sender {i % 97} <sender{i % 97}@outside.example>\r\nTo: <{USER}>\r\n"
            f"Subject: benchmark message {i}\r\nMessage-ID: <{i}@outside.example>\r\n\r\n")
    body = "".join(f"{'.' if n % 9 == 0 else ''}line {n} of message {i}, some text to fill it up a bit\r\n"
                   for n in range(30 + i % 40))
    return (head + body).encode()


class _Answers:
    """Stands in for the reactor: the group commit's answers run in its own thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)


def committer(root: Path) -> Callable[[list[Path], bytes], list[str]]:
    """A blocking delivery through a :class:`GroupCommit` on ``root``: the file names."""
    gc = GroupCommit(_Answers(), root)

    def deliver(boxes: list[Path], msg: bytes) -> list[str]:
        done = threading.Event()
        out: list[Any] = []
        gc.deliver(boxes, msg).addBoth(lambda r: (out.append(r), done.set()))
        done.wait()
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]  # type: ignore[no-any-return]

    return deliver


def populate(box: Path, count: int, synced: int) -> float:
    """Fill ``box``: ``synced`` messages through the group commit (timed), the rest written plainly."""
    maildir._create(box)
    deliver = committer(box)
    t0 = time.perf_counter()
    for i in range(synced):
        deliver([box], message(i))
    rate = synced / (time.perf_counter() - t0) if synced else 0.0
    for i in range(synced, count):
        lf, size = maildir._lf_form(message(i))
        name = f"{maildir._unique()},S={len(lf)},W={size}"
        (box / "new" / name).write_bytes(lf)
    return rate


class _Pipes:
    """The part of a socket poplib uses, over a child's pipes."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def makefile(self, mode: str) -> Any:
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


class DovecotPOP3(poplib.POP3):
    """Preauthenticated Dovecot pop3 over pipes (no greeting is sent)."""

    def __init__(self, conf: Path, home: Path) -> None:
        self.process = subprocess.Popen([DOVECOT_POP3, "-c", str(conf)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        env={"USER": "bench", "HOME": str(home), "PATH": "/usr/bin:/bin"})
        self._greeted = False
        super().__init__("dovecot", 0)

    def _create_socket(self, timeout: Any) -> Any:
        return _Pipes(self.process)

    def _getresp(self) -> bytes:
        if not self._greeted:
            self._greeted = True
            return b"+OK"
        return super()._getresp()

    def finish(self) -> None:
        self.quit()
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.process.wait(60)


def delivery_rates(top: Path, total: int, threads: int) -> dict[str, float]:
    """Messages per second through the group commit from many threads, and fan-out to ten mailboxes."""
    from concurrent.futures import ThreadPoolExecutor

    (top / "rate").mkdir(parents=True, exist_ok=True)
    deliver = committer(top / "rate")
    msgs = [message(i) for i in range(total)]
    out: dict[str, float] = {}
    boxes = [top / "rate" / f"u{i}" for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda i: deliver([boxes[i % threads]], msgs[i]), range(total)))
        out[f"group commit, {threads} threads, {threads} mailboxes"] = total / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        list(pool.map(lambda i: deliver([top / "rate" / "one"], msgs[i]), range(total)))
        out[f"group commit, {threads} threads, one mailbox"] = total / (time.perf_counter() - t0)
        fan = [top / "rate" / f"fan{i}" for i in range(10)]
        t0 = time.perf_counter()
        list(pool.map(lambda i: deliver(fan, msgs[i]), range(total // 10)))
        out[f"group commit to 10 mailboxes, {threads} threads (copies)"] = total / (time.perf_counter() - t0)
    shutil.rmtree(top / "rate")
    return out


def timed(label: str, results: dict[str, float], f: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = f()
    results[label] = time.perf_counter() - t0
    return out


def session(results: dict[str, float], prefix: str, connect: Callable[[], poplib.POP3],
            retr: int, close: Callable[[poplib.POP3], None]) -> tuple[int, list[bytes]]:
    p = timed(f"{prefix} login+STAT", results, lambda: (lambda c: (c, c.stat()))(connect()))
    client, (count, _) = p
    uidl = timed(f"{prefix} UIDL", results, lambda: client.uidl()[1])
    timed(f"{prefix} LIST", results, lambda: client.list()[1])
    timed(f"{prefix} RETR x{retr}", results, lambda: [client.retr(n) for n in range(1, retr + 1)])
    close(client)
    return count, uidl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--retr", type=int, default=5000)
    ap.add_argument("--synced", type=int, default=500, help="messages delivered with fsync, one thread")
    ap.add_argument("--threads", type=int, default=20, help="threads for the concurrent delivery figures")
    args = ap.parse_args()
    if not os.path.exists(DOVECOT_POP3):
        sys.exit(f"{DOVECOT_POP3} is missing: install dovecot-pop3d")

    top = Path(tempfile.mkdtemp(prefix="mailguard-bench-", dir="/tmp"))
    top.chmod(0o755)
    results: dict[str, float] = {}
    server = MailguardServer(top / "mailguard", {
        "domains": {"bench.example": {"route": "inbound"}},
        "tls": {"auth_requires_tls": False},
        "limits": {"idle_timeout": 3600},
    })
    try:
        server.start()
        server.add_user(USER, PASSWORD)
        box = server.maildir(USER)
        rates = delivery_rates(top, args.synced * 4, args.threads)

        def login_empty() -> None:
            c = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=600)
            c.user(USER)
            c.pass_(PASSWORD)
            c.quit()

        timed("mailguard login, empty mailbox (baseline)", results, login_empty)
        rate = populate(box, args.messages, min(args.synced, args.messages))
        scan = timed("in process: Mailbox.open", results, lambda: maildir.Mailbox.open(box))
        snapshot = top / "snapshot"
        shutil.copytree(box, snapshot)
        probe = maildir.Mailbox.open(snapshot)
        for n in range(1, min(args.retr, args.messages) + 1):
            probe.delete(n)
        timed(f"in process: commit deleting {args.retr}", results, probe.commit)
        shutil.rmtree(snapshot)
        assert scan.stat()[0] == args.messages

        def mailguard() -> poplib.POP3:
            c = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=600)
            c.user(USER)
            c.pass_(PASSWORD)
            return c

        def copy_for_dovecot() -> tuple[Path, Path]:
            home = top / "dovecot"
            shutil.rmtree(home, ignore_errors=True)
            shutil.copytree(box, home / "Maildir")
            nobody = pwd.getpwnam("nobody")
            for path in [home, *home.rglob("*")]:
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            conf = top / "dovecot.conf"
            conf.write_text(f"log_path = /dev/null\nssl = no\nmail_location = maildir:{home}/Maildir\n"
                            "mail_uid = nobody\nmail_gid = nogroup\n")
            return conf, home

        conf, home = copy_for_dovecot()
        ours = session(results, "mailguard", mailguard, args.retr, lambda c: c.quit())
        session(results, "mailguard (again)", mailguard, 0, lambda c: c.quit())
        theirs = session(results, "dovecot (cold)", lambda: DovecotPOP3(conf, home), args.retr,
                         lambda c: c.finish())  # type: ignore[attr-defined]
        session(results, "dovecot (warm)", lambda: DovecotPOP3(conf, home), 0,
                lambda c: c.finish())  # type: ignore[attr-defined]
        assert ours[0] == theirs[0] == args.messages, (ours[0], theirs[0])
    finally:
        server.stop()
        shutil.rmtree(top, ignore_errors=True)

    print(f"mailbox: {args.messages} messages; RETR of {args.retr}; "
          f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}")
    print(f"delivery with sync (group commit, one thread): {rate:,.0f} messages/s")
    for label, value in rates.items():
        print(f"delivery with sync ({label}): {value:,.0f} messages/s")
    for label, seconds in results.items():
        if "x0" in label:
            continue
        print(f"  {label:<34} {seconds * 1000:10.1f} ms")


if __name__ == "__main__":
    main()
