"""End to end: faults under the real server (issue 6 item 5).

Each fault is real, not simulated in the code under test:

- *disk full*: data_dir is a 2 MiB tmpfs mounted for the test (the tests run as root)
  and filled with a file, so the server's own writes fail with ENOSPC;
- *directory locked*: another process holds the SQLite file with
  ``PRAGMA locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE`` and writes in it; *missing*: the
  file is deleted under the running server;
- *DNS failing*: ``[outbound] dns_servers`` names a loopback UDP port nobody listens on;
- *crash*: ``kill -9`` at random instants while clients stream messages, over and over.

The promise under test is the one a ``250`` makes: an acknowledged message is on disk,
exactly once, intact; a message that cannot be stored gets a 4xx and leaves nothing
half-written where a mail reader would see it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from mailguard import config
from mailguard.core import replies

from .conftest import ALLOWED_HOST, DOMAIN, OUTSIDER, ServerFactory
from .harness import Dialog, MailguardServer, make_message, split_added_headers

ALICE = f"alice@{DOMAIN}"
KIB = 1024
STORE_FAILED = str(replies.STORE_FAILED)
DIRECTORY_FAILURE = str(config.defaults().replies.directory_failure)


def marker() -> str:
    """A string unique to one message."""
    return "fault-" + uuid.uuid4().hex


def send_one(server: MailguardServer, rcpt: str, message: bytes, source: str = OUTSIDER) -> str:
    """One whole transaction on its own connection; the final reply line (or the first refusal)."""
    with server.dialog(source=source) as d:
        d.cmd("EHLO client.example")
        r = d.cmd("MAIL FROM:<sender@outside.example>")
        if r.code != 250:
            return r.last
        r = d.cmd(f"RCPT TO:<{rcpt}>")
        if r.code != 250:
            return r.last
        r = d.data(message)
        d.cmd("QUIT")
        return r.last


def files_in(folder: Path) -> list[Path]:
    """The regular files in ``folder`` (none when it does not exist)."""
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


# --------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mountpoint`` for the duration (root only)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"cannot mount a tmpfs (the test needs root): {done.stderr}"
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Write a filler file in ``folder`` until at most ``leave`` octets are free; returns it."""
    filler = folder / "filler"
    block = b"\0" * (64 * KIB)
    with open(filler, "ab") as f:
        while True:
            st = os.statvfs(folder)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(block[: max(4096, min(len(block), free - leave))])
                f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    return filler


def big_message(tag: str, size: int) -> bytes:
    """A message of about ``size`` octets whose lines name ``tag``."""
    line = f"{tag} " + "x" * 60
    lines = [line for _ in range(size // (len(line) + 2))]
    return make_message("sender@outside.example", ALICE, tag, lines)


def test_disk_full_is_451_and_nothing_half_written(fresh_server_factory: ServerFactory) -> None:
    """ENOSPC while storing: 451 4.3.0, nothing new in new/, no leftover in tmp/; mail flows once space is back."""
    server = fresh_server_factory(
        "diskfull",
        {"domains": {DOMAIN: {"route": "inbound"}}, "limits": {"max_message_size": 1 << 20}},
        start=False,
    )
    with tmpfs(server.data_dir, "2m") as data:
        try:
            server.start()
            server.add_user(ALICE)
            box = server.maildir(ALICE)
            ok = marker()
            assert send_one(server, ALICE, make_message("s@outside.example", ALICE, ok)).startswith("250")
            stored_before = files_in(box / "new")
            assert len(stored_before) == 1

            # 1. Completely full: the first write fails.
            filler = fill(data, 0)
            full = marker()
            reply = send_one(server, ALICE, make_message("s@outside.example", ALICE, full))
            assert reply == STORE_FAILED, reply
            assert files_in(box / "new") == stored_before
            assert files_in(box / "tmp") == [], files_in(box / "tmp")

            # 2. Space for part of the message: the write fails half-way.
            filler.unlink()
            filler = fill(data, 100 * KIB)
            half = marker()
            reply = send_one(server, ALICE, big_message(half, 400 * KIB))
            assert reply == STORE_FAILED, reply
            assert files_in(box / "new") == stored_before
            assert files_in(box / "tmp") == [], files_in(box / "tmp")
            assert not server.messages_containing(ALICE, half.encode())

            # 3. Space back: the same message goes through, whole.
            filler.unlink()
            again = big_message(half, 400 * KIB)
            assert send_one(server, ALICE, again).startswith("250")
            copies = server.messages_containing(ALICE, half.encode())
            assert len(copies) == 1
            split_added_headers(copies[0], again)
            assert server.running()
        finally:
            server.stop()


# --------------------------------------------------------------------------- directory faults

HOLDER = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
db.execute("PRAGMA locking_mode=EXCLUSIVE")
db.execute("BEGIN EXCLUSIVE")
db.execute("CREATE TABLE IF NOT EXISTS held_by_test (x)")
db.execute("INSERT INTO held_by_test VALUES (1)")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
db.close()
"""


def directory_path(server: MailguardServer) -> Path:
    """data_dir/directory.sqlite (the ``[directory] path`` default)."""
    return server.data_dir / "directory.sqlite"


@contextlib.contextmanager
def holding_lock(db: Path) -> Iterator[None]:
    """Another process holds ``db`` with locking_mode=EXCLUSIVE and an open write transaction."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().strip()
        assert line == "locked", f"the lock holder failed: {line!r} {holder.stderr.read() if holder.stderr else ''}"
        yield
    finally:
        for stream in (holder.stdin, holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
        holder.wait(10)


def rcpt_reply(server: MailguardServer, rcpt: str) -> tuple[str, float]:
    """The reply to RCPT TO:<rcpt> in a fresh session, and how long it took."""
    with server.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO client.example")
        assert d.cmd("MAIL FROM:<sender@outside.example>").code == 250
        start = time.monotonic()
        r = d.cmd(f"RCPT TO:<{rcpt}>")
        took = time.monotonic() - start
        d.cmd("QUIT")
    return r.last, took


def test_locked_directory_is_451_at_rcpt(fresh_server_factory: ServerFactory) -> None:
    """Another process holds the SQLite file exclusively and writes: RCPT gets 451 4.3.0; released, 250.

    The running server keeps a WAL connection open, which no other process can take an
    exclusive lock against; so the file is first moved aside for one lookup (the server
    answers 451 and drops its connection), put back, and only then locked.
    """
    server = fresh_server_factory("dirlocked", {"domains": {DOMAIN: {"route": "inbound"}}})
    server.add_user(ALICE)
    db = directory_path(server)
    assert rcpt_reply(server, ALICE)[0].startswith("250")
    aside = db.with_name(db.name + ".aside")
    os.rename(db, aside)
    assert rcpt_reply(server, ALICE)[0] == DIRECTORY_FAILURE
    os.rename(aside, db)
    with holding_lock(db):
        for rcpt in (ALICE, f"nosuchuser@{DOMAIN}"):
            reply, took = rcpt_reply(server, rcpt)
            assert reply == DIRECTORY_FAILURE, (rcpt, reply)
            assert took < 5, f"RCPT took {took:.1f} s while the directory was locked"
        # The relay rule holds meanwhile: never a 2xx for a remote address.
        reply, _ = rcpt_reply(server, "someone@remote.example")
        assert reply[:1] in ("4", "5"), reply
    assert rcpt_reply(server, ALICE)[0].startswith("250")
    assert send_one(server, ALICE, make_message("s@outside.example", ALICE, marker())).startswith("250")


def test_locked_directory_stalls_only_the_lookups(fresh_server_factory: ServerFactory) -> None:
    """While the directory is locked, RCPTs wait out its busy timeout one after another, but on
    the directory's own thread: another session is answered at once meanwhile (a lookup on the
    reactor thread would hold every session for the whole run of RCPTs)."""
    server = fresh_server_factory("dirstall", {"domains": {DOMAIN: {"route": "inbound"}}})
    server.add_user(ALICE)
    db = directory_path(server)
    assert rcpt_reply(server, ALICE)[0].startswith("250")
    aside = db.with_name(db.name + ".aside")
    os.rename(db, aside)                      # the server drops its connection (see above)
    assert rcpt_reply(server, ALICE)[0] == DIRECTORY_FAILURE
    os.rename(aside, db)
    n = 24
    with holding_lock(db), server.dialog(source=OUTSIDER) as slow, server.dialog(source=OUTSIDER) as quick:
        slow.cmd("EHLO client.example")
        assert slow.cmd("MAIL FROM:<sender@outside.example>").code == 250
        start = time.monotonic()
        slow.send(b"".join(f"RCPT TO:<user{i}@{DOMAIN}>\r\n".encode() for i in range(n)))
        waits = []
        for line in ("EHLO client.example", "NOOP", "NOOP", "NOOP"):
            before = time.monotonic()
            assert quick.cmd(line).code == 250
            waits.append(time.monotonic() - before)
        answers = [slow.read_reply().last for _ in range(n)]
        slow_run = time.monotonic() - start
    assert answers == [DIRECTORY_FAILURE] * n
    assert slow_run > 2.0, f"the lock did not slow the lookups ({slow_run:.2f} s for {n}): nothing measured"
    assert max(waits) < 0.5 * slow_run, f"other sessions waited {max(waits):.2f} s of the lookups' {slow_run:.2f} s"
    assert max(waits) < 1.0, waits


def test_server_starts_while_directory_is_locked(fresh_server_factory: ServerFactory) -> None:
    """A directory locked when the server starts: it still starts and answers 451 4.3.0, then 250 once free."""
    server = fresh_server_factory("dirlockedatstart", {"domains": {DOMAIN: {"route": "inbound"}}})
    server.add_user(ALICE)
    server.stop()
    with holding_lock(directory_path(server)):
        server.start()
        assert rcpt_reply(server, ALICE)[0] == DIRECTORY_FAILURE
    assert rcpt_reply(server, ALICE)[0].startswith("250")


def test_deleted_directory_is_451_at_rcpt(fresh_server_factory: ServerFactory) -> None:
    """The SQLite file deleted under the running server: RCPT gets 451 4.3.0, never 250 or 550."""
    server = fresh_server_factory("dirgone", {"domains": {DOMAIN: {"route": "inbound"}}})
    server.add_user(ALICE)
    assert send_one(server, ALICE, make_message("s@outside.example", ALICE, marker())).startswith("250")
    for p in server.data_dir.glob("directory.sqlite*"):
        p.unlink()
    for rcpt in (ALICE, f"nosuchuser@{DOMAIN}"):
        with server.dialog(source=OUTSIDER) as d:
            d.cmd("EHLO client.example")
            assert d.cmd("MAIL FROM:<sender@outside.example>").code == 250
            r = d.cmd(f"RCPT TO:<{rcpt}>")
            assert r.last == DIRECTORY_FAILURE, r
            d.cmd("QUIT")
    assert server.running()


def test_directory_lost_before_restart_is_451_not_550(fresh_server_factory: ServerFactory) -> None:
    """directory.sqlite lost while the server was down: after restart RCPT gets 451 4.3.0, not 550.

    Making an empty directory beside existing maildirs would bounce every local user's
    mail for good; putting the file back makes the same server answer 250 again.
    """
    server = fresh_server_factory("dirlostatstart", {"domains": {DOMAIN: {"route": "inbound"}}})
    server.add_user(ALICE)
    assert send_one(server, ALICE, make_message("s@outside.example", ALICE, marker())).startswith("250")
    server.stop()
    db = directory_path(server)
    saved = server.root / "saved"
    saved.mkdir()
    files = list(server.data_dir.glob("directory.sqlite*"))      # with its -wal and -shm
    for p in files:
        os.rename(p, saved / p.name)
    server.start()
    assert rcpt_reply(server, ALICE)[0] == DIRECTORY_FAILURE
    assert not db.exists()
    for p in files:
        os.rename(saved / p.name, p)
    assert rcpt_reply(server, ALICE)[0].startswith("250")


# --------------------------------------------------------------------------- DNS failing


def closed_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound, read back, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dns_failure_keeps_mail_queued(fresh_server_factory: ServerFactory) -> None:
    """Relayed mail while DNS does not answer: accepted, then deferred in the queue, not lost or bounced."""
    server = fresh_server_factory(
        "dnsdown",
        {
            "domains": {DOMAIN: {"route": "inbound"}},
            "relay": {"allow": [ALLOWED_HOST]},
            "outbound": {"smarthost": "", "dns_servers": [f"127.0.0.1:{closed_udp_port()}"],
                         "retry_schedule": [600]},
        },
    )
    tag = marker()
    rcpt = "someone@remote.example"
    reply = send_one(server, rcpt, make_message("sender@outside.example", rcpt, tag), source=ALLOWED_HOST)
    assert reply.startswith("250"), reply
    deadline = time.monotonic() + 120
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = server.queue_lines()
        if any(f"{rcpt}=deferred" in ln for ln in lines):
            break
        assert lines, "the message left the queue while DNS was down"
        time.sleep(1)
    assert any(f"{rcpt}=deferred" in ln for ln in lines), lines
    assert len(lines) == 1, lines
    # Nothing bounced to the sender, and nothing delivered anywhere.
    assert not (server.data_dir / "mail" / "outside.example").exists()
    assert "delivered" not in lines[0]


# --------------------------------------------------------------------------- kill -9

ROUNDS = 22
SENDERS = 3


def crash_message(msg_id: str) -> bytes:
    """A message whose every body line is derived from ``msg_id`` (so a torn copy shows)."""
    lines = [hashlib.sha256(f"{msg_id}:{i}".encode()).hexdigest() for i in range(40)]
    return make_message("stream@outside.example", ALICE, msg_id, [f"id {msg_id}", *lines, f"end {msg_id}"])


class Stream:
    """Clients sending messages one after another until the server dies; records the 250s."""

    def __init__(self, server: MailguardServer) -> None:
        self.server = server
        self.acked: list[str] = []
        self.sent: list[str] = []
        self.protocol_errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(SENDERS)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        for t in self._threads:
            t.join(15)
            assert not t.is_alive(), "a client hung after the server was killed"

    def _run(self) -> None:
        try:
            d = Dialog.connect(self.server.host, self.server.smtp_port, OUTSIDER, timeout=10)
        except OSError:
            return
        try:
            d.cmd("EHLO stream.example")
            while True:
                msg_id = marker()
                if d.cmd("MAIL FROM:<stream@outside.example>").code != 250:
                    return
                if d.cmd(f"RCPT TO:<{ALICE}>").code != 250:
                    return
                with self._lock:
                    self.sent.append(msg_id)
                r = d.data(crash_message(msg_id))
                if r.code == 250:
                    with self._lock:
                        self.acked.append(msg_id)
                else:
                    with self._lock:
                        self.protocol_errors.append(str(r))
                    return
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            d.close()


def test_kill9_never_loses_or_duplicates_acknowledged_mail(fresh_server_factory: ServerFactory) -> None:
    """kill -9 at random instants, 22 times: every 250 is in the maildir once and intact; restarts are clean."""
    server = fresh_server_factory("kill9", {"domains": {DOMAIN: {"route": "inbound"}}})
    server.add_user(ALICE)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    acked: set[str] = set()
    sent: set[str] = set()
    for round_no in range(ROUNDS):
        if round_no:
            server.start()  # raises when twistd does not come back with its banner
        stream = Stream(server)
        stream.start()
        time.sleep(rng.uniform(0.1, 1.2))
        server.kill9()
        stream.join()
        assert stream.protocol_errors == [], f"seed {seed} round {round_no}: {stream.protocol_errors}"
        acked.update(stream.acked)
        sent.update(stream.sent)
        by_id = stored_by_id(server)
        missing = sorted(acked - set(by_id))
        assert not missing, f"seed {seed} round {round_no}: acknowledged but not stored: {missing}"
        dupes = {k: len(v) for k, v in by_id.items() if len(v) != 1}
        assert not dupes, f"seed {seed} round {round_no}: stored more than once: {dupes}"
        assert set(by_id) <= sent, f"seed {seed}: stored messages nobody sent: {set(by_id) - sent}"
        for msg_id, copies in by_id.items():
            split_added_headers(copies[0], crash_message(msg_id))  # intact: ends with the message as sent
    assert len(acked) >= ROUNDS, f"seed {seed}: only {len(acked)} messages acknowledged in {ROUNDS} rounds"
    server.start()
    tag = marker()
    assert send_one(server, ALICE, crash_message(tag)).startswith("250")
    assert "Traceback" not in server.log_text()


def stored_by_id(server: MailguardServer) -> dict[str, list[bytes]]:
    """Stored messages of alice grouped by the stream id in their Subject."""
    out: dict[str, list[bytes]] = {}
    for p in server.message_files(ALICE):
        data = p.read_bytes()
        for line in data.split(b"\n"):
            if line.startswith(b"Subject: "):
                out.setdefault(line[9:].decode(), []).append(data)
                break
        else:
            raise AssertionError(f"{p} has no Subject: a torn file in the maildir: {data[:300]!r}")
    return out
