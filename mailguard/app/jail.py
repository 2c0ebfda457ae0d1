"""The fail2ban jail for the ports this configuration listens on (``mailguard fail2ban-jail``).

The shipped ``etc/fail2ban/jail.d/mailguard.conf`` names ports; a jail that names
ports mailguard does not listen on bans nothing useful.  :func:`jail` writes the
jail from the ``[listen]`` endpoints instead.
"""

from __future__ import annotations

import re

from mailguard.config import Config

_PORT = re.compile(r"^(?:tcp6?|ssl|tls):(?:port=)?(\d+)\b|[:]port=(\d+)\b")


def listen_ports(cfg: Config) -> list[int]:
    """Every TCP port of the ``[listen]`` endpoints, in order, once each."""
    ports: list[int] = []
    listen = cfg.listen
    for desc in (*listen.smtp, *listen.submission, *listen.submissions, *listen.pop3, *listen.pop3s):
        m = _PORT.search(desc)
        if m:
            port = int(m.group(1) or m.group(2))
            if port not in ports:
                ports.append(port)
    return ports


def jail(cfg: Config, logpath: str) -> str:
    """The jail file's text for ``cfg``'s ports, reading ``logpath``."""
    return (
        "# Ban clients that keep guessing passwords; written by 'mailguard fail2ban-jail' for\n"
        f"# the ports of {cfg.source}.  mailguard logs the first 10 failures a minute per client.\n"
        "[mailguard]\n"
        "enabled  = true\n"
        "filter   = mailguard\n"
        f"logpath  = {logpath}\n"
        f"port     = {','.join(str(p) for p in listen_ports(cfg))}\n"
        "maxretry = 10\n"
        "findtime = 10m\n"
        "bantime  = 1h\n"
    )
