"""DKIM keys on disk: generation, the DNS record of each, and loading for signing.

Format
======
``keys_dir/<domain>/<selector>.rsa.pem``: an RSA private key (2048 bits, PEM,
PKCS #1), signed with ``rsa-sha256``.  ``keys_dir/<domain>/<selector>.ed25519.key``:
an Ed25519 private key as the base64 of its 32-byte seed (RFC 8463), signed with
``ed25519-sha256``.  Files are ``0600`` and folders ``0700``: the keys are as
secret as a password.  A selector holds one key (DNS publishes one key record per
selector, and verifiers read one); several selectors may exist side by side (key
rotation).  ``[dkim] selector`` S names the RSA key that signs; the Ed25519 key
that signs beside it is selector ``S-ed25519`` (:func:`ed25519_selector`), which is
also where ``mailguard dkim keygen --algorithm ed25519`` puts it by default.  An
existing key is never overwritten.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailguard.storage import safeio

ALGORITHMS = ("rsa", "ed25519")
_SUFFIX = {"rsa": ".rsa.pem", "ed25519": ".ed25519.key"}
_NAME = re.compile(r"^(?P<selector>[a-z0-9._-]+)\.(?P<alg>rsa\.pem|ed25519\.key)$")
RSA_BITS = 2048


class KeyFileError(Exception):
    """A key that cannot be made or read; the text is one line for the admin."""


@dataclass(frozen=True)
class Key:
    """One private key: its domain, selector, algorithm and file."""

    domain: str
    selector: str
    algorithm: str          # "rsa" | "ed25519"
    path: Path

    @property
    def signature_algorithm(self) -> bytes:
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    def private(self) -> bytes:
        """The private key in the form dkimpy signs with (PEM, or the base64 seed)."""
        try:
            return self.path.read_bytes().strip()
        except OSError as e:
            raise KeyFileError(f"cannot read {self.path}: {e.strerror or e}") from None

    def public(self) -> str:
        """The public key as the ``p=`` value of the DNS record."""
        data = self.private()
        if self.algorithm == "rsa":
            key = serialization.load_pem_private_key(data, password=None)
            der = key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
            return base64.b64encode(der).decode("ascii")
        seed = base64.b64decode(data)
        pub = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def record(self) -> str:
        """The TXT record's text: ``v=DKIM1; k=rsa; p=…``."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public()}"

    def zone_line(self) -> str:
        """The record as one zone-file line (long values split into 255-octet strings)."""
        text = self.record()
        chunks = " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))
        return f"{self.selector}._domainkey.{self.domain}. IN TXT {chunks}"


def ed25519_selector(selector: str) -> str:
    """The selector of the Ed25519 key that signs beside the RSA key of ``selector``."""
    return f"{selector}-ed25519"


def signing_keys(keys_dir: Path, domain: str, selector: str) -> list[Key]:
    """The keys that sign a domain's mail: the RSA key of ``selector``, then its Ed25519 twin."""
    rsa_keys = [k for k in keys_for(keys_dir, domain, selector) if k.algorithm == "rsa"]
    ed_keys = [k for k in keys_for(keys_dir, domain, ed25519_selector(selector)) if k.algorithm == "ed25519"]
    return rsa_keys + ed_keys


def _domain_dir(keys_dir: Path, domain: str) -> Path:
    domain = domain.strip().lower().rstrip(".")
    if not domain or "/" in domain or domain.startswith(".") or not domain.isprintable():
        raise KeyFileError(f"{domain!r} is not a domain name")
    return keys_dir / domain


def keys_for(keys_dir: Path, domain: str, selector: str | None = None) -> list[Key]:
    """The keys of a domain (of one selector when given), rsa before ed25519."""
    folder = _domain_dir(keys_dir, domain)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise KeyFileError(f"cannot read {folder}: {e.strerror or e}") from None
    out = []
    for name in names:
        m = _NAME.match(name)
        if m is None:
            continue
        alg = "rsa" if m.group("alg") == "rsa.pem" else "ed25519"
        if selector is None or m.group("selector") == selector:
            out.append(Key(folder.name, m.group("selector"), alg, folder / name))
    out.sort(key=lambda k: (k.selector, ALGORITHMS.index(k.algorithm)))
    return out


def _owner(path: Path) -> tuple[int, int] | None:
    """The (uid, gid) new key files take: those of the nearest existing folder above ``path``.

    Run as root (the admin's ``mailguard dkim keygen``), the key must still be
    readable by the service user that owns the data folder.
    """
    for parent in (path, *path.parents):
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        return st.st_uid, st.st_gid
    return None


def generate(keys_dir: Path, domain: str, selector: str, algorithm: str = "rsa") -> Key:
    """Make a new key; refuses to overwrite one (rotate by choosing a new selector).

    Files and folders made here belong to the owner of the folder they are made in,
    so a key made by root for a service running as its own user is readable by it.
    """
    if algorithm not in ALGORITHMS:
        raise KeyFileError(f"algorithm must be rsa or ed25519, not {algorithm!r}")
    folder = _domain_dir(keys_dir, domain)
    if algorithm == "rsa":
        data = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption())
    else:
        seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        data = base64.b64encode(seed) + b"\n"
    path = folder / f"{selector}{_SUFFIX[algorithm]}"
    taken = keys_for(keys_dir, domain, selector)
    if taken:
        raise KeyFileError(f"selector {selector} of {domain} has a key already ({taken[0].path}); "
                           "choose another selector to rotate keys")
    owner = _owner(keys_dir)
    try:
        for d in (keys_dir, folder):
            if not d.exists():
                d.mkdir(mode=0o700, parents=True)
                if owner is not None and os.geteuid() == 0:
                    os.chown(d, *owner)
        safeio.write_new(path, data)          # 0600, fsynced; nothing left behind on failure
        if owner is not None and os.geteuid() == 0:
            os.chown(path, *owner)
        safeio.fsync_dir(folder)
    except FileExistsError:
        raise KeyFileError(f"{path} exists already; choose another selector to rotate keys") from None
    except OSError as e:
        raise KeyFileError(f"cannot write {path}: {e.strerror or e}") from None
    return Key(folder.name, selector, algorithm, path)
