"""Tests for mailguard.senderauth.dkimverify: signatures from independent signers verify;
altered messages, missing keys and DNS trouble give the RFC 8601 results."""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path
from typing import Any, Callable

import dkim
import pytest_twisted
from dkim_doubles import MESSAGE, key_pair, sign_dkimpy, sign_perl
from senderauth_doubles import FakeLookup, run
from nacl.signing import SigningKey
from twisted.internet import defer, reactor

from mailguard.senderauth import dkimverify
from mailguard.senderauth.dkimverify import DKIMResult


def zone(**extra: list[tuple[str, Any]]) -> FakeLookup:
    _, record = key_pair()
    return FakeLookup({"sel._domainkey.example.org": [("TXT", record)], **extra})


def at_once(work: Callable[..., list[DKIMResult]], *args: Any) -> "defer.Deferred[list[DKIMResult]]":
    return defer.succeed(work(*args))


def verify(message: bytes, lookup: FakeLookup | None = None) -> list[DKIMResult]:
    return run(dkimverify.verify(lookup or zone(), message, to_thread=at_once))


def test_dkimpy_signature_passes() -> None:
    """A message signed by dkimpy verifies, with d= and s= reported."""
    (r,) = verify(sign_dkimpy(MESSAGE))
    assert (r.result, r.domain, r.selector, r.identity) == ("pass", "example.org", "sel", "@example.org")


def test_mail_dkim_signature_passes(tmp_path: Path) -> None:
    """A message signed by Perl's Mail::DKIM (relaxed/relaxed) verifies."""
    (r,) = verify(sign_perl(MESSAGE, tmp_path / "key.pem"))
    assert (r.result, r.domain, r.selector) == ("pass", "example.org", "sel")


def test_altered_body_fails(tmp_path: Path) -> None:
    """Changing one word of the body after signing is a fail, for both signers."""
    for signed in (sign_dkimpy(MESSAGE), sign_perl(MESSAGE, tmp_path / "key.pem")):
        (r,) = verify(signed.replace(b"attached", b"enclosed"))
        assert r.result == "fail", r
        assert "body hash" in r.reason


def test_altered_header_fails() -> None:
    """Changing a signed header (Subject) after signing is a fail."""
    (r,) = verify(sign_dkimpy(MESSAGE).replace(b"quarterly figures", b"urgent wire transfer"))
    assert (r.result, r.reason) == ("fail", "signature does not verify")


def test_key_missing_or_revoked_is_permerror() -> None:
    """No TXT at selector._domainkey.domain, or an empty p=, is permerror (RFC 6376 6.1.2)."""
    (r,) = verify(sign_dkimpy(MESSAGE), FakeLookup({}))
    assert (r.result, r.reason) == ("permerror", "no key at sel._domainkey.example.org")
    (r,) = verify(sign_dkimpy(MESSAGE), FakeLookup({"sel._domainkey.example.org": [("TXT", "v=DKIM1; p=")]}))
    assert r.result == "permerror"


def test_dns_trouble_is_temperror() -> None:
    """A timeout fetching the key is temperror, never pass or fail."""
    (r,) = verify(sign_dkimpy(MESSAGE), FakeLookup({"sel._domainkey.example.org": [("TIMEOUT", None)]}))
    assert r.result == "temperror"


def test_small_key_fails() -> None:
    """An RSA key under 1024 bits does not verify (RFC 8301 section 3.2)."""
    signed = sign_dkimpy(MESSAGE, bits=768)
    _, record = key_pair(768)
    (r,) = verify(signed, FakeLookup({"sel._domainkey.example.org": [("TXT", record)]}))
    assert r.result == "fail"


def test_unsigned_and_garbled() -> None:
    """No signature: no result; a signature that does not parse: neutral; no d=: permerror."""
    assert verify(MESSAGE) == []
    (r,) = verify(b"DKIM-Signature: garbage\r\n" + MESSAGE)
    assert r.result == "neutral"
    (r,) = verify(b"DKIM-Signature: v=1; a=rsa-sha256; s=sel; b=AAAA; bh=AAAA; h=from\r\n" + MESSAGE)
    assert r.result == "neutral"


def test_each_signature_has_its_result() -> None:
    """Two signatures, one good and one by a domain without a key: one result each, in order."""
    signed = sign_dkimpy(sign_dkimpy(MESSAGE), domain="other.example")
    results = verify(signed)
    assert [(r.result, r.domain) for r in results] == [("permerror", "other.example"), ("pass", "example.org")]
    lookup = zone()
    verify(signed, lookup)
    assert sorted(lookup.asked) == [("TXT", "sel._domainkey.example.org"), ("TXT", "sel._domainkey.other.example")]


@pytest_twisted.inlineCallbacks
def test_crypto_runs_in_a_thread(monkeypatch: Any) -> Any:
    """By default the hashing and RSA check run in the reactor's thread pool, not on the reactor."""
    seen: list[threading.Thread] = []
    check_all = dkimverify.check_all

    def spy(*args: Any) -> list[DKIMResult]:
        seen.append(threading.current_thread())
        return check_all(*args)

    monkeypatch.setattr(dkimverify, "check_all", spy)
    results = yield defer.ensureDeferred(dkimverify.verify(zone(), sign_dkimpy(MESSAGE)))
    assert [r.result for r in results] == ["pass"]
    assert seen and seen[0] is not threading.main_thread()


def test_ed25519_signature_passes() -> None:
    """An Ed25519 signature (RFC 8463, as mailguard's own signer adds beside RSA) verifies."""
    seed = SigningKey.generate()
    private = base64.b64encode(bytes(seed))
    public = base64.b64encode(bytes(seed.verify_key))
    signed = dkim.sign(MESSAGE, b"ed", b"example.org", private, signature_algorithm=b"ed25519-sha256",
                       include_headers=[b"from", b"to", b"subject", b"date"]) + MESSAGE
    lookup = FakeLookup({"ed._domainkey.example.org": [("TXT", b"v=DKIM1; k=ed25519; p=" + public)]})
    (r,) = verify(signed, lookup)
    assert (r.result, r.algorithm, r.selector) == ("pass", "ed25519-sha256", "ed")
    (r,) = verify(signed.replace(b"quarterly", b"annual"), lookup)
    assert r.result == "fail"


@pytest_twisted.inlineCallbacks
def test_worker_processes_verify_on_another_process() -> Any:
    """WorkerProcesses runs the verification in a spawned process and answers on the reactor;
    work it cannot send there (an unpicklable function) still runs, in a thread."""
    workers = dkimverify.WorkerProcesses(reactor, workers=1)
    try:
        results = yield defer.ensureDeferred(dkimverify.verify(zone(), sign_dkimpy(MESSAGE), to_thread=workers))
        assert [r.result for r in results] == ["pass"]
        pid = yield workers(os.getpid)
        assert pid != os.getpid()
        here = yield workers(lambda: [DKIMResult("neutral", reason=str(threading.current_thread().name))])
        assert here[0].reason != threading.main_thread().name
    finally:
        workers.close()
