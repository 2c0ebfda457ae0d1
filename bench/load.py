#!/usr/bin/env python3
"""Sustained load: 200 SMTP senders and 50 POP3 readers against one mailguard, with figures.

One command::

    python3 bench/load.py                 # 60 s
    python3 bench/load.py --duration 20 --smtp 200 --pop3 50

It starts ``twistd -n mailguard`` from this checkout (through the end-to-end harness)
in a temporary folder, with limits raised for the load, one inbound domain and one
mailbox per POP3 reader.  Then, for ``--duration`` seconds:

- ``--smtp`` concurrent SMTP sessions (asyncio raw sockets, source addresses spread
  over 127.0.0.10-127.0.0.41) each send messages one after another on one connection
  (``MAIL``, ``RCPT``, ``DATA``, a 2 KiB message with a unique id, ``.``), opening a
  new connection every 20 messages;
- ``--pop3`` concurrent POP3 sessions each log in to their own mailbox, ``STAT``,
  ``UIDL``, ``RETR`` up to three messages and ``QUIT``, in a loop.

At the end it waits for the last replies, counts the message files on disk and prints
messages/s (acknowledged with 250), p50/p99 reply latency (every SMTP reply; POP3
separately), error replies (any 4xx/5xx SMTP reply, any POP3 ``-ERR``), lost messages
(250s without a file on disk, by unique id) and the server's peak RSS (VmHWM).  The
figures are also written as one JSON line.  Exit status 1 when any message was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import MailguardServer  # noqa: E402

DOMAIN = "bench.example"
PASSWORD = "bench password"
BODY_LINE = "The quick brown fox jumps over the lazy dog, again and again and again. 0123456789"


@dataclass
class Stats:
    """Counters shared by all client tasks (one event loop: no locks needed)."""

    smtp_latency: list[float] = field(default_factory=list)
    pop3_latency: list[float] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)     # message id -> mailbox
    smtp_errors: dict[str, int] = field(default_factory=dict)
    pop3_errors: dict[str, int] = field(default_factory=dict)
    io_errors: dict[str, int] = field(default_factory=dict)
    retrieved: int = 0
    pop3_sessions: int = 0
    smtp_sessions: int = 0

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


def message(msg_id: str, rcpt: str) -> bytes:
    lines = [f"From: <load@outside.example>", f"To: <{rcpt}>", f"Subject: load {msg_id}",
             f"Message-ID: <{msg_id}@load.bench>", "Date: Thu, 01 Jan 2026 12:00:00 +0000", "",
             f"id {msg_id}", *([BODY_LINE] * 24)]
    return ("\r\n".join(lines) + "\r\n.\r\n").encode()


async def read_reply(reader: asyncio.StreamReader) -> str:
    """One SMTP reply (continuation lines skipped); the final line."""
    while True:
        line = (await reader.readline()).decode("utf-8", "replace")
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != "-":
            return line.rstrip("\r\n")


async def smtp_client(n: int, port: int, mailboxes: list[str], stats: Stats, stop: float) -> None:
    source = f"127.0.0.{10 + n % 32}"
    k = n
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except OSError as e:
            stats.count(stats.io_errors, f"smtp connect: {e.strerror or e}")
            await asyncio.sleep(0.1)
            continue
        stats.smtp_sessions += 1
        try:
            banner = await read_reply(reader)
            if not banner.startswith("220"):
                stats.count(stats.smtp_errors, banner[:40])
                continue

            async def cmd(data: bytes, expect: str) -> str:
                t = time.monotonic()
                writer.write(data)
                r = await read_reply(reader)
                stats.smtp_latency.append(time.monotonic() - t)
                if not r.startswith(expect):
                    stats.count(stats.smtp_errors, r[:40])
                return r

            if not (await cmd(b"EHLO load.example\r\n", "250")).startswith("250"):
                continue
            for _ in range(20):
                if time.monotonic() >= stop:
                    break
                rcpt = mailboxes[k % len(mailboxes)]
                k += 7
                msg_id = uuid.uuid4().hex
                if not (await cmd(b"MAIL FROM:<load@outside.example>\r\n", "250")).startswith("250"):
                    break
                if not (await cmd(f"RCPT TO:<{rcpt}>\r\n".encode(), "250")).startswith("250"):
                    await cmd(b"RSET\r\n", "250")
                    continue
                if not (await cmd(b"DATA\r\n", "354")).startswith("354"):
                    break
                if (await cmd(message(msg_id, rcpt), "250")).startswith("250"):
                    stats.acked[msg_id] = rcpt
            await cmd(b"QUIT\r\n", "221")
        except (OSError, ConnectionError) as e:
            stats.count(stats.io_errors, f"smtp: {type(e).__name__}")
        finally:
            writer.close()


async def pop3_client(n: int, port: int, mailbox: str, stats: Stats, stop: float) -> None:
    source = f"127.0.0.{50 + n % 16}"
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except OSError as e:
            stats.count(stats.io_errors, f"pop3 connect: {e.strerror or e}")
            await asyncio.sleep(0.1)
            continue
        stats.pop3_sessions += 1

        async def line() -> bytes:
            data = await reader.readline()
            if not data:
                raise ConnectionError("closed")
            return data

        async def cmd(text: str, multi: bool = False) -> bytes:
            t = time.monotonic()
            writer.write(text.encode() + b"\r\n")
            first = await line()
            body = b""
            if multi and first.startswith(b"+OK"):
                while True:
                    ln = await line()
                    if ln == b".\r\n":
                        break
                    body += ln
            stats.pop3_latency.append(time.monotonic() - t)
            if not first.startswith(b"+OK"):
                stats.count(stats.pop3_errors, first[:50].decode("ascii", "replace").strip())
            return body if multi else first

        try:
            greeting = await line()
            if not greeting.startswith(b"+OK"):
                stats.count(stats.pop3_errors, greeting[:50].decode("ascii", "replace").strip())
                continue
            await cmd(f"USER {mailbox}")
            if not (await cmd(f"PASS {PASSWORD}")).startswith(b"+OK"):
                await cmd("QUIT")
                continue
            stat = (await cmd("STAT")).split()
            count = int(stat[1]) if len(stat) > 1 and stat[1].isdigit() else 0
            await cmd("UIDL", multi=True)
            for i in range(1, min(count, 3) + 1):
                body = await cmd(f"RETR {count - i + 1}", multi=True)
                if b"Subject: load " in body:
                    stats.retrieved += 1
            await cmd("QUIT")
        except (OSError, ConnectionError) as e:
            stats.count(stats.io_errors, f"pop3: {type(e).__name__}")
        finally:
            writer.close()
        await asyncio.sleep(0.05)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def vm(pid: int, key: str) -> int:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith(key + ":"):
            return int(ln.split()[1])
    return 0


def stored_ids(server: MailguardServer, mailboxes: list[str]) -> dict[str, int]:
    """Message id -> number of files holding it, over every mailbox's new/ and cur/."""
    found: dict[str, int] = {}
    for box in mailboxes:
        for p in server.message_files(box):
            with open(p, "rb") as f:
                for raw in f:
                    if raw.startswith(b"Subject: load "):
                        key = raw[14:].strip().decode()
                        found[key] = found.get(key, 0) + 1
                        break
    return found


async def drive(args: argparse.Namespace, server: MailguardServer, mailboxes: list[str], stats: Stats) -> float:
    stop = time.monotonic() + args.duration
    start = time.monotonic()
    tasks = [asyncio.create_task(smtp_client(i, server.smtp_port, mailboxes, stats, stop)) for i in range(args.smtp)]
    tasks += [asyncio.create_task(pop3_client(i, server.ports["pop3"], mailboxes[i % len(mailboxes)], stats, stop))
              for i in range(args.pop3)]
    await asyncio.wait_for(asyncio.gather(*tasks), args.duration + 120)
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--smtp", type=int, default=200, help="concurrent SMTP sessions (default 200)")
    ap.add_argument("--pop3", type=int, default=50, help="concurrent POP3 sessions (default 50)")
    ap.add_argument("--keep", action="store_true", help="keep the server folder")
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))

    root = Path(tempfile.mkdtemp(prefix="mailguard-load-"))
    mailboxes = [f"reader{i}@{DOMAIN}" for i in range(max(args.pop3, 1))]
    server = MailguardServer(root, {
        "domains": {DOMAIN: {"route": "inbound"}},
        "tls": {"auth_requires_tls": False},
        "limits": {"max_connections": 5000, "max_connections_per_ip": 1000, "max_recipients": 1000,
                   "idle_timeout": 600, "session_timeout": 3600, "login_failures": 1000},
    }, hostname="mx.bench.example")
    from mailguard.directory.sqlite import SQLiteStore  # the admin CLI's own store, without 50 process starts
    gal = SQLiteStore(server.data_dir / "directory.sqlite")
    for box in mailboxes:
        gal.add_mailbox(box, PASSWORD)
    gal.close()
    stats = Stats()
    try:
        server.start()
        assert server.process is not None
        pid = server.process.pid
        rss_before = vm(pid, "VmRSS")
        cpu0 = os.times()
        elapsed = asyncio.run(drive(args, server, mailboxes, stats))
        cpu1 = os.times()
        peak = vm(pid, "VmHWM")
        stored = stored_ids(server, mailboxes)
        lost = [m for m in stats.acked if m not in stored]
        dupes = [m for m, n in stored.items() if n > 1]
        unacked_on_disk = [m for m in stored if m not in stats.acked]
        figures = {
            "duration_s": round(elapsed, 1),
            "smtp_sessions": args.smtp, "pop3_sessions": args.pop3,
            "messages_acked": len(stats.acked),
            "messages_per_s": round(len(stats.acked) / elapsed, 1),
            "smtp_p50_ms": round(percentile(stats.smtp_latency, 50) * 1000, 1),
            "smtp_p99_ms": round(percentile(stats.smtp_latency, 99) * 1000, 1),
            "smtp_replies": len(stats.smtp_latency),
            "pop3_p50_ms": round(percentile(stats.pop3_latency, 50) * 1000, 1),
            "pop3_p99_ms": round(percentile(stats.pop3_latency, 99) * 1000, 1),
            "pop3_logins": stats.pop3_sessions, "pop3_retrieved": stats.retrieved,
            "smtp_error_replies": sum(stats.smtp_errors.values()),
            "pop3_error_replies": sum(stats.pop3_errors.values()),
            "io_errors": sum(stats.io_errors.values()),
            "lost_messages": len(lost), "duplicated_messages": len(dupes),
            "stored_without_250": len(unacked_on_disk),
            "server_rss_before_mib": round(rss_before / 1024, 1),
            "server_peak_rss_mib": round(peak / 1024, 1),
            "client_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1),
        }
        width = max(map(len, figures))
        for k, v in figures.items():
            print(f"{k:<{width}}  {v}")
        for title, table in (("SMTP error replies", stats.smtp_errors), ("POP3 error replies", stats.pop3_errors),
                             ("I/O errors", stats.io_errors)):
            for text, n in sorted(table.items(), key=lambda kv: -kv[1])[:5]:
                print(f"  {title}: {n} x {text}")
        print(json.dumps(figures))
        return 1 if lost or dupes else 0
    finally:
        server.stop()
        if args.keep:
            print(f"server folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
