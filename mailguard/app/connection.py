"""The transport as mailguard's protocols use it.

Twisted types ``Protocol.transport`` as ``ITransport | None``, but a mail session uses
more of it than ``ITransport`` declares: ``startTLS`` (``ITLSTransport``),
``abortConnection`` (``ITCPTransport``), ``registerProducer`` (``IConsumer``) and
``pauseProducing`` (``IPushProducer``).  Every transport a listener or a client
connection hands over (TCP, TLS, and ``StringTransport`` in the tests) provides all of
them; no single Twisted interface names that union, so :class:`Connection` does.
"""

from __future__ import annotations

import errno
from typing import Iterable, Protocol, cast

from twisted.internet import tcp
from twisted.internet.interfaces import IAddress, IProducer, ITransport


class Connection(Protocol):
    """A connected, TLS-capable, flow-controlled byte stream."""

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Iterable[bytes]) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> IAddress: ...

    def getHost(self) -> IAddress: ...

    def startTLS(self, contextFactory: object) -> None: ...

    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


def connection(transport: ITransport | None) -> Connection:
    """``transport`` as a :class:`Connection`; a protocol asks only while connected."""
    if transport is None:
        raise RuntimeError("the protocol is not connected")
    return cast(Connection, transport)


_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS)


def send(transport: ITransport | None, data: bytes) -> None:
    """Write ``data``: straight to the socket when nothing waits to go before it.

    ``transport.write`` only queues: the reactor then watches the socket for
    writing, sends on its next turn and stops watching, which is two ``epoll_ctl``
    calls and a turn for every reply of a conversation that is one short line at a
    time.  On a plain TCP connection with an empty write buffer, the reply is sent
    now; what the socket does not take (a full buffer, an error) goes to
    ``transport.write`` as before, so order, flow control and the report of a broken
    connection stay the transport's.  TLS connections and test transports just write.
    """
    t = connection(transport)
    s = cast(object, t)
    if type(s) is tcp.Server:
        if (s.connected and not s.TLS and not s.disconnecting and not s._writeDisconnected
                and not s._tempDataLen and s.offset == len(s.dataBuffer)):
            try:
                sent = s.socket.send(data)
            except OSError as e:
                sent = 0
                if e.errno not in _RETRY:
                    t.write(data)               # the next write attempt reports the failure
                    return
            if sent == len(data):
                return
            data = data[sent:]
    t.write(data)


def hang_up(transport: ITransport | None, client_reads: bool) -> None:
    """Close the connection; abort it when the client stopped reading (a graceful close
    would wait for it to read everything first, forever)."""
    if client_reads:
        connection(transport).loseConnection()
    else:
        connection(transport).abortConnection()


def hold_reading(transport: ITransport | None, held: bool, hold: bool) -> bool:
    """Stop or restart reading the socket when ``hold`` differs from ``held``; the new state.

    A session holds reading while a large pipelined backlog waits for it, so an
    unread flood stays in the kernel's buffers instead of the process's memory.
    """
    if hold and not held:
        connection(transport).pauseProducing()
    elif held and not hold:
        connection(transport).resumeProducing()
    return hold
