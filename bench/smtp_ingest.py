#!/usr/bin/env python3
"""SMTP ingest into maildirs (fsync on), and relay rejection, side by side with Postfix.

One command::

    python3 bench/smtp_ingest.py                  # mailguard only
    python3 bench/smtp_ingest.py --with-postfix   # mailguard vs Postfix, ratios

It starts mailguard from this checkout (and, with ``--with-postfix``, the Debian Postfix
configured by ``bench/setup_postfix.sh``) on loopback, with one mailbox
``mguser@bench.example`` on each, and drives both with Postfix's load generator
``smtp-source`` (one message per connection).  Cases: 20 and 1 sessions, 1 KiB and
100 KiB payloads.  Per case: one warm-up run per server, then ``--runs`` runs
alternating A B, B A, A B, ... (each server's run i is adjacent in time to the
other's run i; the "pairwise ratio" is the median of those per-pair ratios).  A run ends when ``smtp-source`` has its last 250 *and* the
maildir's ``new/`` holds every message (counted on disk); "on disk msg/s" uses that
time.  Server CPU is that of the server's process tree, from /proc.  The first run
waits until files a previous benchmark deleted are 36 s old (``servers.settle``: on
ext4 without a journal they slow down every file creation until then).

Relay rejection: ``--relay-clients`` concurrent clients each open connections that
send EHLO, then MAIL FROM and ``--relay-rcpts`` RCPTs to remote addresses pipelined
(RFC 2920), then QUIT; the figure is refused RCPTs (5xx replies) per second.  mailguard
closes a session after 50 error replies and Postfix slows down after 10 (its
``smtpd_soft_error_limit``), so the Postfix reference run uses ``--relay-rcpts-postfix``.

Prints one JSON line per run, then a table of medians and ratios (mailguard/Postfix).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proccpu import cpu_machine, cpu_tree  # noqa: E402
from servers import ADDRESS, SMTP_SOURCE, Mailguard, Postfix, count_files, settle  # noqa: E402

CASES = {  # label: (sessions, payload bytes, messages per run)
    "s20_1k": (20, 1024, 3000),
    "s1_1k": (1, 1024, 1000),
    "s20_100k": (20, 102400, 1000),
    "s1_100k": (1, 102400, 500),
}


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def ingest_run(server, sessions: int, size: int, messages: int, timeout: float = 600.0) -> dict:
    """One smtp-source run against ``server``; waits for every message in maildir/new."""
    new = server.maildir / "new"
    before = count_files(new)
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-M", "loadgen.example", "-f", "loadgen@loadgen.example", "-t", ADDRESS,
           f"{server.host}:{server.port}"]
    c0, s0, (b0, t0) = children_cpu(), cpu_tree(server.pid), cpu_machine()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    smtp_s = time.perf_counter() - start
    want = before + messages
    n = count_files(new)
    while n < want and time.perf_counter() - start < timeout:
        time.sleep(0.01)
        n = count_files(new)
    disk_s = time.perf_counter() - start
    s1, (b1, t1), c1 = cpu_tree(server.pid), cpu_machine(), children_cpu()
    res = {
        "server": server.name, "sessions": sessions, "size": size, "messages": messages,
        "rc": proc.returncode, "delivered": n - before,
        "smtp_s": round(smtp_s, 3), "smtp_mps": round(messages / smtp_s, 1),
        "disk_s": round(disk_s, 3), "disk_mps": round((n - before) / disk_s, 1),
        "server_cpu_ms_per_msg": round(1000 * (s1 - s0) / messages, 3),
        "client_cpu_s": round(c1 - c0, 2), "machine_busy": round((b1 - b0) / max(t1 - t0, 1e-9), 2),
        # CPU burnt by neither the server nor smtp-source (other work on the machine, kernel
        # threads, interrupts): a disturbed run shows up here
        "other_cpu_s": round((b1 - b0) - (s1 - s0) - (c1 - c0), 2),
        "cmd": " ".join(cmd),
    }
    if proc.returncode:
        res["stderr"] = proc.stderr.strip()[-400:]
    return res


# --------------------------------------------------------------------------- relay rejection


async def _relay_connection(host: str, port: int, rcpts: int, serial: int) -> tuple[int, int]:
    """One session: EHLO, then MAIL + ``rcpts`` remote RCPTs + QUIT pipelined.

    Returns (refused RCPTs, other replies to RCPT).
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()                              # 220
        writer.write(b"EHLO relaytest.example\r\n")
        while True:                                          # 250-... 250 last
            line = await reader.readline()
            if not line or line[3:4] == b" ":
                break
        batch = [b"MAIL FROM:<probe@relaytest.example>\r\n"]
        batch += [b"RCPT TO:<victim%d.%d@remote.example>\r\n" % (serial, i) for i in range(rcpts)]
        batch.append(b"QUIT\r\n")
        writer.write(b"".join(batch))
        await reader.readline()                              # MAIL reply
        refused = other = 0
        for _ in range(rcpts):
            line = await reader.readline()
            if not line:
                break
            if line[:1] == b"5":
                refused += 1
            else:
                other += 1
        await reader.read()                                  # 221 and EOF
        return refused, other
    finally:
        writer.close()


async def _relay_load(host: str, port: int, clients: int, connections: int, rcpts: int) -> tuple[int, int]:
    todo = iter(range(connections))
    totals = [0, 0]

    async def worker() -> None:
        for serial in todo:
            r, o = await _relay_connection(host, port, rcpts, serial)
            totals[0] += r
            totals[1] += o

    await asyncio.gather(*(worker() for _ in range(clients)))
    return totals[0], totals[1]


def relay_run(server, clients: int, connections: int, rcpts: int) -> dict:
    s0 = cpu_tree(server.pid)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    refused, other = asyncio.run(_relay_load(server.host, server.port, clients, connections, rcpts))
    elapsed = time.perf_counter() - start
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    s1 = cpu_tree(server.pid)
    return {
        "server": server.name, "test": "relay", "clients": clients, "connections": connections,
        "rcpts_per_connection": rcpts, "refused": refused, "not_refused": other,
        "elapsed_s": round(elapsed, 3), "refused_per_s": round(refused / elapsed, 1),
        "server_cpu_ms_per_refusal": round(1000 * (s1 - s0) / max(refused, 1), 4),
        "client_cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 2),
    }


# --------------------------------------------------------------------------- driver


def med(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def emit(rec: dict, out) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        out.write(line + "\n")
        out.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--with-postfix", action="store_true", help="also run Postfix and print ratios")
    ap.add_argument("--cases", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    ap.add_argument("--runs", type=int, default=3, help="measured runs per server and case")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured runs per server and case")
    ap.add_argument("--messages", type=int, help="messages per run (default per case)")
    ap.add_argument("--relay-clients", type=int, default=20)
    ap.add_argument("--relay-total", type=int, default=20000, help="refusals wanted per run")
    ap.add_argument("--relay-rcpts", type=int, default=40, help="RCPTs per connection (mailguard)")
    ap.add_argument("--relay-rcpts-postfix", type=int, default=9,
                    help="RCPTs per connection for the side-by-side run (below Postfix's soft error limit)")
    ap.add_argument("--relay-runs", type=int, default=3)
    ap.add_argument("--no-relay", action="store_true")
    ap.add_argument("--postfix-port", type=int)
    ap.add_argument("--json-out", help="append every record to this file")
    ap.add_argument("--server-setting", action="append", default=[],
                    help='an extra line for mailguard\'s [server] section, e.g. "workers = 2" (repeatable)')
    a = ap.parse_args()

    out = open(a.json_out, "a") if a.json_out else None
    mg = Mailguard(server_toml="".join(line + "\n" for line in a.server_setting))
    pf = Postfix(a.postfix_port) if a.with_postfix else None
    servers = [mg] + ([pf] if pf else [])
    emit({"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
          "kernel": platform.release(), "mailguard_root": str(mg.root),
          "limits": "max_connections=5000 max_connections_per_ip=1000",
          "mailguard_server": a.server_setting}, out)
    results: dict[tuple[str, str], list[dict]] = {}
    relay: dict[tuple[str, int], list[dict]] = {}
    try:
        for s in servers:
            s.start()
        settle()
        for label in a.cases.split(","):
            sessions, size, messages = CASES[label]
            messages = a.messages or messages
            for _ in range(a.warmup):
                for s in servers:
                    r = ingest_run(s, sessions, size, messages)
                    r.update(case=label, warmup=True)
                    emit(r, out)
            for i in range(a.runs):
                order = servers if i % 2 == 0 else servers[::-1]
                for s in order:
                    r = ingest_run(s, sessions, size, messages)
                    r.update(case=label, run=i + 1)
                    emit(r, out)
                    results.setdefault((label, s.name), []).append(r)
                    time.sleep(0.5)
        if not a.no_relay:
            plan = [(mg, a.relay_rcpts)]
            if pf:
                plan += [(mg, a.relay_rcpts_postfix), (pf, a.relay_rcpts_postfix)]
            for s, k in plan:
                relay_run(s, a.relay_clients, max(a.relay_clients, a.relay_total // k // 5), k)  # warm-up
            for i in range(a.relay_runs):
                for s, k in (plan if i % 2 == 0 else plan[::-1]):
                    r = relay_run(s, a.relay_clients, max(a.relay_clients, a.relay_total // k), k)
                    r["run"] = i + 1
                    emit(r, out)
                    relay.setdefault((s.name, k), []).append(r)
    finally:
        for s in servers:
            s.cleanup()

    # ------------------------------------------------------------------ table
    print()
    head = ("| case | server | runs ok | SMTP msg/s | on-disk msg/s | on-disk range | server CPU ms/msg | "
            "other CPU s | on-disk ratio mg/pf | pairwise ratio median (range) | CPU ratio mg/pf |")
    print(head)
    print("|" + "---|" * 11)
    for label in a.cases.split(","):
        m_runs = results.get((label, "mailguard"), [])
        p_runs = results.get((label, "postfix"), [])
        for name, runs in (("mailguard", m_runs), ("postfix", p_runs)):
            if not runs:
                continue
            ok = [r for r in runs if r["rc"] == 0 and r["delivered"] >= r["messages"]]
            rng = f"{min(r['disk_mps'] for r in ok)}-{max(r['disk_mps'] for r in ok)}" if ok else "-"
            row = [label, name, f"{len(ok)}/{len(runs)}", med(ok, "smtp_mps"), med(ok, "disk_mps"), rng,
                   med(ok, "server_cpu_ms_per_msg"), med(ok, "other_cpu_s")]
            if name == "mailguard" and p_runs:
                p_ok = [r for r in p_runs if r["rc"] == 0 and r["delivered"] >= r["messages"]]
                # run i of mailguard next to run i of Postfix (adjacent in time): drift cancels
                pairs = [m["disk_mps"] / p["disk_mps"] for m, p in zip(runs, p_runs)
                         if m in ok and p in p_ok and p["disk_mps"]]
                pair = (f"{statistics.median(pairs):.2f} ({min(pairs):.2f}-{max(pairs):.2f})"
                        if pairs else "-")
                row += [ratio(med(ok, "disk_mps"), med(p_ok, "disk_mps")), pair,
                        ratio(med(ok, "server_cpu_ms_per_msg"), med(p_ok, "server_cpu_ms_per_msg"))]
            else:
                row += ["", "", ""]
            print("| " + " | ".join(str(x) for x in row) + " |")
    if relay:
        print()
        print("| relay test | server | RCPTs/conn | runs | refused RCPT/s | not refused | "
              "server CPU ms/refusal | ratio to own accepted on-disk rate (s20_1k) |")
        print("|" + "---|" * 8)
        for (name, k), runs in relay.items():
            accepted = med([r for r in results.get(("s20_1k", name), []) if r["rc"] == 0], "disk_mps")
            print(f"| relay | {name} | {k} | {len(runs)} | {med(runs, 'refused_per_s')} | "
                  f"{sum(r['not_refused'] for r in runs)} | {med(runs, 'server_cpu_ms_per_refusal')} | "
                  f"{ratio(med(runs, 'refused_per_s'), accepted)} |")
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
