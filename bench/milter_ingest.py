#!/usr/bin/env python3
"""SMTP ingest with one milter against none: what content filtering costs.

One command::

    python3 bench/milter_ingest.py [--messages 2000] [--sessions 20] [--size 1024] [--runs 3]

It starts mailguard from this checkout twice on loopback (one mailbox
``mguser@bench.example``, fsync on): once with ``[filters] milters`` set to one local
pymilter milter that takes every step and accepts every message
(``bench/accept_milter.py``, run by the system Python with Debian's python3-milter),
once without.  The load generator (asyncio, in this process) keeps ``--sessions``
connections busy, one message per connection.  Runs alternate A B, B A, ... after one
warm-up each; a run ends when every message is in the maildir's ``new/``.

Prints one JSON line per run, then the median msg/s of each and the ratio (with milter /
without), and the ratio of each adjacent pair of runs.  The load generator and the milter share the machine's cores with the
server, as they would on a small office host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import ADDRESS, BENCH, Mailguard, banner, count_files, free_port  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"


async def one_message(host: str, port: int, payload: bytes) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    ok = False
    try:
        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if len(line) < 4 or line[3:4] != b"-":
                    return line
        await reply()
        for cmd in (b"EHLO loadgen.example", b"MAIL FROM:<loadgen@loadgen.example>", f"RCPT TO:<{ADDRESS}>".encode(),
                    b"DATA"):
            writer.write(cmd + b"\r\n")
            await writer.drain()
            if not (await reply())[:1] in (b"2", b"3"):
                return False
        writer.write(payload + b".\r\n")
        await writer.drain()
        ok = (await reply()).startswith(b"250")
        writer.write(b"QUIT\r\n")
        await writer.drain()
        await reply()
    finally:
        writer.close()
    return ok


async def load(host: str, port: int, sessions: int, messages: int, payload: bytes) -> int:
    todo = iter(range(messages))
    accepted = 0

    async def worker() -> None:
        nonlocal accepted
        for _ in todo:
            if await one_message(host, port, payload):
                accepted += 1
    await asyncio.gather(*(worker() for _ in range(sessions)))
    return accepted


def payload_of(size: int) -> bytes:
    head = (b"From: <loadgen@loadgen.example>\r\nTo: <mguser@bench.example>\r\nSubject: bench\r\n"
            b"Message-ID: <bench@loadgen.example>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def run(server: Mailguard, sessions: int, messages: int, size: int) -> dict:
    new = server.maildir / "new"
    before = count_files(new)
    start = time.perf_counter()
    accepted = asyncio.run(load(server.host, server.port, sessions, messages, payload_of(size)))
    while count_files(new) < before + accepted and time.perf_counter() - start < 600:
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    return {"server": server.name, "sessions": sessions, "size": size, "messages": messages,
            "accepted": accepted, "seconds": round(seconds, 3), "msg_per_s": round(messages / seconds, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    milter_port = free_port()
    milter_log = open(Path(os.environ.get("BENCH_TMP", "/var/tmp")) / "accept-milter.log", "ab")
    milter = subprocess.Popen([SYSTEM_PYTHON, str(BENCH / "accept_milter.py"), f"inet:{milter_port}@127.0.0.1"],
                              stdout=milter_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", milter_port), timeout=1).close()
            break
        except OSError:
            if milter.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the accept milter did not start (is python3-milter installed?)")
            time.sleep(0.1)

    plain = Mailguard()
    plain.name = "no-milter"
    filtered = Mailguard(extra_toml=f'\n[filters]\nmilters = ["inet:127.0.0.1:{milter_port}"]\n')
    filtered.name = "one-milter"
    results: dict[str, list[dict]] = {"no-milter": [], "one-milter": []}
    try:
        for server in (plain, filtered):
            server.start()
            assert banner(server.host, server.port).startswith("220")
            run(server, args.sessions, min(200, args.messages), args.size)      # warm-up
        for i in range(args.runs):
            order = (plain, filtered) if i % 2 == 0 else (filtered, plain)
            for server in order:
                rec = run(server, args.sessions, args.messages, args.size)
                results[server.name].append(rec)
                print(json.dumps(rec), flush=True)
    finally:
        plain.cleanup()
        filtered.cleanup()
        milter.terminate()
        milter.wait(10)
        milter_log.close()
    a = statistics.median(r["msg_per_s"] for r in results["one-milter"])
    b = statistics.median(r["msg_per_s"] for r in results["no-milter"])
    pairs = [f["msg_per_s"] / n["msg_per_s"] for f, n in zip(results["one-milter"], results["no-milter"])]
    print(f"median msg/s: no milter {b:.1f}, one accept-all pymilter milter {a:.1f}, ratio {a / b:.2f} "
          f"(pairwise ratios {', '.join(f'{r:.2f}' for r in pairs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
