#!/usr/bin/env python3
"""Memory added to mailguard by idle SMTP connections.

    python3 bench/idle_connections.py [--connections 1000] [--runs 3] [--ehlo]

Each run starts a fresh mailguard from this checkout, makes one complete session
(so lazily built state exists), reads VmRSS of the twistd process and of its worker
processes (``--server-setting "workers = 2"``), then opens
``--connections`` connections spread over several 127.0.0.x source addresses, reads
each 220 banner (with ``--ehlo`` also says EHLO and reads the reply), waits for the
server to settle and reads VmRSS again.  Figure: added RSS (MB) and KiB per
connection; median over runs.  The open-file limit is raised for this process and
the server it starts; the server's limits are ``max_connections = 5000`` and
``max_connections_per_ip = 1000``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import smtplib
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import Mailguard  # noqa: E402


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def tree_rss_kib(root: int) -> int:
    """VmRSS of ``root`` and of every live descendant (the worker processes)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += rss_kib(pid)
        except (OSError, RuntimeError):
            continue
        todo.extend(parents.get(pid, []))
    return total


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def read_reply(s: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed: " + data.decode(errors="replace"))
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data


def one_run(n: int, sources: int, ehlo: bool, settle: float, server_toml: str = "") -> dict:
    mg = Mailguard(server_toml=server_toml).start()
    try:
        with smtplib.SMTP(mg.host, mg.port, timeout=10) as c:    # a full session first
            c.ehlo("warmup.example")
            c.sendmail("w@warmup.example", ["mguser@bench.example"], b"Subject: w\r\n\r\nw\r\n")
        time.sleep(settle)
        before = tree_rss_kib(mg.pid)
        socks = []
        refused = 0
        for i in range(n):
            src = f"127.0.0.{2 + i % sources}"
            s = socket.create_connection((mg.host, mg.port), timeout=10, source_address=(src, 0))
            first = read_reply(s)
            if not first.startswith(b"220"):
                refused += 1
            elif ehlo:
                s.sendall(b"EHLO idle%d.example\r\n" % i)
                read_reply(s)
            socks.append(s)
        time.sleep(settle)
        after = tree_rss_kib(mg.pid)
        # every connection must still be open and served
        alive = 0
        for s in socks[:: max(1, n // 50)]:
            s.sendall(b"NOOP\r\n")
            if read_reply(s).startswith(b"250"):
                alive += 1
        for s in socks:
            s.close()
        return {"connections": n, "sources": sources, "ehlo": ehlo, "refused": refused,
                "sampled_alive": alive, "rss_before_mib": round(before / 1024, 1),
                "rss_after_mib": round(after / 1024, 1), "added_mib": round((after - before) / 1024, 2),
                "kib_per_connection": round((after - before) / n, 2)}
    finally:
        mg.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--sources", type=int, default=10, help="127.0.0.2 ... 127.0.0.(1+N)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ehlo", action="store_true", help="say EHLO on every connection")
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--server-setting", action="append", default=[],
                    help='an extra line for mailguard\'s [server] section, e.g. "workers = 2"')
    a = ap.parse_args()
    limit = raise_nofile(a.connections * 2 + 256)
    runs = []
    for i in range(a.runs):
        r = one_run(a.connections, a.sources, a.ehlo, a.settle, "".join(x + "\n" for x in a.server_setting))
        r.update(run=i + 1, nofile=limit)
        print(json.dumps(r), flush=True)
        runs.append(r)
    added = statistics.median(r["added_mib"] for r in runs)
    print(f"\n| idle SMTP connections | runs | added RSS MiB (median) | range | KiB/connection | target |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {a.connections}{' after EHLO' if a.ehlo else ''} | {len(runs)} | {added:.1f} | "
          f"{min(r['added_mib'] for r in runs):.1f}-{max(r['added_mib'] for r in runs):.1f} | "
          f"{statistics.median(r['kib_per_connection'] for r in runs):.1f} | < 60 MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
