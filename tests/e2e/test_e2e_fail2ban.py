"""End to end: the shipped fail2ban filter reads the real server's failed-login lines (issue 3).

Failed logins are produced against a real ``twistd -n mailguard`` over SMTP AUTH and
POP3, then the real ``fail2ban-regex`` (Debian package fail2ban) runs the shipped
``etc/fail2ban/filter.d/mailguard.conf`` over the twistd log, exactly as an
administrator would check a filter before enabling the jail.
"""

from __future__ import annotations

import base64
import poplib
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from .conftest import DOMAIN, ServerFactory
from .harness import REPO, MailguardServer, SourcePOP3, tls_context

FILTER = REPO / "etc" / "fail2ban" / "filter.d" / "mailguard.conf"

ALICE = f"alice@{DOMAIN}"
PASSWORD = "correct horse battery"

SMTP_GUESSER = "127.0.0.50"   # wrong SMTP AUTH passwords
POP3_GUESSER = "127.0.0.51"   # a wrong POP3 password
SPOOFER = "127.0.0.52"        # a login name that pretends to be another client= field
GOOD_USER = "127.0.0.53"      # logs in correctly; must never be banned
SPOOFED_IP = "10.9.9.9"




def smtp_login(server: MailguardServer, source: str, login: str, password: str) -> int:
    """STARTTLS and AUTH PLAIN on the submission listener from ``source``; the AUTH reply code."""
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], source_address=(source, 0), timeout=30) as c:
        c.ehlo("client.example")
        c.starttls(context=tls_context())
        c.ehlo("client.example")
        payload = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        code, _ = c.docmd("AUTH", f"PLAIN {payload}")
        return code


def fail2ban_regex(log: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``fail2ban-regex [options] LOG FILTER``."""
    exe = shutil.which("fail2ban-regex")
    assert exe is not None, "fail2ban-regex is not installed (Debian package fail2ban)"
    result = subprocess.run([exe, *options, str(log), str(FILTER)], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def matched_count(report: str) -> int:
    """The ``Failregex: N total`` figure of a fail2ban-regex report."""
    m = re.search(r"^Failregex: (\d+) total", report, re.M)
    assert m, report
    return int(m.group(1))


@pytest.fixture(scope="module")
def failures(server_factory: ServerFactory) -> MailguardServer:
    """A server whose log holds real failed logins (SMTP and POP3) and one successful login."""
    server = server_factory("fail2ban", {"domains": {DOMAIN: {"route": "inbound"}}})
    server.add_user(ALICE, PASSWORD)
    assert smtp_login(server, SMTP_GUESSER, ALICE, "guess one") == 535
    assert smtp_login(server, SMTP_GUESSER, "nosuchuser@" + DOMAIN, "guess two") == 535
    assert smtp_login(server, SPOOFER, f"x client={SPOOFED_IP} user=y", "guess three") == 535
    p = SourcePOP3("127.0.0.1", server.ports["pop3"], POP3_GUESSER)
    try:
        p.stls(tls_context())
        p.user(ALICE)
        with pytest.raises(poplib.error_proto):
            p.pass_("guess four")
    finally:
        p.close()
    assert smtp_login(server, GOOD_USER, ALICE, PASSWORD) == 235
    for ip in (SMTP_GUESSER, POP3_GUESSER, SPOOFER):
        server.wait_for_log(rf"auth failure: .*client={re.escape(ip)}\b")
    server.wait_for_log(rf"client={re.escape(GOOD_USER)}\b.*{re.escape(ALICE)}")
    return server


def test_filter_matches_every_failure(failures: MailguardServer) -> None:
    """fail2ban-regex over the real log matches each failed login line, SMTP and POP3."""
    lines = [ln for ln in failures.log_text().splitlines() if "mailguard auth failure:" in ln]
    assert len(lines) == 4, lines
    assert any("service=smtp" in ln for ln in lines), lines
    assert any("service=pop3" in ln for ln in lines), lines
    report = fail2ban_regex(failures.log_path).stdout
    assert matched_count(report) == len(lines), report


def test_filter_finds_the_client_ips(failures: MailguardServer) -> None:
    """The addresses fail2ban would ban are exactly the guessing clients, one per failure."""
    out = fail2ban_regex(failures.log_path, "-o", "ip").stdout.split()
    assert sorted(out) == sorted([SMTP_GUESSER, SMTP_GUESSER, SPOOFER, POP3_GUESSER]), out
    assert SPOOFED_IP not in out, "a login name chose the address fail2ban bans"
    assert GOOD_USER not in out


def test_filter_ignores_successful_login(failures: MailguardServer, tmp_path: Path) -> None:
    """The real log line of a successful login is not matched by the filter."""
    ok_lines = [ln for ln in failures.log_text().splitlines()
                if f"client={GOOD_USER}" in ln and "failure" not in ln]
    assert ok_lines, failures.log_text()
    log = tmp_path / "success.log"
    log.write_text("\n".join(ok_lines) + "\n", encoding="utf-8")
    report = fail2ban_regex(log).stdout
    assert matched_count(report) == 0, report
    assert fail2ban_regex(log, "-o", "ip").stdout.split() == []
