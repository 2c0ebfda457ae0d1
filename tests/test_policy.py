"""Tests for mailguard.core.policy: the ordered first-match recipient rules and their replies."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from mailguard import config
from mailguard.core import policy, replies
from mailguard.core.entries import Expansion
from mailguard.core.srs import SRS
from mailguard.directory.base import DirectoryError

from conftest import FakeDirectory, make_config
from conftest import office_config as office

OUTSIDER = "203.0.113.9"
ALLOWED = "192.168.10.5"
ALLOWED_HOST = "10.1.2.3"
NEVER = "192.168.10.66"
INTERNAL_IFACE = "10.9.9.9"


@pytest.fixture
def gal() -> FakeDirectory:
    """alice (with an alias), joe at compaq, a list with local, remote, stale and rerouted members, a contact."""
    d = FakeDirectory()
    d.add_mailbox("alice@office.example", "a.smith@office.example")
    d.add_mailbox("bob@office.example")
    d.add_mailbox("joe@compaq.example")
    d.entries["staff@office.example"] = Expansion(
        mailboxes=("alice@office.example", "bob@office.example"),
        others=("partner@remote.example", "gone@office.example", "joe@dec.example", "bob@office.example"))
    d.entries["vendor@office.example"] = Expansion(others=("sales@vendor.example",))
    d.entries["boss@office.example"] = Expansion(mailboxes=("admin@office.example",))
    return d


def decide(cfg: config.Config, gal: FakeDirectory, rcpt: str, ip: str = OUTSIDER, **kw: Any) -> policy.Decision:
    """The decision once every fact it asks for is looked up (a DirectoryError: directory_failure)."""
    who = policy.client(ip, **kw)
    try:
        return policy.settle(lambda facts: policy.decide(cfg, facts, who, rcpt), gal.lookup)
    except DirectoryError:
        return policy.directory_failure(cfg, rcpt)


# -- the rule table ---------------------------------------------------------------------------

R = office().replies        # the office configuration's [replies]

TABLE = [
    # (recipient, client ip, client extras, reply, rule)
    ("<alice@office.example>", OUTSIDER, {}, replies.RECIPIENT_OK, "inbound"),
    ("<Alice@OFFICE.Example.>", OUTSIDER, {}, replies.RECIPIENT_OK, "inbound"),
    ("<a.smith@office.example>", OUTSIDER, {}, replies.RECIPIENT_OK, "inbound"),
    ("<alice@office.example>", NEVER, {}, replies.RECIPIENT_OK, "inbound"),
    ("<nobody@office.example>", OUTSIDER, {}, R.unknown_recipient, "unknown_recipient"),
    ("<nobody@office.example>", ALLOWED, {"authenticated": "alice@office.example"}, R.unknown_recipient, "unknown_recipient"),
    ("<postmaster@office.example>", OUTSIDER, {}, replies.RECIPIENT_OK, "inbound"),
    ("<postmaster@compaq.example>", NEVER, {}, replies.RECIPIENT_OK, "inbound"),
    ("<postmaster>", OUTSIDER, {}, replies.RECIPIENT_OK, "inbound"),
    ("<joe@dec.example>", OUTSIDER, {}, replies.RECIPIENT_OK, "reroute"),
    ("<nobody@dec.example>", OUTSIDER, {}, R.unknown_recipient, "unknown_recipient"),
    ("<anyone@oldname.example>", OUTSIDER, {}, replies.RECIPIENT_OK, "reroute"),
    ("<anyone@partner.example>", OUTSIDER, {}, replies.RECIPIENT_OK, "relay_domain"),
    ("<anyone@partner.example>", NEVER, {}, R.never_host, "never"),
    ("<someone@remote.example>", OUTSIDER, {}, R.relay_denied, "relay_denied"),
    ("<someone@remote.example>", ALLOWED, {}, replies.RECIPIENT_OK, "allow"),
    ("<someone@remote.example>", ALLOWED_HOST, {}, replies.RECIPIENT_OK, "allow"),
    ("<someone@remote.example>", "2001:db8::25", {}, replies.RECIPIENT_OK, "allow"),
    ("<someone@remote.example>", "::ffff:192.168.10.5", {}, replies.RECIPIENT_OK, "allow"),
    ("<someone@remote.example>", "10.1.2.4", {}, R.relay_denied, "relay_denied"),
    ("<someone@remote.example>", OUTSIDER, {"authenticated": "alice@office.example"}, replies.RECIPIENT_OK, "authenticated"),
    ("<someone@remote.example>", OUTSIDER, {"local_ip": INTERNAL_IFACE}, replies.RECIPIENT_OK, "internal_address"),
    ("<someone@remote.example>", OUTSIDER, {"local_ip": "10.9.9.8"}, R.relay_denied, "relay_denied"),
    ("<someone@remote.example>", OUTSIDER, {"pop_before_smtp": True}, replies.RECIPIENT_OK, "pop_before_smtp"),
    # The never list beats every permission.
    ("<someone@remote.example>", NEVER, {}, R.never_host, "never"),
    ("<someone@remote.example>", NEVER, {"authenticated": "alice@office.example"}, R.never_host, "never"),
    ("<someone@remote.example>", NEVER, {"local_ip": INTERNAL_IFACE}, R.never_host, "never"),
    ("<someone@remote.example>", NEVER, {"pop_before_smtp": True}, R.never_host, "never"),
    ("<someone@remote.example>", "::ffff:192.168.10.66", {}, R.never_host, "never"),
    # Literals and source routes are remote, judged by the final address.
    ("<someone@[192.0.2.1]>", OUTSIDER, {}, R.relay_denied, "relay_denied"),
    ("<someone@[IPv6:2001:db8::1]>", ALLOWED, {}, replies.RECIPIENT_OK, "allow"),
    ("<@office.example:victim@remote.example>", OUTSIDER, {}, R.relay_denied, "relay_denied"),
    ("<@remote.example:alice@office.example>", OUTSIDER, {}, replies.RECIPIENT_OK, "inbound"),
    # Tricks are refused whoever asks; syntax errors are 501.
    ("<victim%remote.example@office.example>", ALLOWED, {}, replies.RELAY_TRICK, "relay_trick"),
    ('<"victim@remote.example"@office.example>', OUTSIDER, {}, replies.RELAY_TRICK, "relay_trick"),
    ("<remote.example!victim@office.example>", OUTSIDER, {"authenticated": "alice@office.example"}, replies.RELAY_TRICK, "relay_trick"),
    ("<IMCEASMTP-victim+40remote+2Eexample@office.example>", OUTSIDER, {}, replies.RELAY_TRICK, "relay_trick"),
    ("<victim@remote.example@office.example>", OUTSIDER, {}, replies.RELAY_TRICK, "relay_trick"),
    ("<nobody>", OUTSIDER, {}, replies.BAD_RCPT_SYNTAX, "syntax"),
    ("<a b@office.example>", OUTSIDER, {}, replies.BAD_RCPT_SYNTAX, "syntax"),
]


@pytest.mark.parametrize("rcpt, ip, extra, reply, rule", TABLE,
                         ids=[f"{i}-{r[4]}" for i, r in enumerate(TABLE)])
def test_rule_table(office_cfg: config.Config, gal: FakeDirectory, rcpt: str, ip: str, extra: dict[str, Any],
                    reply: replies.Reply, rule: str) -> None:
    """Each recipient/client pair gets the reply and names the rule of the first-match order (the rule table in README.rst)."""
    d = decide(office_cfg, gal, rcpt, ip, **extra)
    assert (d.reply, d.rule) == (reply, rule)
    assert d.accepted == (reply.code < 400)
    if not d.accepted:
        assert d.mailboxes == () and d.remote == ()


def test_authenticated_rule_can_be_turned_off(gal: FakeDirectory) -> None:
    """With relay.authenticated = false, SMTP AUTH alone gives no relay permission."""
    cfg = office(relay={"authenticated": False})
    d = decide(cfg, gal, "<someone@remote.example>", authenticated="alice@office.example")
    assert (d.rule, d.reply.code) == ("relay_denied", 550)


def test_pop_before_smtp_off_gives_nothing(gal: FakeDirectory) -> None:
    """With pop_before_smtp = 0 a recent POP3 login does not allow relaying."""
    cfg = office(relay={"pop_before_smtp": 0})
    assert decide(cfg, gal, "<someone@remote.example>", pop_before_smtp=True).rule == "relay_denied"


def test_rule_order_for_a_client_with_several_permissions(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """First match wins: authenticated before allow before internal_address before pop_before_smtp."""
    full = dict(local_ip=INTERNAL_IFACE, pop_before_smtp=True)
    assert decide(office_cfg, gal, "<x@remote.example>", ALLOWED, authenticated="a@b.example", **full).rule \
        == "authenticated"
    assert decide(office_cfg, gal, "<x@remote.example>", ALLOWED, **full).rule == "allow"
    assert decide(office_cfg, gal, "<x@remote.example>", OUTSIDER, **full).rule == "internal_address"


# -- where accepted mail goes -------------------------------------------------------------------


def test_inbound_destinations(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """An alias lands in its mailbox; the decision carries the mailbox, not the alias."""
    d = decide(office_cfg, gal, "<A.Smith@office.example>")
    assert d.mailboxes == ("alice@office.example",) and d.remote == ()
    assert d.recipient == "a.smith@office.example"


def test_list_expansion_routes_members(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """A list's members: mailboxes once each, remote ones queued, rerouted ones followed, stale ones dropped."""
    d = decide(office_cfg, gal, "<staff@office.example>")
    assert d.accepted and d.rule == "inbound"
    assert sorted(d.mailboxes) == ["alice@office.example", "bob@office.example", "joe@compaq.example"]
    assert d.remote == ("partner@remote.example",)


def test_contact_is_queued_for_anyone(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """A contact forwards to its remote address whoever the client is: the administrator made it."""
    d = decide(office_cfg, gal, "<vendor@office.example>", OUTSIDER)
    assert d.accepted and d.remote == ("sales@vendor.example",) and d.mailboxes == ()


def test_reroute_to_inbound_lands_in_the_rewritten_mailbox(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """dec.example -> compaq.example: joe@dec.example is stored for joe@compaq.example."""
    d = decide(office_cfg, gal, "<Joe@DEC.example>")
    assert (d.rule, d.recipient, d.mailboxes) == ("reroute", "joe@compaq.example", ("joe@compaq.example",))


def test_reroute_to_remote_is_queued_rewritten(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """oldname.example -> faraway.example (not local): queued for the new address, from any client."""
    d = decide(office_cfg, gal, "<anyone@oldname.example>", OUTSIDER)
    assert (d.rule, d.remote, d.mailboxes) == ("reroute", ("anyone@faraway.example",), ())


def test_reroute_chain(gal: FakeDirectory) -> None:
    """A chain of reroutes ends in the last domain's route."""
    cfg = office(domains={"a.example": {"route": "reroute", "to": "dec.example"}})
    d = decide(cfg, gal, "<joe@a.example>")
    assert (d.rule, d.mailboxes) == ("reroute", ("joe@compaq.example",))


def test_postmaster_resolves_to_the_configured_mailbox(gal: FakeDirectory) -> None:
    """With server.postmaster set, postmaster@ of every inbound domain goes to that mailbox."""
    cfg = office(server={"postmaster": "boss@office.example"})
    for rcpt in ("<postmaster@compaq.example>", "<POSTMASTER@office.example>", "<postmaster>"):
        d = decide(cfg, gal, rcpt, NEVER)
        assert d.accepted and d.mailboxes == ("admin@office.example",), rcpt


def test_postmaster_implied_mailbox(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """With no postmaster configured, postmaster@<domain> is an implied mailbox of that domain."""
    d = decide(office_cfg, gal, "<postmaster@compaq.example>")
    assert d.mailboxes == ("postmaster@compaq.example",)
    assert decide(office_cfg, gal, "<postmaster>").mailboxes == ("postmaster@compaq.example",)


def test_bare_postmaster_without_inbound_domain(gal: FakeDirectory) -> None:
    """With no inbound domain at all, bare postmaster is unknown (nothing to deliver to)."""
    cfg = make_config(domains={"partner.example": {"route": "relay"}})
    d = decide(cfg, gal, "<postmaster>")
    assert (d.reply.code, d.rule) == (550, "unknown_recipient")


def test_recipient_that_delivers_nowhere_is_not_accepted(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """An entry whose expansion reaches no mailbox and no remote address (an alias loop, a dangling
    alias, a list of stale members) is refused at RCPT: a 250 would silently lose the mail."""
    gal.entries["loop@office.example"] = Expansion()
    gal.entries["dangling@office.example"] = Expansion(others=("deleted@office.example",))
    for rcpt in ("<loop@office.example>", "<dangling@office.example>"):
        d = decide(office_cfg, gal, rcpt)
        assert not d.accepted, rcpt
        assert d.reply.code == 550 and d.rule == "unknown_recipient"


def chain_config(hops: int, last: str = "office.example") -> config.Config:
    """d0.example -> d1.example -> ... -> d<hops-1>.example -> ``last``: a reroute chain of ``hops`` hops."""
    domains = {f"d{i}.example": {"route": "reroute", "to": f"d{i + 1}.example"} for i in range(hops - 1)}
    domains[f"d{hops - 1}.example"] = {"route": "reroute", "to": last}
    return office(domains=domains)


def test_long_reroute_chain_to_inbound_is_followed_to_its_end(gal: FakeDirectory) -> None:
    """Ten reroute hops ending in an inbound domain: the directory decides, from any client.
    A chain cut short would leave joe@d<k> routed as remote mail, queued for anyone (an open relay)."""
    cfg = chain_config(10)
    d = decide(cfg, gal, "<alice@d0.example>", OUTSIDER)
    assert (d.rule, d.recipient, d.mailboxes, d.remote) == \
        ("reroute", "alice@office.example", ("alice@office.example",), ())
    d = decide(cfg, gal, "<nobody@d0.example>", OUTSIDER)
    assert (d.reply, d.rule, d.remote) == (cfg.replies.unknown_recipient, "unknown_recipient", ())


def test_long_reroute_chain_in_a_list_member_is_followed(gal: FakeDirectory) -> None:
    """A list member behind ten reroute hops lands in its mailbox, not in the outbound queue."""
    cfg = chain_config(12)
    gal.entries["crew@office.example"] = Expansion(others=("alice@d0.example", "ghost@d3.example"))
    d = decide(cfg, gal, "<crew@office.example>", OUTSIDER)
    assert (d.mailboxes, d.remote) == (("alice@office.example",), ())


def test_a_reroute_loop_is_refused_at_load() -> None:
    """A loop of reroutes is a configuration error naming the key, never a routing hang."""
    with pytest.raises(config.ConfigError) as e:
        office(domains={"x.example": {"route": "reroute", "to": "y.example"},
                        "y.example": {"route": "reroute", "to": "x.example"}})
    assert str(e.value).endswith(': domains."x.example".to: reroute loop')


# -- facts: the policy asks, the adapter fetches ---------------------------------------------------


def test_decide_names_the_fact_it_needs(office_cfg: config.Config) -> None:
    """Without the directory's answer an inbound recipient is Missing(key); with it, decided.
    A remote recipient needs no fact at all."""
    who = policy.client(OUTSIDER)
    assert policy.decide(office_cfg, {}, who, "<Alice@Office.example>") == policy.Missing("alice@office.example")
    facts = {"alice@office.example": Expansion(mailboxes=("alice@office.example",))}
    d = policy.decide(office_cfg, facts, who, "<Alice@Office.example>")
    assert isinstance(d, policy.Decision) and d.mailboxes == ("alice@office.example",)
    d = policy.decide(office_cfg, {}, who, "<x@remote.example>")
    assert isinstance(d, policy.Decision) and d.reply == office_cfg.replies.relay_denied


def test_resolve_targets_asks_for_each_inbound_member(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """resolve_targets asks for inbound addresses one by one; remote ones need nothing."""
    found = Expansion(others=("joe@dec.example", "x@remote.example"))
    assert policy.resolve_targets(office_cfg, {}, found) == policy.Missing("joe@compaq.example")
    assert policy.settle(lambda facts: policy.resolve_targets(office_cfg, facts, found), gal.lookup) == \
        (("joe@compaq.example",), ("x@remote.example",))


def test_directory_failure_names_the_recipient(office_cfg: config.Config) -> None:
    """The directory_failure decision carries the routed recipient key and the configured 4xx."""
    d = policy.directory_failure(office_cfg, "<Alice@Office.example>")
    assert (d.reply, d.rule, d.recipient, d.accepted) == \
        (office_cfg.replies.directory_failure, "directory_failure", "alice@office.example", False)


# -- replies: configured, soft_bounce, directory failure ---------------------------------------------


def test_configured_replies_are_used(gal: FakeDirectory) -> None:
    """Each rule's reply comes from [replies] (RFC 2505: configurable per rule)."""
    cfg = office(replies={"relay_denied": "554 5.7.1 No relaying here", "unknown_recipient": "550 5.1.1 Who?",
                          "never_host": "554 5.7.1 Go away"})
    assert str(cfg.replies.relay_denied) == "554 5.7.1 No relaying here"
    assert decide(cfg, gal, "<x@remote.example>").reply == cfg.replies.relay_denied
    assert decide(cfg, gal, "<who@office.example>").reply == cfg.replies.unknown_recipient
    assert decide(cfg, gal, "<x@remote.example>", NEVER).reply == cfg.replies.never_host


def test_a_4xx_relay_denied_is_sent_as_configured(gal: FakeDirectory) -> None:
    """A 451 configured for relay_denied is what the client sees."""
    cfg = office(replies={"relay_denied": "451 4.7.1 Not now"})
    d = decide(cfg, gal, "<x@remote.example>")
    assert (d.reply, d.rule, d.accepted) == (cfg.replies.relay_denied, "relay_denied", False)


@pytest.mark.parametrize("rcpt, ip, expected, rule", [
    ("<x@remote.example>", OUTSIDER, R.relay_denied.soften(), "relay_denied"),
    ("<nobody@office.example>", OUTSIDER, R.unknown_recipient.soften(), "unknown_recipient"),
    ("<x@remote.example>", NEVER, R.never_host.soften(), "never"),
    ("<x@partner.example>", NEVER, R.never_host.soften(), "never"),
    ("<x%remote.example@office.example>", OUTSIDER, replies.RELAY_TRICK.soften(), "relay_trick"),
    ("<alice@office.example>", OUTSIDER, replies.RECIPIENT_OK, "inbound"),
    ("<x@remote.example>", ALLOWED, replies.RECIPIENT_OK, "allow"),
])
def test_soft_bounce_turns_5xx_policy_replies_into_4xx(gal: FakeDirectory, rcpt: str, ip: str,
                                                       expected: replies.Reply, rule: str) -> None:
    """soft_bounce: every 5xx policy reply goes out as its 4xx twin (4.x.x); acceptances unchanged."""
    d = decide(office(replies={"soft_bounce": True}), gal, rcpt, ip)
    assert (d.reply, d.rule) == (expected, rule)
    assert d.reply.code < 500


def test_the_4xx_twin_keeps_the_text() -> None:
    """The softened reply is 450 with the enhanced code's class made 4, same text."""
    assert str(R.relay_denied.soften()) == "450 4.7.1 Relaying prohibited"


def test_soft_bounce_leaves_syntax_errors_alone(gal: FakeDirectory) -> None:
    """A syntax error is no policy decision: still 501 under soft_bounce."""
    assert decide(office(replies={"soft_bounce": True}), gal, "<nobody>").reply.code == 501


def test_directory_failure_gives_the_configured_4xx(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """A directory that cannot answer gives directory_failure (451 4.3.0 by default), never a 5xx."""
    gal.broken = True
    d = decide(office_cfg, gal, "<alice@office.example>")
    assert (d.reply, d.rule) == (R.directory_failure, "directory_failure")
    cfg = office(replies={"directory_failure": "421 4.3.0 Directory busy", "soft_bounce": True})
    assert decide(cfg, gal, "<joe@dec.example>").reply == cfg.replies.directory_failure


def test_directory_failure_does_not_matter_for_remote(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """Remote recipients are judged without the directory."""
    gal.broken = True
    assert decide(office_cfg, gal, "<x@remote.example>", ALLOWED).rule == "allow"
    assert decide(office_cfg, gal, "<x@remote.example>").rule == "relay_denied"


def test_explain_line(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """explain prints "<rcpt>: <reply> (rule: <rule>)"; verbose adds where an accepted one goes."""
    d = decide(office_cfg, gal, "<x@remote.example>")
    assert policy.explain_line(d, "x@remote.example") == \
        "x@remote.example: 550 5.7.1 Relaying prohibited (rule: relay_denied)"
    d = decide(office_cfg, gal, "<staff@office.example>")
    assert policy.explain_line(d, "staff@office.example") == \
        "staff@office.example: 250 2.1.5 Recipient ok (rule: inbound)"
    line = policy.explain_line(d, "staff@office.example", verbose=True)
    assert line.startswith("staff@office.example: 250 2.1.5 Recipient ok (rule: inbound) -> ")
    assert "mailbox alice@office.example" in line and "queue partner@remote.example" in line


# -- the anti-relay invariant (hypothesis) ----------------------------------------------------------

POOL = ["a.example", "b.example", "c.example", "d.example", "e.example"]
REMOTE = ["remote.example", "x.test", "[192.0.2.7]", "[IPv6:2001:db8::7]"]


def ipv4s() -> st.SearchStrategy[str]:
    return st.builds(lambda b, c: f"10.0.{b}.{c}", st.integers(0, 3), st.integers(0, 255))


networks = st.builds(lambda ip, prefix: str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False)),
                     ipv4s(), st.integers(16, 32))


@st.composite
def random_configs(draw: st.DrawFn) -> config.Config:
    domains: dict[str, dict[str, str]] = {}
    for name in draw(st.lists(st.sampled_from(POOL), unique=True, max_size=5)):
        route = draw(st.sampled_from(["inbound", "relay", "reroute"]))
        domains[name] = {"route": route}
        if route == "reroute":
            domains[name]["to"] = draw(st.sampled_from([d for d in POOL + REMOTE[:2] if d != name]))
    data = {
        "domains": domains,
        "relay": {
            "authenticated": draw(st.booleans()),
            "allow": draw(st.lists(networks, max_size=3)),
            "never": draw(st.lists(networks, max_size=3)),
            "internal_addresses": draw(st.lists(ipv4s(), max_size=2)),
            "pop_before_smtp": draw(st.sampled_from([0, 60])),
        },
        "replies": {"soft_bounce": draw(st.booleans())},
    }
    try:
        return make_config(**data)
    except config.ConfigError:
        reject()


@st.composite
def recipients(draw: st.DrawFn) -> str:
    local = draw(st.sampled_from(["joe", "Joe", "postmaster", "a%b", "x!y", '"q@r"', "IMCEAx", "list"]))
    domain = draw(st.sampled_from(POOL + REMOTE))
    if not domain.startswith("[") and draw(st.booleans()):
        domain = domain.upper() + "."
    route = draw(st.sampled_from(["", "@relay.example:", "@a.example,@b.example:"]))
    text = f"<{route}{local}@{domain}>"
    return draw(st.sampled_from([text, text[1:-1] if not route else text, "<postmaster>"]))


@given(cfg=random_configs(), ip=ipv4s(), local_ip=ipv4s(), rcpt=recipients(),
       auth=st.sampled_from([None, "joe@a.example"]), pop=st.booleans(),
       known=st.sets(st.sampled_from([f"{l}@{d}" for l in ("joe", "list", "postmaster") for d in POOL])))
def test_unrouted_domain_accepted_only_with_relay_permission(cfg: config.Config, ip: str, local_ip: str,
                                                             rcpt: str, auth: str | None, pop: bool,
                                                             known: set[str]) -> None:
    """Over random configs, clients and addresses: a recipient whose domain is not routed
    inbound/relay/reroute is accepted only when a relay rule allows the client and the client
    is not on the never list; and then it is accepted."""
    gal = FakeDirectory({k: Expansion(others=("someone@remote.example",)) if k.startswith("list")
                         else Expansion(mailboxes=(k,)) for k in known})
    who = policy.client(ip, local_ip, auth, pop)
    d = policy.settle(lambda facts: policy.decide(cfg, facts, who, rcpt), gal.lookup)
    from mailguard.core.address import AddressError, parse_path
    try:
        addr = parse_path(rcpt, bare_ok=frozenset({"postmaster"}))
    except AddressError as e:
        assert not d.accepted and d.rule == ("relay_trick" if e.trick else "syntax")
        return
    assert addr is not None
    client_ip = ipaddress.ip_address(ip)
    on_never = any(client_ip in ipaddress.ip_network(n) for n in map(str, cfg.relay.never))
    permitted = ((cfg.relay.authenticated and auth is not None)
                 or any(client_ip in n for n in cfg.relay.allow)
                 or ipaddress.ip_address(local_ip) in cfg.relay.internal_addresses
                 or (cfg.relay.pop_before_smtp > 0 and pop))
    routed = addr.domain == "" or (not addr.is_literal and addr.domain in cfg.domains)
    if not routed:
        assert d.accepted == (permitted and not on_never), (d, permitted, on_never)
        if not d.accepted:
            expected = cfg.replies.never_host if on_never else cfg.replies.relay_denied
            if cfg.replies.soft_bounce:
                expected = expected.soften()
            assert d.reply == expected
    if d.remote and not routed:
        assert permitted and not on_never
    if d.accepted:
        assert d.mailboxes or d.remote
    if on_never:
        assert d.rule != "relay_domain" and not (d.accepted and not routed)


# -- SRS bounces ---------------------------------------------------------------------------------

SRS_SECRET = SRS(b"office secret")
NOW = 1796100000.0


def decide_srs(cfg: config.Config, gal: FakeDirectory, rcpt: str, ip: str = OUTSIDER) -> policy.Decision:
    who = policy.client(ip)
    return policy.settle(lambda facts: policy.decide(cfg, facts, who, rcpt, srs=SRS_SECRET, now=NOW), gal.lookup)


def test_srs_bounce_goes_back_to_the_original_sender(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """A bounce to an SRS address we made is accepted from anyone and queued to the original sender."""
    address = SRS_SECRET.forward("alice@sender.example", "office.example", NOW)
    d = decide_srs(office_cfg, gal, f"<{address}>")
    assert (str(d.reply), d.rule, d.remote, d.mailboxes) == (
        "250 2.1.5 Recipient ok", "srs", ("alice@sender.example",), ())


def test_srs_bounce_to_a_local_original_is_delivered_locally(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """When the original sender is one of our mailboxes, the bounce lands in it."""
    address = SRS_SECRET.forward("alice@office.example", "office.example", NOW)
    d = decide_srs(office_cfg, gal, f"<{address}>")
    assert (d.rule, d.mailboxes) == ("inbound", ("alice@office.example",))


@pytest.mark.parametrize("forged", [
    "SRS0=AAAA=JU=victim.example=bob@office.example",
    "SRS0=broken@office.example",
])
def test_forged_srs_is_unknown(office_cfg: config.Config, gal: FakeDirectory, forged: str) -> None:
    """A forged or expired SRS address gets the unknown_recipient reply (rule srs_invalid)."""
    d = decide_srs(office_cfg, gal, f"<{forged}>")
    assert (d.reply, d.rule) == (office_cfg.replies.unknown_recipient, "srs_invalid")


def test_expired_srs_is_unknown(office_cfg: config.Config, gal: FakeDirectory) -> None:
    address = SRS_SECRET.forward("alice@sender.example", "office.example", NOW - 30 * 86400)
    assert decide_srs(office_cfg, gal, f"<{address}>").rule == "srs_invalid"


def test_srs_form_outside_our_domains_is_ordinary_relaying(office_cfg: config.Config, gal: FakeDirectory) -> None:
    """An SRS address in a remote domain is just a remote recipient: relay rules apply."""
    address = SRS_SECRET.forward("alice@sender.example", "elsewhere.example", NOW)
    assert decide_srs(office_cfg, gal, f"<{address}>").rule == "relay_denied"
