#!/usr/bin/env python3
"""POP3: Dovecot vs mailguard on identical maildirs.

    python3 bench/pop3_compare.py [--runs 5]

Generates a 5,000-message and a 20,000-message maildir once (``gen_maildir.py``,
~1 KiB messages, names with ``,S=``/``,W=`` as both servers write them) and copies
them to a private Dovecot (``setup_dovecot.sh``, users pop5k/pop20k) and to mailguard
from this checkout (mailboxes pop5k@ and pop20k@bench.example).  Then, alternating
the servers run by run:

- ``full`` on 5,000: connect, USER/PASS, LIST, UIDL, RETR every message, QUIT;
- ``stat`` on 20,000: connect, USER/PASS, STAT, QUIT.

Both servers allow plaintext USER/PASS on loopback for this (mailguard:
``[tls] auth_requires_tls = false``; Dovecot: ``disable_plaintext_auth = no``).

Run 1 on each server is the first access (Dovecot builds its index, mailguard its
scan; messages move to cur/ at QUIT on both); medians are over runs 2..N ("warm"),
and run 1 is shown as "first".  Server CPU is that of the server's process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import poplib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_maildir import generate  # noqa: E402
from proccpu import cpu_tree  # noqa: E402
from servers import BENCH, DOMAIN, Mailguard, free_port  # noqa: E402

PASSWORD = "secret-pass"      # [auth] min_password_length is 8 by default


def session(host: str, port: int, user: str, mode: str, server_pid: int | None) -> dict:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    s0 = cpu_tree(server_pid)
    t0 = time.perf_counter()
    p = poplib.POP3(host, port, timeout=120)
    p.user(user)
    p.pass_(PASSWORD)
    t1 = time.perf_counter()
    res: dict = {"login_s": round(t1 - t0, 4)}
    if mode == "stat":
        n, octets = p.stat()
        t2 = time.perf_counter()
        res.update(stat_s=round(t2 - t1, 4), messages=n, octets=octets)
    else:
        _, lst, _ = p.list()
        t2 = time.perf_counter()
        _, uidl, _ = p.uidl()
        t3 = time.perf_counter()
        n = len(lst)
        if len(uidl) != n:
            raise RuntimeError(f"UIDL {len(uidl)} lines, LIST {n}")
        total = 0
        for i in range(1, n + 1):
            total += p.retr(i)[2]
        t4 = time.perf_counter()
        res.update(list_s=round(t2 - t1, 4), uidl_s=round(t3 - t2, 4), retr_all_s=round(t4 - t3, 3),
                   list_uidl_retr_s=round(t4 - t1, 3), messages=n, retr_octets=total)
    p.quit()
    t_end = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    res["total_s"] = round(t_end - t0, 3)
    res["client_cpu_s"] = round((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), 2)
    res["server_cpu_s"] = round(cpu_tree(server_pid) - s0, 3)
    return res


class Dovecot:
    name = "dovecot"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = "127.0.0.1"
        self.port = free_port()
        self.pid: int | None = None

    def maildir(self, user: str) -> Path:
        return self.root / "home" / user / "Maildir"

    def login(self, user: str) -> str:
        return user

    def start(self) -> None:
        out = subprocess.run(["bash", str(BENCH / "setup_dovecot.sh"), str(self.root), str(self.port)],
                             check=True, capture_output=True, text=True)
        self.pid = int(out.stdout.strip().splitlines()[-1])
        deadline = time.monotonic() + 20
        while True:
            try:
                poplib.POP3(self.host, self.port, timeout=2).quit()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run(["doveadm", "-c", str(self.root / "dovecot" / "dovecot.conf"), "stop"],
                       capture_output=True)


class MailguardPop:
    name = "mailguard"

    def __init__(self) -> None:
        # plaintext login on loopback, as the Dovecot instance allows (disable_plaintext_auth = no)
        self.mg = Mailguard(extra_toml="\n[tls]\nauth_requires_tls = false\n")
        self.host = self.mg.host
        self.port = self.mg.pop3_port

    @property
    def pid(self) -> int | None:
        return self.mg.pid

    def maildir(self, user: str) -> Path:
        return self.mg.data_dir / "mail" / DOMAIN / user

    def login(self, user: str) -> str:
        return f"{user}@{DOMAIN}"

    def start(self) -> None:
        for user in ("pop5k", "pop20k"):
            self.mg.add_user(f"{user}@{DOMAIN}", PASSWORD)
        self.mg._user_made = True
        self.mg.start()

    def stop(self) -> None:
        self.mg.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per server and test, the first is 'first access'")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    base = Path(os.environ.get("BENCH_TMP", "/var/tmp"))
    root = Path(tempfile.mkdtemp(prefix="pop3-bench-", dir=base))
    root.chmod(0o755)
    out = open(a.json_out, "a") if a.json_out else None
    src = {"pop5k": (root / "src5k", 5000), "pop20k": (root / "src20k", 20000)}
    for path, n in src.values():
        generate(str(path), n)
    dc, mg = Dovecot(root / "dc"), MailguardPop()
    (root / "dc").mkdir()
    (root / "dc").chmod(0o755)
    servers = [mg, dc]
    for s in servers:
        for user, (path, _) in src.items():
            dest = s.maildir(user)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(path, dest)
            if s is dc:
                subprocess.run(["chown", "-R", "mguser:mguser", str(dest.parent)], check=True)
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for s in servers:
            s.start()
        for test, user in (("full", "pop5k"), ("stat", "pop20k")):
            for i in range(a.runs):
                for s in (servers if i % 2 == 0 else servers[::-1]):
                    r = session(s.host, s.port, s.login(user), test, s.pid)
                    r.update(server=s.name, test=test, user=user, run=i + 1)
                    line = json.dumps(r)
                    print(line, flush=True)
                    if out:
                        out.write(line + "\n")
                    results.setdefault((test, s.name), []).append(r)
                    time.sleep(0.3)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print("\n| test | server | first run s | warm median s | warm range | server CPU s (warm) | "
          "ratio mg/dovecot (warm) | ratio (first) | target |")
    print("|" + "---|" * 9)
    for test, key, target in (("full", "list_uidl_retr_s", "<= 1.5"), ("full", "total_s", ""),
                              ("stat", "total_s", "<= 2.0"), ("stat", "stat_s", "")):
        m, d = results[(test, "mailguard")], results[(test, "dovecot")]
        label = {"full": "LIST+UIDL+RETR 5,000", "stat": "login+STAT 20,000"}[test]
        label += {"list_uidl_retr_s": "", "total_s": " (whole session)", "stat_s": " (STAT only)"}[key] \
            if not (test == "stat" and key == "total_s") else ""
        for name, runs in (("mailguard", m), ("dovecot", d)):
            warm = runs[1:] or runs
            row = [label, name, runs[0][key], round(med(warm, key), 4),
                   f"{min(r[key] for r in warm)}-{max(r[key] for r in warm)}", round(med(warm, "server_cpu_s"), 3)]
            if name == "mailguard":
                dw = d[1:] or d
                row += [f"{med(warm, key) / max(med(dw, key), 1e-9):.2f}",
                        f"{runs[0][key] / max(d[0][key], 1e-9):.2f}", target]
            else:
                row += ["", "", ""]
            print("| " + " | ".join(str(x) for x in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
