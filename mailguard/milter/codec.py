"""The milter wire format (Sendmail's libmilter, protocol version 6), as pure functions.

This module imports only the standard library (and the pure reply catalogue of
``mailguard.core``): it builds the packets the MTA sends
and parses the packets a milter answers, and knows nothing of sockets or time.

Format
======
Every packet, in both directions, is::

    uint32 length (network order, counting the command byte and the data)
    char   command
    bytes  data (length - 1 octets)

Strings inside the data end with a NUL.  The MTA side sends the ``SMFIC_*``
commands below; the milter answers with ``SMFIR_*`` replies.  Option negotiation
(``SMFIC_OPTNEG``) opens every connection: the MTA offers a version, the actions it
allows (``SMFIF_*``) and the protocol steps it can leave out (``SMFIP_*``); the
milter answers with the subset it wants, optionally followed by the macros it wants
per stage (``SMFIM_*`` index, then a NUL-terminated, space-separated name list).

The names and numbers are those of libmilter's ``mfdef.h``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from mailguard.core.replies import Reply

VERSION = 6
MIN_VERSION = 2
MAX_PACKET = 1 << 20            # a milter packet larger than this is nonsense (MILTER_MAX_DATA_SIZE 1 MiB)
CHUNK = 65535                   # MILTER_CHUNK_SIZE: the largest body chunk sent

# Commands, MTA to milter (SMFIC_*).
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
QUIT_NC = b"K"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
UNKNOWN = b"U"

# Replies, milter to MTA (SMFIR_*).
ADDRCPT = b"+"
DELRCPT = b"-"
ADDRCPT_PAR = b"2"
SHUTDOWN = b"4"
ACCEPT = b"a"
REPLBODY = b"b"
CONTINUE = b"c"
DISCARD = b"d"
CHGFROM = b"e"
CONN_FAIL = b"f"
ADDHEADER = b"h"
INSHEADER = b"i"
SETSYMLIST = b"l"
CHGHEADER = b"m"
PROGRESS = b"p"
QUARANTINE = b"q"
REJECT = b"r"
SKIP = b"s"
TEMPFAIL = b"t"
REPLYCODE = b"y"

#: Replies that end the exchange for one command.
FINAL = frozenset({ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, REPLYCODE, SKIP, CONN_FAIL, SHUTDOWN})
#: Modification replies, allowed only before the final reply to end-of-message.
EDITS = frozenset({ADDRCPT, DELRCPT, ADDRCPT_PAR, REPLBODY, CHGFROM, ADDHEADER, INSHEADER, CHGHEADER,
                   QUARANTINE})

# Actions the milter may take (SMFIF_*).
F_ADDHDRS = 0x01
F_CHGBODY = 0x02
F_ADDRCPT = 0x04
F_DELRCPT = 0x08
F_CHGHDRS = 0x10
F_QUARANTINE = 0x20
F_CHGFROM = 0x40
F_ADDRCPT_PAR = 0x80
F_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

#: The action flag each modification reply needs.
EDIT_FLAG = {ADDHEADER: F_ADDHDRS, INSHEADER: F_ADDHDRS, CHGHEADER: F_CHGHDRS, REPLBODY: F_CHGBODY,
             ADDRCPT: F_ADDRCPT, ADDRCPT_PAR: F_ADDRCPT_PAR, DELRCPT: F_DELRCPT, CHGFROM: F_CHGFROM,
             QUARANTINE: F_QUARANTINE}

# Protocol steps (SMFIP_*).
P_NOCONNECT = 0x01
P_NOHELO = 0x02
P_NOMAIL = 0x04
P_NORCPT = 0x08
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80                 # SMFIP_NOHREPL
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000
#: Everything this client can do (the MDS_256K/1M body sizes are not offered).
ALL_PROTOCOL = 0x1FFFFF

#: Per command: the "do not send" step and the "no reply" step.
STEPS: dict[bytes, tuple[int, int]] = {
    CONNECT: (P_NOCONNECT, P_NR_CONN), HELO: (P_NOHELO, P_NR_HELO), MAIL: (P_NOMAIL, P_NR_MAIL),
    RCPT: (P_NORCPT, P_NR_RCPT), DATA: (P_NODATA, P_NR_DATA), HEADER: (P_NOHDRS, P_NR_HDR),
    EOH: (P_NOEOH, P_NR_EOH), BODY: (P_NOBODY, P_NR_BODY), UNKNOWN: (P_NOUNKNOWN, P_NR_UNKN),
}

# Macro stages (SMFIM_*), in the optneg reply's symbol lists.
M_CONNECT, M_HELO, M_ENVFROM, M_ENVRCPT, M_DATA, M_EOM, M_EOH = range(7)
STAGE_OF = {CONNECT: M_CONNECT, HELO: M_HELO, MAIL: M_ENVFROM, RCPT: M_ENVRCPT, DATA: M_DATA,
            BODYEOB: M_EOM, EOH: M_EOH}


class ProtocolError(Exception):
    """The milter said something that is not the milter protocol (or not allowed here)."""


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command byte, data."""
    return struct.pack("!I", len(data) + 1) + command + data


def _z(*parts: str) -> bytes:
    return b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in parts)


def optneg(version: int = VERSION, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> bytes:
    """SMFIC_OPTNEG: what this MTA offers."""
    return packet(OPTNEG, struct.pack("!III", version, actions, protocol))


def macros(command: bytes, values: dict[str, str]) -> bytes:
    """SMFIC_MACRO: the macro values for the command that follows (no reply expected)."""
    return packet(MACRO, command + b"".join(_z(k, v) for k, v in values.items()))


def connect(hostname: str, family: str, port: int, address: str) -> bytes:
    """SMFIC_CONNECT.  ``family`` is ``"4"``, ``"6"``, ``"L"`` (unix socket) or ``"U"`` (unknown)."""
    data = _z(hostname) + family.encode("ascii")
    if family != "U":
        data += struct.pack("!H", port) + _z(address)
    return packet(CONNECT, data)


def helo(name: str) -> bytes:
    return packet(HELO, _z(name))


def mail(sender: str, args: list[str] | None = None) -> bytes:
    """SMFIC_MAIL: the reverse-path in angle brackets, then the ESMTP arguments."""
    return packet(MAIL, _z(f"<{sender}>", *(args or [])))


def rcpt(recipient: str, args: list[str] | None = None) -> bytes:
    return packet(RCPT, _z(f"<{recipient}>", *(args or [])))


def header(name: str, value: str) -> bytes:
    return packet(HEADER, _z(name, value))


def body(chunk: bytes) -> bytes:
    if len(chunk) > CHUNK:
        raise ValueError("a body chunk is at most 65535 octets")
    return packet(BODY, chunk)


def simple(command: bytes) -> bytes:
    """A command without data: DATA, EOH, BODYEOB, ABORT, QUIT."""
    return packet(command)


@dataclass(frozen=True)
class Negotiated:
    """The milter's answer to SMFIC_OPTNEG."""

    version: int
    actions: int
    protocol: int
    symlists: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def sends(self, command: bytes) -> bool:
        """False when the milter asked not to get this command (SMFIP_NO*)."""
        step = STEPS.get(command)
        return step is None or not self.protocol & step[0]

    def replies_to(self, command: bytes) -> bool:
        """False when the milter said it will not answer this command (SMFIP_NR_*)."""
        step = STEPS.get(command)
        return step is None or not self.protocol & step[1]

    def may(self, action: int) -> bool:
        return bool(self.actions & action)


def parse_optneg(data: bytes, offered_actions: int = ALL_ACTIONS,
                 offered_protocol: int = ALL_PROTOCOL) -> Negotiated:
    """Parse the data of the milter's SMFIC_OPTNEG reply.

    :raises ProtocolError: short, a version outside 2-6, or actions/steps this MTA did not offer.
    """
    if len(data) < 12:
        raise ProtocolError(f"option negotiation reply of {len(data)} octets")
    version, actions, protocol = struct.unpack("!III", data[:12])
    if not MIN_VERSION <= version <= VERSION:
        raise ProtocolError(f"milter protocol version {version} (this MTA speaks {MIN_VERSION}-{VERSION})")
    if actions & ~offered_actions:
        raise ProtocolError(f"milter asks for actions 0x{actions:x} beyond 0x{offered_actions:x}")
    # Sendmail 8.14+ milters may set the body-size bits this MTA did not offer; they
    # only mean "I accept bigger chunks", so they are ignored.
    protocol &= ~0x30000000
    if protocol & ~offered_protocol:
        raise ProtocolError(f"milter asks for protocol steps 0x{protocol:x} beyond 0x{offered_protocol:x}")
    symlists: dict[int, tuple[str, ...]] = {}
    rest = data[12:]
    while rest:
        if len(rest) < 5:
            raise ProtocolError("truncated macro list in option negotiation")
        (stage,) = struct.unpack("!I", rest[:4])
        end = rest.find(b"\0", 4)
        if end < 0 or stage > M_EOH:
            raise ProtocolError("bad macro list in option negotiation")
        names = rest[4:end].decode("utf-8", "replace").split()
        symlists[stage] = tuple(names)
        rest = rest[end + 1:]
    return Negotiated(version, actions, protocol, symlists)


class Reader:
    """Splits a byte stream into (command, data) packets."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self._buf = bytearray()
        self.max_packet = max_packet

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add received bytes; return the packets now complete.

        :raises ProtocolError: a zero or oversized length.
        """
        self._buf += data
        out: list[tuple[bytes, bytes]] = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack("!I", self._buf[:4])
            if length < 1 or length > self.max_packet:
                raise ProtocolError(f"packet length {length}")
            if len(self._buf) < 4 + length:
                break
            command = bytes(self._buf[4:5])
            out.append((command, bytes(self._buf[5:4 + length])))
            del self._buf[:4 + length]
        return out


# -- the replies' data ------------------------------------------------------------------------


def strings(data: bytes, count: int) -> list[str]:
    """The first ``count`` NUL-terminated strings of ``data``.

    :raises ProtocolError: fewer strings than that.
    """
    parts = data.split(b"\0")
    if len(parts) < count + 1:
        raise ProtocolError(f"expected {count} NUL-terminated strings")
    return [p.decode("utf-8", "surrogateescape") for p in parts[:count]]


def indexed(data: bytes) -> tuple[int, str, str]:
    """The data of SMFIR_INSHEADER / SMFIR_CHGHEADER: index, name, value."""
    if len(data) < 6:
        raise ProtocolError("header change too short")
    (index,) = struct.unpack("!I", data[:4])
    name, value = strings(data[4:], 2)
    return index, name, value


def reply_text(data: bytes) -> Reply:
    """The SMFIR_REPLYCODE data as a reply, checked to be 4xx or 5xx.

    Several lines (``550-5.7.1 a\\r\\n550 5.7.1 b``) are joined into one line.  A
    missing enhanced status code becomes ``X.7.1`` (the class of the reply code).

    :raises ProtocolError: not ``NNN text`` with NNN 4xx or 5xx.
    """
    (text,) = strings(data, 1)
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln]
    if not lines:
        raise ProtocolError("empty reply code")
    code = lines[0][:3]
    for ln in lines:
        if ln[:3] != code or not code.isdigit() or code[0] not in "45" or (len(ln) > 3 and ln[3] not in " -"):
            raise ProtocolError(f"reply {text[:80]!r} is not a 4xx or 5xx reply")
    enhanced, words = "", []
    for ln in lines:
        part = ln[4:].strip()
        first, _, rest = part.partition(" ")
        if _enhanced_ok(first, code[0]):
            enhanced = enhanced or first
            part = rest.strip()
        if part:
            words.append(part)
    return Reply(int(code), enhanced or f"{code[0]}.7.1", " ".join(words))


def _enhanced_ok(text: str, cls: str) -> bool:
    parts = text.split(".")
    return len(parts) == 3 and parts[0] == cls and all(p.isdigit() and 0 < len(p) <= 3 for p in parts)


def parse_address(text: str) -> tuple[str, str, int]:
    """A milter address as Postfix writes it: ``inet:HOST:PORT`` -> ("inet", HOST, PORT),
    ``unix:PATH`` -> ("unix", PATH, 0).  An IPv6 host may be in brackets: ``inet:[::1]:8891``.

    :raises ValueError: another form, no host or path, or a port outside 1-65535.
    """
    kind, colon, rest = text.partition(":")
    if kind == "unix" and colon:
        if not rest:
            raise ValueError("unix: needs a socket path")
        return "unix", rest, 0
    if kind != "inet" or not colon:
        raise ValueError("must be 'inet:HOST:PORT' or 'unix:PATH'")
    host, colon, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be 'inet:HOST:PORT' with a port 1-65535")
    return "inet", host, int(port)
