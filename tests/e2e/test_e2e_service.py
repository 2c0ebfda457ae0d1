"""Running as a real service: started as root on privileged ports, serving as its own user.

``twistd --uid/--gid`` opens the listening sockets (ports 25 and 110 on a loopback
address) before it gives up root, and every file the server made or makes belongs
to the service user; the private ones are not readable by others.  A daemon whose
port is taken exits non-zero within seconds with the reason, and leaves no pidfile.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import smtplib
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from .conftest import DOMAIN
from .harness import MailguardServer, child_env, free_port, make_message, toml_dumps, twistd_command
from .sinks import wait_until
from .test_e2e_metrics import delta, scrape

SERVICE_USER = "nobody"
PRIVILEGED_IP = "127.0.6.1"


class RootStartedServer(MailguardServer):
    """The harness's server, started as root with ``--uid/--gid`` of the service user."""

    def __init__(self, root: Path, uid: int, gid: int) -> None:
        super().__init__(root, {"domains": {DOMAIN: {"route": "inbound"}}})
        self.uid, self.gid = uid, gid
        self.config["listen"]["smtp"] = [f"tcp:25:interface={PRIVILEGED_IP}"]
        self.config["listen"]["pop3"] = [f"tcp:110:interface={PRIVILEGED_IP}"]
        self.smtp_ports = {PRIVILEGED_IP: 25}
        self.config_path.write_text(toml_dumps(self.config), encoding="utf-8")

    def command(self) -> list[str]:
        return twistd_command() + ["-n", "--pidfile=", f"--uid={self.uid}", f"--gid={self.gid}", "mailguard",
                                   "--config", str(self.config_path)]


@pytest.fixture
def service_root() -> Iterator[Path]:
    """A folder the service user can reach (pytest's own tmp folders are root's alone)."""
    if os.geteuid() != 0:
        pytest.fail("these tests start the server as root, as an administrator does (CI runs as root)")
    folder = Path(tempfile.mkdtemp(prefix="mailguard-service-", dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def owners(folder: Path) -> set[tuple[int, int]]:
    return {(p.lstat().st_uid, p.lstat().st_gid) for p in [folder, *folder.rglob("*")]}


def test_root_start_binds_privileged_ports_and_runs_as_the_service_user(service_root: Path) -> None:
    """Ports 25 and 110 are served; the process, and every file, belong to the service user."""
    user = pwd.getpwnam(SERVICE_USER)
    probe = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                            os.path.realpath(os.sys.executable), "-c", "import twisted, mailguard"],
                           env=child_env(), capture_output=True, text=True)
    assert probe.returncode == 0, ("the service user cannot run this Python (grant traversal of its folders, "
                                   f"as .ci/run does): {probe.stderr[-500:]}")
    server = RootStartedServer(service_root, user.pw_uid, user.pw_gid)
    server.add_user(f"alice@{DOMAIN}", "alice's password")     # the admin's CLI, as root, before start
    server.start()
    try:
        status = Path(f"/proc/{server.process.pid}/status").read_text()   # type: ignore[union-attr]
        uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(user.pw_uid)}, status
        with smtplib.SMTP(PRIVILEGED_IP, 25, timeout=30) as c:
            assert c.sendmail("someone@outside.example", [f"alice@{DOMAIN}"],
                              make_message("someone@outside.example", f"alice@{DOMAIN}", "privileged")) == {}
        pop = poplib.POP3(PRIVILEGED_IP, 110, timeout=30)
        assert pop.getwelcome().startswith(b"+OK")
        pop.quit()
        wait_until(lambda: len(server.messages(f"alice@{DOMAIN}")) == 1, 10, "the stored message")
        assert owners(server.data_dir) == {(user.pw_uid, user.pw_gid)}
        directory = server.data_dir / "directory.sqlite"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o600
        readable = [p for p in [server.data_dir, *server.data_dir.rglob("*")]
                    if stat.S_IMODE(p.lstat().st_mode) & 0o077]
        assert readable == [], "readable by others: " + ", ".join(map(str, readable))
    finally:
        server.stop()


def test_daemon_with_a_taken_port_fails_fast(tmp_path: Path) -> None:
    """``twistd mailguard`` (daemon) whose port is taken: non-zero within seconds, the reason, no pidfile."""
    server = MailguardServer(tmp_path / "daemon")
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", server.smtp_port))
    blocker.listen(1)
    pidfile = tmp_path / "daemon" / "twistd.pid"
    try:
        started = time.monotonic()
        result = subprocess.run(twistd_command() + [f"--pidfile={pidfile}", f"--logfile={tmp_path / 'daemon.log'}",
                                                    "mailguard", "--config", str(server.config_path)],
                                cwd=server.root, env=child_env(), capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        blocker.close()
    assert result.returncode != 0
    assert elapsed < 20, elapsed
    assert f"cannot listen on tcp:{server.smtp_port}:interface=127.0.0.1: Address already in use" in result.stderr, \
        result.stderr
    # The daemon removes its pidfile just after telling twistd's parent it failed.
    wait_until(lambda: not pidfile.exists(), 10, "the failed daemon's pidfile to be removed")


def test_foreground_with_a_taken_port_says_one_line(tmp_path: Path) -> None:
    """``twistd -n mailguard`` whose port is taken: exit 1 and one line, no traceback."""
    server = MailguardServer(tmp_path / "fg")
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", server.smtp_port))
    blocker.listen(1)
    try:
        result = subprocess.run(server.command(), cwd=server.root, env=child_env(), capture_output=True, text=True,
                                timeout=60)
    finally:
        blocker.close()
    assert result.returncode == 1
    # Under -n, twistd's log (standard output) carries what the service writes to stderr.
    errors = [ln for ln in (result.stdout + result.stderr).splitlines() if "mailguard: cannot listen" in ln]
    assert len(errors) == 1, result.stdout + result.stderr
    assert errors[0].endswith(f"mailguard: cannot listen on tcp:{server.smtp_port}:interface=127.0.0.1: "
                              "Address already in use"), errors
    assert "Traceback" not in result.stdout + result.stderr


def test_root_started_workers_count_metrics_as_the_service_user(service_root: Path) -> None:
    """With ``workers = 2`` and ``[metrics]``, both processes run as the service user and count
    into files it owns: a message counts once on /metrics, and every file under the data
    folder, the metrics folder included, is the service user's."""
    user = pwd.getpwnam(SERVICE_USER)
    server = RootStartedServer(service_root, user.pw_uid, user.pw_gid)
    port = free_port()
    server.config["server"]["workers"] = 2
    server.config["metrics"] = {"listen": [f"tcp:{port}:interface=127.0.0.1"]}
    server.config_path.write_text(toml_dumps(server.config), encoding="utf-8")
    server.add_user(f"alice@{DOMAIN}", "alice's password")
    server.start()
    try:
        wait_until(lambda: server.log_text().count("mailguard starting:") >= 2, 20, "both processes serving")
        before = scrape(port)
        with smtplib.SMTP(PRIVILEGED_IP, 25, timeout=30) as c:
            assert c.sendmail("someone@outside.example", [f"alice@{DOMAIN}"],
                              make_message("someone@outside.example", f"alice@{DOMAIN}", "workers")) == {}
        after = scrape(port)
        assert delta(before, after, "mailguard_connections_total", service="smtp") == 1
        assert delta(before, after, "mailguard_store_seconds_count") == 1
        assert list((server.data_dir / "metrics").glob("*.db"))
        assert owners(server.data_dir) == {(user.pw_uid, user.pw_gid)}
    finally:
        server.stop()
