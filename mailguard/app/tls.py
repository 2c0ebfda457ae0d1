"""TLS for every listener: the certificate from ``[tls]``, or a self-signed pair made once.

With no ``[tls] certificate``, a self-signed certificate and key are generated on
first start under ``data_dir/tls/`` (so STARTTLS and AUTH work out of the box) and
reused afterwards.  Only TLS 1.2 and newer are offered (RFC 8996, RFC 8314), and
TLS 1.2 only with the AEAD suites of Mozilla's "intermediate" profile.

:class:`TLSContext` is handed to ``transport.startTLS`` and to implicit-TLS
listeners; on SIGHUP the reload (:mod:`mailguard.app.reload`) reads the files again
through :meth:`TLSContext.staged` and :meth:`TLSContext.use`, and new connections use
the new certificate without a restart.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer
from twisted.logger import Logger

from mailguard.config import Config

log = Logger()


def generate_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """Write a self-signed EC P-256 certificate for ``hostname`` (valid ten years)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def paths_for(cfg: Config) -> tuple[Path, Path]:
    """The certificate and key ``cfg`` uses; a self-signed pair is made once when it names none."""
    if cfg.tls.certificate is not None and cfg.tls.key is not None:
        return cfg.tls.certificate, cfg.tls.key
    tls_dir = cfg.server.data_dir / "tls"
    cert_path, key_path = tls_dir / "cert.pem", tls_dir / "key.pem"
    if not (cert_path.is_file() and key_path.is_file()):
        generate_self_signed(cert_path, key_path, cfg.server.hostname)
    return cert_path, key_path


#: TLS 1.2 suites of Mozilla's "intermediate" profile (v5.7): ECDHE or DHE, AEAD only — no
#: CBC, no SHA-1 MACs, no RSA key exchange.  TLS 1.3 suites are all modern and stay as they are.
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


def _options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """TLS 1.2+ server options for one certificate (chain) and key file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    pem = cert_path.read_bytes()
    chain = x509.load_pem_x509_certificates(pem)
    private = load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(private, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
                                ed448.Ed448PrivateKey, dsa.DSAPrivateKey)):
        raise ValueError(f"{key_path}: a {type(private).__name__} cannot sign for TLS")
    # The cryptography objects go to OpenSSL as they are (Twisted hands them to
    # pyOpenSSL untouched, whose X509/PKey wrappers are deprecated: a
    # DeprecationWarning at every handshake); Twisted's annotations still say X509.
    certs: list[Any] = list(chain)
    key: Any = private
    return ssl.CertificateOptions(privateKey=key, certificate=certs[0], extraCertChain=certs[1:],
                                  raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
                                  acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(
                                      INTERMEDIATE_CIPHERS))


@implementer(IOpenSSLServerConnectionCreator)
class TLSContext:
    """The server-side TLS settings, reloadable; a connection creator for Twisted's TLS."""

    def __init__(self, cfg: Config) -> None:
        self.cert_path, self.key_path = paths_for(cfg)
        self._options = self._load()

    def staged(self, cfg: Config) -> tuple[Path, Path, ssl.CertificateOptions]:
        """The certificate ``cfg`` names, loaded but not yet used (a reload's first step).

        :raises OSError, ValueError, SSL.Error: the files cannot be read or used.
        """
        cert, key = paths_for(cfg)
        return cert, key, _options(cert, key)

    def use(self, staged: tuple[Path, Path, ssl.CertificateOptions]) -> None:
        """New connections get the certificate :meth:`staged` loaded."""
        self.cert_path, self.key_path, self._options = staged

    def _load(self) -> ssl.CertificateOptions:
        return _options(self.cert_path, self.key_path)

    def reload(self) -> None:
        """Read the certificate and key again; on error keep the old ones and log it."""
        try:
            self._options = self._load()
        except (OSError, ValueError, SSL.Error) as e:
            log.error("mailguard tls: reload of {cert} failed, keeping the old certificate: {err}",
                      cert=str(self.cert_path), err=str(e))
        else:
            log.info("mailguard tls: certificate reloaded from {cert}", cert=str(self.cert_path))

    def getContext(self) -> SSL.Context:
        """The current OpenSSL context."""
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A server-side OpenSSL connection with the current certificate."""
        return self._options.serverConnectionForTLS(tlsProtocol)

    def options(self) -> "TLSContext":
        """What ``transport.startTLS`` and implicit-TLS listeners take."""
        return self
