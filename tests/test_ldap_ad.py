"""schema = "ad": Active Directory objects, served by a slapd with a small AD-like schema."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailguard.config import ldap as ldap_config
from mailguard.directory.base import Expansion
from mailguard.directory.ldap import LDAPDirectory

from ldap_server import SERVICE_DN, SERVICE_PW, SUFFIX, Slapd, ad_user

D = "realdomain.example"


LDIF = (
    ad_user("John Doe", f"jdoe@{D}", (f"SMTP:John.Doe@{D}", f"smtp:jdoe@{D}", f"smtp:JD@{D}",
                                          "X400:c=US;a= ;p=Real;o=Exchange;s=Doe;g=John;"), "john pw")
    + ad_user("Shared Desk", f"desk@{D}", (f"SMTP:desk@{D}",), "desk pw", uac=514)
    + ad_user("Hidden Boss", f"boss@{D}", (f"SMTP:boss@{D}",), "boss pw", hidden=True)
    + f"""dn: cn=Partner Pat,ou=people,{SUFFIX}
objectClass: contact
cn: Partner Pat
sn: Pat
mail: pat@partner.example
proxyAddresses: smtp:pat@{D}
targetAddress: SMTP:pat@partner.example

dn: cn=Desk Group,ou=groups,{SUFFIX}
objectClass: group
cn: Desk Group
member: cn=Shared Desk,ou=people,{SUFFIX}
member: cn=Staff,ou=groups,{SUFFIX}

dn: cn=Staff,ou=groups,{SUFFIX}
objectClass: group
cn: Staff
mail: staff@{D}
proxyAddresses: SMTP:staff@{D}
proxyAddresses: smtp:everyone@{D}
member: cn=John Doe,ou=people,{SUFFIX}
member: cn=Hidden Boss,ou=people,{SUFFIX}
member: cn=Partner Pat,ou=people,{SUFFIX}
member: cn=Desk Group,ou=groups,{SUFFIX}

"""
)


@pytest.fixture(scope="module")
def ad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LDAPDirectory]:
    server = Slapd(tmp_path_factory.mktemp("ad"), LDIF, ad=True).start()

    def fail(key: str, message: str) -> Exception:
        return AssertionError(f"{key}: {message}")
    cfg = ldap_config.parse({"url": server.url, "ca_file": str(server.ca_file), "base": SUFFIX,
                             "bind_dn": SERVICE_DN, "bind_password": SERVICE_PW, "schema": "ad"},
                            fail, Path("/"), required=True)
    directory = LDAPDirectory(cfg, reactor, [D], timeout=5)
    yield directory
    directory.close()
    server.stop()


@pytest_twisted.ensureDeferred
async def test_proxy_addresses_primary_and_secondaries(ad: LDAPDirectory) -> None:
    """SMTP: is the mailbox (its maildir), even where mail differs; smtp: secondaries reach it, in any case."""
    john = Expansion(mailboxes=(f"john.doe@{D}",))
    for address in (f"john.doe@{D}", f"JDOE@{D}", f"jd@{D.upper()}"):
        assert await ad.expand(address) == john, address
    assert await ad.addresses_of(f"john.doe@{D}") == frozenset({f"john.doe@{D}", f"jdoe@{D}", f"jd@{D}"})
    assert await ad.expand(f"x400@{D}") is None


@pytest_twisted.ensureDeferred
async def test_contacts_groups_and_hidden_entries(ad: LDAPDirectory) -> None:
    """A contact forwards to targetAddress; groups nest (loop included); hidden users still get mail."""
    assert await ad.expand(f"pat@{D}") == Expansion(others=("pat@partner.example",))
    assert await ad.expand(f"boss@{D}") == Expansion(mailboxes=(f"boss@{D}",))
    staff = await ad.expand(f"everyone@{D}")
    assert staff is not None
    assert sorted(staff.mailboxes) == [f"boss@{D}", f"desk@{D}", f"john.doe@{D}"]
    assert staff.others == ("pat@partner.example",)


@pytest_twisted.ensureDeferred
async def test_disabled_accounts_cannot_log_in(ad: LDAPDirectory) -> None:
    """userAccountControl bit 2: no login even with the right password; mail still delivered."""
    assert await ad.verify_password(f"jdoe@{D}", "john pw") == f"john.doe@{D}"
    assert await ad.verify_password(f"jdoe@{D}", "wrong") is None
    assert await ad.verify_password(f"desk@{D}", "desk pw") is None
    assert await ad.expand(f"desk@{D}") == Expansion(mailboxes=(f"desk@{D}",))
    assert await ad.verify_password(f"boss@{D}", "boss pw") == f"boss@{D}"
