"""
T, the receiver port: the data connections senders open back to us, each
carrying the chunks of one stream we asked for.

The first frame must be a hello naming a token we handed out (the L{Inbox}
knows them), from the host we asked.  After that every frame is a chunk of
the stream.  Each chunk is read by a L{FrameReader} into a buffer its
stream's owner gives (from a pool it keeps), straight from the socket with
C{recv_into} where the transport allows it (L{ReceiverEndpoint}), so the
bytes are copied once, from the kernel, before they are hashed and written
in a worker thread.  The owner pauses reading while too many chunks wait for
that.
"""

import errno
import socket
import sys

from twisted.internet import defer, main, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from twisted_p2p import wire
from twisted_p2p.framing import FrameReader
from twisted_p2p.limits import (
    CHUNK_SIZE,
    DATA_RECEIVE_BUFFER,
    HELLO_TIMEOUT,
    MAX_DATA_HEADER,
)
from twisted_p2p.transfer.framed import (
    PerHostLimitedFactory,
    _now,
    describe_peer,
    release_place,
)

log = Logger()


class ReceiverProtocol(Protocol, TimeoutMixin):
    """
    One data connection.  Feeds the incoming stream the L{Inbox} gives for
    its token (see L{twisted_p2p.download.requests.SourceStream} for what a
    stream provides: C{attach}, C{chunk_started} (which gives the buffer a
    chunk is read into), C{bytes_arrived}, C{chunk_arrived}, C{detached}).

    Before the hello, a frame may be no larger than a header
    (L{MAX_DATA_HEADER}), so a stranger cannot make us buffer anything.
    After it, silence is the stream owner's business (it knows whether it
    waits for anything).
    """

    def connectionMade(self):
        self.stream = None
        self._index = None
        self._count = 0
        self._line = b""
        self._buffer = None
        self._reader = FrameReader(self, MAX_DATA_HEADER, MAX_DATA_HEADER)
        self.setTimeout(HELLO_TIMEOUT)
        self.last_active = _now(self)

    def holds_work(self):
        """
        Whether a stream owns this connection: before the hello, it may be
        closed to make room for another.
        """
        return self.stream is not None

    # -- bytes in: recv_into where the transport allows, else copied ------------

    def read_buffer(self):
        """
        Where the transport should C{recv_into} next (L{ReceiverEndpoint}).
        """
        return self._reader.buffer()

    def read_done(self, count):
        try:
            self._reader.filled(count)
        except wire.ProtocolError as e:
            self.drop(str(e))

    def dataReceived(self, data):
        try:
            self._reader.feed(data)
        except wire.ProtocolError as e:
            self.drop(str(e))

    # -- the FrameReader's owner ----------------------------------------------------

    def header_received(self, header, body_length):
        kind = header["t"]
        if self.stream is None:
            if kind != "hello" or body_length:
                raise wire.ProtocolError("data before hello")
            wire.check_version(header)
            token = wire.token_field(header)
            stream = self.factory.inbox.claim(token, self.transport.getPeer().host)
            if stream is None:
                raise wire.ProtocolError("a token nobody handed out")
            self.setTimeout(None)
            self.stream = stream
            overhead = stream.seal.overhead if stream.seal is not None else 0
            # A frame is at most the run this stream asked for, so that what
            # one connection holds while it reads is the asker's to bound.
            self._reader.max_frame = MAX_DATA_HEADER + stream.run * CHUNK_SIZE + overhead
            stream.attach(self)
            return None
        if kind != "chunk":
            raise wire.ProtocolError(f"unexpected {kind!r} frame")
        index = wire.int_field(header, "i", 0, 2**31)
        count = wire.int_field(header, "n", 1, self.stream.run) if "n" in header else 1
        self._buffer = self.stream.chunk_started(index, count, body_length)
        self._index, self._count, self._line = index, count, self._reader.line
        return self._buffer

    def body_progress(self, count):
        self.stream.bytes_arrived(count)

    def frame_ended(self):
        if self._index is None:
            return  # the hello
        index, count, buffer = self._index, self._count, self._buffer
        self._index = self._buffer = None
        self.stream.chunk_arrived(index, count, buffer, self._line)

    # -- what the stream's owner may do ------------------------------------------

    def pause(self):
        """
        Read nothing more until L{resume}.
        """
        if self.transport is not None and not self.transport.disconnecting:
            self.transport.pauseProducing()

    def resume(self):
        if self.transport is not None and not self.transport.disconnecting:
            self.transport.resumeProducing()

    def close(self):
        if self.transport is not None and not self.transport.disconnecting:
            self.transport.loseConnection()

    def drop(self, reason):
        """
        Log a broken message and drop the connection.
        """
        if self.transport is None or self.transport.disconnecting:
            return
        log.info(
            "Dropping a data connection from {host}: {reason}",
            host=describe_peer(self.transport),
            reason=reason,
        )
        self._reader.stopped = True
        self.setTimeout(None)
        self.transport.abortConnection()

    def timeoutConnection(self):
        self.drop("no hello in time")

    def connectionLost(self, reason):
        self.setTimeout(None)
        release_place(self)
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.detached(self, reason)


def granted_receive_buffer(size):
    """
    The receive buffer the kernel gives a TCP socket that asks for C{size}
    bytes (as C{getsockopt} reports it), or C{None} if it will not say.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            return probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except OSError:
        return None


def receive_buffer_to_ask(size=DATA_RECEIVE_BUFFER, granted=None, platform=sys.platform):
    """
    C{size} if the system grants a socket that much receive buffer, else
    C{None}: a fixed buffer smaller than asked for (C{net.core.rmem_max} on
    Linux, 208 KiB by default) would do worse than the kernel's autotuning,
    which a fixed size turns off.  Linux reports twice what was asked for.

    @param granted: L{granted_receive_buffer}, or a stand-in.
    """
    got = (granted or granted_receive_buffer)(size)
    if got is None:
        return None
    return size if got >= size * (2 if platform.startswith("linux") else 1) else None


#: What L{data_receive_buffer} worked out, at the first data connection.
_receive_buffer = []


def data_receive_buffer():
    """
    The receive buffer a data connection asks for: L{DATA_RECEIVE_BUFFER}
    where the system grants it, else C{None} (L{receive_buffer_to_ask}, asked
    once).
    """
    if not _receive_buffer:
        _receive_buffer.append(receive_buffer_to_ask())
    return _receive_buffer[0]


def tune_receive_buffer(sock, size):
    """
    Ask for a receive buffer of C{size} bytes on C{sock}; with C{None}, leave
    it to the kernel's autotuning.
    """
    if size is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:
        pass  # the kernel's own buffer, then


class _RecvIntoServer(tcp.Server):
    """
    An accepted TCP connection that reads with C{recv_into}, into the buffer
    its protocol names (C{read_buffer()}, then C{read_done(count)}), when the
    protocol has one; else as Twisted does.  Twisted's own read makes a new
    bytes object per read, which the protocol must then copy.

    Its socket gets a large receive buffer where the system allows
    (L{data_receive_buffer}).
    """

    def __init__(self, sock, *args, **kwargs):
        tune_receive_buffer(sock, data_receive_buffer())
        tcp.Server.__init__(self, sock, *args, **kwargs)

    def doRead(self):
        read_buffer = getattr(self.protocol, "read_buffer", None)
        if read_buffer is None:
            return tcp.Server.doRead(self)
        try:
            count = self.socket.recv_into(read_buffer())
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return None
            return main.CONNECTION_LOST
        if not count:
            return main.CONNECTION_DONE
        self.protocol.read_done(count)
        return None


class _RecvIntoPort(tcp.Port):
    """
    A listening port whose connections are L{_RecvIntoServer}s (Twisted's
    C{Port.transport} is there to be replaced), and that takes IPv6 only
    on an IPv6 address, so the IPv4 port beside it stays free.
    """

    transport = _RecvIntoServer

    def createInternetSocket(self):
        sock = tcp.Port.createInternetSocket(self)
        if self.addressFamily == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return sock


@implementer(IStreamServerEndpoint)
class ReceiverEndpoint:
    """
    Where the receiver port listens: like Twisted's TCP server endpoints,
    with connections that read chunks straight into their buffers.
    """

    def __init__(self, reactor, port, interface="", backlog=50):
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog

    def listen(self, factory):
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        port = _RecvIntoPort(
            self._port, factory, self._backlog, self._interface, self._reactor
        )
        port.startListening()  # CannotListenError, as Twisted's endpoints
        return port


class ReceiverFactory(PerHostLimitedFactory):
    protocol = ReceiverProtocol

    def __init__(self, inbox):
        self.inbox = inbox


class Inbox:
    """
    Owns the tokens of the streams we asked for, so the receiver port
    accepts data only for them, and only from the host each was asked of.
    """

    def __init__(self):
        self._expected = {}

    def expect(self, stream):
        """
        Accept one data connection for C{stream} (its C{token} and C{host}).
        """
        self._expected[stream.token] = stream

    def withdraw(self, token):
        self._expected.pop(token, None)

    def claim(self, token, host):
        """
        The stream of C{token} if it was asked of C{host}; a token can be
        claimed once.
        """
        stream = self._expected.get(token)
        if stream is None or stream.host != host:
            return None
        del self._expected[token]
        return stream

    def __len__(self):
        return len(self._expected)
