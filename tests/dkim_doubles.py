"""DKIM test material: an RSA key pair, its DNS record, and two independent signers
(dkimpy's ``dkim.sign`` and Perl's Mail::DKIM through tests/tools/dkim-sign.pl)."""

from __future__ import annotations

import base64
import functools
import subprocess
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SIGNER_PL = Path(__file__).parent / "tools" / "dkim-sign.pl"

MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@realdomain.example\r\n"
           b"Subject: quarterly figures\r\nDate: Tue, 01 Dec 2026 05:00:00 +0000\r\n"
           b"Message-ID: <1@example.org>\r\n\r\nThe figures are attached.\r\nAlice\r\n")


def key_pair(bits: int = 2048) -> tuple[bytes, bytes]:
    """(private key PEM in PKCS #1, the TXT record ``v=DKIM1; k=rsa; p=...``), one per size."""
    return _key_pair(bits)


@functools.lru_cache(maxsize=None)
def _key_pair(bits: int) -> tuple[bytes, bytes]:
    # openssl, because cryptography refuses to make the keys under 1024 bits a test needs.
    pem = subprocess.run(["openssl", "genrsa", "-traditional", str(bits)], capture_output=True,
                         check=True, timeout=60).stdout
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def sign_dkimpy(message: bytes, domain: str = "example.org", selector: str = "sel", bits: int = 2048) -> bytes:
    """``message`` with a DKIM-Signature made by dkimpy."""
    pem, _ = key_pair(bits)
    signature = dkim.sign(message, selector.encode(), domain.encode(), pem,
                          include_headers=[b"from", b"to", b"subject", b"date"])
    return signature + message


def sign_perl(message: bytes, key_file: Path, domain: str = "example.org", selector: str = "sel") -> bytes:
    """``message`` with a DKIM-Signature made by Perl's Mail::DKIM (a missing perl/module fails)."""
    pem, _ = key_pair()
    key_file.write_bytes(pem)
    done = subprocess.run(["perl", str(SIGNER_PL), domain, selector, str(key_file)], input=message,
                          capture_output=True, timeout=60, check=True)
    return done.stdout
