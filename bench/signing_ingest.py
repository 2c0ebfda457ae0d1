#!/usr/bin/env python3
"""What DKIM signing costs: submission rate with signing on against signing off.

::

    python3 bench/signing_ingest.py [--runs 5] [--messages 1000] [--sessions 10] [--size 4096]

Two mailguard servers from this checkout, identical but for ``[dkim] sign``: A signs
with an RSA-2048 key for ``bench.example`` (``mailguard dkim keygen``), B does not.
The client is trusted through ``[relay] allow`` (as an office's own machines are),
and every message's ``From:`` is in ``bench.example``, so A signs every one.  Load:
``--sessions`` concurrent connections, each sending its share of ``--messages``
(one MAIL/RCPT/DATA per message, pipelined envelope), to the local mailbox; a run
ends when every message is in the maildir.  One warm-up run each, then ``--runs``
runs alternating A B, B A, ...; the figure is the median of the per-pair ratios
A/B with its range (the target is a cost under 25 %: ratio >= 0.75).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proccpu import cpu_tree  # noqa: E402
from servers import ADDRESS, DOMAIN, Mailguard, count_files  # noqa: E402

SENDER = f"office@{DOMAIN}"


def message(size: int, n: int) -> bytes:
    head = (f"From: Office <{SENDER}>\r\nTo: <{ADDRESS}>\r\nSubject: bench {n}\r\n"
            f"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{n}.{time.time()}@{DOMAIN}>\r\n\r\n").encode()
    line = b"x" * 70 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def session(port: int, count: int, size: int, base: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line or line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO bench.client\r\n")
    await reply()
    for i in range(count):
        writer.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ADDRESS}>\r\nDATA\r\n".encode())
        for _ in range(3):
            line = await reply()
        assert line.startswith(b"354"), line
        writer.write(message(size, base + i) + b".\r\n")
        line = await reply()
        assert line.startswith(b"250"), line
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()


def run(server: Mailguard, messages: int, sessions: int, size: int) -> tuple[float, float]:
    """(messages per second on disk, server CPU ms per message)."""
    new = server.maildir / "new"
    before = count_files(new)
    c0 = cpu_tree(server.pid)
    start = time.perf_counter()
    per = messages // sessions

    async def all_sessions() -> None:
        await asyncio.gather(*(session(server.port, per, size, k * per) for k in range(sessions)))

    asyncio.run(all_sessions())
    while count_files(new) < before + per * sessions:
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    return per * sessions / elapsed, 1000 * (cpu_tree(server.pid) - c0) / (per * sessions)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--size", type=int, default=4096)
    a = ap.parse_args()
    trusted = '[relay]\nallow = ["127.0.0.0/8"]\n'
    signing = Mailguard(extra_toml=trusted + '[dkim]\nsign = true\n')
    plain = Mailguard(extra_toml=trusted + '[dkim]\nsign = false\n')
    servers = [signing, plain]
    try:
        for s in servers:
            s.start()
        signing.cli("dkim", "keygen", DOMAIN)
        for s in servers:
            run(s, a.messages // 2, a.sessions, a.size)          # warm-up
        rates: dict[str, list[float]] = {"sign": [], "plain": []}
        cpu: dict[str, list[float]] = {"sign": [], "plain": []}
        for i in range(a.runs):
            order = [("sign", signing), ("plain", plain)]
            for name, s in (order if i % 2 == 0 else order[::-1]):
                mps, ms = run(s, a.messages, a.sessions, a.size)
                rates[name].append(mps)
                cpu[name].append(ms)
                print(f"run {i + 1} {name:5} {mps:8.1f} msg/s  {ms:6.3f} ms CPU/msg", flush=True)
        pairs = [x / y for x, y in zip(rates["sign"], rates["plain"])]
        print(f"signing on : median {statistics.median(rates['sign']):.1f} msg/s, "
              f"{statistics.median(cpu['sign']):.3f} ms CPU/msg")
        print(f"signing off: median {statistics.median(rates['plain']):.1f} msg/s, "
              f"{statistics.median(cpu['plain']):.3f} ms CPU/msg")
        print(f"rate ratio on/off: median {statistics.median(pairs):.2f} "
              f"(range {min(pairs):.2f}-{max(pairs):.2f}) over {len(pairs)} pairs")
    finally:
        for s in servers:
            s.stop()
            s.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
