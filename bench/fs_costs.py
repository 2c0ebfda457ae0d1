#!/usr/bin/env python3
"""What the file system costs where each server keeps its mail: the machine, not the servers.

    python3 bench/fs_costs.py [--files 300] [DIR ...]

For each folder (default: where the ingest benchmark's servers write: a fresh folder
under ``/var/tmp`` as mailguard's ``data_dir``, ``/var/spool/postfix`` for Postfix's
queue, ``/home/mguser`` for its maildir, and ``/tmp`` and ``/root`` for comparison),
a scratch sub-folder is made and removed again, and per file it measures, as
wall-clock and kernel CPU (``ru_stime``) milliseconds:

- ``create``: ``open(O_CREAT|O_EXCL)`` + ``close`` of a new empty file;
- ``write+fsync``: create, write 1 KiB, ``fsync``, close;
- ``syncfs``: 1 KiB appended to an open file, then ``syncfs(2)``;
- ``rename``: one file renamed to another folder (maildir ``tmp/`` to ``new/``).

Every message costs mailguard one file creation and Postfix two (queue file, then
maildir copy).  On ext4 a new file's inode is allocated near its folder's, so the
cost of ``create`` depends on where the file system put the folder: run it a few
times, a fresh scratch folder each time, to see the spread.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import sys
import tempfile
import time

_LIBC = ctypes.CDLL(None, use_errno=True)
DEFAULT = ["/var/tmp", "/var/spool/postfix", "/home/mguser", "/tmp", "/root"]


def _timed(n: int, step) -> tuple[float, float]:
    """The mean of ``n`` calls of ``step(i)``: (wall ms, kernel CPU ms)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
    wall = (time.perf_counter() - t0) / n * 1000
    return wall, (resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0) / n * 1000


def measure(parent: str, n: int) -> dict[str, tuple[float, float]]:
    root = tempfile.mkdtemp(prefix="fs-costs-", dir=parent)
    try:
        for sub in ("a", "b", "c", "tmp", "new"):
            os.mkdir(os.path.join(root, sub))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        data = b"x" * 1024

        def create(i: int) -> None:
            os.close(os.open(os.path.join(root, "a", str(i)), flags, 0o600))

        def write_fsync(i: int) -> None:
            fd = os.open(os.path.join(root, "b", str(i)), flags, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)

        log = os.open(os.path.join(root, "c", "log"), flags, 0o600)

        def sync_fs(i: int) -> None:
            os.write(log, data)
            if _LIBC.syncfs(log) != 0:
                raise OSError(ctypes.get_errno(), "syncfs")

        for i in range(n):
            os.close(os.open(os.path.join(root, "tmp", str(i)), flags, 0o600))

        def rename(i: int) -> None:
            os.rename(os.path.join(root, "tmp", str(i)), os.path.join(root, "new", str(i)))

        try:
            return {"create": _timed(n, create), "write+fsync": _timed(n, write_fsync),
                    "syncfs": _timed(n, sync_fs), "rename": _timed(n, rename)}
        finally:
            os.close(log)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=300, help="files per measurement")
    ap.add_argument("folders", nargs="*", default=DEFAULT)
    a = ap.parse_args()
    print("| folder | create ms (kernel CPU) | write+fsync ms (kernel CPU) | syncfs ms (kernel CPU) | rename ms |")
    print("|---|---|---|---|---|")
    for folder in a.folders:
        if not os.path.isdir(folder):
            print(f"| {folder} | (missing) | | | |")
            continue
        r = measure(folder, a.files)
        cells = [f"{r[k][0]:.3f} ({r[k][1]:.3f})" for k in ("create", "write+fsync", "syncfs")]
        print(f"| {folder} | {' | '.join(cells)} | {r['rename'][0]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
