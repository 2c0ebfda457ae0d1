"""Loopback stand-ins for the outside world of outbound mail: a DNS server and an SMTP sink.

The server under test is a separate ``twistd`` process, so both doubles run as
threads inside the test process on free loopback ports, with blocking sockets and no
reactor (the e2e tests never run one):

- :class:`DNSServer` answers MX / A / AAAA / TXT / PTR questions over UDP from a small zone
  (RFC 1035); the wire format is encoded and decoded with ``twisted.names.dns.Message``,
  which is plain code with no reactor behind it.  Names outside the zone get NXDOMAIN;
  names in the zone without the asked type get an empty NOERROR answer; a name whose
  records include ``("SERVFAIL", None)`` gets SERVFAIL (RCODE 2) for every question.
- :class:`SMTPSink` is the remote host (or the smarthost): an ESMTP server
  (RFC 5321) that records every message it accepted, answers RCPT as each test
  scripts it, can offer STARTTLS (RFC 3207) and require AUTH PLAIN/LOGIN (RFC 4954),
  and can hold its answer to the final dot until the test releases it.

A message counts as received only once the sink has answered ``250`` to its final
dot, like any MTA: a client that goes away before that answer did not deliver.
"""

from __future__ import annotations

import base64
import select
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from twisted.names import dns

from .harness import wait_for

#: A zone record: ("MX", (preference, exchange)), ("A", "127.0.0.1"), ("AAAA", "::1"),
#: ("TXT", "text") (split into 255-octet strings), ("PTR", "name") or ("SERVFAIL", None).
Record = tuple[str, object]


#: The one polling helper of the end-to-end tests, under the name the sink tests use.
wait_until = wait_for


# --------------------------------------------------------------------------- DNS


class DNSServer:
    """A UDP DNS server on ``127.0.0.1:<free port>`` answering from ``zone``.

    :param zone: owner name (no trailing dot, any case) -> its records.
    """

    def __init__(self, zone: Mapping[str, Iterable[Record]]) -> None:
        self._lock = threading.Lock()
        self._zone = {name.lower().rstrip("."): list(records) for name, records in zone.items()}
        self.questions: list[tuple[str, str]] = []
        #: questions this server could not answer (a test double's own failure)
        self.errors: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="e2e-dns", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``"127.0.0.1:<port>"``, as ``[outbound] dns_servers`` takes it."""
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, records: Iterable[Record]) -> None:
        """Replace the records of ``name``."""
        with self._lock:
            self._zone[name.lower().rstrip(".")] = list(records)

    def asked(self, name: str) -> list[str]:
        """The record types asked for ``name`` so far (``"MX"``, ``"A"``, ...)."""
        with self._lock:
            return [qtype for qname, qtype in self.questions if qname == name.lower()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                answer = self._answer(data)
            except Exception as e:  # noqa: BLE001 - kept for the test to see, no answer sent
                with self._lock:
                    self.errors.append(repr(e))
                continue
            try:
                self._sock.sendto(answer, peer)
            except OSError:
                continue

    def _answer(self, data: bytes) -> bytes:
        query = dns.Message()
        query.fromStr(data)
        response = dns.Message(id=query.id, answer=1, opCode=query.opCode, auth=1,
                               recDes=query.recDes, recAv=0)
        response.queries = query.queries
        for q in query.queries:
            name = q.name.name.decode("ascii", "replace").lower().rstrip(".")
            qtype = dns.QUERY_TYPES.get(q.type, str(q.type))
            with self._lock:
                self.questions.append((name, qtype))
                records = self._zone.get(name)
            if records is None:
                response.rCode = dns.ENAME
                continue
            if any(kind == "SERVFAIL" for kind, _ in records):
                response.rCode = dns.ESERVER
                continue
            for kind, value in records:
                if kind != qtype:
                    continue
                payload: object
                if kind == "MX":
                    preference, exchange = value  # type: ignore[misc]
                    payload = dns.Record_MX(preference, exchange.encode("ascii"), ttl=1)
                elif kind == "A":
                    payload = dns.Record_A(str(value), ttl=1)
                elif kind == "AAAA":
                    payload = dns.Record_AAAA(str(value), ttl=1)
                elif kind == "PTR":
                    payload = dns.Record_PTR(str(value).encode("ascii"), ttl=1)
                elif kind == "TXT":
                    text = str(value).encode("utf-8")
                    payload = dns.Record_TXT(*[text[i:i + 255] for i in range(0, len(text), 255)], ttl=1)
                else:
                    raise ValueError(f"record type {kind} is not served here")
                response.answers.append(dns.RRHeader(q.name.name, q.type, dns.IN, 1, payload, auth=True))
        return bytes(response.toStr())


# --------------------------------------------------------------------------- TLS


#: The throw-away certificate authority that signs every sink's certificate.  It is in no
#: trust store: a client verifies a sink only when told to trust this CA
#: (``[outbound] tls_ca_file`` = :func:`ca_file`).
TEST_CA = trustme.CA()


def ca_file(folder: Path) -> Path:
    """:data:`TEST_CA`'s certificate as a PEM file in ``folder``."""
    path = folder / "test-ca.pem"
    TEST_CA.cert_pem.write_to_path(str(path))
    return path


def issued_pair(folder: Path, names: Iterable[str]) -> tuple[Path, Path]:
    """A certificate for ``names`` (host names or IP addresses) signed by :data:`TEST_CA`."""
    issued = TEST_CA.issue_cert(*names)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert_path))
    issued.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


# --------------------------------------------------------------------------- SMTP sink


@dataclass
class Received:
    """One message the sink accepted (answered 250 to its final dot)."""

    sender: str
    recipients: list[str]
    data: bytes  #: the message as transmitted, dot-stuffing removed, CRLF line endings
    helo: str
    tls: bool
    auth_user: str | None
    mail_params: str  #: what followed ``MAIL FROM:<...>`` (e.g. `` SIZE=1234``)


@dataclass
class SinkState:
    """Everything the sink saw; read it through :class:`SMTPSink`, which holds the lock."""

    messages: list[Received] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    connections: int = 0
    abandoned: int = 0  #: sessions whose client left while the final answer was held


class _Closed(Exception):
    """The client went away."""


class _Wire:
    """CRLF lines over a socket that may switch to TLS."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket = sock
        self.buffer = b""

    def readline(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if len(self.buffer) > 1 << 20:
                raise _Closed("line too long")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed("end of stream")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode("utf-8") + b"\r\n")

    def peer_left(self) -> bool:
        """True when the client closed the connection (checked without blocking)."""
        if isinstance(self.sock, ssl.SSLSocket):
            readable = self.sock.pending() > 0 or bool(select.select([self.sock], [], [], 0)[0])
        else:
            readable = bool(select.select([self.sock], [], [], 0)[0])
        if not readable:
            return False
        try:
            chunk = self.sock.recv(65536)
        except (OSError, ssl.SSLError):
            return True
        if not chunk:
            return True
        self.buffer += chunk
        return False


def _address(arg: str) -> str:
    """The address inside ``<...>`` of a MAIL/RCPT argument."""
    return arg.partition("<")[2].partition(">")[0]


class SMTPSink:
    """An ESMTP server on ``127.0.0.1:<free port>`` that stands in for a remote host.

    :param tls: offer STARTTLS (a self-signed certificate).
    :param auth: ``(user, password)``: AUTH PLAIN/LOGIN is offered once the channel is
        encrypted, and MAIL is refused (530) until the client authenticated with these.
    :param name: the host name in the banner and the EHLO answer.
    :param cert_names: the names in its certificate (signed by :data:`TEST_CA`); by default
        ``name`` and ``127.0.0.1``.

    Scripts (:meth:`script_rcpt`) decide the answer to RCPT for an address; by default
    every recipient gets ``250``.  :meth:`hold` makes the sink keep the answer to the
    final dot back until :meth:`release`.
    """

    def __init__(self, tls: bool = False, auth: tuple[str, str] | None = None,
                 name: str = "sink.example", size: int = 10_000_000,
                 cert_names: tuple[str, ...] | None = None) -> None:
        self.name = name
        self.size = size
        self.auth = auth
        self._lock = threading.Lock()
        self._state = SinkState()
        #: failures of the sink itself (not of the client): a test asserts there are none
        self.errors: list[str] = []
        self._rcpt_scripts: dict[str, list[str]] = {}
        self._data_scripts: dict[str, list[str]] = {}
        self._released = threading.Event()
        self._released.set()
        self.holding = threading.Event()  #: set while a session waits for :meth:`release`
        self._tmp = tempfile.TemporaryDirectory(prefix="e2e-sink-")
        self._context: ssl.SSLContext | None = None
        if tls or auth:
            cert, key = issued_pair(Path(self._tmp.name), cert_names or (name, "127.0.0.1"))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(cert), str(key))
            self._context = context
        sink = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sink._session(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            block_on_close = False

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="e2e-sink", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``"127.0.0.1:<port>"``, as ``[outbound] smarthost`` takes it."""
        return f"127.0.0.1:{self.port}"

    # -- scripting

    def script_rcpt(self, address: str, *replies: str) -> None:
        """Answer the next RCPT TO:<address> commands with ``replies`` in turn, then 250."""
        with self._lock:
            self._rcpt_scripts[address.lower()] = list(replies)

    def script_data(self, address: str, *replies: str) -> None:
        """Answer the final dot of the next transactions holding ``address`` with ``replies`` in turn."""
        with self._lock:
            self._data_scripts[address.lower()] = list(replies)

    def hold(self) -> None:
        """From now on, keep the answer to the final dot back until :meth:`release`."""
        self.holding.clear()
        self._released.clear()

    def release(self) -> None:
        """Answer held (and future) final dots."""
        self._released.set()

    # -- observation

    @property
    def connections(self) -> int:
        with self._lock:
            return self._state.connections

    @property
    def abandoned(self) -> int:
        with self._lock:
            return self._state.abandoned

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._state.messages)

    def messages_for(self, address: str) -> list[Received]:
        """Accepted messages that had ``address`` among their accepted recipients."""
        return [m for m in self.messages() if address.lower() in (r.lower() for r in m.recipients)]

    def commands(self) -> list[str]:
        with self._lock:
            return list(self._state.commands)

    def rcpt_commands(self, address: str) -> int:
        """How many RCPT TO commands named ``address``."""
        return sum(1 for c in self.commands()
                   if c.upper().startswith("RCPT TO:") and _address(c).lower() == address.lower())

    def wait_for_messages(self, address: str, count: int = 1, timeout: float = 10.0) -> list[Received]:
        """The messages for ``address`` once there are at least ``count`` of them."""
        wait_until(lambda: len(self.messages_for(address)) >= count, timeout,
                   f"{count} message(s) for {address} at the sink (got {len(self.messages_for(address))})")
        return self.messages_for(address)

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._tmp.cleanup()

    # -- the protocol

    def _session(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        with self._lock:
            self._state.connections += 1
        wire = _Wire(sock)
        try:
            self._converse(wire)
        except (_Closed, OSError, ssl.SSLError):
            pass
        except Exception as e:  # noqa: BLE001 - the sink's own failure, for the test to see
            with self._lock:
                self.errors.append(repr(e))
        finally:
            try:
                wire.sock.close()
            except OSError:
                pass

    def _ehlo_lines(self, secure: bool) -> list[str]:
        caps = [self.name, "PIPELINING", f"SIZE {self.size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self._context is not None and not secure:
            caps.append("STARTTLS")
        if self.auth is not None and secure:
            caps.append("AUTH PLAIN LOGIN")
        return [f"250-{c}" for c in caps[:-1]] + [f"250 {caps[-1]}"]

    def _converse(self, wire: _Wire) -> None:
        secure = False
        helo = ""
        auth_user: str | None = None
        sender: str | None = None
        mail_params = ""
        rcpts: list[str] = []
        wire.send(f"220 {self.name} ESMTP sink")
        while True:
            raw = wire.readline()
            line = raw.decode("utf-8", "replace")
            with self._lock:
                self._state.commands.append(line)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                helo = arg.strip()
                sender, rcpts = None, []
                if verb == "HELO":
                    wire.send(f"250 {self.name}")
                else:
                    for text in self._ehlo_lines(secure):
                        wire.send(text)
            elif verb == "STARTTLS" and self._context is not None and not secure:
                wire.send("220 2.0.0 Ready to start TLS")
                wire.sock = self._context.wrap_socket(wire.sock, server_side=True)
                wire.buffer = b""
                secure = True
                helo, sender, rcpts = "", None, []
            elif verb == "AUTH" and self.auth is not None and secure:
                auth_user = self._authenticate(wire, arg)
                if auth_user is None:
                    wire.send("535 5.7.8 Authentication credentials invalid")
                else:
                    wire.send("235 2.7.0 Authentication successful")
            elif verb == "MAIL" and line[5:10].upper() == "FROM:":
                if self.auth is not None and auth_user is None:
                    wire.send("530 5.7.0 Authentication required")
                    continue
                sender = _address(line)
                mail_params = line.rpartition(">")[2]
                rcpts = []
                wire.send("250 2.1.0 Sender ok")
            elif verb == "RCPT" and line[5:8].upper() == "TO:":
                if sender is None:
                    wire.send("503 5.5.1 MAIL first")
                    continue
                address = _address(line)
                with self._lock:
                    script = self._rcpt_scripts.get(address.lower())
                    answer = script.pop(0) if script else "250 2.1.5 Recipient ok"
                if answer.startswith("2"):
                    rcpts.append(address)
                wire.send(answer)
            elif verb == "DATA":
                if sender is None or not rcpts:
                    wire.send("503 5.5.1 No valid recipients")
                    continue
                wire.send("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data(wire)
                answer = "250 2.0.0 Ok: queued"
                with self._lock:
                    for rcpt in rcpts:
                        script = self._data_scripts.get(rcpt.lower())
                        if script:
                            answer = script.pop(0)
                            break
                if not self._released.is_set() and not self._wait_release(wire):
                    with self._lock:
                        self._state.abandoned += 1
                    return
                if answer.startswith("2"):
                    with self._lock:
                        self._state.messages.append(
                            Received(sender, list(rcpts), data, helo, secure, auth_user, mail_params))
                wire.send(answer)
                sender, rcpts = None, []
            elif verb == "RSET":
                sender, rcpts = None, []
                wire.send("250 2.0.0 Ok")
            elif verb == "NOOP":
                wire.send("250 2.0.0 Ok")
            elif verb == "QUIT":
                wire.send("221 2.0.0 Bye")
                return
            else:
                wire.send("502 5.5.2 Command not recognized")

    def _wait_release(self, wire: _Wire) -> bool:
        """Hold the final answer; False when the client left meanwhile (nothing delivered)."""
        self.holding.set()
        deadline = time.monotonic() + 60
        while not self._released.wait(0.05):
            if wire.peer_left() or time.monotonic() > deadline:
                return False
        return not wire.peer_left()

    @staticmethod
    def _read_data(wire: _Wire) -> bytes:
        """Lines up to the lone ``.``, transparency undone (RFC 5321 section 4.5.2)."""
        out = bytearray()
        while True:
            line = wire.readline()
            if line == b".":
                return bytes(out)
            if line.startswith(b"."):
                line = line[1:]
            out += line + b"\r\n"

    def _authenticate(self, wire: _Wire, arg: str) -> str | None:
        """AUTH PLAIN (initial response or not) or LOGIN; the user on success."""
        assert self.auth is not None
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        try:
            if mechanism == "PLAIN":
                if not initial:
                    wire.send("334 ")
                    initial = wire.readline().decode("ascii")
                _authzid, user, password = base64.b64decode(initial).decode("utf-8").split("\0")
            elif mechanism == "LOGIN":
                wire.send("334 " + base64.b64encode(b"Username:").decode())
                user = base64.b64decode(wire.readline()).decode("utf-8")
                wire.send("334 " + base64.b64encode(b"Password:").decode())
                password = base64.b64decode(wire.readline()).decode("utf-8")
            else:
                return None
        except (ValueError, UnicodeDecodeError):
            return None
        return user if (user, password) == self.auth else None


def received_prefix_and_rest(data: bytes, sent: bytes) -> bytes:
    """What the relaying server put before ``sent`` in ``data`` (the sink's copy).

    :raises AssertionError: the copy at the sink does not end with the message as sent.
    """
    assert data.endswith(sent), (
        "the message at the sink does not end with the message as sent\n"
        f"sink tail: {data[-300:]!r}\nsent tail: {sent[-300:]!r}\nsizes: sink {len(data)}, sent {len(sent)}"
    )
    return data[: len(data) - len(sent)]

