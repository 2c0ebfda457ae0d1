"""Refusals per second with the inbound checks on: relay attempts and DNS-block-listed clients.

Starts ``twistd -n mailguard`` from this checkout (``servers.Mailguard``) with
``[dns] servers`` pointed at the loopback DNS server of the end-to-end tests
(``tests/e2e/sinks.DNSServer``), which lists 127.0.0.2 in ``bl.test`` and gives
127.0.0.1 a forward-confirmed reverse name.  Three runs, each with ``--clients``
concurrent clients:

- ``relay``: from 127.0.0.1 (not listed), EHLO, MAIL and ``--rcpts`` remote RCPTs
  pipelined, QUIT; refused RCPTs (``relay_denied``) per second.  Run with the checks
  off and with ``dnsbl`` + ``reverse_dns = "require"`` + ``sender_domain`` on (every
  connection then asks for the DNSBL and PTR records, answered from the cache).
- ``dnsbl``: from 127.0.0.2 (listed), EHLO, MAIL (refused ``dnsbl_listed``), QUIT;
  refused connections per second.

Usage: ``python3 bench/checks_bench.py [--clients 20] [--connections 2000] [--rcpts 20]``.
The DNS answers carry a 1 s TTL, so the shared cache asks the DNS server about once a
second per name; the figures are the server's, not the DNS server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from e2e.sinks import DNSServer  # noqa: E402
from servers import Mailguard  # noqa: E402

ZONE = {
    "1.0.0.127.in-addr.arpa": [("PTR", "client.bench.test")],
    "client.bench.test": [("A", "127.0.0.1")],
    "2.0.0.127.in-addr.arpa": [("PTR", "listed.bench.test")],
    "listed.bench.test": [("A", "127.0.0.2")],
    "2.0.0.127.bl.test": [("A", "127.0.0.2")],
    "sender.test": [("MX", (10, "client.bench.test"))],
}


async def _hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()                                  # 220
    writer.write(b"EHLO client.bench.test\r\n")
    while True:
        line = await reader.readline()
        if not line or line[3:4] == b" ":
            return


async def relay_session(host: str, port: int, source: str, rcpts: int, serial: int) -> int:
    """One connection: MAIL, ``rcpts`` remote RCPTs, QUIT pipelined; refused RCPTs."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        await _hello(reader, writer)
        batch = [b"MAIL FROM:<probe@sender.test>\r\n"]
        batch += [b"RCPT TO:<victim%d.%d@remote.example>\r\n" % (serial, i) for i in range(rcpts)]
        writer.write(b"".join(batch) + b"QUIT\r\n")
        mail = await reader.readline()
        if not mail.startswith(b"250"):
            raise RuntimeError(f"MAIL refused: {mail!r}")
        refused = 0
        for _ in range(rcpts):
            line = await reader.readline()
            refused += line[:3] == b"550"
        await reader.read()
        return refused
    finally:
        writer.close()


async def dnsbl_session(host: str, port: int, source: str, rcpts: int, serial: int) -> int:
    """One connection from a listed client: MAIL refused; 1 when it was dnsbl_listed."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        await _hello(reader, writer)
        writer.write(b"MAIL FROM:<probe@sender.test>\r\nQUIT\r\n")
        line = await reader.readline()
        await reader.read()
        return int(line.startswith(b"554 5.7.1 Client host blocked by a DNS block list"))
    finally:
        writer.close()


async def load(session: object, host: str, port: int, source: str, clients: int, connections: int,
               rcpts: int) -> int:
    todo = iter(range(connections))
    total = 0

    async def worker() -> None:
        nonlocal total
        for serial in todo:
            refused = await session(host, port, source, rcpts, serial)  # type: ignore[operator]
            total += refused            # after the await: "total += await ..." would lose updates

    await asyncio.gather(*(worker() for _ in range(clients)))
    return total


def run(name: str, extra_toml: str, session: object, source: str, args: argparse.Namespace) -> dict[str, object]:
    server = Mailguard(extra_toml=extra_toml)
    try:
        server.start()
        asyncio.run(load(session, server.host, server.port, source, 2, 20, args.rcpts))   # warm-up
        start = time.perf_counter()
        refused = asyncio.run(load(session, server.host, server.port, source, args.clients, args.connections,
                                   args.rcpts))
        elapsed = time.perf_counter() - start
    finally:
        server.cleanup()
    return {"run": name, "clients": args.clients, "connections": args.connections, "refused": refused,
            "elapsed_s": round(elapsed, 2), "refused_per_s": round(refused / elapsed, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--rcpts", type=int, default=20)
    args = p.parse_args()
    dns = DNSServer(ZONE)
    on = (f'\n[dns]\nservers = ["{dns.address}"]\ntimeout = 2\n'
          f'\n[checks]\ndnsbl = ["bl.test"]\nreverse_dns = "require"\nsender_domain = true\n')
    try:
        results = [
            run("relay, checks off", f'\n[dns]\nservers = ["{dns.address}"]\n', relay_session, "127.0.0.1", args),
            run("relay, dnsbl+reverse_dns+sender_domain on", on, relay_session, "127.0.0.1", args),
            run("dnsbl refusals (listed client)", on, dnsbl_session, "127.0.0.2", args),
        ]
    finally:
        dns.close()
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
