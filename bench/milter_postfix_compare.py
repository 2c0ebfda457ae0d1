#!/usr/bin/env python3
"""The same message through the same milter, in mailguard and in Postfix: same reply, same bytes?

One command (root: it configures and starts the Debian Postfix of ``setup_postfix.sh``)::

    python3 bench/milter_postfix_compare.py

It starts the pymilter test milter (``tests/milters/action_milter.py``), points
Postfix's ``smtpd_milters`` and mailguard's ``[filters] milters`` at it, and sends both
the same message for each milter action.  For each it prints both replies to the final
dot and whether the stored messages are the same once each server's own trace
delivery headers (``Return-Path``, ``Delivered-To``, ``X-Original-To``) are set aside and the
text of each ``Received:`` header (not its place); a difference
is printed as a diff.
"""

from __future__ import annotations

import difflib
import os
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import ADDRESS, BENCH, REPO, Mailguard, Postfix, count_files, free_port  # noqa: E402

ACTIONS = ["continue", "add-header", "insert-header", "change-header", "delete-header", "replace-body",
           "add-header,change-header,replace-body", "reject", "reject-plain", "tempfail", "tempfail-plain",
           "discard", "quarantine"]
TRACE = (b"return-path:", b"delivered-to:", b"x-original-to:", b"received:")


def message(action: str, n: int) -> bytes:
    return (f"From: <joe@outside.example>\r\nTo: <{ADDRESS}>\r\nSubject: compare {n}\r\n"
            f"Message-ID: <compare-{n}-{time.time()}@outside.example>\r\nDate: Thu, 01 Jan 2026 12:00:00 +0000\r\n"
            f"X-Test-Action: {action}\r\n"
            "X-Test-Secret: s\r\n\r\nHello,\r\n.a line with a leading dot\r\n\r\nJoe\r\n").encode()


def send(host: str, port: int, data: bytes) -> str:
    with smtplib.SMTP(host, port, timeout=60) as s:
        s.ehlo("client.outside.example")
        s.mail("joe@outside.example")
        s.rcpt(ADDRESS)
        code, text = s.data(data)
        return f"{code} {text.decode(errors='replace')}"


def without_trace(raw: bytes) -> bytes:
    """The stored message with the delivery headers dropped and each Received: header
    (whose text names the server) replaced by ``Received: (trace)``: its place still counts."""
    out: list[bytes] = []
    skipping, in_header = False, True
    for line in raw.split(b"\n"):
        if in_header and line[:1] in (b" ", b"\t") and skipping:
            continue
        if in_header and line.lower().startswith(TRACE):
            skipping = True
            if line.lower().startswith(b"received:"):
                out.append(b"Received: (trace)")
            continue
        skipping = False
        if not line:
            in_header = False
        out.append(line)
    return b"\n".join(out)


def newest(maildir: Path, before: set[str], timeout: float = 10.0) -> bytes | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [p for p in (maildir / "new").iterdir() if p.name not in before]
        if fresh:
            return fresh[0].read_bytes()
        time.sleep(0.05)
    return None


def main() -> int:
    port = free_port()
    milter = subprocess.Popen(["/usr/bin/python3", str(REPO / "tests/milters/action_milter.py"),
                               f"inet:{port}@127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    postfix = Postfix().start()
    subprocess.run(["postconf", "-e", f"smtpd_milters = inet:127.0.0.1:{port}", "milter_default_action = tempfail",
                    "milter_protocol = 6"], check=True)
    subprocess.run(["postfix", "reload"], check=True, capture_output=True)
    time.sleep(1)
    mg = Mailguard(extra_toml=f'\n[filters]\nmilters = ["inet:127.0.0.1:{port}"]\n').start()
    same = 0
    try:
        for n, action in enumerate(ACTIONS):
            data = message(action, n)
            stored = []
            replies = []
            for server in (mg, postfix):
                before = {p.name for p in (server.maildir / "new").iterdir()} if (server.maildir / "new").is_dir() \
                    else set()
                try:
                    replies.append(send(server.host, server.port, data))
                except smtplib.SMTPResponseException as e:
                    replies.append(f"{e.smtp_code} {e.smtp_error.decode(errors='replace')}")
                got = newest(server.maildir, before, 3.0 if replies[-1].startswith("250") else 0.5)
                stored.append(without_trace(got) if got is not None else None)
            match = stored[0] == stored[1]
            same += match
            print(f"== {action}\n   mailguard: {replies[0]}\n   postfix:   {replies[1]}\n   stored: "
                  f"{'same' if match else 'DIFFERENT'}"
                  f"{'' if stored[0] is not None else ' (nothing stored)'}")
            if not match:
                a = (stored[0] or b"").decode(errors="replace").splitlines()
                b = (stored[1] or b"").decode(errors="replace").splitlines()
                for line in difflib.unified_diff(a, b, "mailguard", "postfix", lineterm=""):
                    print("   " + line)
        held = subprocess.run(["postqueue", "-p"], capture_output=True, text=True).stdout
        print("== postfix hold queue (postqueue -p; '!' = held):\n" + held)
        print("== mailguard queue list:\n" + mg.cli("queue", "list"))
    finally:
        mg.cleanup()
        subprocess.run(["postconf", "-X", "smtpd_milters", "milter_default_action", "milter_protocol"])
        postfix.stop()
        milter.terminate()
    print(f"{same} of {len(ACTIONS)} actions gave the same stored bytes (delivery headers and Received: text aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
