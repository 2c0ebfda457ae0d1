"""Unit tests for the inbound checks (mailguard.checks): each refusing and passing, DNS trouble, trusted clients.

DNS is a table (tests/dns_doubles.FakeDNS), time a task.Clock; nothing touches the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dns_doubles import FakeDNS
from twisted.internet import defer, task

from mailguard import config
from mailguard.checks.pipeline import InboundChecks
from mailguard.core.checks import Refusal
from mailguard.dns.resolver import MX

CLIENT = "192.0.2.10"
PTR = "10.2.0.192.in-addr.arpa"
ZONE_NAME = "10.2.0.192.bl.test"

DNS: dict[tuple[str, str], Any] = {
    (PTR, "PTR"): ("mail.client.test",),
    ("mail.client.test", "A"): (CLIENT,),
    ("real.test", "MX"): (MX(10, "mx.real.test"),),
    ("nullmx.test", "MX"): (MX(0, ""),),
    ("gone.test", "MX"): "NXDOMAIN",
    ("addressonly.test", "A"): ("192.0.2.80",),
    ("broken.test", "MX"): "SERVFAIL",
}


def result(coro: Any) -> Any:
    """The result of a coroutine that completes without the reactor."""
    out: list[Any] = []
    defer.Deferred.fromCoroutine(coro).addBoth(out.append)
    assert out, "the check did not complete"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def build(tmp_path: Path, table: dict[tuple[str, str], Any] | None = None, **sections: dict[str, Any]
          ) -> tuple[InboundChecks, FakeDNS, task.Clock]:
    cfg = config.parse({"server": {"data_dir": str(tmp_path)}, "domains": {"local.test": {"route": "inbound"}},
                        **sections}, "test", tmp_path)
    dns = FakeDNS({**DNS, **(table or {})})
    clock = task.Clock()
    clock.advance(1_000_000)
    checks = InboundChecks(cfg, dns, clock, run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    return checks, dns, clock


def at_mail(checks: InboundChecks, sender: str, client: str = CLIENT, *, trusted: bool = False,
            auth: str | None = None) -> Refusal | None:
    conn = checks.connected(client)
    return result(checks.at_mail(checks.facts(conn, trusted, auth, sender)))


def reply(refusal: Refusal | None) -> str:
    assert refusal is not None, "expected a refusal"
    return f"{refusal.reply} ({refusal.rule}; {refusal.detail})"


# -- reject_clients / reject_senders ---------------------------------------------------------

def test_reject_clients_refuses_listed_networks(tmp_path: Path) -> None:
    """A client inside a reject_clients network gets client_rejected; one outside passes."""
    checks, _, _ = build(tmp_path, checks={"reject_clients": ["192.0.2.0/28", "2001:db8::/32"]})
    assert reply(at_mail(checks, "a@real.test")) == \
        "554 5.7.1 Access denied (client_rejected; network=192.0.2.0/28)"
    assert reply(at_mail(checks, "a@real.test", "2001:db8::5")).startswith("554 5.7.1 Access denied")
    assert at_mail(checks, "a@real.test", "192.0.2.99") is None


def test_reject_clients_applies_to_trusted_clients(tmp_path: Path) -> None:
    """reject_clients is one of the two checks trusted clients do not skip."""
    checks, _, _ = build(tmp_path, checks={"reject_clients": ["192.0.2.10"]})
    assert reply(at_mail(checks, "a@real.test", trusted=True, auth="a@local.test")).startswith("554 5.7.1")


@pytest.mark.parametrize("sender,pattern", [
    ("Spammer@Bad.Test", "spammer@bad.test"),
    ("anyone@whole.test", "@whole.test"),
    ("x@deep.sub.test", "@.sub.test"),
])
def test_reject_senders_forms(tmp_path: Path, sender: str, pattern: str) -> None:
    """user@domain, @domain and @.domain match case-insensitively; sender_rejected names the pattern."""
    checks, _, _ = build(tmp_path, checks={"reject_senders": ["spammer@bad.test", "@whole.test", "@.sub.test"]})
    assert reply(at_mail(checks, sender, trusted=True)) == \
        f"550 5.7.1 Sender address rejected (sender_rejected; pattern={pattern})"


@pytest.mark.parametrize("sender", ["other@bad.test", "a@sub.test", "a@notwhole.test", "a@whole.test.example", ""])
def test_reject_senders_passes_others(tmp_path: Path, sender: str) -> None:
    """Other users of a listed address's domain, the parent of @.domain, look-alikes and <> pass."""
    checks, _, _ = build(tmp_path, checks={"reject_senders": ["spammer@bad.test", "@whole.test", "@.sub.test"]})
    assert at_mail(checks, sender) is None


def test_soft_bounce_softens_check_refusals(tmp_path: Path) -> None:
    """soft_bounce sends a check's 5xx as its 4xx twin."""
    checks, _, _ = build(tmp_path, checks={"reject_clients": ["192.0.2.0/24"]}, replies={"soft_bounce": True})
    assert str(at_mail(checks, "a@real.test").reply) == "454 4.7.1 Access denied"  # type: ignore[union-attr]


def test_configured_reply_text_is_used(tmp_path: Path) -> None:
    """Each rule's [replies] key replaces its default."""
    checks, _, _ = build(tmp_path, checks={"reject_clients": ["192.0.2.0/24"]},
                         replies={"client_rejected": "550 5.7.1 Go away"})
    assert str(at_mail(checks, "a@real.test").reply) == "550 5.7.1 Go away"  # type: ignore[union-attr]


# -- sender_domain -----------------------------------------------------------------------------

@pytest.mark.parametrize("sender,detail", [
    ("a@gone.test", "domain=gone.test NXDOMAIN"),
    ("a@nullmx.test", "domain=nullmx.test null MX"),
    ("a@nothing.test", "domain=nothing.test no MX, A or AAAA"),
])
def test_sender_domain_unknown(tmp_path: Path, sender: str, detail: str) -> None:
    """NXDOMAIN, a null MX (RFC 7505) or no MX/A/AAAA: sender_domain_unknown."""
    checks, _, _ = build(tmp_path, checks={"sender_domain": True})
    assert reply(at_mail(checks, sender)) == \
        f"550 5.1.8 Sender address rejected: domain not found (sender_domain_unknown; {detail})"


@pytest.mark.parametrize("sender", ["a@real.test", "a@addressonly.test", "", "postmaster@local.test", "a@[192.0.2.1]"])
def test_sender_domain_passes(tmp_path: Path, sender: str) -> None:
    """An MX, an A record alone, the null sender, a local domain and a literal all pass."""
    checks, dns, _ = build(tmp_path, checks={"sender_domain": True})
    assert at_mail(checks, sender) is None
    if sender in ("", "postmaster@local.test", "a@[192.0.2.1]"):
        assert not [q for q in dns.asked if q[1] in ("MX", "A", "AAAA") and "in-addr" not in q[0]
                    and q[0] != "mail.client.test"]


def test_sender_domain_dns_trouble_is_451(tmp_path: Path) -> None:
    """SERVFAIL for the sender's MX: 451 4.4.3, never 5xx and never a pass."""
    checks, _, _ = build(tmp_path, checks={"sender_domain": True})
    assert reply(at_mail(checks, "a@broken.test")) == \
        "451 4.4.3 Temporary DNS lookup failure, try again later (sender_domain_temperror; domain=broken.test MX=SERVFAIL)"


def test_sender_domain_skips_trusted_clients(tmp_path: Path) -> None:
    """An authenticated client's sender domain is not looked up."""
    checks, dns, _ = build(tmp_path, checks={"sender_domain": True})
    assert at_mail(checks, "a@gone.test", trusted=True, auth="a@local.test") is None
    assert ("gone.test", "MX") not in dns.asked


# -- reverse_dns -------------------------------------------------------------------------------

def test_received_name_is_forward_confirmed(tmp_path: Path) -> None:
    """PTR then A containing the client: that name; otherwise (or on DNS trouble) unknown."""
    checks, _, _ = build(tmp_path, {("11.2.0.192.in-addr.arpa", "PTR"): ("liar.test",),
                                    ("liar.test", "A"): ("192.0.2.200",),
                                    ("12.2.0.192.in-addr.arpa", "PTR"): "SERVFAIL"})
    assert result(checks.received_name(checks.connected(CLIENT))) == "mail.client.test"
    assert result(checks.received_name(checks.connected("192.0.2.11"))) == "unknown"
    assert result(checks.received_name(checks.connected("192.0.2.12"))) == "unknown"
    assert result(checks.received_name(checks.connected("192.0.2.13"))) == "unknown"


def test_reverse_lookup_starts_at_connect_and_runs_once(tmp_path: Path) -> None:
    """The PTR query goes out when the client connects, once per connection."""
    checks, dns, _ = build(tmp_path, checks={"reverse_dns": "require"})
    conn = checks.connected(CLIENT)
    assert dns.asked.count((PTR, "PTR")) == 1
    result(checks.at_mail(checks.facts(conn, False, None, "a@real.test")))
    result(checks.received_name(conn))
    assert dns.asked.count((PTR, "PTR")) == 1


def test_reverse_dns_require(tmp_path: Path) -> None:
    """require: a client without a confirmed name gets no_reverse_dns; one with it passes."""
    checks, _, _ = build(tmp_path, {("11.2.0.192.in-addr.arpa", "PTR"): ("liar.test",),
                                    ("liar.test", "A"): ("192.0.2.200",)}, checks={"reverse_dns": "require"})
    assert at_mail(checks, "a@real.test") is None
    assert reply(at_mail(checks, "a@real.test", "192.0.2.11")) == (
        "450 4.7.25 Client host has no verified reverse DNS name (no_reverse_dns; ptr=11.2.0.192.in-addr.arpa)")


def test_reverse_dns_require_dns_trouble_is_451(tmp_path: Path) -> None:
    """require with a PTR lookup that SERVFAILs: 451 4.4.3."""
    checks, _, _ = build(tmp_path, {("12.2.0.192.in-addr.arpa", "PTR"): "SERVFAIL"}, checks={"reverse_dns": "require"})
    assert reply(at_mail(checks, "a@real.test", "192.0.2.12")).startswith(
        "451 4.4.3 Temporary DNS lookup failure, try again later (reverse_dns_temperror;")


def test_reverse_dns_log_never_refuses(tmp_path: Path) -> None:
    """The default "log" never refuses a client for its reverse name."""
    checks, _, _ = build(tmp_path)
    assert at_mail(checks, "a@real.test", "192.0.2.11") is None
    assert checks.rules == []


# -- dnsbl -------------------------------------------------------------------------------------

@pytest.mark.parametrize("code,listed", [
    ("127.0.0.2", True), ("127.0.0.255", True), ("127.0.0.1", False),
    ("127.255.255.254", False), ("127.255.255.252", False), ("127.0.1.2", False), ("10.0.0.2", False),
])
def test_dnsbl_listing_codes(tmp_path: Path, code: str, listed: bool) -> None:
    """Only 127.0.0.2-127.0.0.255 lists; 127.255.255.x (the lists' error codes) never does."""
    checks, _, _ = build(tmp_path, {(ZONE_NAME, "A"): (code,)}, checks={"dnsbl": ["bl.test"]})
    got = at_mail(checks, "a@real.test")
    if listed:
        assert reply(got) == f"554 5.7.1 Client host blocked by a DNS block list (dnsbl_listed; zone=bl.test code={code})"
    else:
        assert got is None


def test_dnsbl_zones_queried_in_parallel_at_connect(tmp_path: Path) -> None:
    """Every zone is asked when the client connects, before MAIL; the listing zone is named."""
    checks, dns, _ = build(tmp_path, {("10.2.0.192.one.test", "A"): "hold", ("10.2.0.192.two.test", "A"): "hold"},
                           checks={"dnsbl": ["one.test", "two.test"]})
    conn = checks.connected(CLIENT)
    assert set(dns.held) == {("10.2.0.192.one.test", "A"), ("10.2.0.192.two.test", "A")}
    out: list[Any] = []
    defer.Deferred.fromCoroutine(checks.at_mail(checks.facts(conn, False, None, "a@real.test"))).addBoth(out.append)
    dns.held[("10.2.0.192.two.test", "A")].callback(("127.0.0.4",))
    assert not out
    dns.held[("10.2.0.192.one.test", "A")].callback("NXDOMAIN")
    assert reply(out[0]).endswith("(dnsbl_listed; zone=two.test code=127.0.0.4)")


def test_dnsbl_trouble_is_451_and_trusted_skip(tmp_path: Path) -> None:
    """A zone that SERVFAILs: 451 4.4.3; a trusted client is not looked up at all."""
    checks, dns, _ = build(tmp_path, {(ZONE_NAME, "A"): "SERVFAIL"}, checks={"dnsbl": ["bl.test"]})
    assert reply(at_mail(checks, "a@real.test")) == \
        "451 4.4.3 Temporary DNS lookup failure, try again later (dnsbl_temperror; zone=bl.test lookup failed)"
    dns.asked.clear()
    conn = checks.connected(CLIENT, trusted_by_address=True)
    assert result(checks.at_mail(checks.facts(conn, True, None, "a@real.test"))) is None
    assert dns.asked == []


# -- greylisting -------------------------------------------------------------------------------

def at_rcpt(checks: InboundChecks, sender: str, rcpt: str, client: str = CLIENT, trusted: bool = False
            ) -> Refusal | None:
    conn = checks.connected(client)
    return result(checks.at_rcpt(checks.facts(conn, trusted, None, sender, rcpt)))


def test_greylist_defers_then_passes_and_whitelists(tmp_path: Path) -> None:
    """First try: greylisted; too early: greylisted; after the delay: pass, and the /24 is whitelisted."""
    checks, _, clock = build(tmp_path, checks={"greylist": 300})
    assert reply(at_rcpt(checks, "a@real.test", "bob@local.test")) == (
        "451 4.7.1 Greylisted, please try again later "
        "(greylisted; triplet=192.0.2.0/24,<a@real.test>,<bob@local.test> new)")
    clock.advance(100)
    assert reply(at_rcpt(checks, "a@real.test", "bob@local.test")).endswith(" early)")
    clock.advance(201)
    assert at_rcpt(checks, "a@real.test", "bob@local.test", "192.0.2.77") is None
    assert at_rcpt(checks, "other@else.test", "carol@local.test", "192.0.2.78") is None   # whitelisted /24
    assert reply(at_rcpt(checks, "a@real.test", "bob@local.test", "198.51.100.1")).endswith(" new)")


def test_greylist_survives_a_restart(tmp_path: Path) -> None:
    """Triplets are in data_dir/greylist.sqlite: a new InboundChecks remembers them."""
    checks, _, clock = build(tmp_path, checks={"greylist": 60})
    assert at_rcpt(checks, "a@real.test", "bob@local.test") is not None
    checks.close()
    again, _, clock2 = build(tmp_path, checks={"greylist": 60})
    clock2.advance(61)
    assert at_rcpt(again, "a@real.test", "bob@local.test") is None
    assert (tmp_path / "greylist.sqlite").stat().st_mode & 0o777 == 0o600


def test_greylist_ipv6_uses_the_64_and_skips_trusted(tmp_path: Path) -> None:
    """An IPv6 client is keyed by its /64; trusted clients are never greylisted."""
    checks, _, _ = build(tmp_path, checks={"greylist": 60})
    assert "triplet=2001:db8:1:2::/64," in reply(at_rcpt(checks, "a@real.test", "b@local.test", "2001:db8:1:2::9"))
    assert at_rcpt(checks, "a@real.test", "b@local.test", "198.51.100.9", trusted=True) is None


def test_greylist_store_failure_is_4xx(tmp_path: Path) -> None:
    """A greylist file that cannot be used: 451 4.3.0 under greylisted_error, never a pass."""
    (tmp_path / "greylist.sqlite").mkdir()
    checks, _, _ = build(tmp_path, checks={"greylist": 60})
    got = at_rcpt(checks, "a@real.test", "b@local.test")
    assert got is not None and got.rule == "greylisted_error" and str(got.reply).startswith("451 4.3.0")


# -- rate control ------------------------------------------------------------------------------

def test_rate_per_ip_per_minute(tmp_path: Path) -> None:
    """After N accepted messages from one address in a minute, MAIL gets rate_limited; a minute later it passes."""
    checks, _, clock = build(tmp_path, limits={"messages_per_ip_per_minute": 2})
    conn = checks.connected(CLIENT)
    for _ in range(2):
        facts = checks.facts(conn, False, None, "a@real.test")
        assert result(checks.at_mail(facts)) is None
        checks.accepted(facts)
    assert reply(result(checks.at_mail(checks.facts(conn, False, None, "a@real.test")))) == \
        "451 4.7.0 Too much mail, slow down (rate_limited; ip=192.0.2.10 limit=2/minute)"
    assert at_mail(checks, "a@real.test", "192.0.2.11") is None
    assert at_mail(checks, "a@real.test", trusted=True) is None        # allow-listed: no per-IP limit
    clock.advance(61)
    assert result(checks.at_mail(checks.facts(conn, False, None, "a@real.test"))) is None


def test_rate_per_user_per_hour(tmp_path: Path) -> None:
    """An authenticated account is limited per hour, from any address."""
    checks, _, clock = build(tmp_path, limits={"messages_per_user_per_hour": 3})
    for i in range(3):
        facts = checks.facts(checks.connected(f"198.51.100.{i}"), True, "alice@local.test", "alice@local.test")
        assert result(checks.at_mail(facts)) is None
        checks.accepted(facts)
    got = at_mail(checks, "alice@local.test", "203.0.113.5", trusted=True, auth="alice@local.test")
    assert reply(got) == "451 4.7.0 Too much mail, slow down (rate_limited; user=alice@local.test limit=3/hour)"
    assert at_mail(checks, "bob@local.test", trusted=True, auth="bob@local.test") is None
    clock.advance(3601)
    assert at_mail(checks, "alice@local.test", trusted=True, auth="alice@local.test") is None


# -- order and trust ---------------------------------------------------------------------------

def test_trusted_clients_skip_all_but_the_access_lists(tmp_path: Path) -> None:
    """With every check on, a trusted client meets only reject_clients/reject_senders."""
    checks, dns, _ = build(tmp_path, {(ZONE_NAME, "A"): ("127.0.0.2",)},
                           checks={"dnsbl": ["bl.test"], "sender_domain": True, "reverse_dns": "require",
                                   "greylist": 60, "reject_senders": ["@spam.test"]})
    assert at_mail(checks, "a@gone.test", "192.0.2.11", trusted=True) is None
    assert at_rcpt(checks, "a@gone.test", "b@local.test", trusted=True) is None
    assert reply(at_mail(checks, "x@spam.test", trusted=True)).startswith("550 5.7.1 Sender address rejected")
    assert checks.rules == ["sender_rejected", "dnsbl_listed", "no_reverse_dns", "sender_domain_unknown", "greylisted"]


def test_runs_tells_which_stages_have_checks(tmp_path: Path) -> None:
    """runs() lets the SMTP adapter skip a stage without checks (no pause, no coroutine)."""
    checks, _, _ = build(tmp_path)
    assert not checks.runs("mail") and not checks.runs("rcpt") and not checks.runs("data")
    checks, _, _ = build(tmp_path, checks={"greylist": 10, "dkim_verify": True})
    assert not checks.runs("mail") and checks.runs("rcpt") and checks.runs("data")


def test_reload_keeps_rate_counts_and_the_greylist_store(tmp_path: Path) -> None:
    """carry_over (a SIGHUP reload): unchanged limits keep their counts, the same greylist file its store."""
    old, _, _ = build(tmp_path, checks={"greylist": 60}, limits={"messages_per_ip_per_minute": 1})
    facts = old.facts(old.connected(CLIENT), False, None, "a@real.test")
    old.accepted(facts)
    new, _, _ = build(tmp_path, checks={"greylist": 60, "dnsbl": ["bl.test"]},
                      limits={"messages_per_ip_per_minute": 1})
    new.carry_over(old)
    assert new.greylist_store is old.greylist_store
    assert reply(result(new.at_mail(new.facts(new.connected("192.0.2.10"), False, None, "a@real.test")))) \
        .startswith("451 4.7.0 Too much mail, slow down (rate_limited;")
