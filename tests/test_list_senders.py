"""Who may send to a list (``mailguard list senders LIST anyone|authenticated|members``):
the pure decision at RCPT, the SQLite store behind it, and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailguard import config
from mailguard.app import cli
from mailguard.core import policy, replies
from mailguard.core.entries import Expansion
from mailguard.directory.sqlite import EntryError, SQLiteStore

from conftest import FakeDirectory
from conftest import office_config as office

OUTSIDER = "203.0.113.9"
ALLOWED = "192.168.10.5"
INTERNAL_IFACE = "10.9.9.9"
ONLY_MEMBERS = "550 5.7.1 <staff@office.example>: only members may post to this list"
ONLY_AUTHENTICATED = "550 5.7.1 <staff@office.example>: only authenticated senders may post to this list"


def directory(senders: str) -> FakeDirectory:
    """alice (alias a.smith), bob; staff@ = alice + partner@remote.example with policy ``senders``;
    the alias crew@ leads to it (the store gives an alias the policy of its list)."""
    d = FakeDirectory()
    d.add_mailbox("alice@office.example", "a.smith@office.example")
    d.add_mailbox("bob@office.example")
    members = frozenset({"alice@office.example", "partner@remote.example"}) if senders == "members" else frozenset()
    staff = Expansion(mailboxes=("alice@office.example",), others=("partner@remote.example",),
                      senders=senders, members=members)
    d.entries["staff@office.example"] = staff
    d.entries["crew@office.example"] = staff
    d.entries["postmaster@office.example"] = staff
    return d


def decide(senders: str, sender: str, rcpt: str = "<staff@office.example>", ip: str = OUTSIDER,
           cfg: config.Config | None = None, **kw: Any) -> policy.Decision:
    gal = directory(senders)
    who = policy.client(ip, **kw)
    return policy.settle(lambda facts: policy.decide(cfg or office(), facts, who, rcpt, sender=sender), gal.lookup)


# -- the decision --------------------------------------------------------------------------------

@pytest.mark.parametrize("sender", ["alice@office.example", "ALICE@office.example", "Partner@Remote.Example",
                                    "a.smith@office.example"],
                         ids=["member", "member-other-case", "remote-member", "alias-of-a-member"])
def test_members_list_takes_a_members_mail(sender: str) -> None:
    """A ``members`` list takes mail whose envelope sender is a member, whatever the case of the
    local part, or an alias of a member's mailbox; from any client."""
    d = decide("members", sender)
    assert str(d.reply) == "250 2.1.5 Recipient ok" and d.rule == "inbound"
    assert d.mailboxes == ("alice@office.example",) and d.remote == ("partner@remote.example",)


@pytest.mark.parametrize("sender", ["eve@outside.example", "bob@office.example", "", "alice@office.example.evil"],
                         ids=["outsider", "local-non-member", "null-sender", "lookalike-domain"])
def test_members_list_refuses_anyone_else(sender: str) -> None:
    """Anyone else gets 550 5.7.1 at RCPT naming the list (rule list_senders), even when the
    client authenticated: the policy is about the sender, and nothing is delivered."""
    for kw in ({}, {"authenticated": "bob@office.example"}):
        d = decide("members", sender, **kw)
        assert str(d.reply) == ONLY_MEMBERS, d
        assert d.rule == "list_senders" and d.mailboxes == () and d.remote == ()


def test_members_list_reached_through_an_alias_keeps_its_policy() -> None:
    """An alias of the list is judged by the list's policy."""
    assert str(decide("members", "eve@outside.example", "<crew@office.example>").reply) == \
        "550 5.7.1 <crew@office.example>: only members may post to this list"


def test_authenticated_list_refuses_an_anonymous_outsider() -> None:
    """An ``authenticated`` list refuses a client that neither did AUTH nor may relay."""
    d = decide("authenticated", "alice@office.example")
    assert str(d.reply) == ONLY_AUTHENTICATED and d.rule == "list_senders"
    assert d.list_senders == "authenticated; not authenticated"


@pytest.mark.parametrize("ip, kw, why", [
    (OUTSIDER, {"authenticated": "bob@office.example"}, "authenticated as bob@office.example"),
    (ALLOWED, {}, "trusted client (allow)"),
    (OUTSIDER, {"local_ip": INTERNAL_IFACE}, "trusted client (internal_address)"),
    (OUTSIDER, {"pop_before_smtp": True}, "trusted client (pop_before_smtp)"),
], ids=["smtp-auth", "allow", "internal_address", "pop_before_smtp"])
def test_authenticated_list_takes_authenticated_and_trusted_clients(ip: str, kw: dict[str, Any], why: str) -> None:
    """SMTP AUTH, or a client that may relay (the office's own hosts), may send to it."""
    d = decide("authenticated", "eve@outside.example", ip=ip, **kw)
    assert str(d.reply) == "250 2.1.5 Recipient ok" and d.rule == "inbound"
    assert d.list_senders == f"authenticated; {why}"


def test_anyone_list_takes_everybody() -> None:
    """``anyone`` (the default) takes the null sender from an outsider."""
    d = decide("anyone", "")
    assert str(d.reply) == "250 2.1.5 Recipient ok" and d.list_senders == "anyone"


def test_postmaster_is_never_closed() -> None:
    """postmaster@ takes mail from anyone even when it is a restricted list (RFC 5321 section 4.5.1)."""
    assert decide("members", "", "<postmaster@office.example>").accepted


def test_soft_bounce_softens_the_refusal() -> None:
    """With soft_bounce the refusal is its 4xx twin, like every policy refusal."""
    d = decide("members", "eve@outside.example", cfg=office(replies={"soft_bounce": True}))
    assert str(d.reply) == "450 4.7.1 <staff@office.example>: only members may post to this list"


def test_explain_line_shows_the_policy_and_why() -> None:
    """explain's line for a list ends with its sender policy and what it made of this sender."""
    assert policy.explain_line(decide("members", "eve@outside.example"), "staff@office.example") == (
        f"staff@office.example: {ONLY_MEMBERS} (rule: list_senders) "
        "[list senders: members; <eve@outside.example> is not a member]")
    assert policy.explain_line(decide("members", "a.smith@office.example"), "staff@office.example") == (
        "staff@office.example: 250 2.1.5 Recipient ok (rule: inbound) "
        "[list senders: members; <a.smith@office.example> is a member]")
    assert policy.explain_line(decide("anyone", ""), "staff@office.example") == (
        "staff@office.example: 250 2.1.5 Recipient ok (rule: inbound) [list senders: anyone]")
    bob = decide("anyone", "", "<bob@office.example>")
    assert policy.explain_line(bob, "bob@office.example") == "bob@office.example: 250 2.1.5 Recipient ok (rule: inbound)"


def test_the_reply_catalogue_entry() -> None:
    """The refusal is a permanent 5.7.1 (delivery not authorized) naming the list."""
    assert policy.list_refusal("x@y.example", "authenticated") == replies.Reply(
        550, "5.7.1", "<x@y.example>: only authenticated senders may post to this list")


# -- the store -----------------------------------------------------------------------------------

@pytest.fixture
def gal(tmp_path: Path) -> SQLiteStore:
    store = SQLiteStore(tmp_path / "directory.sqlite")
    store.add_mailbox("alice@office.example", "pw")
    store.add_alias("a.smith@office.example", "alice@office.example")
    store.add_contact("vendor@office.example", "sales@vendor.example")
    store.add_list_members("inner@office.example", ["friend@remote.example"])
    store.add_list_members("staff@office.example", ["a.smith@office.example", "vendor@office.example",
                                                    "inner@office.example", "partner@remote.example"])
    store.add_alias("crew@office.example", "staff@office.example")
    return store


def test_a_new_list_takes_mail_from_anyone(gal: SQLiteStore) -> None:
    """Until its policy is set a list is ``anyone``, as every list was before policies."""
    assert gal.list_senders("staff@office.example") == "anyone"
    exp = gal.expand("staff@office.example")
    assert exp is not None and exp.senders == "anyone" and exp.members == frozenset()
    alice = gal.expand("alice@office.example")
    assert alice is not None and alice.senders is None


def test_members_are_every_address_reached(gal: SQLiteStore) -> None:
    """``members``: the direct members and every address reached through them (alias, mailbox,
    contact and its target, nested list and its members), not the list itself; an alias of the
    list carries the same policy and members."""
    gal.set_list_senders("Staff@Office.Example", "members")
    exp = gal.expand("staff@office.example")
    assert exp is not None and exp.senders == "members"
    assert exp.members == {"a.smith@office.example", "alice@office.example", "vendor@office.example",
                           "sales@vendor.example", "inner@office.example", "friend@remote.example",
                           "partner@remote.example"}
    assert gal.expand("crew@office.example") == exp
    inner = gal.expand("inner@office.example")
    assert inner is not None and inner.senders == "anyone"


def test_set_list_senders_refuses_bad_values_and_non_lists(gal: SQLiteStore) -> None:
    """A value outside the three, or an address that is no list: EntryError saying so."""
    with pytest.raises(EntryError, match="senders must be one of anyone, authenticated, members, not 'everyone'"):
        gal.set_list_senders("staff@office.example", "everyone")
    with pytest.raises(EntryError, match="no list alice@office.example"):
        gal.set_list_senders("alice@office.example", "members")


def test_a_deleted_list_forgets_its_policy(gal: SQLiteStore) -> None:
    """A list deleted (whole, or its last member removed) and made again starts at ``anyone``."""
    gal.set_list_senders("staff@office.example", "authenticated")
    gal.delete_list("staff@office.example")
    gal.add_list_members("staff@office.example", ["alice@office.example"])
    assert gal.list_senders("staff@office.example") == "anyone"
    gal.set_list_senders("inner@office.example", "members")
    gal.delete_list("inner@office.example", ["friend@remote.example"])
    gal.add_list_members("inner@office.example", ["alice@office.example"])
    assert gal.list_senders("inner@office.example") == "anyone"


def test_the_store_decides_with_the_policy(gal: SQLiteStore) -> None:
    """The SQLite facts and the pure decision together: a contact's target is a member."""
    gal.set_list_senders("staff@office.example", "members")
    who = policy.client(OUTSIDER)
    for sender, reply in (("sales@vendor.example", "250 2.1.5 Recipient ok"),
                          ("a.smith@office.example", "250 2.1.5 Recipient ok"),
                          ("eve@outside.example", ONLY_MEMBERS)):
        d = policy.settle(lambda facts: policy.decide(office(), facts, who, "<staff@office.example>",
                                                      sender=sender), gal.expand)
        assert str(d.reply) == reply, sender


# -- the CLI -------------------------------------------------------------------------------------

@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "mailguard.toml"
    path.write_text('[server]\nhostname = "mx.office.example"\ndata_dir = "data"\n'
                    '[domains."office.example"]\nroute = "inbound"\n')
    return path


def run(conf: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--config", str(conf), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sets_shows_and_refuses(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``list senders LIST POLICY`` sets it, ``list senders LIST`` and ``list show LIST`` print it;
    a bad value or an unknown list is one line on stderr and exit 1."""
    assert run(conf, capsys, "list", "add", "staff@office.example", "alice@office.example") == \
        (0, "list staff@office.example: 1 member(s) added\n",
         "mailguard: warning: list staff@office.example: member alice@office.example points at nothing: "
         "no mailbox, alias, list or contact alice@office.example\n")
    assert run(conf, capsys, "list", "senders", "staff@office.example") == \
        (0, "list staff@office.example: senders anyone\n", "")
    assert run(conf, capsys, "list", "senders", "Staff@office.example", "Members") == \
        (0, "list staff@office.example: senders members\n", "")
    assert run(conf, capsys, "list", "show", "staff@office.example") == \
        (0, "senders: members\nalice@office.example\n", "")
    assert run(conf, capsys, "list", "senders", "staff@office.example", "everyone") == \
        (1, "", "mailguard: list staff@office.example: senders must be one of anyone, authenticated, members, "
                "not 'everyone'\n")
    assert run(conf, capsys, "list", "senders", "nobody@office.example", "members") == \
        (1, "", "mailguard: no list nobody@office.example\n")
    assert run(conf, capsys, "list", "senders", "nobody@office.example") == \
        (1, "", "mailguard: no list nobody@office.example\n")
    assert run(conf, capsys, "list", "senders", "staff@office.example", "members", "anyone") == \
        (1, "", "mailguard: list senders needs LIST and one of anyone, authenticated, members\n")


def test_cli_warns_when_an_open_list_gets_a_remote_member(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Adding a remote member to an ``anyone`` list says it forwards outsiders' mail and how to close it;
    not once the list is closed."""
    code, out, _ = run(conf, capsys, "list", "add", "staff@office.example", "partner@remote.example")
    assert code == 0 and out == (
        "list staff@office.example: 1 member(s) added\n"
        "list staff@office.example: takes mail from anyone and forwards it to remote members; "
        "'mailguard list senders staff@office.example authenticated' limits who may send\n")
    run(conf, capsys, "list", "senders", "staff@office.example", "authenticated")
    assert run(conf, capsys, "list", "add", "staff@office.example", "friend@remote.example") == \
        (0, "list staff@office.example: 1 member(s) added\n", "")
