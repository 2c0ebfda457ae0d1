"""End-to-end harness: the real ``twistd -n mailguard`` on loopback, and clients for it.

Everything here drives mailguard through its operator surface only (README.rst): a
configuration file, the ``twistd`` start command, the admin CLI (``python -m
mailguard``), the wire, the maildirs on disk and the log on standard output.  Nothing
imports the ``mailguard`` package, so these tests hold whatever the internals are.

Clients may connect from any 127.0.0.0/8 source address, which is how one machine
tests IP-based relay rules (``allow``, ``never``, ``internal_addresses``).
"""

from __future__ import annotations

import json
import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

#: The repository checkout under test (``tests/e2e/harness.py`` -> repository root).
REPO = Path(__file__).resolve().parents[2]

#: Seconds to wait for the server to answer its 220 banner.
START_TIMEOUT = 20.0

LISTENERS = ("smtp", "submission", "submissions", "pop3", "pop3s")
_SSL_LISTENERS = ("submissions", "pop3s")


# --------------------------------------------------------------------------- TOML


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string for the text used here.
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Write a mapping of str/int/bool/list values and nested tables as TOML."""
    out: list[str] = []

    def table(path: list[str], body: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in body.items() if isinstance(v, Mapping)}
        if path and (scalars or not tables):
            out.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in scalars.items():
            out.append(f"{_toml_key(k)} = {_toml_value(v)}")
        if path and (scalars or not tables):
            out.append("")
        for k, v in tables.items():
            table(path + [k], v)

    table([], data)
    return "\n".join(out) + "\n"


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``; nested tables are merged, other values replaced."""
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


# --------------------------------------------------------------------------- waiting


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 20 ms until it holds; fail naming ``what`` after ``timeout`` seconds.

    Tests wait for an event, never for a fixed time: a sleep is too short on a loaded
    machine (a flaky failure) or too long everywhere (a slow suite), and "nothing
    happened" after a sleep does not show that the server had got that far.  To show
    that something did *not* happen, first wait for a positive event proving the
    server has handled the input (a reply, a log line, :func:`wait_server_read`).
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class TCPEnd:
    """The kernel's view of one end of a TCP connection (a line of ``/proc/net/tcp``)."""

    state: str        # two hex digits: 01 ESTABLISHED, 08 CLOSE_WAIT, 09 LAST_ACK, ...
    tx_queue: int     # bytes written and not yet acknowledged by the peer
    rx_queue: int     # bytes received and not yet read by the process


def _proc_endpoint(host: str, port: int) -> str:
    """``127.0.0.1:25`` as ``/proc/net/tcp`` prints it: ``0100007F:0019`` (little-endian host)."""
    return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"


def tcp_end(local: tuple[str, int], remote: tuple[str, int]) -> TCPEnd | None:
    """The end of the IPv4 connection ``local`` <-> ``remote`` that ``local`` owns; None when gone."""
    want = (_proc_endpoint(*local), _proc_endpoint(*remote))
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == want:
            tx, rx = fields[4].split(":")
            return TCPEnd(fields[3], int(tx, 16), int(rx, 16))
    return None


def wait_server_read(sock: socket.socket, timeout: float = 10.0) -> None:
    """Wait until the server has read everything sent on ``sock`` (loopback only).

    Twisted hands what it reads to the protocol in the same reactor turn, so an empty
    receive queue on the server's end means the server has processed those bytes.
    """
    mine, theirs = sock.getsockname()[:2], sock.getpeername()[:2]

    def read() -> bool:
        client, server = tcp_end(mine, theirs), tcp_end(theirs, mine)
        return client is not None and client.tx_queue == 0 and server is not None and server.rx_queue == 0

    wait_for(read, timeout, f"the server to read what {mine} sent")


def wait_server_closed(client: tuple[str, int], server: tuple[str, int], timeout: float = 10.0) -> None:
    """Wait until the server has closed its end of a connection the client closed.

    The server's end stays ESTABLISHED (01) or CLOSE_WAIT (08) until its process closes
    the socket, which Twisted does when it runs the protocol's ``connectionLost``.
    """
    def closed() -> bool:
        end = tcp_end(server, client)
        return end is None or end.state not in ("01", "08")

    wait_for(closed, timeout, f"the server to close its end of {client} -> {server}")


# --------------------------------------------------------------------------- ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_accepts(host: str, port: int) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def twistd_command() -> list[str]:
    """The ``twistd`` of the Python running the tests."""
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("twistd")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]


def child_env() -> dict[str, str]:
    """Environment for the server and the CLI: the checkout first on the path, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONWARNINGS", None)
    return env


# --------------------------------------------------------------------------- server


class ServerError(AssertionError):
    """The server did not start, or stopped when it should not have."""


class MailguardServer:
    """One ``twistd -n mailguard --config FILE`` process in its own folder.

    :param root: an empty folder; the configuration, ``var/`` (data_dir) and the log go there.
    :param config: tables merged over the harness's base configuration.
    :param smtp_interfaces: local addresses that each get an ``smtp`` listener (own port).
    """

    def __init__(
        self,
        root: Path,
        config: Mapping[str, Any] | None = None,
        smtp_interfaces: tuple[str, ...] = ("127.0.0.1",),
        hostname: str = "mx.realdomain.example",
    ) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.hostname = hostname
        self.config_path = root / "mailguard.toml"
        self.data_dir = root / "var"
        self.log_path = root / "twistd.log"
        self.smtp_ports = {iface: free_port(iface) for iface in smtp_interfaces}
        self.ports = {name: free_port() for name in LISTENERS if name != "smtp"}
        self.sink_port = free_port()  # nothing listens here: outbound attempts fail fast
        base: dict[str, Any] = {
            "server": {"hostname": hostname, "data_dir": "var"},
            "listen": {
                "smtp": [f"tcp:{port}:interface={iface}" for iface, port in self.smtp_ports.items()],
                **{
                    name: [f"{'ssl' if name in _SSL_LISTENERS else 'tcp'}:{port}:interface=127.0.0.1"]
                    for name, port in self.ports.items()
                },
            },
            "outbound": {"smarthost": f"127.0.0.1:{self.sink_port}", "smarthost_tls": "none"},
        }
        self.config = deep_merge(base, config or {})
        self.config_path.write_text(toml_dumps(self.config), encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.starts = 0

    # -- addresses

    @property
    def host(self) -> str:
        """The first smtp interface."""
        return next(iter(self.smtp_ports))

    @property
    def smtp_port(self) -> int:
        """The port of the first smtp listener."""
        return self.smtp_ports[self.host]

    def command(self) -> list[str]:
        """twistd options, then the plugin name, then the plugin's options."""
        return twistd_command() + ["-n", "--pidfile=", "mailguard", "--config", str(self.config_path)]

    # -- life cycle

    def start(self) -> MailguardServer:
        """Start twistd and wait until every smtp listener answers a 220 banner."""
        if self.process is not None and self.process.poll() is None:
            raise ServerError("already running")
        self.starts += 1
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== start {self.starts}: {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
        deadline = time.monotonic() + START_TIMEOUT
        pending = dict(self.smtp_ports)
        while pending:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._close_log()
                raise ServerError(f"twistd exited with status {code} during start-up:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.kill9()
                raise ServerError(f"no 220 banner within {START_TIMEOUT} s:\n{self.log_text()}")
            for iface, port in list(pending.items()):
                if _banner(iface, port).startswith("220"):
                    del pending[iface]
            if pending:
                time.sleep(0.1)
        return self

    def running(self) -> bool:
        """True while the twistd process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait; SIGKILL when it does not stop.  Returns the exit status."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._close_log()
        return proc.returncode

    def kill9(self) -> None:
        """SIGKILL at once, as a crash would."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(15)
        self._close_log()

    def restart(self) -> MailguardServer:
        """Stop (if still running) and start again with the same configuration and ports."""
        self.stop()
        return self.start()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- observation

    def log_text(self) -> str:
        """Everything twistd wrote so far (all starts)."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def log_lines(self, pattern: str) -> list[str]:
        """Every log line matching the regular expression ``pattern``, so far."""
        rx = re.compile(pattern)
        return [line for line in self.log_text().splitlines() if rx.search(line)]

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> str:
        """The first log line matching the regular expression ``pattern`` (waits for it)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matches {pattern!r}:\n{self.log_text()}")
            time.sleep(0.1)

    def maildir(self, address: str) -> Path:
        """``data_dir/mail/<domain>/<local>`` (README.rst "Storage")."""
        local, _, domain = address.rpartition("@")
        return self.data_dir / "mail" / domain / local

    def message_files(self, address: str) -> list[Path]:
        """The files in a mailbox's new/ and cur/, sorted."""
        box = self.maildir(address)
        files: list[Path] = []
        for sub in ("new", "cur"):
            d = box / sub
            if d.is_dir():
                files.extend(p for p in d.iterdir() if p.is_file())
        return sorted(files)

    def messages(self, address: str) -> list[bytes]:
        """The stored messages of a mailbox (new/ and cur/), as bytes."""
        return [p.read_bytes() for p in self.message_files(address)]

    def messages_containing(self, address: str, marker: bytes) -> list[bytes]:
        """The stored messages of a mailbox that contain ``marker``."""
        return [m for m in self.messages(address) if marker in m]

    # -- admin CLI

    def cli(self, *args: str, input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``python -m mailguard --config FILE ARGS...`` in the server's folder."""
        return subprocess.run(
            [sys.executable, "-m", "mailguard", "--config", str(self.config_path), *args],
            cwd=self.root,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(),
        )

    def cli_ok(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Like :meth:`cli`, failing the test with the output when the exit status is not 0."""
        result = self.cli(*args, input=input)
        if result.returncode != 0:
            raise AssertionError(
                f"mailguard {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def queue_lines(self) -> list[str]:
        """``mailguard queue list``: one line per queued message (a line saying "empty" is none)."""
        listing = self.cli_ok("queue", "list").stdout
        return [ln for ln in listing.splitlines() if ln.strip() and "empty" not in ln.lower()]

    def add_user(self, address: str, password: str = "correct horse battery") -> None:
        """``mailguard user add ADDRESS --password-stdin``."""
        self.cli_ok("user", "add", address, "--password-stdin", input=password + "\n")

    # -- clients

    def smtp(self, source: str = "127.0.0.1", interface: str | None = None) -> smtplib.SMTP:
        """An ``smtplib.SMTP`` connected from ``source`` to the smtp listener on ``interface``."""
        iface = interface or self.host
        return smtplib.SMTP(iface, self.smtp_ports[iface], source_address=(source, 0), timeout=30)

    def dialog(self, source: str = "127.0.0.1", interface: str | None = None) -> Dialog:
        """A raw :class:`Dialog` with the banner already read."""
        iface = interface or self.host
        return Dialog.connect(iface, self.smtp_ports[iface], source)


def _banner(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=2.0) as s:
            s.settimeout(2.0)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            try:
                s.sendall(b"QUIT\r\n")
            except OSError:
                pass
            return data.decode("utf-8", "replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- raw dialog


@dataclass
class Reply:
    """One SMTP reply as it came over the wire (RFC 5321 section 4.2)."""

    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def last(self) -> str:
        """The final line, e.g. ``"550 5.7.1 Relaying prohibited"``."""
        return self.lines[-1] if self.lines else ""

    @property
    def text(self) -> str:
        """All lines of the reply."""
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str:
        """The RFC 3463 enhanced status code of the last line, or ''."""
        m = re.match(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b", self.last)
        return m.group(1) if m else ""

    def __str__(self) -> str:
        return self.text


class Dialog:
    """A line-by-line SMTP conversation over a plain socket, for exact reply checks."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.banner = Reply(0)

    @classmethod
    def connect(cls, host: str, port: int, source: str = "127.0.0.1", timeout: float = 30.0) -> Dialog:
        """Connect from ``source`` and read the banner."""
        sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        d = cls(sock)
        d.banner = d.read_reply()
        return d

    def __enter__(self) -> Dialog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (no QUIT)."""
        self.sock.close()

    def _read_line(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def read_reply(self) -> Reply:
        """Read one whole reply, following ``NNN-`` continuation lines."""
        lines: list[str] = []
        while True:
            line = self._read_line()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                break
        code = int(lines[-1][:3]) if lines[-1][:3].isdigit() else 0
        return Reply(code, lines)

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def cmd(self, line: str) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        self.send(line.encode("utf-8") + b"\r\n")
        return self.read_reply()

    def data(self, message: bytes) -> Reply:
        """Send DATA, the dot-stuffed message and the final dot; the reply to the dot.

        Returns the reply to DATA itself when that is not 354.
        """
        go = self.cmd("DATA")
        if go.code != 354:
            return go
        self.send(dot_stuff(message) + b".\r\n")
        return self.read_reply()


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 section 4.5.2 transparency for a CRLF message; ends with CRLF."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")[:-1]
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


def make_message(sender: str, rcpt: str, subject: str, body_lines: list[str] | None = None) -> bytes:
    """A small RFC 5322 message in CRLF form, with a Message-ID that names ``subject``."""
    lines = [
        f"From: <{sender}>",
        f"To: <{rcpt}>",
        f"Subject: {subject}",
        f"Message-ID: <{subject}@e2e.test>",
        "Date: Thu, 01 Jan 2026 12:00:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *(body_lines if body_lines is not None else [f"Body of {subject}.", "Regards,", "e2e"]),
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def split_added_headers(stored: bytes, sent: bytes) -> bytes:
    """The part of a stored (LF) message before the sent message, which must end it.

    :raises AssertionError: the stored message does not end with the sent one (LF form).
    """
    sent_lf = sent.replace(b"\r\n", b"\n")
    assert stored.endswith(sent_lf), (
        "stored message does not end with the message as sent\n"
        f"stored: {stored[:2000]!r}\nsent:   {sent_lf[:2000]!r}"
    )
    return stored[: len(stored) - len(sent_lf)]


def header_names(block: bytes) -> list[str]:
    """Field names of a header block, continuation lines folded into their field."""
    names = []
    for line in block.split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            assert names, f"continuation line before any header: {line!r}"
            continue
        name, colon, _ = line.partition(b":")
        assert colon, f"not a header line: {line!r}"
        names.append(name.decode("ascii", "replace"))
    return names


def swaks(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the real ``swaks`` binary."""
    exe = shutil.which("swaks")
    assert exe is not None, "swaks is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def tls_context() -> ssl.SSLContext:
    """A client context that accepts the server's self-signed certificate (made under data_dir/tls)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SourcePOP3(poplib.POP3):
    """``poplib.POP3`` connecting from a chosen loopback source address."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
