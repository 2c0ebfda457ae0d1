"""A real OpenLDAP ``slapd`` for the tests: a free loopback port, a generated slapd.conf.

:class:`Slapd` writes a ``slapd.conf`` (mdb backend; the stock core, cosine,
inetorgperson and misc schemas, ``misc`` giving ``mailLocalAddress``; for ``ad`` a
small extra schema with ``user``/``group``/``contact``, ``proxyAddresses`` matched
case-insensitively, ``userAccountControl``, ``msExchHideFromAddressLists``,
``targetAddress``), loads LDIF with ``slapadd`` and runs ``slapd -d 0`` in the
foreground on ``ldap://127.0.0.1:PORT`` and ``ldaps://127.0.0.1:PORT2`` with a
certificate from a test CA (trustme).  A missing slapd makes the test fail.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import trustme

SUFFIX = "dc=realdomain,dc=example"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "rootsecret"
SERVICE_DN = f"cn=mailguard,ou=services,{SUFFIX}"
SERVICE_PW = "service secret"
SCHEMAS = ("core", "cosine", "inetorgperson", "misc")

AD_SCHEMA = """
attributetype ( 1.3.6.1.4.1.55555.1.1 NAME 'proxyAddresses'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.3.6.1.4.1.55555.1.2 NAME 'userAccountControl'
    EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.3 NAME 'msExchHideFromAddressLists'
    EQUALITY booleanMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.7 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.4 NAME 'targetAddress'
    EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.5 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.6 NAME 'memberOf'
    EQUALITY distinguishedNameMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )
objectclass ( 1.3.6.1.4.1.55555.2.1 NAME 'user' SUP organizationalPerson STRUCTURAL
    MAY ( mail $ proxyAddresses $ userAccountControl $ msExchHideFromAddressLists $
          sAMAccountName $ memberOf ) )
objectclass ( 1.3.6.1.4.1.55555.2.2 NAME 'group' SUP top STRUCTURAL MUST cn
    MAY ( member $ mail $ proxyAddresses $ sAMAccountName $ msExchHideFromAddressLists $ memberOf ) )
objectclass ( 1.3.6.1.4.1.55555.2.3 NAME 'contact' SUP organizationalPerson STRUCTURAL
    MAY ( mail $ proxyAddresses $ targetAddress $ msExchHideFromAddressLists $ memberOf ) )
"""

BASE_LDIF = f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: Real Domain
dc: realdomain

dn: ou=services,{SUFFIX}
objectClass: organizationalUnit
ou: services

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: mailguard
userPassword: {SERVICE_PW}

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{SUFFIX}
objectClass: organizationalUnit
ou: groups
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    for folder in ("/usr/sbin", "/usr/bin", "/usr/local/sbin"):
        if Path(folder, name).is_file():
            return str(Path(folder, name))
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed (Debian: apt-get install slapd ldap-utils)")
    return found


class Slapd:
    """One slapd with its own database folder; ``start``/``stop`` keep the data."""

    def __init__(self, root: Path, ldif: str, *, ad: bool = False) -> None:
        self.root = root
        self.port = free_port()
        self.tls_port = free_port()
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        root.mkdir(parents=True, exist_ok=True)
        (root / "db").mkdir(exist_ok=True)
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(root / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
        includes = [f"include /etc/ldap/schema/{s}.schema" for s in SCHEMAS]
        if ad:
            (root / "ad.schema").write_text(AD_SCHEMA)
            includes.append(f"include {root / 'ad.schema'}")
        (root / "slapd.conf").write_text("\n".join(includes) + f"""
pidfile {root / 'slapd.pid'}
argsfile {root / 'slapd.args'}
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {self.ca_file}
TLSCertificateFile {root / 'cert.pem'}
TLSCertificateKeyFile {root / 'key.pem'}
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {root / 'db'}
index objectClass eq
index mail,mailLocalAddress eq
access to attrs=userPassword by anonymous auth by self write by * none
access to * by * read
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.slapadd(BASE_LDIF + "\n" + ldif)

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def slapadd(self, ldif: str) -> None:
        path = self.root / "load.ldif"
        path.write_text(ldif)
        result = subprocess.run([_binary("slapadd"), "-f", str(self.root / "slapd.conf"), "-l", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"slapadd failed: {result.stderr}"

    def start(self) -> Slapd:
        log = open(self.root / "slapd.log", "ab")
        self.proc = subprocess.Popen(
            [_binary("slapd"), "-d", "0", "-f", str(self.root / "slapd.conf"),
             "-h", f"{self.url}/ {self.ldaps_url}/"], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"slapd exited: {(self.root / 'slapd.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("slapd did not start listening within 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def ldapadd(self, ldif: str) -> None:
        """Add entries through the running server, as an administrator would."""
        result = subprocess.run(
            [_binary("ldapadd"), "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PW],
            input=ldif, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"ldapadd failed: {result.stderr}"


def person(uid: str, mail: str, password: str = "", aliases: tuple[str, ...] = (), ou: str = "people") -> str:
    """LDIF for an inetOrgPerson mailbox (or contact, when ``mail`` is remote)."""
    lines = [f"dn: uid={uid},ou={ou},{SUFFIX}", "objectClass: inetOrgPerson"]
    if aliases:
        lines.append("objectClass: inetLocalMailRecipient")
    lines += [f"uid: {uid}", f"cn: {uid}", f"sn: {uid}", f"mail: {mail}"]
    lines += [f"mailLocalAddress: {a}" for a in aliases]
    if password:
        lines.append(f"userPassword: {password}")
    return "\n".join(lines) + "\n\n"


def group(cn: str, mail: str, members: tuple[str, ...]) -> str:
    """LDIF for a groupOfNames distribution list; ``members`` are DNs."""
    lines = [f"dn: cn={cn},ou=groups,{SUFFIX}", "objectClass: groupOfNames", "objectClass: extensibleObject",
             f"cn: {cn}", f"mail: {mail}"] + [f"member: {m}" for m in members]
    return "\n".join(lines) + "\n\n"


def dn_of(uid: str) -> str:
    return f"uid={uid},ou=people,{SUFFIX}"


def group_dn(cn: str) -> str:
    return f"cn={cn},ou=groups,{SUFFIX}"


def ad_user(cn: str, mail: str, proxies: tuple[str, ...], password: str = "", uac: int = 512,
            hidden: bool = False) -> str:
    """LDIF for an AD-like user object (``uac`` 514 = disabled)."""
    lines = [f"dn: cn={cn},ou=people,{SUFFIX}", "objectClass: user", f"cn: {cn}", f"sn: {cn}",
             f"sAMAccountName: {cn}", f"mail: {mail}", f"userAccountControl: {uac}"]
    lines += [f"proxyAddresses: {p}" for p in proxies]
    if password:
        lines.append(f"userPassword: {password}")
    if hidden:
        lines.append("msExchHideFromAddressLists: TRUE")
    return "\n".join(lines) + "\n\n"
