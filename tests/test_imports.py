"""Importing the server does no DNS lookup (TWISTED-NOTES item 11)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import socket, sys
def refuse(*args, **kwargs):
    raise SystemExit("blocking DNS lookup at import: socket.%s%r" % (refuse.name, args))
for name in ("getfqdn", "gethostbyname", "gethostbyaddr", "getaddrinfo"):
    def f(*args, _name=name, **kwargs):
        refuse.name = _name
        refuse(*args)
    setattr(socket, name, f)
import mailguard.app.tap, mailguard.smtp.server, mailguard.pop3.server, mailguard.app.service, mailguard.outbound.runner
print("imported")
"""


def test_importing_the_server_makes_no_dns_lookup() -> None:
    """twisted.mail.smtp calls socket.getfqdn() at import; mailguard's import of it must not."""
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "imported"
