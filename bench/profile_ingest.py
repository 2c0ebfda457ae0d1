#!/usr/bin/env python3
"""Profile mailguard's SMTP ingest path under load with py-spy (sampling, all threads).

    python3 bench/profile_ingest.py [--messages 6000] [--sessions 20] [--size 1024] [--svg prof.svg]

Starts mailguard from this checkout, warms it up, then runs ``py-spy record --pid``
(collapsed stacks, aggregated by function) while ``smtp-source`` sends the load
(default: 20 sessions, 1 KiB, one message per connection).  Prints the top functions
by own time ("self") and by time including callees ("total"), as percentages of all
non-idle samples, separately for the reactor thread and the thread pool (fsync/store).
py-spy counts a thread blocked in a system call such as ``send`` (which on loopback
runs the receiver's TCP stack too) or ``syncfs`` as busy; ``--gil`` keeps only samples
of the thread holding the GIL, i.e. Python CPU time.
With ``--svg`` a flame graph of a second, identical pass is written too.
Needs ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import ADDRESS, SMTP_SOURCE, Mailguard  # noqa: E402

PYSPY = shutil.which("py-spy") or "py-spy"


def load(mg: Mailguard, sessions: int, size: int, messages: int) -> None:
    subprocess.run([SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
                    "-M", "loadgen.example", "-f", "loadgen@loadgen.example", "-t", ADDRESS,
                    f"{mg.host}:{mg.port}"], check=True, capture_output=True)


def record(mg: Mailguard, a, fmt: str, out: str) -> None:
    spy = subprocess.Popen([PYSPY, "record", "--pid", str(mg.pid), "--rate", str(a.rate), "--threads",
                            "--function", "--nonblocking", "--format", fmt, "-o", out]
                           + (["--gil"] if a.gil else []),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    load(mg, a.sessions, a.size, a.messages)
    spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
    _, err = spy.communicate(timeout=60)
    if not os.path.exists(out):
        raise RuntimeError("py-spy wrote nothing: " + err.decode(errors="replace"))


def frame_name(frame: str) -> str:
    # "function (path/to/file.py)" -> "function (file.py)", keeping the package for mailguard/twisted
    fn, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/mailguard/", "/twisted/", "/lib/python3"):
        i = where.find(marker)
        if i >= 0:
            where = where[i + 1:]
            break
    return f"{fn} ({where})" if where else fn


def report(raw: str, top: int) -> None:
    groups: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            thread = frames[0]
            # the reactor runs on the main thread (the one whose stack starts in twistd's run)
            group = "reactor thread" if any("run (twisted/scripts/twistd.py" in frame_name(x) or
                                             "mainLoop" in x for x in frames) else "worker threads"
            groups[group].append(([frame_name(x) for x in frames[1:]], int(count)))
            groups["all threads"].append(([frame_name(x) for x in frames[1:]], int(count)))
            del thread
    total_all = sum(c for _, c in groups["all threads"])
    print(f"samples (non-idle, all threads): {total_all}")
    for group in ("all threads", "reactor thread", "worker threads"):
        stacks = groups.get(group, [])
        n = sum(c for _, c in stacks)
        if not n:
            continue
        own: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        for frames, c in stacks:
            if frames:
                own[frames[-1]] += c
            for name in set(frames):
                incl[name] += c
        print(f"\n## {group}: {n} samples = {100 * n / total_all:.1f}% of all\n")
        print("| self % | function |")
        print("|---|---|")
        for name, c in own.most_common(top):
            print(f"| {100 * c / n:.1f} | {name} |")
        print("\n| total % | function |")
        print("|---|---|")
        for name, c in incl.most_common(top * 2):
            print(f"| {100 * c / n:.1f} | {name} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=6000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rate", type=int, default=250, help="samples per second")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--raw", default="/var/tmp/mailguard-ingest-profile.txt")
    ap.add_argument("--svg", help="also write a flame graph (second pass)")
    ap.add_argument("--gil", action="store_true",
                    help="sample only the thread holding the GIL: Python CPU, without time spent in "
                         "syscalls that release it (send on loopback, fsync/syncfs)")
    a = ap.parse_args()
    mg = Mailguard().start()
    try:
        load(mg, a.sessions, a.size, 1000)  # warm-up
        record(mg, a, "raw", a.raw)
        if a.svg:
            record(mg, a, "flamegraph", a.svg)
    finally:
        mg.cleanup()
    print(f"raw collapsed stacks: {a.raw}")
    report(a.raw, a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
