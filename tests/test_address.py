"""Tests for mailguard.core.address: RFC 5321 paths, normalisation, and relay tricks."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mailguard.core.address import (MAX_DOMAIN, MAX_LOCAL, MAX_PATH, Address, AddressError, normalize_domain,
                               parse_mail_arg, parse_path)

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#$&'*+/=?^_`{|}~-"
POSTMASTER = frozenset({"postmaster"})

atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
dot_atoms = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(
    lambda s: len(s) <= MAX_LOCAL and not s.upper().startswith("IMCEA"))
labels = st.from_regex(r"\A[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?\Z")
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)


def parse(text: str) -> Address | None:
    return parse_path(text, bare_ok=POSTMASTER)


# -- property tests ------------------------------------------------------------------


@given(local=dot_atoms, domain=domains, trailing_dot=st.booleans(), brackets=st.booleans())
def test_valid_dot_atom_round_trips_with_lowercase_domain(local: str, domain: str, trailing_dot: bool,
                                                          brackets: bool) -> None:
    """A generated dot-atom@domain parses to the same local part and the lower-cased domain."""
    text = f"{local}@{domain}{'.' if trailing_dot else ''}"
    addr = parse(f"<{text}>" if brackets else text)
    assert addr == Address(local, domain.lower())
    assert str(addr) == f"{local}@{domain.lower()}"
    assert addr.key == str(addr).lower()
    assert parse(f"<{addr}>") == addr


@given(st.text(max_size=300))
@example("<\"\\")
@example("<@:>")
@example("a@[IPv6:")
@example("\"a\"@b\x00c")
@example("a@" + "\u00e9" * 80 + ".de")
@example("a@[IPv6:fe80::1%eth0]")
def test_parse_never_raises_anything_but_address_error(text: str) -> None:
    """Arbitrary text either parses or raises AddressError, never another exception."""
    for null_ok in (False, True):
        try:
            parse_path(text, null_ok=null_ok, bare_ok=POSTMASTER)
        except AddressError:
            pass


@given(st.text(max_size=120))
def test_parse_mail_arg_never_raises_anything_but_address_error(text: str) -> None:
    """MAIL/RCPT arguments of any shape either split or raise AddressError."""
    for kw in ("FROM", "TO"):
        try:
            path, params = parse_mail_arg(text, kw)
        except AddressError:
            continue
        assert isinstance(path, str) and all(k == k.upper() for k in params)


@st.composite
def tricks(draw: st.DrawFn) -> str:
    """Relay-trick forms built around generated names (the open-relay catalogues)."""
    user, remote, local = draw(dot_atoms), draw(domains), draw(domains)
    form = draw(st.sampled_from([
        "{u}%{r}@{l}", "{u}%{r}", "{r}!{u}@{l}", "{r}!{u}", '"{u}@{r}"@{l}', '"{u}%{r}"@{l}',
        '"{u}@{r}"', "{u}@{r}@{l}", "{u}@{r}@[1.2.3.4]", "@{l}:{u}%{r}@{l}", "@{l}:{u}@{r}@{l}",
        "IMCEASMTP-{u}+40{r}@{l}", '"IMCEA {u}+40{r}"@{l}', "imceaex-{u}@{l}", '"{u}\\@{r}"@{l}',
        "{u}%{r}@[127.0.0.1]", "{u}%40{r}@{l}",
    ]))
    text = form.format(u=user, r=remote, l=local)
    return draw(st.sampled_from([text, f"<{text}>"]))


@given(tricks())
def test_tricks_always_raise_with_trick_flag(text: str) -> None:
    """Every relay-trick form is refused as a trick, never parsed into an address."""
    with pytest.raises(AddressError) as err:
        parse(text)
    assert err.value.trick, text


# -- table tests ----------------------------------------------------------------------


@pytest.mark.parametrize("text, local, domain", [
    ("<Joe@Example.COM>", "Joe", "example.com"),
    ("<joe@example.com.>", "joe", "example.com"),
    ("joe@example.com", "joe", "example.com"),
    ("  <joe@example.com>  ", "joe", "example.com"),
    ("<joe@xn--bcher-kva.de>", "joe", "xn--bcher-kva.de"),
    ("<joe@[192.0.2.1]>", "joe", "[192.0.2.1]"),
    ("<joe@[IPv6:::1]>", "joe", "[IPv6:::1]"),
    ("<joe@[ipv6:2001:DB8:0:0::1]>", "joe", "[IPv6:2001:db8::1]"),
    ("<@relay.example:joe@final.example>", "joe", "final.example"),
    ("<@a.example,@b.example:joe@final.example>", "joe", "final.example"),
    ('<"joe"@example.com>', "joe", "example.com"),
    ('<"joe smith"@example.com>', '"joe smith"', "example.com"),
    ("<postmaster>", "postmaster", ""),
    ("postmaster", "postmaster", ""),
    ("<PostMaster>", "PostMaster", ""),
])
def test_accepted_forms(text: str, local: str, domain: str) -> None:
    """Normalisation: case, trailing dot, IDNA, literals, source routes, quotes, bare postmaster."""
    assert parse(text) == Address(local, domain)


def test_literal_domain_is_flagged() -> None:
    """An address literal is recognised as one (it is never an inbound domain)."""
    addr = parse("<joe@[192.0.2.1]>")
    assert addr is not None and addr.is_literal
    addr = parse("<joe@example.com>")
    assert addr is not None and not addr.is_literal


def test_source_route_is_judged_by_final_address() -> None:
    """A source route through our domain to a remote one yields the remote final address."""
    assert parse("<@office.example:victim@remote.example>") == Address("victim", "remote.example")


def test_null_path_only_when_allowed() -> None:
    """<> is the null reverse-path for MAIL FROM; as a recipient it is an error."""
    assert parse_path("<>", null_ok=True) is None
    with pytest.raises(AddressError):
        parse_path("<>")


@pytest.mark.parametrize("text", [
    "joe", "<joe>", "<bob>", "<postmaster@>", "<@example.com>", "<joe@>", "<joe@example..com>",
    "<joe@-example.com>", "<joe@example-.com>", "<joe@exa mple.com>", "<joe@example.com", "joe@example.com>",
    "<<joe@example.com>>", "<joe@[1.2.3]>", "<joe@[1.2.3.4.5]>", "<joe@[256.1.1.1]>", "<joe@[IPv6:zz::1]>",
    "<joe@[IPv6:1.2.3.4]>", "<joe@[]>", "<joe@[1.2.3.4>", "<joe@[IPv6:fe80::1%eth0]>",
    "<jo e@example.com>", "<joe..x@example.com>", "<.joe@example.com>", "<joé@example.com>",
    '<"joe@example.com>', "<@a.example joe@b.example>", "<@:joe@example.com>",
    "<joe@example.com\x00>", "<joe@ex\tample.com>", "<joe@.>",
    # 8-bit domains without SMTPUTF8 (not offered): refused, never IDNA-folded, so a fullwidth
    # dot cannot turn a foreign-looking domain into the local one (issue 17 item 11).
    "<joe@bücher.de>", "<joe@BÜCHER.de.>", "<joe@realdomain\uff0eexample>", "<joe@\uff52ealdomain.example>",
])
def test_refused_syntax(text: str) -> None:
    """Malformed paths raise AddressError (a syntax error, not a trick)."""
    with pytest.raises(AddressError) as err:
        parse(text)
    assert not err.value.trick, text


@pytest.mark.parametrize("text", [
    "<user%remote.example@office.example>",
    "<user%remote.example>",
    "<remote.example!user@office.example>",
    "<remote.example!user>",
    '<"user@remote.example"@office.example>',
    '<"user@remote.example">',
    '<"user%remote.example"@office.example>',
    "<user@remote.example@office.example>",
    "<@office.example:user@remote.example@office.example>",
    "<IMCEASMTP-user+40remote+2Eexample@office.example>",
    '<"IMCEASMTP-user+40remote.example"@office.example>',
    "<IMCEAEX-_O=ORG_OU=SITE_CN=user@office.example>",
    '<"user\\@remote.example"@office.example>',
    "<user%remote.example@[192.0.2.1]>",
    "<a@b.example,joe@c.example>",
])
def test_refused_tricks(text: str) -> None:
    """The relay tricks of item 3 are refused with .trick set."""
    with pytest.raises(AddressError) as err:
        parse(text)
    assert err.value.trick, text


# -- length limits (RFC 5321 section 4.5.3.1) -------------------------------------------


def test_local_part_limit_64() -> None:
    """A 64-octet local part is accepted, 65 is not."""
    assert parse(f"<{'a' * MAX_LOCAL}@example.com>") == Address("a" * 64, "example.com")
    with pytest.raises(AddressError):
        parse(f"<{'a' * (MAX_LOCAL + 1)}@example.com>")


def _domain_of_length(n: int) -> str:
    labels, left = [], n
    while left > 0:
        size = min(63, left)
        if left - size == 1:        # never leave a lone dot to fill
            size -= 2
        labels.append("a" * size)
        left -= size + 1
    name = ".".join(labels)
    assert len(name) == n
    return name


def test_domain_limit_255() -> None:
    """A 255-octet domain is a valid name, 256 is not; a 64-octet label is refused."""
    assert normalize_domain(_domain_of_length(MAX_DOMAIN)) == _domain_of_length(MAX_DOMAIN)
    with pytest.raises(AddressError):
        normalize_domain(_domain_of_length(MAX_DOMAIN + 1))
    with pytest.raises(AddressError):
        normalize_domain("a" * 64 + ".example")


def test_path_limit_256_counts_the_brackets() -> None:
    """RFC 5321 4.5.3.1.3: the path is at most 256 octets including punctuation ("<", ">")."""
    domain = _domain_of_length(MAX_PATH - 2 - len("joe@"))
    exact = f"<joe@{domain}>"
    assert len(exact) == MAX_PATH
    assert parse(exact) == Address("joe", domain)
    longer_domain = _domain_of_length(len(domain) + 1)
    with pytest.raises(AddressError):
        parse(f"<joe@{longer_domain}>")


# -- parse_mail_arg ----------------------------------------------------------------------


@pytest.mark.parametrize("arg, path, params", [
    ("FROM:<joe@example.com>", "<joe@example.com>", {}),
    ("from:<joe@example.com>", "<joe@example.com>", {}),
    ("FROM: <joe@example.com>", "<joe@example.com>", {}),
    ("FROM: joe@example.com", "joe@example.com", {}),
    ("FROM:joe@example.com SIZE=1000", "joe@example.com", {"SIZE": "1000"}),
    ("FROM:<> SIZE=10 body=8BITMIME", "<>", {"SIZE": "10", "BODY": "8BITMIME"}),
    ("FROM:<joe@example.com> SMTPUTF8", "<joe@example.com>", {"SMTPUTF8": None}),
    ('FROM:<"a>b"@example.com> SIZE=5', '<"a>b"@example.com>', {"SIZE": "5"}),
    ('FROM:<joe@example.com> X-TAG="v"', "<joe@example.com>", {"X-TAG": '"v"'}),
])
def test_parse_mail_arg(arg: str, path: str, params: dict[str, str | None]) -> None:
    """The path is split from its ESMTP parameters; keywords are upper-cased."""
    kw = arg.partition(":")[0].upper()
    assert parse_mail_arg(arg, kw) == (path, params)


@pytest.mark.parametrize("arg, kw", [
    ("FROM <joe@example.com>", "FROM"),
    ("TO:<joe@example.com>", "FROM"),
    ("FROM:<joe@example.com", "FROM"),
    ("FROM:<joe@example.com> =x", "FROM"),
    ("FROM:<joe@example.com> SIZE=a=b c=\x7f", "FROM"),
])
def test_parse_mail_arg_refuses(arg: str, kw: str) -> None:
    """A missing keyword or colon, unbalanced brackets or a bad parameter raise AddressError."""
    with pytest.raises(AddressError):
        parse_mail_arg(arg, kw)
