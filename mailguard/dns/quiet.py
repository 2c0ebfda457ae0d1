"""A ``twisted.names`` client resolver that does not log four lines per lookup.

``client.Resolver`` sends each UDP query from a new random source port (a defence
against cache poisoning) and ``twisted.internet.udp.Port`` logs every such port's
opening and closing, and the protocol its start and stop, unconditionally: with the
inbound checks asking PTR, A and DNSBL records for every connection, that would be
most of the server's log.  :class:`QuietResolver` keeps the random ports and drops
those lines; nothing else about the queries changes.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import base, error, udp
from twisted.names import client, dns

MAX_PORT_TRIES = 1000


class _QuietPort(udp.Port):
    """A UDP port that opens and closes without a log line."""

    def __init__(self, port: int, proto: Any, interface: str, reactor: Any) -> None:
        super().__init__(port, proto, interface=interface, reactor=reactor)  # type: ignore[no-untyped-call]

    def startListening(self) -> None:
        self._bindSocket()
        self._connectToProtocol()  # type: ignore[no-untyped-call]

    def _bindSocket(self) -> None:
        try:
            skt = self.createInternetSocket()
            skt.bind((self.interface, self.port))
        except OSError as le:
            raise error.CannotListenError(self.interface, self.port, le)
        self._realPortNumber = skt.getsockname()[1]
        self.connected = 1
        self.socket = skt
        setattr(self, "fileno", skt.fileno)          # as udp.Port does (an attribute, not the method)

    def connectionLost(self, reason: Any = None) -> None:
        self._realPortNumber = None
        self.maxThroughput = -1
        base.BasePort.connectionLost(self, reason)
        self.protocol.doStop()
        self.socket.close()
        del self.socket
        del self.fileno
        if hasattr(self, "d"):
            self.d.callback(None)
            del self.d


class QuietResolver(client.Resolver):
    """``client.Resolver`` whose per-query UDP ports are opened without log lines."""

    def _connectedProtocol(self, interface: str = "") -> dns.DNSDatagramProtocol:
        proto = dns.DNSDatagramProtocol(self, reactor=self._reactor)
        proto.noisy = False
        for tries in range(1, MAX_PORT_TRIES + 1):
            port = _QuietPort(dns.randomSource(), proto, interface=interface, reactor=self._reactor)
            try:
                port.startListening()
            except error.CannotListenError as e:
                if getattr(e.socketError, "errno", None) == errno.EMFILE or tries == MAX_PORT_TRIES:
                    raise
                continue
            return proto
        raise AssertionError("unreachable")
