"""End to end: what a ``250`` after DATA promises, observed on the real server.

- The syscalls of the running ``twistd -n mailguard`` are traced with ``strace`` while
  one message is delivered: the message data is synced before the rename that
  publishes it into ``new/``, and that rename is synced, all before the server
  writes its ``250``.  (A ``kill -9`` test cannot see a missing sync: the page cache
  survives the process.)
- A message for a local mailbox and a remote recipient is one transaction: when the
  local copy cannot be written the client gets the 451 and nothing was queued, so
  its retry cannot send the remote copy twice.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mailguard.core import replies

from .conftest import DOMAIN, OUTSIDER, ServerFactory
from .harness import MailguardServer, make_message

ALICE = f"alice@{DOMAIN}"
PARTNER = "carol@partner.example"
CONFIG = {"domains": {DOMAIN: {"route": "inbound"}, "partner.example": {"route": "relay"}}}
SYNCS = ("fsync", "fdatasync", "syncfs")
RENAMES = ("rename", "renameat", "renameat2")

# strace -f -o FILE: "<pid> name(args) = result", or split in two lines around another
# thread's calls: "<pid> name(args <unfinished ...>" ... "<pid> <... name resumed>rest) = result".
_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^([a-z0-9_]+)\((.*)\)\s+=\s+(-?\d+)")
_UNFINISHED = re.compile(r"^([a-z0-9_]+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. ([a-z0-9_]+) resumed>(.*)\)\s+=\s+(-?\d+)")


@dataclass
class Call:
    """One traced system call: the trace lines where it began and ended."""

    name: str
    args: str
    result: int
    start: int
    end: int


def parse_trace(text: str) -> list[Call]:
    """The completed calls of an ``strace -f -y -o`` file, in order of their end."""
    calls: list[Call] = []
    open_calls: dict[tuple[str, str], tuple[str, int]] = {}
    for number, raw in enumerate(text.splitlines()):
        m = _LINE.match(raw)
        if m is None:
            continue
        pid, rest = m.groups()
        if (u := _UNFINISHED.match(rest)) is not None:
            open_calls[(pid, u.group(1))] = (u.group(2), number)
        elif (r := _RESUMED.match(rest)) is not None:
            args, start = open_calls.pop((pid, r.group(1)), ("", number))
            calls.append(Call(r.group(1), args + r.group(2), int(r.group(3)), start, number))
        elif (c := _CALL.match(rest)) is not None:
            calls.append(Call(c.group(1), c.group(2), int(c.group(3)), number, number))
    return calls


def fd_path(args: str) -> str:
    """The path strace -y shows for the first argument: ``7</var/mail>`` -> ``/var/mail``."""
    m = re.match(r"\d+<(.*?)>", args)
    return m.group(1) if m else ""


def strings(args: str) -> list[str]:
    """The quoted string arguments of a call."""
    return re.findall(r'"((?:[^"\\]|\\.)*)"', args)


class Strace:
    """``strace -p`` on a running process and all its threads, until :meth:`stop`."""

    def __init__(self, pid: int, out: Path) -> None:
        strace = shutil.which("strace")
        assert strace, "strace is not installed (.ci/run installs it)"
        self.out = out
        self.proc = subprocess.Popen(
            [strace, "-f", "-y", "-s", "120", "-o", str(out),
             "-e", "trace=" + ",".join(SYNCS + RENAMES + ("write", "sendto", "sendmsg")), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()           # "strace: Process N attached" once it watches
        assert "attached" in line, f"strace could not attach: {line}{self.proc.stderr.read()}"
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> list[Call]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        finally:
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        return parse_trace(self.out.read_text(errors="replace"))


def send(server: MailguardServer, rcpts: list[str], message: bytes) -> str:
    """One transaction from an outside client; the reply to the final dot."""
    with server.dialog(source=OUTSIDER) as d:
        d.cmd("EHLO client.example")
        assert d.cmd("MAIL FROM:<sender@outside.example>").code == 250
        for rcpt in rcpts:
            r = d.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, r.last
        reply = d.data(message).last
        d.cmd("QUIT")
    return reply


def test_the_250_comes_after_the_message_and_its_name_are_synced(fresh_server_factory: ServerFactory) -> None:
    """strace of the real server: write to tmp/ -> sync -> rename into new/ -> sync -> '250 ... queued'."""
    server = fresh_server_factory("strace", CONFIG)
    server.add_user(ALICE)
    assert server.process is not None
    tracer = Strace(server.process.pid, server.root / "strace.out")
    try:
        reply = send(server, [ALICE], make_message("sender@outside.example", ALICE, "traced"))
    finally:
        calls = tracer.stop()
    assert reply.startswith(str(replies.QUEUED)), reply
    box = str(server.maildir(ALICE).resolve())
    data_dir = str(server.data_dir.resolve())

    answers = [c for c in calls if c.name in ("write", "sendto", "sendmsg") and c.args.find(str(replies.QUEUED)) >= 0]
    assert answers, "the server's 250 was not seen in the trace"
    answered = answers[0].start
    published = [c for c in calls if c.name in RENAMES and c.result == 0
                 and any(s.startswith(f"{box}/new/") for s in strings(c.args))]
    assert len(published) == 1, published
    rename = published[0]
    staged = next(s for s in strings(rename.args) if s.startswith(f"{box}/tmp/"))
    written = [c for c in calls if c.name == "write" and fd_path(c.args) == staged]
    assert written, f"no write to {staged} seen"

    def syncs_it(c: Call, path: str) -> bool:
        """The call makes ``path``'s data or entry durable: fsync of it, or syncfs of its filesystem."""
        target = fd_path(c.args)
        return c.name in SYNCS and c.result == 0 and (
            target == path or (c.name == "syncfs" and target.startswith(data_dir)))

    data_synced = [c for c in calls if syncs_it(c, staged) and c.start > written[-1].end and c.end < rename.start]
    assert data_synced, "the message data was not synced before the rename that publishes it"
    name_synced = [c for c in calls if syncs_it(c, f"{box}/new") and c.start > rename.end and c.end < answered]
    assert name_synced, "the rename into new/ was not synced before the 250"
    assert rename.end < answered


def test_a_failing_local_copy_queues_nothing(fresh_server_factory: ServerFactory) -> None:
    """Local + remote recipients, the local copy cannot be written: 451, no queue entry, nothing
    in new/; the client's retry, once the mailbox is repaired, stores one copy and one entry."""
    server = fresh_server_factory("transaction", CONFIG)
    server.add_user(ALICE)
    box = server.maildir(ALICE)
    for sub in ("new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    (box / "tmp").write_text("a file where the maildir's tmp/ should be")
    message = make_message("sender@outside.example", ALICE, "all-or-nothing")

    reply = send(server, [ALICE, PARTNER], message)
    assert reply == str(replies.STORE_FAILED)
    assert server.queue_lines() == []
    queue_dir = server.data_dir / "queue"
    assert (sorted(os.listdir(queue_dir)) if queue_dir.is_dir() else []) == []
    assert os.listdir(box / "new") == []

    (box / "tmp").unlink()
    (box / "tmp").mkdir()
    assert send(server, [ALICE, PARTNER], message).startswith(str(replies.QUEUED))
    assert len(os.listdir(box / "new")) == 1
    lines = server.queue_lines()
    assert len(lines) == 1 and f"{PARTNER}=" in lines[0]
