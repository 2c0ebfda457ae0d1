"""Real milters for the end-to-end tests: the pymilter test milter, rspamd, clamav-milter.

pymilter (Debian ``python3-milter``, Sendmail's libmilter underneath) is installed for
the system Python, which may not be the Python running the tests, so the test milter
runs as a ``/usr/bin/python3`` subprocess.  A missing program fails the test.
"""

from __future__ import annotations

import getpass
import hashlib
import shutil
import subprocess
import time
from pathlib import Path

from .harness import REPO, free_port, port_accepts

SYSTEM_PYTHON = "/usr/bin/python3"
ACTION_MILTER = REPO / "tests" / "milters" / "action_milter.py"


class Process:
    """A helper process listening on a loopback port; stopped by :meth:`stop`."""

    def __init__(self, argv: list[str], port: int, log: Path, cwd: Path | None = None,
                 timeout: float = 30.0) -> None:
        self.port = port
        self.log_path = log
        self._log = open(log, "ab")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=cwd)
        deadline = time.monotonic() + timeout
        while not port_accepts("127.0.0.1", port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{argv[0]} did not listen on {port}:\n{self.log_text()}")
            time.sleep(0.1)

    @property
    def address(self) -> str:
        """The milter address for ``[filters] milters``."""
        return f"inet:127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def action_milter(folder: Path, *flags: str) -> Process:
    """The pymilter test milter (``tests/milters/action_milter.py``) on a free port."""
    assert Path(SYSTEM_PYTHON).exists(), f"{SYSTEM_PYTHON} is missing"
    check = subprocess.run([SYSTEM_PYTHON, "-c", "import Milter"], capture_output=True, text=True)
    assert check.returncode == 0, f"pymilter (Debian python3-milter) is not installed: {check.stderr}"
    port = free_port()
    name = "action-milter" + "".join(flags).replace("-", "_")
    return Process([SYSTEM_PYTHON, str(ACTION_MILTER), f"inet:{port}@127.0.0.1", *flags], port,
                   folder / f"{name}.log")


def require(program: str) -> str:
    """The path of a program the test needs; fails the test when it is not installed."""
    found = shutil.which(program) or next(
        (str(p) for p in (Path("/usr/sbin") / program, Path("/usr/bin") / program) if p.exists()), None)
    assert found is not None, f"{program} is not installed (see .ci/run)"
    return found


#: rspamd's proxy worker in milter mode scanning by itself (no normal worker, no redis),
#: DNS pointed at a closed port so nothing waits for the network.
RSPAMD_PROXY = """\
bind_socket = "127.0.0.1:{port}";
milter = yes;
timeout = 120s;
upstream "local" {{ default = yes; self_scan = yes; }}
count = 1;
"""
RSPAMD_OVERRIDES = {
    "override.d/worker-normal.inc": "enabled = false;\n",
    "override.d/worker-controller.inc": "enabled = false;\n",
    "override.d/logging.inc": 'type = "file";\nfilename = "{folder}/rspamd.log";\nlevel = "info";\n',
    "local.d/options.inc": 'dns { nameserver = ["127.0.0.1:1"]; timeout = 0.5s; retransmits = 1; }\n',
    # Headers on every message, so clean mail shows it was scanned.
    "local.d/milter_headers.conf": 'use = ["x-spamd-result", "x-rspamd-queue-id", "x-spam-status"];\n'
                                   "skip_local = false;\nskip_authenticated = false;\n",
}


def rspamd(folder: Path) -> Process:
    """Debian's rspamd with a generated configuration in ``folder``: its proxy worker in
    milter mode on a free loopback port (start-up compiles its regexps: up to a few minutes)."""
    exe = require("rspamd")
    port = free_port()
    for name in ("local.d", "override.d", "run", "db"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / "override.d/worker-proxy.inc").write_text(RSPAMD_PROXY.format(port=port))
    for name, text in RSPAMD_OVERRIDES.items():
        (folder / name).write_text(text.replace("{folder}", str(folder)))
    argv = [exe, "-f", "-i", "-c", "/etc/rspamd/rspamd.conf", "--var", f"LOCAL_CONFDIR={folder}",
            "--var", f"RUNDIR={folder / 'run'}", "--var", f"DBDIR={folder / 'db'}", "--var", f"LOGDIR={folder}"]
    return Process(argv, port, folder / "rspamd.out", cwd=folder, timeout=240.0)


EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


class ClamAV:
    """Debian's clamd with one local signature (the EICAR test file's MD5, an ``.hdb``: no
    download) and clamav-milter in front of it on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        clamd, milter = require("clamd"), require("clamav-milter")
        db = folder / "db"
        db.mkdir(parents=True, exist_ok=True)
        (db / "eicar.hdb").write_text(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Eicar-Test-Signature\n")
        sock = folder / "clamd.sock"
        (folder / "clamd.conf").write_text(
            f"LocalSocket {sock}\nDatabaseDirectory {db}\nForeground yes\nLogFile {folder}/clamd.log\n"
            f"PidFile {folder}/clamd.pid\nTemporaryDirectory {folder}\nUser {getpass.getuser()}\n")
        port = free_port()
        (folder / "clamav-milter.conf").write_text(
            f"MilterSocket inet:{port}@127.0.0.1\nClamdSocket unix:{sock}\nForeground yes\n"
            f"LogFile {folder}/clamav-milter.log\nPidFile {folder}/clamav-milter.pid\nUser {getpass.getuser()}\n"
            "OnInfected Reject\nOnFail Defer\nAddHeader Replace\nRejectMsg Virus found: %v\n")
        self.clamd = subprocess.Popen([clamd, "-c", str(folder / "clamd.conf")], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not sock.exists():
            if self.clamd.poll() is not None or time.monotonic() > deadline:
                self.clamd.kill()
                log = folder / "clamd.log"
                raise AssertionError(f"clamd did not start:\n{log.read_text() if log.exists() else ''}")
            time.sleep(0.1)
        self.milter = Process([milter, "-c", str(folder / "clamav-milter.conf")], port, folder / "milter.out")

    @property
    def address(self) -> str:
        return self.milter.address

    def stop(self) -> None:
        self.milter.stop()
        if self.clamd.poll() is None:
            self.clamd.terminate()
            self.clamd.wait(10)
