"""Tests for mailguard.dkim: key files, signatures an independent verifier accepts, DNS records."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from mailguard.dkim import keys, records
from mailguard.dkim.sign import SigningError, from_domain, sign

from conftest import make_config

MESSAGE = (b"From: Joe <joe@office.example>\r\nTo: Bob <bob@remote.example>\r\nSubject: plans\r\n"
           b"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@office.example>\r\n\r\n"
           b"Line one\r\n.dot line\r\n\r\n")


def _dns_of(*made: keys.Key):
    table = {f"{k.selector}._domainkey.{k.domain}.".encode(): k.record().encode() for k in made}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name)
    return dnsfunc


def test_keygen_writes_private_files(tmp_path: Path) -> None:
    """A new key is 0600 in a 0700 folder, and its record is one zone-file line."""
    key = keys.generate(tmp_path / "dkim", "office.example", "mail", "rsa")
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key.path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "dkim").st_mode) == 0o700
    line = key.zone_line()
    assert line.startswith('mail._domainkey.office.example. IN TXT "v=DKIM1; k=rsa; p=MII')
    assert "\n" not in line


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    """Rotation means a new selector: an existing key is kept and the command fails."""
    key = keys.generate(tmp_path, "office.example", "mail", "rsa")
    before = key.path.read_bytes()
    for algorithm in ("rsa", "ed25519"):     # one key per selector: DNS holds one record there
        with pytest.raises(keys.KeyFileError, match="has a key already"):
            keys.generate(tmp_path, "office.example", "mail", algorithm)
    assert key.path.read_bytes() == before
    keys.generate(tmp_path, "office.example", "mail2", "rsa")
    assert [k.selector for k in keys.keys_for(tmp_path, "office.example")] == ["mail", "mail2"]
    assert [k.selector for k in keys.keys_for(tmp_path, "office.example", "mail2")] == ["mail2"]


def test_rsa_2048(tmp_path: Path) -> None:
    """The RSA key is 2048 bits, as the mailbox providers require at least."""
    from cryptography.hazmat.primitives import serialization
    key = keys.generate(tmp_path, "office.example", "mail", "rsa")
    assert serialization.load_pem_private_key(key.private(), None).key_size == 2048  # type: ignore[union-attr]


def test_signature_verifies_with_dkimpy(tmp_path: Path) -> None:
    """rsa-sha256 and ed25519-sha256 signatures both verify, From is over-signed."""
    keys.generate(tmp_path, "office.example", "mail", "rsa")
    keys.generate(tmp_path, "office.example", "mail-ed25519", "ed25519")
    keys.generate(tmp_path, "office.example", "old", "rsa")          # not the signing selector
    made = keys.signing_keys(tmp_path, "office.example", "mail")
    assert [(k.selector, k.algorithm) for k in made] == [("mail", "rsa"), ("mail-ed25519", "ed25519")]
    headers = sign(MESSAGE, made)
    assert headers.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in headers and b"a=ed25519-sha256" in headers
    signed = headers + MESSAGE
    for idx in (0, 1):
        assert dkim.DKIM(signed).verify(idx=idx, dnsfunc=_dns_of(*made)), idx
    first = headers.split(b"DKIM-Signature:")[1].replace(b"\r\n", b"").replace(b" ", b"")
    assert b"h=from:to:subject:date:message-id:from" in first


def test_altered_message_fails(tmp_path: Path) -> None:
    """A changed body or an added From: breaks the signature."""
    made = [keys.generate(tmp_path, "office.example", "mail", "rsa")]
    signed = sign(MESSAGE, made) + MESSAGE
    assert dkim.verify(signed, dnsfunc=_dns_of(*made))
    assert not dkim.verify(signed.replace(b"Line one", b"Line 1"), dnsfunc=_dns_of(*made))
    second_from = signed.replace(b"To: Bob", b"From: evil@else.example\r\nTo: Bob")
    assert not dkim.verify(second_from, dnsfunc=_dns_of(*made))


def test_broken_key_is_a_signing_error(tmp_path: Path) -> None:
    """A damaged key file gives SigningError, never an unexpected exception."""
    key = keys.generate(tmp_path, "office.example", "mail", "rsa")
    os.chmod(key.path, 0o600)
    key.path.write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\ngarbage\n-----END RSA PRIVATE KEY-----\n")
    with pytest.raises(SigningError):
        sign(MESSAGE, [key])


@pytest.mark.parametrize(("head", "domain"), [
    (b"From: Joe <joe@Office.Example>\r\n", "office.example"),
    (b"from: joe@office.example\r\n", "office.example"),
    (b"From: \"Joe, the boss\"\r\n <joe@office.example>\r\n", "office.example"),
    (b"From: a@one.example, b@two.example\r\n", None),
    (b"From: a@one.example\r\nFrom: b@two.example\r\n", None),
    (b"Subject: no from\r\n", None),
])
def test_from_domain(head: bytes, domain: str | None) -> None:
    """Only a single From: address names a signing domain."""
    assert from_domain(head + b"To: x@y.example\r\n\r\nbody\r\n") == domain


def _cfg(tmp_path: Path, **extra: object):
    return make_config(tmp_path, server={"hostname": "mx.office.example"},
                       domains={"office.example": {"route": "inbound"}}, **extra)


def test_records_list_every_key(tmp_path: Path) -> None:
    """MX, SPF, both DKIM keys and DMARC, as zone-file lines."""
    cfg = _cfg(tmp_path)
    rsa = keys.generate(cfg.dkim.keys_dir, "office.example", "mail", "rsa")
    ed = keys.generate(cfg.dkim.keys_dir, "office.example", "mail-ed25519", "ed25519")
    lines = [r.zone_line() for r in records.records(cfg, "office.example")]
    assert lines == [
        "office.example. IN MX 10 mx.office.example.",
        'office.example. IN TXT "v=spf1 mx -all"',
        rsa.zone_line(),
        ed.zone_line(),
        '_dmarc.office.example. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@office.example"',
    ]
    assert any("PTR" in n for n in records.notes(cfg, "office.example"))
    assert any("p=quarantine" in n for n in records.notes(cfg, "office.example"))


def test_spf_names_the_smarthost(tmp_path: Path) -> None:
    """With a smarthost, SPF authorises it too."""
    cfg = _cfg(tmp_path, outbound={"smarthost": "smtp.isp.example:587"})
    spf = [r for r in records.records(cfg, "office.example") if r.what == "spf"][0]
    assert spf.value == "v=spf1 mx a:smtp.isp.example -all"
    cfg = _cfg(tmp_path, outbound={"smarthost": "192.0.2.25"})
    spf = [r for r in records.records(cfg, "office.example") if r.what == "spf"][0]
    assert spf.value == "v=spf1 mx ip4:192.0.2.25 -all"


@pytest.mark.parametrize(("published", "expected"), [
    ({}, ["missing", "missing", "missing", "missing"]),
    ({"office.example": ["v=spf1 mx -all"], "_dmarc.office.example": ["v=DMARC1; p=reject"],
      "mail._domainkey.office.example": ["v=DKIM1; k=rsa; p=AAAA"]},
     ["missing", "ok", "differs: v=DKIM1; k=rsa; p=AAAA", "ok (p=reject)"]),
    ({"office.example": ["v=spf1 a -all", "google-site-verification=x"]},
     ["missing", "differs: v=spf1 a -all", "missing", "missing"]),
])
def test_check_states(tmp_path: Path, published: dict[str, list[str]], expected: list[str]) -> None:
    """Each record is ok, missing or differs; a stricter DMARC policy is still ok."""
    cfg = _cfg(tmp_path)
    keys.generate(cfg.dkim.keys_dir, "office.example", "mail", "rsa")

    async def txt(name: str) -> list[str]:
        return published.get(name, [])

    async def mx(name: str) -> list[str]:
        return []

    result: list[tuple[records.Record, str]] = []
    defer.ensureDeferred(records.check(cfg, "office.example", txt, mx)).addCallback(result.extend)
    assert [state for _, state in result] == expected


def test_a_long_header_list_folds_between_names(tmp_path: Path) -> None:
    """Many signed fields make h= longer than a line: it is folded after a colon, never inside a name."""
    made = [keys.generate(tmp_path, "office.example", "mail", "rsa")]
    message = b"From: j@office.example\r\nTo: a@b.example\r\n" + b"MIME-Version: 1.0\r\n" * 5 + b"\r\nbody\r\n"
    headers = sign(message, made)
    assert dkim.verify(headers + message, dnsfunc=_dns_of(*made))


@settings(max_examples=60)
@given(st.lists(st.sampled_from([
    b"To: a@b.example", b"To: c@d.example,\r\n\te@f.example", b"Cc:   spaced   out  ", b"Subject: \tfolded\r\n  twice",
    b"X-Custom: not signed", b"Received: from x by y", b"Reply-To: r@office.example", b"MIME-Version: 1.0",
    b"Content-Type: text/plain;\r\n charset=utf-8", b"DATE: Tue, 1 Dec 2026 10:00:00 +0000",
]), max_size=6), st.lists(st.sampled_from([
    b"line", b"  indented", b"trailing space   ", b"", b"\ttab\tinside", b".", b"..", b"x" * 200,
]), max_size=8), st.booleans())
def test_any_message_verifies(extra: list[bytes], body_lines: list[bytes], final_crlf: bool) -> None:
    """Folded, repeated and odd headers, empty and whitespace-heavy bodies: dkimpy verifies every one."""
    made = _FUZZ_KEYS
    head = b"From: Joe <joe@office.example>\r\n" + b"".join(h + b"\r\n" for h in extra)
    body = b"\r\n".join(body_lines) + (b"\r\n" if final_crlf and body_lines else b"")
    message = head + b"\r\n" + body
    signed = sign(message, made) + message
    for idx in range(len(made)):
        assert dkim.DKIM(signed).verify(idx=idx, dnsfunc=_dns_of(*made)), (idx, message)


_FUZZ_KEYS: list[keys.Key] = []


@pytest.fixture(autouse=True, scope="module")
def _fuzz_keys(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("fuzzkeys")
    _FUZZ_KEYS[:] = [keys.generate(folder, "office.example", "mail", "rsa"),
                     keys.generate(folder, "office.example", "mail-ed25519", "ed25519")]


def test_keys_belong_to_the_data_folders_owner(tmp_path: Path) -> None:
    """Made by root for a service user: the key and its folders take the data folder's owner."""
    if os.geteuid() != 0:
        pytest.fail("this test checks ownership changes and must run as root (as CI does)")
    data = tmp_path / "var"
    data.mkdir()
    os.chown(data, 4242, 4243)
    key = keys.generate(data / "dkim", "office.example", "mail", "rsa")
    for path in (data / "dkim", key.path.parent, key.path):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (4242, 4243), path
