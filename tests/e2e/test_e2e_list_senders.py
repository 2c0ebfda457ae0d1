"""End to end: who may send to a list (``mailguard list senders``), against the real ``twistd -n mailguard``.

A list that forwards to remote members turns anybody's mail into mail from this host;
``members`` and ``authenticated`` lists refuse the outsider at RCPT with ``550 5.7.1``,
while the server runs, the CLI having changed the directory under it.
"""

from __future__ import annotations

import base64
import uuid

import pytest

from .conftest import DOMAIN, OFFICE_CONFIG, OUTSIDER, ServerFactory, populate_office
from .harness import Dialog, MailguardServer, Reply, make_message, tls_context

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
STAFF = f"staff@{DOMAIN}"        # members: alice, bob
BOARD = f"board@{DOMAIN}"        # authenticated: alice
PASSWORD = "correct horse battery"
OUTSIDE_SENDER = "eve@outside.example"


@pytest.fixture(scope="module")
def office(server_factory: ServerFactory) -> MailguardServer:
    """The office server; its lists' policies set with the CLI once it runs."""
    server = server_factory("listsenders", OFFICE_CONFIG)
    populate_office(server)
    server.cli_ok("list", "add", STAFF, ALICE, BOB)
    server.cli_ok("list", "add", BOARD, ALICE)
    assert server.cli_ok("list", "senders", STAFF, "members").stdout == f"list {STAFF}: senders members\n"
    assert server.cli_ok("list", "senders", BOARD, "authenticated").stdout == f"list {BOARD}: senders authenticated\n"
    return server


def marker() -> str:
    return "e2e-" + uuid.uuid4().hex


def dialog(server: MailguardServer) -> Dialog:
    """A cleartext dialog from the outsider's address, EHLO done."""
    d = Dialog.connect("127.0.0.1", server.smtp_port, OUTSIDER)
    assert d.cmd("EHLO client.example").code == 250
    return d


def logged_in(server: MailguardServer, login: str) -> Dialog:
    """A dialog from the outsider's address, after STARTTLS and AUTH PLAIN as ``login``."""
    d = dialog(server)
    assert d.cmd("STARTTLS").code == 220
    d.sock = tls_context().wrap_socket(d.sock, server_hostname="mx.realdomain.example")
    assert d.cmd("EHLO client.example").code == 250
    token = base64.b64encode(f"\0{login}\0{PASSWORD}".encode()).decode()
    r = d.cmd(f"AUTH PLAIN {token}")
    assert r.code == 235, r
    return d


def post(d: Dialog, sender: str, rcpt: str, tag: str) -> tuple[Reply, Reply | None]:
    """MAIL, RCPT and (when RCPT was accepted) the message: the RCPT reply and the final one."""
    assert d.cmd(f"MAIL FROM:<{sender}>").code == 250
    rcpt_reply = d.cmd(f"RCPT TO:<{rcpt}>")
    if rcpt_reply.code != 250:
        d.cmd("RSET")
        return rcpt_reply, None
    return rcpt_reply, d.data(make_message(sender, rcpt, tag))


def test_members_list_refuses_an_outsider_and_takes_a_member(office: MailguardServer) -> None:
    """staff@ (members): an outsider's sender gets 550 5.7.1 at RCPT, nothing is stored; a member
    writing from outside (the envelope sender in another case) gets 250 and both members a copy."""
    tag = marker()
    with dialog(office) as d:
        refused, _ = post(d, OUTSIDE_SENDER, STAFF, tag)
        assert refused.last == f"550 5.7.1 <{STAFF}>: only members may post to this list"
        accepted, final = post(d, f"Bob@{DOMAIN}", STAFF, tag)
        assert accepted.last == "250 2.1.5 Recipient ok"
        assert final is not None and final.code == 250, final
    for mailbox in (ALICE, BOB):
        assert len(office.messages_containing(mailbox, tag.encode())) == 1, mailbox
    logged = office.wait_for_log(rf"mailguard smtp decision: .*from=<{OUTSIDE_SENDER}> rcpt=<{STAFF}> "
                                 r"rule=list_senders")
    assert 'reply="550 5.7.1' in logged, logged


def test_authenticated_list_takes_mail_only_after_auth(office: MailguardServer) -> None:
    """board@ (authenticated): without AUTH 550 5.7.1; after STARTTLS and AUTH, 250 and delivered."""
    tag = marker()
    with dialog(office) as d:
        refused, _ = post(d, ALICE, BOARD, tag)
        assert refused.last == f"550 5.7.1 <{BOARD}>: only authenticated senders may post to this list"
    with logged_in(office, BOB) as d:
        accepted, final = post(d, BOB, BOARD, tag)
        assert accepted.last == "250 2.1.5 Recipient ok"
        assert final is not None and final.code == 250, final
    assert len(office.messages_containing(ALICE, tag.encode())) == 1


def test_explain_shows_the_policy_and_the_decision(office: MailguardServer) -> None:
    """``mailguard explain`` gives each list's reply, its sender policy and what decided it."""
    def explain(*args: str) -> str:
        return office.cli_ok("explain", "--client", OUTSIDER, *args).stdout

    assert explain("--from", OUTSIDE_SENDER, STAFF, f"team@{DOMAIN}") == (
        f"{STAFF}: 550 5.7.1 <{STAFF}>: only members may post to this list (rule: list_senders) "
        f"[list senders: members; <{OUTSIDE_SENDER}> is not a member]\n"
        f"team@{DOMAIN}: 250 2.1.5 Recipient ok (rule: inbound) [list senders: anyone]\n")
    assert explain("--from", BOB, STAFF) == (
        f"{STAFF}: 250 2.1.5 Recipient ok (rule: inbound) [list senders: members; <{BOB}> is a member]\n")
    assert explain("--from", BOB, BOARD) == (
        f"{BOARD}: 550 5.7.1 <{BOARD}>: only authenticated senders may post to this list (rule: list_senders) "
        f"[list senders: authenticated; not authenticated]\n")
    assert explain("--auth", BOB, "--from", BOB, BOARD) == (
        f"{BOARD}: 250 2.1.5 Recipient ok (rule: inbound) [list senders: authenticated; authenticated as {BOB}]\n")


def test_list_show_names_the_policy(office: MailguardServer) -> None:
    """``list show`` prints the policy first, then the members."""
    assert office.cli_ok("list", "show", STAFF).stdout == f"senders: members\n{ALICE}\n{BOB}\n"
