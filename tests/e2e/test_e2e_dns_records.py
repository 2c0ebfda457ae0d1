"""``mailguard dkim keygen`` and ``mailguard dns DOMAIN [--check]`` against a loopback DNS server.

The admin generates a key, publishes what ``mailguard dns`` prints, and ``--check``
tells what is still missing: it fails while DNS lacks the records and passes once the
printed records are served.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from .conftest import DOMAIN, HOSTNAME, ServerFactory
from .sinks import DNSServer


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    server = DNSServer({})
    yield server
    server.close()
    assert server.errors == []


def _publish(dns: DNSServer, zone_lines: list[str]) -> None:
    """Serve the records of ``mailguard dns`` output lines (MX and TXT)."""
    by_name: dict[str, list[tuple[str, object]]] = {}
    for line in zone_lines:
        if line.startswith(";"):
            continue
        m = re.match(r'^(\S+)\. IN (MX|TXT) (.*)$', line)
        assert m, line
        name, kind, value = m.groups()
        if kind == "MX":
            pref, host = value.split()
            by_name.setdefault(name, []).append(("MX", (int(pref), host.rstrip("."))))
        else:
            by_name.setdefault(name, []).append(("TXT", "".join(re.findall(r'"([^"]*)"', value))))
    for name, recs in by_name.items():
        dns.set(name, recs)


def test_dns_check_fails_until_records_are_published(fresh_server_factory: ServerFactory,
                                                      dns_server: DNSServer) -> None:
    """Missing records → exit 1 naming each; after publishing what ``dns`` printed → exit 0."""
    server = fresh_server_factory("dnsrecords", {
        "domains": {DOMAIN: {"route": "inbound"}},
        "outbound": {"dns_servers": [dns_server.address], "smarthost": ""},
    }, start=False)
    rsa_line = server.cli_ok("dkim", "keygen", DOMAIN).stdout.strip()
    assert rsa_line.startswith(f'mail._domainkey.{DOMAIN}. IN TXT "v=DKIM1; k=rsa; p=')
    ed_line = server.cli_ok("dkim", "keygen", DOMAIN, "--algorithm", "ed25519").stdout.strip()
    assert ed_line.startswith(f'mail-ed25519._domainkey.{DOMAIN}. IN TXT "v=DKIM1; k=ed25519; p=')
    key_dir = Path(server.data_dir) / "dkim" / DOMAIN
    assert sorted(p.name for p in key_dir.iterdir()) == ["mail-ed25519.ed25519.key", "mail.rsa.pem"]

    printed = server.cli_ok("dns", DOMAIN).stdout.splitlines()
    records = [ln for ln in printed if not ln.startswith(";")]
    assert records == [f"{DOMAIN}. IN MX 10 {HOSTNAME}.", f'{DOMAIN}. IN TXT "v=spf1 mx -all"',
                       rsa_line, ed_line,
                       f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@{DOMAIN}"']

    before = server.cli("dns", DOMAIN, "--check")
    assert before.returncode == 1, before.stdout + before.stderr
    assert [ln.split()[0] for ln in before.stdout.splitlines()] == ["missing"] * 5

    _publish(dns_server, records[:3])          # MX, SPF, the RSA key: the Ed25519 key and DMARC not yet
    partial = server.cli("dns", DOMAIN, "--check")
    assert partial.returncode == 1
    assert [ln.split()[0] for ln in partial.stdout.splitlines()] == ["ok", "ok", "ok", "missing", "missing"]

    _publish(dns_server, printed)
    after = server.cli("dns", DOMAIN, "--check")
    assert after.returncode == 0, after.stdout + after.stderr
    assert [ln.split()[0] for ln in after.stdout.splitlines()] == ["ok"] * 5

    dns_server.set(DOMAIN, [("MX", (10, HOSTNAME)), ("TXT", "v=spf1 a -all")])
    differs = server.cli("dns", DOMAIN, "--check")
    assert differs.returncode == 1
    assert differs.stdout.splitlines()[1].startswith("differs ")
    assert "v=spf1 a -all" in differs.stdout.splitlines()[1]
