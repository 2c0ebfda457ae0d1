#!/usr/bin/env python3
"""What SPF, DKIM verification and DMARC cost on SMTP ingest.

One command::

    python3 bench/senderauth_ingest.py --runs 5

Two mailguard instances from this checkout, on loopback, both delivering to the maildir
of ``mguser@bench.example`` and both asking the same local test DNS server
(``tests/e2e/sinks.py``'s ``DNSServer``, records with a 1-second TTL):

- A, "off": ``[checks]`` as shipped (spf = "off", dkim_verify = false, dmarc = "off");
- B, "on": ``spf = "check"``, ``dkim_verify = true``, ``dmarc = "check"``.

Every message is the same 1 KiB message (``--size``) from ``alice@example.org``, signed
once with dkimpy (rsa-sha256, 2048 bits); example.org publishes an SPF record that passes
127.0.0.1, the DKIM key and ``p=reject``, so on B every message costs an SPF evaluation,
a DKIM verification (RSA in a thread), a DMARC evaluation and an Authentication-Results
header.  ``--sessions`` concurrent clients send one message per connection (EHLO, MAIL,
RCPT, DATA, QUIT).  A run ends when the maildir holds every message.  Runs alternate A B,
A B, ... after one warm-up each; the figure is the median rate of each side with its range,
and the median of the per-pair ratios B/A.  Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import dkim  # noqa: E402
from dkim_doubles import key_pair  # noqa: E402
from proccpu import CLK, _stat, cpu_tree  # noqa: E402
from servers import ADDRESS, Mailguard, count_files  # noqa: E402

from tests.e2e.sinks import DNSServer  # noqa: E402

SENDER = "alice@example.org"
CHECKS_ON = '[checks]\nspf = "check"\ndkim_verify = true\ndmarc = "check"\n'


def signed_message(size: int) -> bytes:
    line = b"The quarterly figures are attached; please check them before Friday.\r\n"
    body = line * max(1, size // len(line))
    message = (f"From: Alice <{SENDER}>\r\nTo: <{ADDRESS}>\r\nSubject: figures\r\n"
               f"Date: Tue, 01 Dec 2026 05:00:00 +0000\r\nMessage-ID: <bench@example.org>\r\n\r\n").encode() + body
    pem, _ = key_pair()
    return dkim.sign(message, b"sel", b"example.org", pem,
                     include_headers=[b"from", b"to", b"subject", b"date"]) + message


async def _one(port: int, data: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply(expect: str) -> None:
        while True:
            line = await reader.readline()
            if not line.startswith(expect.encode()):
                raise RuntimeError(f"expected {expect}, got {line!r}")
            if line[3:4] != b"-":
                return

    await reply("220")
    for command, expect in ((b"EHLO loadgen.example", "250"), (f"MAIL FROM:<{SENDER}>".encode(), "250"),
                            (f"RCPT TO:<{ADDRESS}>".encode(), "250"), (b"DATA", "354")):
        writer.write(command + b"\r\n")
        await reply(expect)
    writer.write(data + b".\r\n")
    await reply("250")
    writer.write(b"QUIT\r\n")
    await reply("221")
    writer.close()
    await writer.wait_closed()


async def _load(port: int, data: bytes, sessions: int, messages: int) -> None:
    left = iter(range(messages))

    async def worker() -> None:
        for _ in left:
            await _one(port, data)

    await asyncio.gather(*(worker() for _ in range(sessions)))


def run(server: Mailguard, label: str, data: bytes, sessions: int, messages: int) -> dict:
    new = server.maildir / "new"
    before = count_files(new)
    cpu0, main0 = cpu_tree(server.pid), _stat(server.pid)[1] / CLK
    start = time.perf_counter()
    asyncio.run(_load(server.port, data, sessions, messages))
    while count_files(new) < before + messages:
        if time.perf_counter() - start > 600:
            raise RuntimeError("messages missing from the maildir")
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    cpu_ms = 1000 * (cpu_tree(server.pid) - cpu0) / messages
    main_ms = 1000 * (_stat(server.pid)[1] / CLK - main0) / messages
    return {"server": label, "messages": messages, "sessions": sessions, "size": len(data),
            "seconds": round(seconds, 3), "mps": round(messages / seconds, 1),
            "server_cpu_ms_per_msg": round(cpu_ms, 3), "reactor_process_cpu_ms_per_msg": round(main_ms, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="measured runs per side")
    ap.add_argument("--messages", type=int, default=1000, help="messages per run")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024, help="body bytes")
    args = ap.parse_args()
    _, record = key_pair()
    dns_server = DNSServer({
        "example.org": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
        "sel._domainkey.example.org": [("TXT", record.decode())],
        "_dmarc.example.org": [("TXT", "v=DMARC1; p=reject")],
    })
    dns = f'[dns]\nservers = ["{dns_server.address}"]\n'
    off = Mailguard(extra_toml=dns)
    on = Mailguard(extra_toml=dns + CHECKS_ON)
    data = signed_message(args.size)
    results: dict[str, list[float]] = {"off": [], "on": []}
    try:
        off.start()
        on.start()
        for server, label in ((off, "off"), (on, "on")):
            run(server, label, data, args.sessions, args.messages)   # warm-up
        for _ in range(args.runs):
            for server, label in ((off, "off"), (on, "on")):
                rec = run(server, label, data, args.sessions, args.messages)
                results[label].append(rec["mps"])
                print(json.dumps(rec), flush=True)
        stored = next((on.maildir / "new").iterdir()).read_bytes()
        assert b"dkim=pass" in stored and b"spf=pass" in stored and b"dmarc=pass" in stored, stored[:800]
    finally:
        off.cleanup()
        on.cleanup()
        dns_server.close()
    ratios = [b / a for a, b in zip(results["off"], results["on"])]
    for label in ("off", "on"):
        r = results[label]
        print(f"{label:>3}: median {statistics.median(r):.1f} msg/s (range {min(r):.1f}-{max(r):.1f})")
    print(f"on/off: median {statistics.median(ratios):.1%} (range {min(ratios):.1%}-{max(ratios):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
