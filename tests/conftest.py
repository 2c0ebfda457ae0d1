"""Unit-test fixtures: configurations, a fake directory, and a fake SMTPContext for SMTP sessions.

Nothing here starts a reactor or opens a socket: the SMTP server under test talks to a
``StringTransport``, time is a ``task.Clock``, and the store and authenticator hand out
Deferreds the test fires itself.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
from hypothesis import HealthCheck, settings
from twisted.internet import defer, interfaces, protocol, ssl, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import directlyProvides

from mailguard import config
from mailguard.app.tls import TLSContext
from mailguard.auth.authenticator import PopBeforeSmtp
from mailguard.smtp.context import SMTPContext
from mailguard.directory.base import DirectoryError
from mailguard.core.entries import Expansion

settings.register_profile("mailguard", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mailguard")

# When a property test fails, hypothesis's pytest plugin imports its patch writer, which
# pulls in libcst (when installed) and with it a DeprecationWarning from mypy_extensions;
# under -W error that turns the report of the real failure into an INTERNALERROR.  Import
# it once here, warnings silenced, so a failure is reported as itself.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass


def make_config(tmp: Path | None = None, **sections: Any) -> config.Config:
    """A validated Config from section tables, as if read from ``tmp/mailguard.toml``."""
    base = tmp or Path("/nonexistent-mailguard-test")
    return config.parse(sections, str(base / "mailguard.toml"), base)


OFFICE: dict[str, Any] = {
    "server": {"hostname": "mx.office.example"},
    "domains": {
        "office.example": {"route": "inbound"},
        "compaq.example": {"route": "inbound"},
        "dec.example": {"route": "reroute", "to": "compaq.example"},
        "oldname.example": {"route": "reroute", "to": "faraway.example"},
        "partner.example": {"route": "relay"},
    },
    "relay": {
        "allow": ["192.168.10.0/24", "10.1.2.3", "2001:db8::/32"],
        "never": ["192.168.10.66"],
        "internal_addresses": ["10.9.9.9"],
        "pop_before_smtp": 600,
    },
}


def office_config(**changes: dict[str, Any]) -> config.Config:
    """The office configuration with some keys of some sections changed."""
    data = copy.deepcopy(OFFICE)
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    return make_config(**data)


@pytest.fixture
def office_cfg() -> config.Config:
    """The small office of these tests: two inbound domains, reroutes, a relay domain, IP rules."""
    return make_config(**OFFICE)


class FakeDirectory:
    """An in-memory GAL implementing the Directory interface (Deferreds fired at once).

    ``entries`` maps an address to an Expansion; ``owned`` maps a mailbox to its own
    addresses; ``broken`` makes every lookup fail with DirectoryError; ``hold`` keeps
    each expand() Deferred in ``held`` for the test to fire.  ``lookup`` is the
    blocking form (for :func:`mailguard.core.policy.settle`).
    """

    def __init__(self, entries: dict[str, Expansion] | None = None,
                 owned: dict[str, set[str]] | None = None) -> None:
        self.entries = entries if entries is not None else {}
        self.owned = owned if owned is not None else {}
        self.broken = False
        self.hold = False
        self.held: list[defer.Deferred[Expansion | None]] = []
        self.lookups: list[str] = []
        self.own_quotas: dict[str, int] = {}

    def add_mailbox(self, address: str, *aliases: str) -> None:
        self.entries[address] = Expansion(mailboxes=(address,))
        for alias in aliases:
            self.entries[alias] = Expansion(mailboxes=(address,))
        self.owned[address] = {address, *aliases}

    def lookup(self, address: str) -> Expansion | None:
        self.lookups.append(address)
        if self.broken:
            raise DirectoryError("directory locked")
        return self.entries.get(address.lower())

    def expand(self, address: str) -> defer.Deferred[Expansion | None]:
        if self.hold:
            d: defer.Deferred[Expansion | None] = defer.Deferred()
            self.held.append(d)
            return d
        return defer.maybeDeferred(self.lookup, address)

    def verify_password(self, login: str, password: str) -> defer.Deferred[str | None]:
        return defer.succeed(None)

    def addresses_of(self, mailbox: str) -> defer.Deferred[frozenset[str]]:
        if self.broken:
            return defer.fail(DirectoryError("directory locked"))
        return defer.succeed(frozenset(self.owned.get(mailbox, {mailbox})))

    def quotas(self, mailboxes: tuple[str, ...]) -> defer.Deferred[dict[str, int]]:
        if self.broken:
            return defer.fail(DirectoryError("directory locked"))
        return defer.succeed({m: self.own_quotas[m] for m in mailboxes if m in self.own_quotas})

    def close(self) -> None:
        pass


@dataclass
class StoreCall:
    msg_id: str
    sender: str
    decisions: list[Any]
    received: bytes
    message: bytes
    deferred: defer.Deferred = field(default_factory=defer.Deferred)
    held: str = ""


class FakeStore:
    """Records each store() call; ``auto`` fires it at once with success (or ``fail``)."""

    def __init__(self) -> None:
        self.calls: list[StoreCall] = []
        self.auto = True
        self.fail = False

    def store(self, msg_id: str, sender: str, decisions: Any, received: bytes, message: bytes,
              held: str = "") -> defer.Deferred:
        call = StoreCall(msg_id, sender, list(decisions), received, message, held=held)
        self.calls.append(call)
        if self.auto:
            if self.fail:
                call.deferred.errback(OSError(28, "No space left on device"))
            else:
                call.deferred.callback("queued")
        return call.deferred


class FakeAuthenticator:
    """check() answers from ``users`` (login -> (password, mailbox)); ``outcome`` overrides.

    ``outcome`` may be an Exception instance (errback) or ``"pending"`` (a Deferred the
    test fires from ``pending``).
    """

    def __init__(self) -> None:
        self.users: dict[str, tuple[str, str]] = {}
        self.outcome: Any = None
        self.calls: list[tuple[str, str, str, str]] = []
        self.pending: list[defer.Deferred] = []

    def check(self, login: str, password: str, client_ip: str, service: str) -> defer.Deferred:
        self.calls.append((login, password, client_ip, service))
        if isinstance(self.outcome, Exception):
            return defer.fail(self.outcome)
        if self.outcome == "pending":
            d: defer.Deferred = defer.Deferred()
            self.pending.append(d)
            return d
        found = self.users.get(login.lower())
        return defer.succeed(found[1] if found and found[0] == password else None)


HOSTNAME = "mx.office.example"


@functools.lru_cache(maxsize=1)
def server_tls() -> TLSContext:
    """mailguard's own TLSContext with a self-signed certificate for mx.office.example (made once)."""
    folder = Path(tempfile.mkdtemp(prefix="mailguard-test-tls-"))
    return TLSContext(make_config(folder, server={"hostname": HOSTNAME, "data_dir": str(folder)}))


class Plaintext(protocol.Protocol):
    """What the client side of a TLS session reads, decrypted."""

    def __init__(self) -> None:
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class TLSCapableTransport(StringTransport):
    """A StringTransport that can really start TLS.

    Before ``startTLS`` the server's writes collect in the StringTransport as usual.
    ``startTLS`` puts a server-side TLS layer (Twisted's ``TLSMemoryBIOProtocol``, with
    the options the server passed) between the protocol and the wire, as the TCP
    transport does; from then on the server's writes are encrypted into ``cipher``,
    and :class:`Session` speaks TLS to it through a client-side layer that trusts
    :func:`server_tls`'s certificate.  ``encrypted=True`` stands in for an
    implicit-TLS listener (the transport just provides ISSLTransport).
    """

    def __init__(self, *args: Any, encrypted: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_started: list[Any] = []
        self.protocol: protocol.Protocol | None = None        # set by Session
        self.tls_layer: TLSMemoryBIOProtocol | None = None
        self.cipher = StringTransport()
        if encrypted:
            directlyProvides(self, interfaces.ISSLTransport)

    def startTLS(self, options: Any) -> None:
        self.tls_started.append(options)
        factory = TLSMemoryBIOFactory(options, False, None)
        self.tls_layer = TLSMemoryBIOProtocol(factory, self.protocol, False)
        directlyProvides(self, interfaces.ISSLTransport)
        self.tls_layer.makeConnection(self.cipher)

    def write(self, data: bytes) -> None:
        if self.tls_layer is not None:
            self.tls_layer.write(data)
        else:
            super().write(data)


@dataclass
class FakeContext(SMTPContext):
    """An SMTPContext with fakes behind it (the config is the only thing to give)."""

    cfg: config.Config
    clock: task.Clock = field(default_factory=task.Clock)
    directory: FakeDirectory = field(default_factory=FakeDirectory)
    store: FakeStore = field(default_factory=FakeStore)
    authenticator: FakeAuthenticator = field(default_factory=FakeAuthenticator)
    tls: Any = field(default_factory=server_tls)
    limiter: Any = None
    pop_before_smtp: Any = None

    def __post_init__(self) -> None:
        from mailguard.app.limits import ConnectionLimiter
        if self.limiter is None:
            lm = self.cfg.limits
            self.limiter = ConnectionLimiter(lm.max_connections, lm.max_connections_per_ip)
        if self.pop_before_smtp is None:
            self.pop_before_smtp = PopBeforeSmtp(self.clock, self.cfg.relay.pop_before_smtp)
        super().__post_init__()


class Session:
    """One SMTPServer on a StringTransport, with helpers to talk and read replies."""

    def __init__(self, host: FakeContext, kind: str = "smtp", client_ip: str = "203.0.113.9",
                 local_ip: str = "10.0.0.1", encrypted: bool = False) -> None:
        from mailguard.smtp.server import SMTPServer
        self.host = host
        self.proto = SMTPServer(host, kind)
        self.transport = TLSCapableTransport(
            hostAddress=IPv4Address("TCP", local_ip, 25),
            peerAddress=IPv4Address("TCP", client_ip, 40000),
            encrypted=encrypted)
        self.transport.protocol = self.proto
        self.proto.makeConnection(self.transport)
        self._seen = 0
        self.plaintext = Plaintext()
        self.client_wire = StringTransport()
        self.client_tls: TLSMemoryBIOProtocol | None = None

    def send(self, data: bytes | str) -> None:
        """Write raw bytes (or text) to the server exactly as given (encrypted after STARTTLS)."""
        raw = data.encode() if isinstance(data, str) else data
        if self.transport.tls_layer is None:
            self.proto.dataReceived(raw)
            return
        if self.closed:
            return                  # the server hung up: nothing more reaches it, or comes back
        if self.client_tls is None:
            trust = ssl.Certificate.loadPEM(server_tls().cert_path.read_bytes())
            factory = TLSMemoryBIOFactory(ssl.optionsForClientTLS(HOSTNAME, trustRoot=trust), True, None)
            self.client_tls = TLSMemoryBIOProtocol(factory, self.plaintext)
            self.client_tls.makeConnection(self.client_wire)
        self.client_tls.write(raw)
        self.pump()

    def pump(self) -> None:
        """Carry TLS records both ways until neither side has anything more to say."""
        assert self.transport.tls_layer is not None and self.client_tls is not None
        while True:
            to_server, to_client = self.client_wire.value(), self.transport.cipher.value()
            if not to_server and not to_client:
                return
            self.client_wire.clear()
            self.transport.cipher.clear()
            if to_server:
                self.transport.tls_layer.dataReceived(to_server)
            if to_client:
                self.client_tls.dataReceived(to_client)

    @property
    def handshake_done(self) -> bool:
        """True once the client side of STARTTLS has verified the server and finished the handshake."""
        return self.client_tls is not None and self.client_tls._handshakeDone

    def raw_output(self) -> bytes:
        """Everything the server wrote: the cleartext part, then what the client decrypted."""
        return self.transport.value() + bytes(self.plaintext.received)

    def output(self) -> str:
        return self.raw_output().decode("utf-8", "replace")

    def lines(self) -> list[str]:
        """Every reply line written so far."""
        return self.output().split("\r\n")[:-1]

    def new_lines(self) -> list[str]:
        """The reply lines written since the last call."""
        all_lines = self.lines()
        out, self._seen = all_lines[self._seen:], len(all_lines)
        return out

    def cmd(self, line: str) -> list[str]:
        """Send one command line (CRLF added) and return the reply lines it produced."""
        self.new_lines()
        self.send(line + "\r\n")
        return self.new_lines()

    def codes(self) -> list[str]:
        """The three-digit codes of the final line of each reply, in order (continuations skipped)."""
        return [ln[:3] for ln in self.lines() if ln[3:4] == " "]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """Deliver connectionLost, as the reactor does after loseConnection()."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        self.proto.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def ctx(office_cfg: config.Config) -> FakeContext:
    """A FakeContext for the office configuration, with alice and a list in the directory."""
    host = FakeContext(office_cfg)
    host.directory.add_mailbox("alice@office.example", "a.smith@office.example")
    host.directory.add_mailbox("joe@compaq.example")
    host.authenticator.users["alice@office.example"] = ("secret", "alice@office.example")
    return host


@pytest.fixture
def session_factory(ctx: FakeContext) -> Callable[..., Session]:
    """Open SMTP sessions on the shared fake context."""
    def open_session(**kwargs: Any) -> Session:
        return Session(ctx, **kwargs)
    return open_session


class LogCapture:
    """The log events emitted while a test runs, readable as formatted lines."""

    def __init__(self, events: Sequence[LogEvent]) -> None:
        self.events = events

    def lines(self) -> list[str]:
        return [formatEvent(e) or "" for e in self.events]

    def matching(self, needle: str) -> list[str]:
        return [t for t in self.lines() if needle in t]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Capture every log event emitted while the test runs."""
    with capturedLogs() as events:
        yield LogCapture(events)


@pytest.fixture(autouse=True)
def fresh_auth_log_budget() -> Iterator[None]:
    """Each test starts with an empty failed-login log budget (it is per process)."""
    from mailguard.app import maillog
    maillog.AUTH_LINES._windows.clear()
    yield
