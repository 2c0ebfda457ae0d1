"""Tests for MTA-STS (RFC 8461): the policy parser and the policy cache, with a task.Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task

from mailguard.core.mtasts import Policy, PolicyError, matches, parse_policy, record_id
from mailguard.dns.resolver import NODATA, RECORDS, Answer, TemporaryDNSError
from mailguard.outbound.mtasts import FetchError, PolicyCache

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"


def test_parse_policy() -> None:
    """The example policy of RFC 8461 section 3.2 parses; its MX patterns match as section 4.1 says."""
    p = parse_policy(POLICY, "abc")
    assert p == Policy("enforce", ("mail.example.com", "*.example.net"), 86400, "abc")
    assert p.allows("mail.example.com") and p.allows("MAIL.example.com.")
    assert p.allows("backup.example.net")
    assert not p.allows("example.net") and not p.allows("a.b.example.net") and not p.allows("evil.example.com")


@pytest.mark.parametrize("text", [
    "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
    "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: soon\n",
    "<html>not a policy</html>",
])
def test_bad_policies(text: str) -> None:
    """Anything that is not a valid STSv1 policy is refused."""
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_max_age_capped() -> None:
    """max_age is capped at one year (section 3.2)."""
    assert parse_policy("version: STSv1\nmode: testing\nmx: a.example\nmax_age: 999999999\n").max_age == 31557600


def test_record_id() -> None:
    """One v=STSv1 record with an id; none or several mean no policy."""
    assert record_id([b"v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert record_id([b"v=spf1 -all", b"v=STSv1; id=1"]) == "1"
    assert record_id([b"v=STSv1; id=1", b"v=STSv1; id=2"]) is None
    assert record_id([b"v=STSv1; id=bad-id!"]) is None
    assert record_id([]) is None


def test_wildcard_match() -> None:
    """A wildcard covers exactly one leftmost label."""
    assert matches("*.mx.example", "a.mx.example")
    assert not matches("*.mx.example", "mx.example")


class FakeDNS:
    def __init__(self) -> None:
        self.txt: list[bytes] | Exception = []

    async def lookup(self, name: str, type: str) -> Answer:
        assert (name, type) == ("_mta-sts.example.com", "TXT")
        if isinstance(self.txt, Exception):
            raise self.txt
        return Answer(name, type, RECORDS if self.txt else NODATA, tuple(self.txt))


class FakeFetch:
    def __init__(self) -> None:
        self.body: bytes | Exception = POLICY.encode()
        self.urls: list[str] = []

    async def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        if isinstance(self.body, Exception):
            raise self.body
        return self.body


def run(cache: PolicyCache) -> Any:
    out: list[Any] = []
    defer.ensureDeferred(cache.policy("example.com")).addBoth(out.append)
    return out[0]


def test_cache_follows_the_record_id() -> None:
    """Fetched once per id, again when the id changes; kept through fetch and DNS failures until max_age."""
    clock, dns, fetch = task.Clock(), FakeDNS(), FakeFetch()
    cache = PolicyCache(dns, fetch, clock)
    assert run(cache) is None and fetch.urls == []          # no record: no policy, nothing fetched
    dns.txt = [b"v=STSv1; id=one"]
    assert run(cache).mode == "enforce"
    assert fetch.urls == ["https://mta-sts.example.com/.well-known/mta-sts.txt"]
    assert run(cache).id == "one" and len(fetch.urls) == 1  # same id: cached
    dns.txt = [b"v=STSv1; id=two"]
    fetch.body = FetchError("HTTP status 404")
    assert run(cache).id == "one"                          # new id, fetch failed: the cached one stays
    dns.txt = TemporaryDNSError("_mta-sts.example.com", "TXT", "timeout")
    assert run(cache).id == "one"
    clock.advance(86401)
    assert run(cache) is None                              # expired, nothing fresh: no policy
    dns.txt = [b"v=STSv1; id=three"]
    fetch.body = b"version: STSv1\nmode: testing\nmx: *.example.com\nmax_age: 60\n"
    assert run(cache).mode == "testing"
