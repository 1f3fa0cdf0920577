"""
T, the receiver port: the data connections senders open back to us, each
carrying the chunks of one stream we asked for.

The first frame must be a hello naming a token we handed out (the L{Inbox}
knows them), from the host we asked.  After that every frame is a chunk of
the stream, parsed as it arrives by a L{FrameParser}: the body goes on in the
pieces the socket gave, never gathered into one buffer here, to the stream's
owner, which verifies and stores it in a worker thread and pauses reading
while too much waits for that.
"""

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from twisted_p2p import wire
from twisted_p2p.framing import FrameParser
from twisted_p2p.limits import (
    CHUNK_SIZE,
    HELLO_TIMEOUT,
    MAX_DATA_HEADER,
    RECEIVE_BUFFER,
)
from twisted_p2p.transfer.framed import PerHostLimitedFactory, describe_peer, release_place

log = Logger()


class ReceiverProtocol(Protocol, TimeoutMixin):
    """
    One data connection.  Feeds the incoming stream the L{Inbox} gives for
    its token (see L{twisted_p2p.download.requests.SourceStream} for what a
    stream must provide: C{attach}, C{chunk_started}, C{bytes_arrived},
    C{chunk_arrived}, C{detached}).

    Before the hello, a frame may be no larger than a header
    (L{MAX_DATA_HEADER}), so a stranger cannot make us buffer anything.
    After it, silence is the stream owner's business (it knows whether it
    waits for anything).
    """

    def connectionMade(self):
        self.stream = None
        self._index = None
        self._pieces = []
        self._parser = FrameParser(self, MAX_DATA_HEADER, MAX_DATA_HEADER)
        if hasattr(self.transport, "bufferSize"):
            # Fewer, larger reads: a chunk in a few reads rather than many.
            self.transport.bufferSize = RECEIVE_BUFFER
        self.setTimeout(HELLO_TIMEOUT)

    def dataReceived(self, data):
        try:
            self._parser.feed(data)
        except wire.ProtocolError as e:
            self.drop(str(e))

    # -- FrameParser's owner ---------------------------------------------------

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
            self._parser.max_frame = MAX_DATA_HEADER + CHUNK_SIZE
            stream.attach(self)
            return
        if kind != "chunk":
            raise wire.ProtocolError(f"unexpected {kind!r} frame")
        index = wire.int_field(header, "i", 0, 2**31)
        self.stream.chunk_started(index, body_length)
        self._index = index

    def body_received(self, piece):
        self._pieces.append(piece)
        self.stream.bytes_arrived(len(piece))

    def frame_ended(self):
        if self._index is None:
            return  # the hello
        pieces, self._pieces = self._pieces, []
        index, self._index = self._index, None
        self.stream.chunk_arrived(index, pieces)

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
        self._parser.stopped = True
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
