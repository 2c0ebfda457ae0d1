"""SIGHUP and ``mailguard reload`` against the real ``twistd -n mailguard``.

A changed ``[relay]`` rule takes effect on the next connection; a session that was
open before the reload keeps the rules it started with; a broken configuration is
refused in one log line and the running rules stay; a changed ``[listen]`` is
reported as needing a restart.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from mailguard import config
from mailguard.core import replies

from .conftest import DOMAIN, ServerFactory
from .harness import MailguardServer, deep_merge, free_port, port_accepts, toml_dumps, wait_for

CLIENT = "127.0.0.9"                 # the printer whose relay permission the admin changes
OTHER = "127.0.0.10"                 # never allowed
RELAY_DENIED = config.DEFAULTS["replies"]["relay_denied"]
ALICE = f"alice@{DOMAIN}"


def rewrite(server: MailguardServer, extra: dict[str, Any]) -> None:
    """Write the server's configuration file again with ``extra`` merged in."""
    server.config = deep_merge(server.config, extra)
    server.config_path.write_text(toml_dumps(server.config), encoding="utf-8")


def relay_reply(server: MailguardServer, source: str) -> str:
    """The reply to RCPT for a remote recipient on a new connection from ``source``."""
    with server.dialog(source=source) as d:
        assert d.cmd("EHLO printer.example").code == 250
        assert d.cmd(f"MAIL FROM:<scanner@{DOMAIN}>").last == str(replies.SENDER_OK)
        return d.cmd("RCPT TO:<someone@remote.example>").last


def reload_and_wait(server: MailguardServer, pattern: str, cli: bool = True) -> str:
    """``mailguard reload`` (or a plain SIGHUP), then the new log line matching ``pattern``."""
    before = len(server.log_lines(pattern))
    if cli:
        out = server.cli_ok("reload").stdout
        assert out == f"SIGHUP sent to mailguard (process {server.process.pid if server.process else 0}); " \
                      f"its log says whether {server.config_path} was taken\n", out
    else:
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
    server_lines: list[str] = []

    def seen() -> bool:
        server_lines[:] = server.log_lines(pattern)
        return len(server_lines) > before

    wait_for(seen, 10.0, f"a log line matching {pattern!r}")
    return server_lines[-1]


def test_reload_changes_relay_rules_for_new_connections(fresh_server_factory: ServerFactory) -> None:
    """allow gains 127.0.0.9: its next connection relays, an open one does not; a broken file changes nothing."""
    server = fresh_server_factory("reload", {"domains": {DOMAIN: {"route": "inbound"}}})
    assert (server.data_dir / "mailguard.pid").read_text().strip() == str(server.process.pid if server.process else 0)
    assert relay_reply(server, CLIENT) == RELAY_DENIED

    early = server.dialog(source=CLIENT)               # opened under the old rules
    assert early.cmd("EHLO printer.example").code == 250
    rewrite(server, {"relay": {"allow": [CLIENT]}})
    line = reload_and_wait(server, r"mailguard reload: ")
    assert line.endswith(f"mailguard reload: {server.config_path} in use for new connections"), line

    assert relay_reply(server, CLIENT) == str(replies.RECIPIENT_OK)
    assert relay_reply(server, OTHER) == RELAY_DENIED
    with early:
        assert early.cmd(f"MAIL FROM:<scanner@{DOMAIN}>").last == str(replies.SENDER_OK)
        assert early.cmd("RCPT TO:<someone@remote.example>").last == RELAY_DENIED

    # A broken file: the CLI refuses to signal; a SIGHUP all the same (kill -HUP,
    # systemctl reload) gets one log line naming the key, and the running rules stay.
    rewrite(server, {"relay": {"allow": [CLIENT, "not-an-address"]}})
    broken = (f"{server.config_path}: relay.allow: 'not-an-address': "
              "'not-an-address' does not appear to be an IPv4 or IPv6 network")
    refused = server.cli("reload")
    assert (refused.returncode, refused.stderr) == (1, f"mailguard: {broken}\n")
    line = reload_and_wait(server, r"mailguard reload refused", cli=False)
    assert line.endswith(f"mailguard reload refused, the running configuration stays: {broken}"), line
    assert len(server.log_lines(r"mailguard reload refused")) == 1
    assert relay_reply(server, CLIENT) == str(replies.RECIPIENT_OK)
    assert relay_reply(server, OTHER) == RELAY_DENIED
    assert server.running()


def test_reload_reports_listener_changes(fresh_server_factory: ServerFactory) -> None:
    """A changed [listen] is kept until a restart (the new port is not bound), [relay] and [replies] apply."""
    server = fresh_server_factory("reloadlisten")
    new_port = free_port()
    rewrite(server, {"listen": {"smtp": [f"tcp:{new_port}:interface=127.0.0.1"]},
                     "relay": {"allow": [CLIENT]},
                     "replies": {"relay_denied": "550 5.7.1 Ask the office to send it for you"}})
    line = reload_and_wait(server, r"mailguard reload: ")
    assert line.endswith(f"mailguard reload: {server.config_path} in use for new connections; "
                         "changed [listen] kept until a restart"), line
    assert relay_reply(server, CLIENT) == str(replies.RECIPIENT_OK)
    assert relay_reply(server, OTHER) == "550 5.7.1 Ask the office to send it for you"     # [replies] too
    assert not port_accepts("127.0.0.1", new_port)


def test_reload_without_a_server(tmp_path: Path, fresh_server_factory: ServerFactory) -> None:
    """After a clean stop the pidfile is gone and ``mailguard reload`` says the server is not running."""
    server = fresh_server_factory("reloadstopped")
    pidfile = server.data_dir / "mailguard.pid"
    assert pidfile.is_file()
    server.stop()
    assert not pidfile.exists()
    result = server.cli("reload")
    assert result.returncode == 1
    assert result.stderr == f"mailguard: no {pidfile}: mailguard is not running on this data folder\n"
