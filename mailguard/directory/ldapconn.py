"""Connections to the LDAP server: TLS, binds, searches with timeouts, a small pool.

Every operation here returns a Deferred and has a deadline; a server that is
unreachable, slow, or refuses the service account fails it with
:class:`~mailguard.directory.base.DirectoryError` (a temporary failure), never with
an answer.  TLS is either LDAPS (``ldaps://``, TLS from the first byte) or StartTLS
(RFC 4511 section 4.14) before the bind; the server's certificate is verified
against ``ca_file`` (or the system's CAs) and the host name of the URL.

:class:`Pool` keeps a few connections bound as the service account and spreads
searches over them (LDAP multiplexes requests on one connection).  Connections are
opened on demand; after a failed attempt the next one waits 0.5 s, then 1, 2, 4 ...
up to ``max_backoff`` seconds, and lookups meanwhile fail at once with
DirectoryError instead of queueing.  A dropped connection is replaced at the next
lookup, so the service recovers by itself when the server comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldapclient
from twisted.internet import defer, endpoints, error, ssl
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailguard.app import maillog
from mailguard.config.ldap import LDAPConfig
from mailguard.directory.base import DirectoryError

log = Logger(namespace="mailguard")

SUCCESS, NO_SUCH_OBJECT, INVALID_CREDENTIALS = 0, 32, 49
SCOPE_BASE, SCOPE_SUBTREE = 0, 2


@dataclass(frozen=True)
class Entry:
    """One search result: its DN and attributes (names lower-cased, values as text)."""

    dn: str
    attrs: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def get(self, name: str) -> tuple[str, ...]:
        return self.attrs.get(name.lower(), ())


class BindRefused(Exception):
    """The server said invalidCredentials (49) to a bind."""


def tls_options(cfg: LDAPConfig) -> Any:
    """Client TLS options that verify the server against ``ca_file`` (or the system CAs)."""
    if cfg.ca_file is not None:
        pem = cfg.ca_file.read_bytes()
        blocks = [b"-----BEGIN CERTIFICATE-----" + part for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(b) for b in blocks])
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(cfg.host, trustRoot=trust)


def _why(problem: Failure | BaseException) -> str:
    exc = problem.value if isinstance(problem, Failure) else problem
    if isinstance(exc, (defer.TimeoutError, defer.CancelledError)):
        return "no answer in time"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    text = str(exc)
    if "certificate" in text.lower() or "SSL" in text:
        return f"TLS failed (certificate not trusted?): {text}"
    return text or type(exc).__name__


class Connection:
    """One LDAP connection (ldaptor's client) with deadlines on every request."""

    def __init__(self, client: Any, clock: Any, timeout: float) -> None:
        self.client = client
        self.clock = clock
        self.timeout = timeout

    @property
    def alive(self) -> bool:
        return bool(self.client.connected)

    def _deadline(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        def expired(failure: Failure) -> Failure:
            if isinstance(failure.value, defer.TimeoutError):
                self.abort()              # its other requests fail with it; the pool opens another
            return failure
        return d.addTimeout(self.timeout, self.clock).addErrback(expired)

    def request(self, op: Any) -> defer.Deferred[Any]:
        """Send one request; fire with the server's single response."""
        try:
            return self._deadline(self.client.send(op))
        except ldapclient.LDAPClientConnectionLostException:
            return defer.fail(DirectoryError("the LDAP connection was lost"))

    def bind(self, dn: str, password: str) -> defer.Deferred[None]:
        """A simple bind; BindRefused on invalidCredentials, DirectoryError on the rest."""
        def check(resp: Any) -> None:
            if resp.resultCode == INVALID_CREDENTIALS:
                raise BindRefused(dn)
            if resp.resultCode != SUCCESS:
                raise DirectoryError(f"bind as {dn!r} refused: {_result_text(resp)}")
        return self.request(pureldap.LDAPBindRequest(dn=dn, auth=password.encode())).addCallback(check)

    def search(self, base: str, scope: int, filt: Any, attributes: list[str]) -> defer.Deferred[list[Entry]]:
        """Every entry the search returns (none for noSuchObject)."""
        entries: list[Entry] = []
        done: defer.Deferred[list[Entry]] = defer.Deferred()

        def handle(msg: Any) -> bool:
            if isinstance(msg, pureldap.LDAPSearchResultEntry):
                attrs = {_text(k).lower(): tuple(_text(v) for v in vs) for k, vs in msg.attributes}
                entries.append(Entry(_text(msg.objectName), attrs))
                return False
            if isinstance(msg, pureldap.LDAPSearchResultReference):
                return False
            if not done.called:
                if msg.resultCode in (SUCCESS, NO_SUCH_OBJECT):
                    done.callback(entries)
                else:
                    done.errback(DirectoryError(f"search refused: {_result_text(msg)}"))
            return True

        op = pureldap.LDAPSearchRequest(baseObject=base, scope=scope, filter=filt, attributes=attributes,
                                        timeLimit=max(1, int(self.timeout)))
        try:
            sent = self.client.send_multiResponse(op, handle)
        except ldapclient.LDAPClientConnectionLostException:
            return defer.fail(DirectoryError("the LDAP connection was lost"))
        sent.addErrback(lambda f: None if done.called else done.errback(f))
        return self._deadline(done)

    def abort(self) -> None:
        transport = getattr(self.client, "transport", None)
        if transport is not None and self.client.connected:
            transport.abortConnection()

    def close(self) -> None:
        if self.client.connected:
            try:
                self.client.unbind()
            except Exception:                 # already going away
                self.abort()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _result_text(resp: Any) -> str:
    msg = _text(resp.errorMessage or b"")
    return f"result {resp.resultCode}" + (f" ({msg})" if msg else "")


async def open_connection(reactor: Any, cfg: LDAPConfig, timeout: float) -> Connection:
    """Connect, set up TLS as configured, and return the connection (not yet bound).

    :raises DirectoryError: unreachable, TLS refused or not verified, no answer in time.
    """
    endpoint: Any = endpoints.HostnameEndpoint(reactor, cfg.host, cfg.port, timeout=timeout)
    if cfg.tls == "ldaps":
        endpoint = endpoints.wrapClientTLS(tls_options(cfg), endpoint)
    try:
        d: defer.Deferred[Any] = endpoints.connectProtocol(maillog.Quiet(endpoint), ldapclient.LDAPClient())
        client = await d.addTimeout(timeout, reactor)
    except Exception as e:
        raise DirectoryError(f"{cfg.url}: {_why(e)}") from None
    conn = Connection(client, reactor, timeout)
    if cfg.tls == "starttls":
        try:
            resp = await conn.request(pureldap.LDAPStartTLSRequest())
        except Exception as e:
            conn.abort()
            raise DirectoryError(f"{cfg.url}: StartTLS: {_why(e)}") from None
        if resp.resultCode != SUCCESS:
            conn.abort()
            raise DirectoryError(f"{cfg.url}: the server refused StartTLS: {_result_text(resp)}")
        client.transport.startTLS(tls_options(cfg))
    return conn


async def bound_connection(reactor: Any, cfg: LDAPConfig, timeout: float, dn: str, password: str) -> Connection:
    """A connection bound as ``dn`` (no bind at all for an anonymous service account)."""
    conn = await open_connection(reactor, cfg, timeout)
    if not dn:
        return conn
    try:
        await conn.bind(dn, password)
    except BindRefused:
        conn.abort()
        raise DirectoryError(f"{cfg.url}: the service account {dn!r} was refused (invalid credentials)") from None
    except DirectoryError:
        conn.abort()
        raise
    except Exception as e:
        conn.abort()
        raise DirectoryError(f"{cfg.url}: bind: {_why(e)}") from None
    return conn


class Pool:
    """A few service connections, opened on demand, with backoff after failures."""

    def __init__(self, reactor: Any, cfg: LDAPConfig, *, size: int = 2, timeout: float = 10.0,
                 max_backoff: float = 15.0,
                 opener: Callable[[], defer.Deferred[Connection]] | None = None) -> None:
        self.reactor = reactor
        self.clock: Any = reactor
        self.cfg = cfg
        self.size = size
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._opener = opener or (lambda: defer.ensureDeferred(
            bound_connection(reactor, cfg, timeout, cfg.bind_dn, cfg.bind_password)))
        self._conns: list[Connection] = []
        self._opening = False
        self._waiters: list[defer.Deferred[Connection]] = []
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""
        self._turn = 0

    def search(self, base: str, scope: int, filt: Any, attributes: list[str]) -> defer.Deferred[list[Entry]]:
        """Search on a pooled connection; DirectoryError when the server cannot answer."""
        def run(conn: Connection) -> defer.Deferred[list[Entry]]:
            return conn.search(base, scope, filt, attributes).addErrback(lost, conn)

        def lost(failure: Failure, conn: Connection) -> list[Entry]:
            if not isinstance(failure.value, DirectoryError) or not conn.alive:
                conn.abort()
                self._note_failure(_why(failure), backoff=False)
                raise DirectoryError(f"{self.cfg.url}: {_why(failure)}")
            raise failure.value

        d: defer.Deferred[list[Entry]] = self.connection().addCallback(run)
        return d

    def connection(self) -> defer.Deferred[Connection]:
        """A live service connection, opening one when the pool is short of them."""
        self._conns = [c for c in self._conns if c.alive]
        now = self.clock.seconds()
        if len(self._conns) < self.size and not self._opening and now >= self._retry_at:
            self._open()
        if self._conns:
            self._turn = (self._turn + 1) % len(self._conns)
            return defer.succeed(self._conns[self._turn])
        if self._opening:
            d: defer.Deferred[Connection] = defer.Deferred()
            self._waiters.append(d)
            return d
        return defer.fail(DirectoryError(
            f"{self.cfg.url} unreachable ({self._last_error}); next attempt in {self._retry_at - now:.1f} s"))

    def _open(self) -> None:
        self._opening = True

        def opened(conn: Connection) -> None:
            self._opening = False
            if self._failures:
                log.info("mailguard ldap: {url} reachable again", url=self.cfg.url)
            self._failures = 0
            self._conns.append(conn)
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.callback(conn)

        def failed(failure: Failure) -> None:
            self._opening = False
            why = str(failure.value) if isinstance(failure.value, DirectoryError) else _why(failure)
            self._note_failure(why, backoff=True)
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.errback(DirectoryError(why))

        self._opener().addCallbacks(opened, failed)

    def _note_failure(self, why: str, backoff: bool) -> None:
        if why != self._last_error or not self._failures:
            log.error("mailguard ldap: {why}; recipients get directory_failure until it answers", why=why)
        self._last_error = why
        if backoff:
            self._failures += 1
            self._retry_at = self.clock.seconds() + min(self.max_backoff, 0.5 * 2 ** (self._failures - 1))

    def close(self) -> None:
        """Unbind and drop every connection (before twistd forks, and at shutdown)."""
        conns, self._conns = self._conns, []
        for c in conns:
            c.close()
