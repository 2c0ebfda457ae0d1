"""Servers under benchmark, started privately on loopback: mailguard, Postfix, Dovecot.

mailguard runs from this checkout (``PYTHONPATH=<repo> twistd -n --pidfile= mailguard``)
so the figures are those of the current code, not of an installed copy.  Postfix is the
Debian package configured by ``setup_postfix.sh``; Dovecot a private instance from
``setup_dovecot.sh``.  Nothing here listens outside 127.0.0.0/8.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"

#: the mailbox every benchmark delivers to, on both sides
DOMAIN = "bench.example"
LOCAL = "mguser"
ADDRESS = f"{LOCAL}@{DOMAIN}"
PASSWORD = "bench-password"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def banner(host: str, port: int, timeout: float = 2.0) -> str:
    """The first line the server sends, or "" when nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return s.recv(512).decode("ascii", "replace")
    except OSError:
        return ""


def count_files(directory: Path) -> int:
    """Number of entries in ``directory`` (0 when it does not exist)."""
    try:
        with os.scandir(directory) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


#: Touched whenever a benchmark deletes many files (see :func:`settle`).
DELETED_STAMP = Path(tempfile.gettempdir()) / "mailguard-bench-deleted"
#: ext4 without a journal passes over inodes freed in the last 30 s (35 s while their
#: inode table block is dirty) each time it allocates one (``recently_deleted`` in
#: fs/ext4/ialloc.c), so a file created soon after thousands were deleted costs a
#: scan past them.
RECENTLY_DELETED_S = 36.0


def deleted_files() -> None:
    """Note that many files were just deleted (a maildir emptied, a server's folder removed)."""
    DELETED_STAMP.touch()


def settle() -> None:
    """Wait until the files the last benchmark deleted no longer slow file creation.

    Without this, whichever server runs first pays for the previous run's cleanup
    (on this project's benchmark machine, ext4 without a journal: 10-14 % of
    mailguard's CPU went to the kernel's inode allocator in a run started right after
    another).  Each server's own deletions during a run (Postfix's queue files) are
    its own cost and stay.
    """
    try:
        wait = DELETED_STAMP.stat().st_mtime + RECENTLY_DELETED_S - time.time()
    except FileNotFoundError:
        return
    if wait > 0:
        print(f"waiting {wait:.0f} s: files deleted just before slow down file creation", file=sys.stderr)
        time.sleep(wait)


def clear_maildir(maildir: Path) -> None:
    removed = 0
    for sub in ("new", "cur", "tmp"):
        d = maildir / sub
        if d.is_dir():
            with os.scandir(d) as it:
                for e in it:
                    os.unlink(e.path)
                    removed += 1
    if removed:
        deleted_files()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONWARNINGS", None)
    return env


def twistd() -> list[str]:
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("twistd")
    return [found] if found else [sys.executable, "-m", "twisted"]


class Mailguard:
    """``twistd -n mailguard`` in a temporary folder with one mailbox, ``mguser@bench.example``.

    Load limits are raised (``max_connections_per_ip = 1000``, ``max_connections = 5000``)
    so that the load generator, which connects from one address, is not refused.
    """

    name = "mailguard"

    def __init__(self, root: Path | None = None, extra_toml: str = "",
                 max_connections: int = 5000, max_per_ip: int = 1000, server_toml: str = "") -> None:
        base = Path(os.environ.get("BENCH_TMP", "/var/tmp"))
        base.mkdir(parents=True, exist_ok=True)
        self.root = root or Path(tempfile.mkdtemp(prefix="mailguard-bench-", dir=base))
        self.data_dir = self.root / "var"
        self.config = self.root / "mailguard.toml"
        self.log_path = self.root / "twistd.log"
        self.host = "127.0.0.1"
        self.ports = {k: free_port() for k in ("smtp", "submission", "submissions", "pop3", "pop3s")}
        ssl = {"submissions", "pop3s"}
        listen = "\n".join(
            f'{k} = ["{"ssl" if k in ssl else "tcp"}:{p}:interface=127.0.0.1"]' for k, p in self.ports.items())
        self.config.write_text(
            f'[server]\nhostname = "mx.{DOMAIN}"\ndata_dir = "{self.data_dir}"\n{server_toml}\n'
            f"[listen]\n{listen}\n\n"
            f'[domains."{DOMAIN}"]\nroute = "inbound"\n\n'
            f"[limits]\nmax_connections_per_ip = {max_per_ip}\nmax_connections = {max_connections}\n"
            f"{extra_toml}", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self._user_made = False

    @property
    def port(self) -> int:
        return self.ports["smtp"]

    @property
    def pop3_port(self) -> int:
        return self.ports["pop3"]

    @property
    def maildir(self) -> Path:
        return self.data_dir / "mail" / DOMAIN / LOCAL

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def cli(self, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run([sys.executable, "-m", "mailguard", "--config", str(self.config), *args],
                             input=stdin, capture_output=True, text=True, env=child_env(), cwd=self.root)
        if out.returncode:
            raise RuntimeError(f"mailguard {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout

    def add_user(self, address: str = ADDRESS, password: str = PASSWORD) -> None:
        self.cli("user", "add", address, "--password-stdin", stdin=password + "\n")

    def start(self, profile_args: list[str] | None = None) -> "Mailguard":
        if not self._user_made:
            self.add_user()
            self._user_made = True
        self._log = open(self.log_path, "ab")
        cmd = twistd() + ["-n", "--pidfile="] + (profile_args or []) + ["mailguard", "--config", str(self.config)]
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=child_env())
        deadline = time.monotonic() + 30
        while not banner(self.host, self.port).startswith("220"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("mailguard did not start:\n" + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        deleted_files()


class Postfix:
    """The Debian Postfix configured by ``setup_postfix.sh``: local(8) delivery to ~mguser/Maildir."""

    name = "postfix"
    maildir = Path("/home/mguser/Maildir")

    def __init__(self, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()

    @property
    def pid(self) -> int | None:
        try:
            return int(Path("/var/spool/postfix/pid/master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self) -> "Postfix":
        subprocess.run(["bash", str(BENCH / "setup_postfix.sh"), str(self.port)], check=True,
                       stdout=subprocess.DEVNULL)
        clear_maildir(self.maildir)
        deadline = time.monotonic() + 30
        while not banner(self.host, self.port).startswith("220"):
            if time.monotonic() > deadline:
                raise RuntimeError("postfix did not start; see /var/log/postfix.log")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        subprocess.run(["bash", str(BENCH / "stop_postfix.sh")], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def cleanup(self) -> None:
        self.stop()
        clear_maildir(self.maildir)
