"""End to end: ``[directory] backend = "ldap"`` against a real OpenLDAP slapd.

The office keeps its users in OpenLDAP (inetOrgPerson with ``mailLocalAddress``
aliases, groupOfNames lists).  The real ``twistd -n mailguard`` looks recipients up
there, delivers to lists once per mailbox, logs users in by binding as their
entries, answers 4xx while slapd is down and recovers when it is back.
"""

from __future__ import annotations

import base64
import poplib
import smtplib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ldap_server import (SERVICE_DN, SERVICE_PW, SUFFIX, Slapd, ad_user, dn_of, group, group_dn,  # noqa: E402
                         person)

from mailguard import config  # noqa: E402
from mailguard.core import replies  # noqa: E402

from .conftest import DOMAIN, ServerFactory  # noqa: E402
from .harness import MailguardServer, make_message, tls_context  # noqa: E402

ALICE, BOB, CAROL = f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"carol@{DOMAIN}"
SALES = f"sales@{DOMAIN}"
ALICE_PW, BOB_PW = "alice in ldap", "bob in ldap"
UNKNOWN = str(config.defaults().replies.unknown_recipient)
DIRECTORY_FAILURE = str(config.defaults().replies.directory_failure)
AUTH_OK = str(replies.AUTH_OK)
AUTH_FAILED = str(replies.AUTH_FAILED)
AUTH_TEMPFAIL = str(replies.AUTH_TEMPFAIL)
CACHE_TTL = 3

LDIF = (
    person("alice", ALICE, ALICE_PW, aliases=(SALES,))
    + person("bob", BOB, BOB_PW)
    + person("carol", CAROL)
    + person("pat", "pat@partner.example", aliases=(f"pat@{DOMAIN}",))
    + group("team", f"team@{DOMAIN}", (dn_of("alice"), dn_of("bob")))
    + group("all", f"all@{DOMAIN}", (group_dn("team"), dn_of("carol"), dn_of("alice")))
)


def ldap_config(slapd: Slapd, **over: Any) -> dict[str, Any]:
    return {
        "domains": {DOMAIN: {"route": "inbound"}},
        "directory": {"backend": "ldap", "ldap": {
            "url": slapd.url, "starttls": True, "ca_file": str(slapd.ca_file), "base": SUFFIX,
            "bind_dn": SERVICE_DN, "bind_password": SERVICE_PW, "cache_ttl": CACHE_TTL, **over}},
    }


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    server = Slapd(tmp_path_factory.mktemp("slapd"), LDIF).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def office(server_factory: ServerFactory, slapd: Slapd) -> MailguardServer:
    return server_factory("ldap-office", ldap_config(slapd))


def rcpt(server: MailguardServer, address: str) -> str:
    """The reply to ``RCPT TO:<address>`` as one line."""
    with server.dialog() as d:
        d.cmd("EHLO client.example")
        d.cmd("MAIL FROM:<someone@outside.example>")
        return d.cmd(f"RCPT TO:<{address}>").last


def poll(check: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``check()`` held; fails after ``seconds``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not reached within {seconds} s")
        time.sleep(0.2)
    return time.monotonic() - started


def smtp_auth(server: MailguardServer, login: str, password: str) -> str:
    """AUTH PLAIN over implicit TLS (submissions); the reply as one line."""
    s = smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_context(), timeout=30)
    try:
        s.ehlo("client.example")
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        code, text = s.docmd("AUTH", f"PLAIN {token}")
        return f"{code} {text.decode()}"
    finally:
        s.close()


def submit_as(server: MailguardServer, login: str, password: str, sender: str) -> str:
    """AUTH as ``login`` on submissions, then ``MAIL FROM:<sender>``; the MAIL reply as one line."""
    s = smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_context(), timeout=30)
    try:
        s.ehlo("client.example")
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        assert s.docmd("AUTH", f"PLAIN {token}")[0] == 235
        code, text = s.docmd("MAIL", f"FROM:<{sender}>")
        return f"{code} {text.decode()}"
    finally:
        s.close()


def pop3_login(server: MailguardServer, login: str, password: str) -> str:
    """USER/PASS over POP3S; the PASS reply (or the -ERR line)."""
    p = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=30)
    try:
        p.user(login)
        return p.pass_(password).decode()
    except poplib.error_proto as e:
        return bytes(e.args[0]).decode()
    finally:
        try:
            p.quit()
        except (poplib.error_proto, OSError):
            pass


# -- recipients and delivery ----------------------------------------------------------


def test_recipients_come_from_ldap(office: MailguardServer) -> None:
    """Mailboxes, a mailLocalAddress alias, a contact and a list are accepted; others are unknown."""
    for address in (ALICE, SALES.upper(), f"team@{DOMAIN}", f"pat@{DOMAIN}"):
        assert rcpt(office, address).startswith("250 "), address
    assert rcpt(office, f"nobody@{DOMAIN}") == UNKNOWN


@pytest.mark.parametrize("address", [f"*@{DOMAIN}", f"al*@{DOMAIN}", f'"*)(uid=*"@{DOMAIN}'])
def test_filter_injection_is_an_unknown_recipient(office: MailguardServer, address: str) -> None:
    """An address with filter metacharacters matches no entry (RFC 4515 escaping)."""
    assert rcpt(office, address) == UNKNOWN


def test_alias_and_nested_list_delivery_once_per_mailbox(office: MailguardServer) -> None:
    """One message to the alias and the nested list: alice gets one copy, bob and carol one each."""
    tag = f"ldap-{time.time_ns()}"
    message = make_message("someone@outside.example", f"all@{DOMAIN}", tag)
    s = smtplib.SMTP("127.0.0.1", office.smtp_port, timeout=30)
    try:
        refused = s.sendmail("someone@outside.example", [SALES, f"all@{DOMAIN}", f"team@{DOMAIN}"], message)
    finally:
        s.quit()
    assert refused == {}
    # The 250 after DATA comes once every local copy is stored: nothing arrives later.
    for address in (ALICE, BOB, CAROL):
        assert len(office.messages_containing(address, tag.encode())) == 1, address


# -- logins ------------------------------------------------------------------------------


def test_smtp_auth_binds_with_the_ldap_password(office: MailguardServer) -> None:
    """AUTH PLAIN: the LDAP password works (also through the alias); a wrong one is 535."""
    assert smtp_auth(office, ALICE, ALICE_PW) == AUTH_OK
    assert smtp_auth(office, SALES, ALICE_PW) == AUTH_OK
    assert smtp_auth(office, BOB, ALICE_PW) == AUTH_FAILED
    assert smtp_auth(office, CAROL, "") in (AUTH_FAILED, str(replies.AUTH_MALFORMED))


def test_submission_senders_are_the_entrys_addresses(office: MailguardServer) -> None:
    """After AUTH, alice may send as her mail and mailLocalAddress values, not as bob."""
    assert submit_as(office, ALICE, ALICE_PW, SALES) == str(replies.SENDER_OK)
    assert submit_as(office, ALICE, ALICE_PW, ALICE) == str(replies.SENDER_OK)
    assert submit_as(office, ALICE, ALICE_PW, BOB) == str(replies.SENDER_NOT_OWNED)


def test_pop3_logins_bind_with_the_ldap_password(office: MailguardServer) -> None:
    """USER/PASS and AUTH PLAIN over POP3S with the LDAP password; a wrong password is refused."""
    assert pop3_login(office, BOB, BOB_PW).startswith("+OK")
    assert pop3_login(office, BOB, "not it").startswith("-ERR [AUTH]")
    p = poplib.POP3_SSL("127.0.0.1", office.ports["pop3s"], context=tls_context(), timeout=30)
    token = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
    assert p._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK")
    p.quit()


# -- changes and outages -------------------------------------------------------------------


def test_entry_added_with_ldapadd_is_seen_within_cache_ttl(office: MailguardServer, slapd: Slapd) -> None:
    """'No such entry' is reused for cache_ttl seconds; then the new entry is found."""
    dave = f"dave-{time.time_ns()}@{DOMAIN}"
    assert rcpt(office, dave) == UNKNOWN
    slapd.ldapadd(person(dave.split("@")[0], dave, "dave pw"))
    waited = poll(lambda: rcpt(office, dave).startswith("250 "), CACHE_TTL + 5)
    assert waited <= CACHE_TTL + 1


def test_outage_gives_4xx_then_recovers(fresh_server_factory: ServerFactory, tmp_path: Path) -> None:
    """slapd stopped: 451 at RCPT, 454 4.7.0 to AUTH, -ERR [SYS/TEMP] to POP3; started: mail flows."""
    ldap = Slapd(tmp_path / "slapd", LDIF).start()
    try:
        server = fresh_server_factory("ldap-outage", ldap_config(ldap, cache_ttl=0))
        assert rcpt(server, ALICE).startswith("250 ")
        ldap.stop()
        assert rcpt(server, ALICE) == DIRECTORY_FAILURE
        assert rcpt(server, BOB) == DIRECTORY_FAILURE
        assert smtp_auth(server, ALICE, ALICE_PW) == AUTH_TEMPFAIL
        assert pop3_login(server, BOB, BOB_PW).startswith("-ERR [SYS/TEMP]")
        assert server.running()
        ldap.start()
        poll(lambda: rcpt(server, ALICE).startswith("250 "), 30)
        assert smtp_auth(server, ALICE, ALICE_PW) == AUTH_OK
        assert pop3_login(server, BOB, BOB_PW).startswith("+OK")
    finally:
        ldap.stop()


# -- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [("user", "add", ALICE), ("user", "list"), ("alias", "add", SALES, BOB),
                                  ("list", "add", f"team@{DOMAIN}", CAROL), ("contact", "del", f"pat@{DOMAIN}")])
def test_cli_entries_are_managed_in_ldap(office: MailguardServer, args: tuple[str, ...]) -> None:
    """user/alias/list/contact say the directory is managed in LDAP and exit 1."""
    result = office.cli(*args, input="pw\n")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("mailguard: the directory is managed in LDAP (ldap://127.0.0.1:")
    assert result.stderr.count("\n") == 1


def test_cli_directory_test_shows_what_ldap_answers(office: MailguardServer) -> None:
    """directory test: the filters sent, the entry DN, the maildir, the expansion."""
    out = office.cli_ok("directory", "test", SALES).stdout
    assert "mailbox_filter: (&(objectClass=inetOrgPerson)(|(mail=sales@realdomain.example)" in out
    assert f"mailbox {dn_of('alice')}: {ALICE} (maildir " in out
    assert f"mail/{DOMAIN}/alice" in out
    assert out.rstrip().endswith(f"expands to: mailbox {ALICE}")
    out = office.cli_ok("directory", "test", f"all@{DOMAIN}").stdout
    assert f"list {group_dn('all')}: 3 direct member(s)" in out
    result = office.cli("directory", "test", f"*@{DOMAIN}")
    assert result.returncode == 1
    assert "mailbox_filter: (&(objectClass=inetOrgPerson)(|(mail=\\2a@realdomain.example)" in result.stdout
    assert result.stdout.rstrip().endswith(f"no entry matches: *@{DOMAIN} is an unknown recipient")


def test_cli_check_config_binds_once(office: MailguardServer, tmp_path: Path) -> None:
    """check-config binds as the service account; a wrong password is one error line and exit 1."""
    out = office.cli_ok("check-config").stdout
    assert f"bound as {SERVICE_DN}; base {SUFFIX} found" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(office.config_path.read_text().replace(SERVICE_PW, "wrong secret"))
    result = office.cli("--config", str(bad), "check-config")
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"the service account '{SERVICE_DN}' was refused (invalid credentials)")


def test_cli_explain_uses_ldap(office: MailguardServer) -> None:
    """explain looks recipients up in LDAP as the server does."""
    out = office.cli_ok("explain", "--client", "127.0.0.5", "-v", SALES, f"nobody@{DOMAIN}").stdout.splitlines()
    assert out[0].startswith(f"{SALES}: 250 ") and out[0].endswith(f"-> mailbox {ALICE}"), out
    assert out[1] == f"nobody@{DOMAIN}: {UNKNOWN} (rule: unknown_recipient)", out


# -- Active Directory ------------------------------------------------------------------------


def test_active_directory_schema(fresh_server_factory: ServerFactory, tmp_path: Path) -> None:
    """schema = "ad": smtp: secondaries in any case reach the SMTP: primary's maildir; disabled accounts get mail, no login."""
    ldif = (ad_user("John Doe", f"jdoe@{DOMAIN}", (f"SMTP:John.Doe@{DOMAIN}", f"smtp:jd@{DOMAIN}"), "john pw")
            + ad_user("Shared Desk", f"desk@{DOMAIN}", (f"SMTP:desk@{DOMAIN}",), "desk pw", uac=514))
    ad = Slapd(tmp_path / "ad", ldif, ad=True).start()
    try:
        server = fresh_server_factory("ldap-ad", ldap_config(ad, schema="ad"))
        tag = f"ad-{time.time_ns()}"
        s = smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30)
        try:
            refused = s.sendmail("someone@outside.example", [f"JD@{DOMAIN.upper()}", f"desk@{DOMAIN}"],
                                 make_message("someone@outside.example", f"jd@{DOMAIN}", tag))
        finally:
            s.quit()
        assert refused == {}
        for mailbox in (f"john.doe@{DOMAIN}", f"desk@{DOMAIN}"):
            poll(lambda: len(server.messages_containing(mailbox, tag.encode())) == 1, 10)
        assert smtp_auth(server, f"jd@{DOMAIN}", "john pw") == AUTH_OK
        assert smtp_auth(server, f"desk@{DOMAIN}", "desk pw") == AUTH_FAILED
        assert pop3_login(server, f"desk@{DOMAIN}", "desk pw").startswith("-ERR [AUTH]")
        assert pop3_login(server, f"john.doe@{DOMAIN}", "john pw").startswith("+OK")
    finally:
        ad.stop()
