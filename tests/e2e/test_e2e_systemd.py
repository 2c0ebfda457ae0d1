"""Socket activation: ``systemd-socket-activate`` binds the ports and hands them to ``twistd -n mailguard``.

The server is configured with ``systemd:`` endpoints only (``ssl:systemd:`` for the
implicit-TLS one), as with the shipped ``etc/systemd/mailguard-*.socket`` units; it
binds nothing itself.  A message goes in through the passed SMTP socket and is
stored; the passed ``pop3s`` socket speaks TLS.
"""

from __future__ import annotations

import poplib
import shutil
import ssl
from pathlib import Path

from .conftest import DOMAIN
from .harness import REPO, MailguardServer, free_port, make_message, twistd_command

ALICE = f"alice@{DOMAIN}"
SOCKET_ACTIVATE = "systemd-socket-activate"      # Debian package systemd (.ci/run installs it)


class SocketActivated(MailguardServer):
    """The harness's server, started under systemd-socket-activate with the ports it binds."""

    def __init__(self, root: Path) -> None:
        self.pop3s_port = free_port()
        super().__init__(root, {
            "domains": {DOMAIN: {"route": "inbound"}},
            "listen": {"smtp": ["systemd:domain=INET:name=smtp"], "submission": [], "submissions": [],
                       "pop3": [], "pop3s": ["ssl:systemd:domain=INET:name=pop3s"]},
        })

    def command(self) -> list[str]:
        tool = shutil.which(SOCKET_ACTIVATE)
        assert tool is not None, f"missing test tool: {SOCKET_ACTIVATE} (Debian package systemd)"
        return [tool, "-l", f"{self.host}:{self.smtp_port}", "-l", f"127.0.0.1:{self.pop3s_port}",
                "--fdname=smtp:pop3s", "-E", f"PYTHONPATH={REPO}", "-E", "PYTHONUNBUFFERED=1",
                *twistd_command(), "-n", "--pidfile=", "mailguard", "--config", str(self.config_path)]


def test_socket_activation_delivers(tmp_path: Path) -> None:
    """Ports bound by systemd-socket-activate: mail delivered through them, POP3S over TLS."""
    server = SocketActivated(tmp_path / "sa")
    server.add_user(ALICE)
    server.start()
    try:
        server.wait_for_log(r"mailguard listening: systemd:domain=INET:name=smtp")
        server.wait_for_log(r"mailguard listening: ssl:systemd:domain=INET:name=pop3s")
        with server.smtp() as c:
            assert c.sendmail(f"x@{DOMAIN}", [ALICE], make_message(f"x@{DOMAIN}", ALICE, "socket-activated")) == {}
        assert len(server.messages_containing(ALICE, b"socket-activated")) == 1
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        box = poplib.POP3_SSL("127.0.0.1", server.pop3s_port, context=ctx, timeout=30)
        try:
            box.user(ALICE)
            box.pass_("correct horse battery")
            assert box.stat()[0] == 1
        finally:
            box.quit()
    finally:
        server.stop()
