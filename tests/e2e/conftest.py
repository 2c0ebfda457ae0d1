"""Fixtures that start the real ``twistd -n mailguard`` (see ``harness.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from .harness import MailguardServer

#: The inbound domain most tests deliver to, and the server's own host name.
DOMAIN = "realdomain.example"
HOSTNAME = "mx.realdomain.example"

#: Client source addresses (all on loopback) and what the office configuration makes of them.
OUTSIDER = "127.0.0.5"          # in no list: may not relay
ALLOWED_HOST = "127.0.0.3"      # relay.allow names this address
ALLOWED_NET_HOST = "127.0.1.7"  # inside relay.allow's 127.0.1.0/24
NEVER_HOST = "127.0.1.66"       # inside the allowed network, but on relay.never
INTERNAL_IFACE = "127.0.0.2"    # a second smtp listener; relay.internal_addresses names it

#: A small office: two inbound domains, a reroute, a relay (partner) domain, IP rules.
OFFICE_CONFIG: dict[str, Any] = {
    "domains": {
        DOMAIN: {"route": "inbound"},
        "compaq.example": {"route": "inbound"},
        "dec.example": {"route": "reroute", "to": "compaq.example"},
        "partner.example": {"route": "relay"},
    },
    "relay": {
        "allow": ["127.0.1.0/24", ALLOWED_HOST],
        "never": [NEVER_HOST],
        "internal_addresses": [INTERNAL_IFACE],
    },
    "limits": {"max_message_size": 200000},
}

#: The directory the office server gets: mailboxes, an alias, a list.
OFFICE_USERS = ("alice@realdomain.example", "bob@realdomain.example", "joe@compaq.example")
OFFICE_ALIASES = (("sales@realdomain.example", "alice@realdomain.example"),)
OFFICE_LISTS = (("team@realdomain.example", ("alice@realdomain.example", "bob@realdomain.example")),)

ServerFactory = Callable[..., MailguardServer]


def _factory(root: Callable[[str], Path]) -> Iterator[ServerFactory]:
    servers: list[MailguardServer] = []

    def make(
        name: str,
        config: Mapping[str, Any] | None = None,
        smtp_interfaces: tuple[str, ...] = ("127.0.0.1",),
        start: bool = True,
    ) -> MailguardServer:
        server = MailguardServer(root(name), config, smtp_interfaces=smtp_interfaces, hostname=HOSTNAME)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers that live until the end of the test module."""
    yield from _factory(lambda name: tmp_path_factory.mktemp(name))


@pytest.fixture
def fresh_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers that live for one test (for tests that kill or restart them)."""
    yield from _factory(lambda name: tmp_path_factory.mktemp(name))


def populate_office(server: MailguardServer) -> None:
    """Create the office directory through the admin CLI."""
    for address in OFFICE_USERS:
        server.add_user(address)
    for alias, target in OFFICE_ALIASES:
        server.cli_ok("alias", "add", alias, target)
    for name, members in OFFICE_LISTS:
        server.cli_ok("list", "add", name, *members)


@pytest.fixture(scope="module")
def office(server_factory: ServerFactory) -> MailguardServer:
    """The office server (listening on 127.0.0.1 and 127.0.0.2) with its directory filled in."""
    server = server_factory("office", OFFICE_CONFIG, smtp_interfaces=("127.0.0.1", INTERNAL_IFACE))
    populate_office(server)
    return server
