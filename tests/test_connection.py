"""Replies sent straight to the socket (mailguard.app.connection.send)."""

from __future__ import annotations

import socket
from typing import Iterator

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor, StringTransport

from mailguard.app.connection import send


@pytest.fixture
def pair() -> Iterator[tuple[tcp.Server, socket.socket, MemoryReactor]]:
    """A Twisted TCP server transport on one end of a socket pair, the other end as the client."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)                  # a reply that never comes fails the test, not hangs it
    reactor = MemoryReactor()
    transport = tcp.Server(ours, protocol.Protocol(), ("192.0.2.7", 2525), None, 1, reactor)  # type: ignore[arg-type]
    yield transport, theirs, reactor
    ours.close()
    theirs.close()


def test_a_reply_goes_out_at_once(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """With nothing queued the reply is on the wire before the reactor turns, and it does not watch for writing."""
    transport, client, reactor = pair
    send(transport, b"250 2.0.0 Ok\r\n")
    assert client.recv(100) == b"250 2.0.0 Ok\r\n"
    assert transport not in reactor.getWriters()
    assert transport.dataBuffer == b"" and transport._tempDataBuffer == []


def test_what_the_socket_does_not_take_is_queued_in_order(
        pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """A client that does not read: the rest goes to the transport's buffer, and a later reply waits behind it."""
    transport, client, reactor = pair
    big = bytes(range(256)) * 40_000                      # more than the socket buffers hold
    send(transport, big)
    queued = transport._tempDataLen
    assert 0 < queued < len(big) and transport in reactor.getWriters()
    send(transport, b"221 2.0.0 Bye\r\n")
    assert transport._tempDataLen == queued + len(b"221 2.0.0 Bye\r\n")
    received = bytearray()
    client.setblocking(False)
    while len(received) < len(big) + 15:
        try:
            received += client.recv(1 << 20)
        except BlockingIOError:
            transport.doWrite()
    assert bytes(received) == big + b"221 2.0.0 Bye\r\n"


def test_tls_and_other_transports_just_write(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """After STARTTLS the bytes must go through TLS; a test transport has no socket."""
    transport, client, reactor = pair
    transport.TLS = True
    written: list[bytes] = []
    transport.protocol.write = written.append         # type: ignore[attr-defined]  # what TLS would encrypt
    send(transport, b"250 2.0.0 Ok\r\n")
    assert written == [b"250 2.0.0 Ok\r\n"]
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)
    plain = StringTransport()
    send(plain, b"220 ready\r\n")
    assert plain.value() == b"220 ready\r\n"


def test_a_broken_connection_is_reported_by_the_transport(
        pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """A send that fails (the client is gone) leaves the reply to the transport, which reports the loss."""
    transport, client, reactor = pair
    client.close()
    send(transport, b"250 2.0.0 Ok\r\n")
    assert transport in reactor.getWriters()
    assert transport.doWrite() is not None             # the error that closes the connection
