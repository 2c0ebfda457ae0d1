#!/usr/bin/env python3
"""Create a maildir holding N small RFC 5322 messages in ``new/``.

    gen_maildir.py DIR N [--size 1024] [--owner USER]

Names follow the convention both mailguard and Dovecot write and read:
``<secs>.M<usecs>P<pid>Q<n>.<host>,S=<file size>,W=<CRLF size>`` (files hold LF line
endings; ``W=`` is the size a POP3 client sees).  Existing messages are removed first.
The same DIR can be copied for several servers, so that all read identical mail.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil


def generate(directory: str, n: int, size: int = 1024, owner: str | None = None) -> None:
    for sub in ("new", "cur", "tmp"):
        d = os.path.join(directory, sub)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    line = b"X" * 76 + b"\n"
    body = line * max(1, size // len(line))
    secs = 1700000000
    for i in range(n):
        hdr = (f"Return-Path: <sender{i}@example.test>\nFrom: sender{i}@example.test\n"
               f"To: user@bench.example\nSubject: test message {i}\nMessage-ID: <{i}.{secs}@gen.example>\n"
               f"Date: Mon, 01 Jan 2024 00:00:00 +0000\n\n").encode()
        data = hdr + body
        crlf = len(data) + data.count(b"\n")
        name = f"{secs + i // 1000}.M{i % 1000}P4242Q{i}.gen,S={len(data)},W={crlf}"
        with open(os.path.join(directory, "new", name), "wb") as f:
            f.write(data)
    if owner:
        pw = pwd.getpwnam(owner)
        for root, dirs, files in os.walk(directory):
            os.chown(root, pw.pw_uid, pw.pw_gid)
            for f in files:
                os.chown(os.path.join(root, f), pw.pw_uid, pw.pw_gid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("n", type=int)
    ap.add_argument("--size", type=int, default=1024, help="approximate body bytes")
    ap.add_argument("--owner")
    a = ap.parse_args()
    generate(a.dir, a.n, a.size, a.owner)
    print(f"{a.n} messages in {a.dir}/new")


if __name__ == "__main__":
    main()
