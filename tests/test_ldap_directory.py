"""The LDAP directory backend against a real OpenLDAP slapd (started per module)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from mailguard.config import ldap as ldap_config
from mailguard.config.ldap import LDAPConfig
from mailguard.directory.base import DirectoryError, Expansion
from mailguard.directory.ldap import LDAPDirectory

from ldap_server import SERVICE_DN, SERVICE_PW, Slapd, dn_of, group, group_dn, person

D = "realdomain.example"
LDIF = (
    person("alice", f"alice@{D}", "alice pw", aliases=(f"sales@{D}",))
    + person("bob", f"bob@{D}", "bob pw")
    + person("carol", f"carol@{D}")
    + person("pat", "pat@partner.example", aliases=(f"pat@{D}",))
    + group("team", f"team@{D}", (dn_of("alice"), dn_of("bob")))
    + group("all", f"all@{D}", (group_dn("team"), dn_of("carol"), dn_of("alice"),
                                 f"uid=gone,ou=people,dc=realdomain,dc=example"))
    + group("loopa", f"loopa@{D}", (group_dn("loopb"), dn_of("alice")))
    + group("loopb", f"loopb@{D}", (group_dn("loopa"),))
)


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    server = Slapd(tmp_path_factory.mktemp("slapd"), LDIF).start()
    yield server
    server.stop()


def make_config(slapd: Slapd, **over: Any) -> LDAPConfig:
    table = {"url": slapd.url, "ca_file": str(slapd.ca_file), "base": "dc=realdomain,dc=example",
             "bind_dn": SERVICE_DN, "bind_password": SERVICE_PW, **over}

    def fail(key: str, message: str) -> Exception:
        return AssertionError(f"{key}: {message}")
    return ldap_config.parse(table, fail, Path("/"), required=True)


def directory(slapd: Slapd, **over: Any) -> LDAPDirectory:
    return LDAPDirectory(make_config(slapd, **over), reactor, [D], timeout=5)


@pytest_twisted.ensureDeferred
async def test_mailboxes_aliases_contacts_and_unknown(slapd: Slapd) -> None:
    """A mailbox, its mailLocalAddress alias (any case), a contact, and an unknown address."""
    d = directory(slapd)
    try:
        assert await d.expand(f"alice@{D}") == Expansion(mailboxes=(f"alice@{D}",))
        assert await d.expand(f"SALES@{D.upper()}") == Expansion(mailboxes=(f"alice@{D}",))
        assert await d.expand(f"pat@{D}") == Expansion(others=("pat@partner.example",))
        assert await d.expand(f"nobody@{D}") is None
    finally:
        d.close()


@pytest_twisted.ensureDeferred
async def test_lists_nested_deduplicated_and_loops_end(slapd: Slapd) -> None:
    """Group members resolve to addresses; nested groups once per mailbox; a loop ends; a group
    takes mail from anyone (no sender policy is read from LDAP)."""
    d = directory(slapd)
    try:
        assert await d.expand(f"team@{D}") == Expansion(mailboxes=(f"alice@{D}", f"bob@{D}"), senders="anyone")
        got = await d.expand(f"all@{D}")
        assert got is not None and sorted(got.mailboxes) == [f"alice@{D}", f"bob@{D}", f"carol@{D}"]
        assert got.others == ()
        assert await d.expand(f"loopa@{D}") == Expansion(mailboxes=(f"alice@{D}",), senders="anyone")
    finally:
        d.close()


@pytest.mark.parametrize("address", ["*", "*)(uid=*", f"*)(mail=*@{D}", f"al*@{D}", f"\\2a@{D}"])
@pytest_twisted.ensureDeferred
async def test_filter_injection_finds_nothing(slapd: Slapd, address: str) -> None:
    """Filter metacharacters in an address are escaped (RFC 4515): no wildcard, no extra term."""
    d = directory(slapd)
    try:
        assert await d.expand(address) is None
        assert await d.verify_password(address, "alice pw") is None
    finally:
        d.close()


@pytest_twisted.ensureDeferred
async def test_logins_bind_as_the_entry(slapd: Slapd) -> None:
    """Right password -> the mailbox; wrong, empty, unknown, list or contact -> None."""
    d = directory(slapd)
    try:
        assert await d.verify_password(f"alice@{D}", "alice pw") == f"alice@{D}"
        assert await d.verify_password(f" Sales@{D} ", "alice pw") == f"alice@{D}"
        assert await d.verify_password(f"alice@{D}", "bob pw") is None
        assert await d.verify_password(f"alice@{D}", "") is None
        assert await d.verify_password(f"carol@{D}", "") is None
        assert await d.verify_password(f"nobody@{D}", "alice pw") is None
        assert await d.verify_password(f"team@{D}", "alice pw") is None
        assert await d.addresses_of(f"alice@{D}") == frozenset({f"alice@{D}", f"sales@{D}"})
    finally:
        d.close()


@pytest_twisted.ensureDeferred
async def test_unknown_logins_cost_a_bind_too(slapd: Slapd) -> None:
    """An unknown login is answered after a bind, like a wrong password, so timing tells nothing."""
    d = directory(slapd)
    binds: list[str] = []
    real = d._bind_ok

    async def counting(dn: str, password: str) -> bool:
        binds.append(dn)
        return await real(dn, password)
    d._bind_ok = counting  # type: ignore[method-assign]
    try:
        assert await d.verify_password(f"nobody@{D}", "guess") is None
        assert await d.verify_password(f"alice@{D}", "guess") is None
        assert binds == ["cn=mailguard-no-such-login,dc=realdomain,dc=example", dn_of("alice")]
    finally:
        d.close()


@pytest_twisted.ensureDeferred
async def test_tls_is_verified(slapd: Slapd, tmp_path: Path) -> None:
    """StartTLS and LDAPS work with the right CA; a server the CA did not sign is refused."""
    import trustme
    for over in ({}, {"url": slapd.ldaps_url}):
        d = directory(slapd, **over)
        try:
            assert await d.expand(f"bob@{D}") == Expansion(mailboxes=(f"bob@{D}",))
            assert await d.verify_password(f"bob@{D}", "bob pw") == f"bob@{D}"
            assert "bound as" in await d.check()
        finally:
            d.close()
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    for over in ({"ca_file": str(other)}, {"ca_file": str(other), "url": slapd.ldaps_url}):
        d = directory(slapd, **over)
        try:
            with pytest.raises(DirectoryError):
                await d.expand(f"bob@{D}")
        finally:
            d.close()


@pytest_twisted.ensureDeferred
async def test_wrong_service_password_is_a_temporary_failure(slapd: Slapd) -> None:
    """A refused service bind is DirectoryError (4xx for the client), not 'unknown'."""
    d = directory(slapd, bind_password="wrong")
    try:
        with pytest.raises(DirectoryError, match="service account"):
            await d.expand(f"alice@{D}")
    finally:
        d.close()


async def poll(check: Any, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = await check()
            if result:
                return result
        except DirectoryError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, 0.1, lambda: None)


@pytest_twisted.ensureDeferred
async def test_new_entry_seen_after_cache_ttl(slapd: Slapd) -> None:
    """'No such entry' is cached for cache_ttl; an entry added with ldapadd shows after it."""
    d = directory(slapd, cache_ttl=2)
    try:
        assert await d.expand(f"dave@{D}") is None
        slapd.ldapadd(person("dave", f"dave@{D}", "dave pw"))
        started = time.monotonic()
        assert await d.expand(f"dave@{D}") is None          # the cached answer
        await poll(lambda: d.expand(f"dave@{D}"), 10)
        assert 0.5 < time.monotonic() - started < 4
    finally:
        d.close()


@pytest_twisted.ensureDeferred
async def test_outage_then_recovery_without_restart(tmp_path: Path) -> None:
    """slapd stopped: DirectoryError (never None); started again: answers return."""
    server = Slapd(tmp_path / "slapd", person("erin", f"erin@{D}", "erin pw")).start()
    d = LDAPDirectory(make_config(server, cache_ttl=0), reactor, [D], timeout=5)
    try:
        assert await d.expand(f"erin@{D}") == Expansion(mailboxes=(f"erin@{D}",))
        server.stop()
        for _ in range(3):
            with pytest.raises(DirectoryError):
                await d.expand(f"erin@{D}")
            with pytest.raises(DirectoryError):
                await d.verify_password(f"erin@{D}", "erin pw")
        server.start()
        assert await poll(lambda: d.expand(f"erin@{D}"), 20) == Expansion(mailboxes=(f"erin@{D}",))
        assert await d.verify_password(f"erin@{D}", "erin pw") == f"erin@{D}"
    finally:
        d.close()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_concurrent_lookups_share_one_search(slapd: Slapd) -> None:
    """Twenty lookups of one address at once cost one pair of searches."""
    d = directory(slapd)
    calls = []
    real = d.pool.search

    def counting(*args: Any) -> defer.Deferred[Any]:
        calls.append(args)
        return real(*args)
    d.pool.search = counting  # type: ignore[method-assign]
    try:
        results = await defer.gatherResults([d.expand(f"bob@{D}") for _ in range(20)])
        assert results == [Expansion(mailboxes=(f"bob@{D}",))] * 20
        assert len(calls) == 2
        await d.expand(f"bob@{D}")
        assert len(calls) == 2                                 # cached
    finally:
        d.close()
