"""
The four transfer ports, as thin protocols.

 - T, receiver: L{ReceiverProtocol} takes chunk data for our own outstanding
   requests and hands it to the L{Inbox}.
 - T+1, sender: L{SenderProtocol} answers catalog, manifest and chunk requests
   by asking an L{Uploads} (in C{uploads.py}).  Chunk data does not go back on
   this connection: L{ChunkPusher} opens a connection to the requester's
   receiver port, at the address the request came from.
 - T+2, distributor, and T+3, distributee: L{NotSupportedProtocol} for now.

Every connection speaks frames (see C{wire.py}) and is dropped on the first
frame that breaks the protocol, or after L{IDLE_TIMEOUT} of silence.
"""

from collections import Counter, deque

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from twisted_p2p import wire
from twisted_p2p.limits import (
    HELLO_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS_PER_HOST,
    MAX_FRAME,
    MAX_HEADER,
    MAX_QUEUED_REQUESTS,
)

log = Logger()


class RequestRefused(Exception):
    """
    A well-formed request we will not serve; the connection stays up.

    @ivar code: a short machine-readable reason (C{unknown-file}, C{busy},
        C{unreachable}, ...).
    """

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


class FramedProtocol(Int32StringReceiver, TimeoutMixin):
    """
    Frames in, frames out, and a connection dropped on the first bad one.

    Subclasses implement L{frame_received}.
    """

    MAX_LENGTH = MAX_FRAME
    idle_timeout = IDLE_TIMEOUT

    def connectionMade(self):
        self.setTimeout(self.idle_timeout)

    def stringReceived(self, frame):
        self.resetTimeout()
        try:
            header, body = wire.decode_frame(frame)
        except wire.ProtocolError as e:
            self.protocol_error(str(e))
            return
        try:
            self.frame_received(header, body)
        except wire.ProtocolError as e:
            self.protocol_error(str(e))

    def frame_received(self, header, body):
        raise NotImplementedError()

    def lengthLimitExceeded(self, length):
        self.protocol_error(f"a frame of {length} bytes is over the limit")

    def protocol_error(self, reason):
        """
        Log a broken message and drop the connection.
        """
        if self.transport is None or self.transport.disconnecting:
            return
        peer = self.transport.getPeer()
        log.info(
            "Dropping {kind} connection from {host}: {reason}",
            kind=type(self).__name__,
            host=getattr(peer, "host", peer),
            reason=reason,
        )
        self.paused = True  # parse nothing more from this connection
        self.setTimeout(None)
        self.transport.loseConnection()

    def send(self, header, body=b""):
        self.sendString(wire.encode_frame(header, body))

    def timeoutConnection(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.setTimeout(None)
        release = getattr(self.factory, "release", None)
        if release is not None:
            release(self)


class PerHostLimitedFactory(Factory):
    """
    A server factory that refuses a host's connections beyond
    L{MAX_CONNECTIONS_PER_HOST}, so that one host cannot hold thousands of
    half-sent frames in our memory.  Its protocols hand their place back
    when they close (L{FramedProtocol.connectionLost}).
    """

    noisy = False
    max_per_host = MAX_CONNECTIONS_PER_HOST

    def buildProtocol(self, addr):
        counts = self.__dict__.setdefault("_per_host", Counter())
        host = getattr(addr, "host", None)
        if counts[host] >= self.max_per_host:
            self.__dict__["refused"] = self.__dict__.get("refused", 0) + 1
            return None  # Twisted closes the connection
        counts[host] += 1
        protocol = Factory.buildProtocol(self, addr)
        protocol._limited_host = host
        return protocol

    def release(self, protocol):
        host = protocol.__dict__.pop("_limited_host", None)
        counts = self.__dict__.get("_per_host")
        if counts is not None and host in counts:
            counts[host] -= 1
            if counts[host] <= 0:
                del counts[host]


# -- T+1: sender -------------------------------------------------------------


class SenderProtocol(FramedProtocol):
    """
    The sender port: answers requests one at a time, in order, from
    C{factory.uploads} (an L{Uploads}).

    Memory per connection is bounded however the requester behaves: reading
    (parsing) pauses while L{MAX_QUEUED_REQUESTS} requests wait, and while
    the transport's write buffer is full, i.e. while the requester does not
    read its answers.  A requester that neither reads nor lets us read is
    dropped by the idle timeout.
    """

    MAX_LENGTH = MAX_HEADER  # requests are headers only

    def connectionMade(self):
        FramedProtocol.connectionMade(self)
        self._requests = deque()
        self._busy = False
        self._looping = False
        self._parsing = False
        self._writes_blocked = False
        self._write_gate = _WriteGate(self)
        self.transport.registerProducer(self._write_gate, True)

    def dataReceived(self, data):
        # Int32StringReceiver.resumeProducing re-parses from the start of its
        # buffer: called from inside dataReceived, it would parse frames
        # twice.  _update_reading needs to know where it is called from.
        self._parsing = True
        try:
            FramedProtocol.dataReceived(self, data)
        finally:
            self._parsing = False

    def frame_received(self, header, body):
        self._requests.append(header)
        self._answer_next()
        self._update_reading()

    def writes_blocked(self, blocked):
        """
        The transport's write buffer is full (C{True}) or has drained.
        """
        self._writes_blocked = blocked
        self._update_reading()

    def _update_reading(self):
        """
        Pause or resume reading the connection, as the request queue and the
        write buffer allow.
        """
        if self.transport is None or self.transport.disconnecting:
            return
        hold = self._writes_blocked or len(self._requests) >= MAX_QUEUED_REQUESTS
        if hold and not self.paused:
            self.pauseProducing()
        elif not hold and self.paused:
            if self._parsing:
                # The dataReceived loop under us carries on by itself.
                self.paused = False
                self.transport.resumeProducing()
            else:
                self.resumeProducing()

    def _answer_next(self):
        # A loop, not recursion: answers that are ready at once would
        # otherwise nest one call per queued request.
        if self._looping:
            return
        self._looping = True
        try:
            while self._requests and not self._busy and not self.transport.disconnecting:
                header = self._requests.popleft()
                self._busy = True
                host = self.transport.getPeer().host
                d = defer.maybeDeferred(self.factory.uploads.handle, header, host)
                d.addCallbacks(self._reply, self._refuse, errbackArgs=(header,))
                d.addErrback(lambda f: log.failure("Answering a request failed", f))
                d.addBoth(self._answered)
        finally:
            self._looping = False

    def _reply(self, answer):
        reply, body = answer
        if not self.transport.disconnecting:
            self.send(reply, body)

    def _refuse(self, failure, header):
        if self.transport.disconnecting:
            return
        if failure.check(RequestRefused):
            error = failure.value
            self.send({"t": "error", "code": error.code, "message": error.message})
            return
        if failure.check(wire.ProtocolError):
            self.send(
                {"t": "error", "code": "bad-request", "message": failure.getErrorMessage()}
            )
            self.protocol_error(failure.getErrorMessage())
            return
        # Still one answer per request, or every later answer would be
        # matched to the wrong request.
        log.failure("Answering a request failed", failure)
        self.send({"t": "error", "code": "internal", "message": "this peer failed to answer"})

    def _answered(self, _):
        self._busy = False
        self._answer_next()
        self._update_reading()

    def protocol_error(self, reason):
        # A paused producer would keep a closing transport open (it is
        # resumed, not closed, once the buffer drains): unregister it first.
        if self.transport is not None and self.transport.producer is self._write_gate:
            self.transport.unregisterProducer()
        FramedProtocol.protocol_error(self, reason)


@implementer(IPushProducer)
class _WriteGate:
    """
    Registered with a L{SenderProtocol}'s transport, so that a full write
    buffer pauses reading the requests.

    A separate object, because the protocol's own C{pauseProducing} and
    C{resumeProducing} (from C{Int32StringReceiver}) pause reading directly,
    and reading must stay paused while the request queue is full even if
    the write buffer drains.
    """

    def __init__(self, protocol):
        self._protocol = protocol

    def pauseProducing(self):
        self._protocol.writes_blocked(True)

    def resumeProducing(self):
        self._protocol.writes_blocked(False)

    def stopProducing(self):
        pass  # the connection is gone; connectionLost cleans up


class SenderFactory(PerHostLimitedFactory):
    protocol = SenderProtocol

    def __init__(self, uploads):
        self.uploads = uploads


@implementer(IPushProducer)
class _ChunkStream:
    """
    Streams chunks from disk to a transport, one read in flight at a time,
    pausing when the transport's buffer is full.  Memory stays at one chunk.

    With C{pace} (a L{TokenBucket}'s C{take}), each chunk's bytes are taken
    from the bucket before the chunk is read: the stream waits on the clock,
    holding no data, until the peer's upload rate allows it.
    """

    def __init__(self, protocol, local_file, chunks, read_chunk, pace=None):
        self._protocol = protocol
        self._file = local_file
        self._chunks = deque(chunks)
        self._read_chunk = read_chunk
        self._pace = pace
        self._paused = False
        self._stopped = False
        self._reading = None
        self.chunks_sent = 0
        self.bytes_sent = 0
        self.done = defer.Deferred()

    def start(self):
        self._protocol.transport.registerProducer(self, True)
        self._pump()

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._pump()

    def stopProducing(self):
        self._stopped = True
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()
        self._finish(False)

    def _pump(self):
        if self._paused or self._stopped or self._reading is not None:
            return
        if not self._chunks:
            self._protocol.send({"t": "done"})
            self._finish(True)
            return
        index = self._chunks.popleft()
        manifest = self._file.manifest
        offset, length = manifest.chunk_offset(index), manifest.chunk_length(index)
        if self._pace is None:
            d = defer.succeed(None)
        else:
            d = self._pace(length)
            if not d.called:
                # Waiting on our own upload rate is not the receiver being
                # idle: the timeout does not run meanwhile.
                self._protocol.setTimeout(None)
                d.addCallback(self._paced)
        # Set before the callbacks: a read that is done at once clears it.
        self._reading = d
        d.addCallback(lambda _: self._read_chunk(self._file.path, offset, length))
        d.addCallbacks(self._read, self._read_failed, callbackArgs=(index,))

    def _paced(self, result):
        if not self._stopped:
            self._protocol.setTimeout(self._protocol.idle_timeout)
        return result

    def _read(self, data, index):
        self._reading = None
        if self._stopped:
            return
        self._protocol.send({"t": "chunk", "i": index}, data)
        # A chunk sent is progress: the receiver has read what came before
        # (or the write buffer would have paused us).
        self._protocol.resetTimeout()
        self.chunks_sent += 1
        self.bytes_sent += len(data)
        self._pump()

    def _read_failed(self, failure):
        self._reading = None
        if self._stopped:
            return  # cancelled by stopProducing
        log.warn(
            "Could not read {path} to send it: {error}",
            path=self._file.path,
            error=failure.getErrorMessage(),
        )
        self._finish(False)

    def _finish(self, complete):
        if self.done.called:
            return
        self._stopped = True
        transport = self._protocol.transport
        if transport is not None:
            transport.unregisterProducer()
            transport.loseConnection()
        self.done.callback(complete)


class ChunkPusher(FramedProtocol):
    """
    The connection a sender opens to a requester's receiver port: a hello
    with the request's token, then the chunks, then "done".

    The receiver never talks, so the idle timeout counts from the last chunk
    sent, and stands still while the stream waits on the upload rate.
    """

    def __init__(self, token, local_file, chunks, read_chunk, pace=None):
        self.token = token
        self.stream = _ChunkStream(self, local_file, chunks, read_chunk, pace)

    def connectionMade(self):
        FramedProtocol.connectionMade(self)
        self.send({"t": "hello", "v": wire.PROTOCOL_VERSION, "token": self.token})
        self.stream.start()

    def frame_received(self, header, body):
        raise wire.ProtocolError("the receiver does not talk back")

    def protocol_error(self, reason):
        FramedProtocol.protocol_error(self, reason)
        # Stop streaming too (a paused stream would be resumed, not closed,
        # once the write buffer drains).
        self.stream.stopProducing()

    def connectionLost(self, reason):
        FramedProtocol.connectionLost(self, reason)
        self.stream.stopProducing()


# -- T: receiver -------------------------------------------------------------


class ReceiverProtocol(FramedProtocol):
    """
    The receiver port: chunk data for requests we made, handed to
    C{factory.inbox} (an L{Inbox}).

    The first frame must be a hello naming a token we handed out, from the
    host we asked.  Anything else drops the connection.  While a chunk is
    being verified and written, reading pauses, so at most one chunk per
    connection is held in memory.
    """

    idle_timeout = HELLO_TIMEOUT
    # Until a token is shown, frames are headers only: a stranger cannot
    # make us buffer a whole chunk.
    MAX_LENGTH = MAX_HEADER

    def connectionMade(self):
        FramedProtocol.connectionMade(self)
        self.expectation = None

    def frame_received(self, header, body):
        kind = header["t"]
        if self.expectation is None:
            if kind != "hello":
                raise wire.ProtocolError("data before hello")
            wire.check_version(header)
            token = wire.token_field(header)
            host = self.transport.getPeer().host
            self.expectation = self.factory.inbox.claim(token, host)
            if self.expectation is None:
                raise wire.ProtocolError("a token nobody handed out")
            attach = getattr(self.expectation, "attach", None)
            if attach is not None:
                # So that the download can drop this connection when it no
                # longer wants what comes on it (a duplicate that lost).
                attach(self.transport)
            self.MAX_LENGTH = MAX_FRAME
            self.setTimeout(IDLE_TIMEOUT)
            return
        if kind == "chunk":
            index = wire.int_field(header, "i", 0, 2**31)
            if not self.expectation.accepts(index, len(body)):
                raise wire.ProtocolError(f"chunk {index} was not asked for")
            d = self.expectation.deliver(index, body)
            d.addErrback(lambda f: log.failure("Storing a chunk failed", f))
            if not d.called:
                # Resuming from inside dataReceived would parse frames twice:
                # pause only for a delivery that is still on its way.
                self.pauseProducing()
                d.addBoth(lambda _: self._delivered())
        elif kind == "done":
            self.expectation.finished()
            self.transport.loseConnection()
        else:
            raise wire.ProtocolError(f"unexpected {kind!r} frame")

    def _delivered(self):
        if self.transport is not None and not self.transport.disconnecting:
            self.resumeProducing()

    def connectionLost(self, reason):
        FramedProtocol.connectionLost(self, reason)
        if self.expectation is not None:
            self.expectation.lost()


class ReceiverFactory(PerHostLimitedFactory):
    protocol = ReceiverProtocol

    def __init__(self, inbox):
        self.inbox = inbox


class Inbox:
    """
    Owns the tokens of our outstanding chunk requests, so the receiver port
    accepts data only for them, and only from the host each was sent to.
    """

    def __init__(self):
        self._expected = {}

    def expect(self, expectation):
        self._expected[expectation.token] = expectation

    def withdraw(self, token):
        self._expected.pop(token, None)

    def claim(self, token, host):
        """
        The expectation for C{token} if it was sent to C{host}; a token can be
        claimed once.
        """
        expectation = self._expected.get(token)
        if expectation is None or expectation.host != host:
            return None
        del self._expected[token]
        return expectation

    def __len__(self):
        return len(self._expected)


# -- T+2, T+3: not yet ------------------------------------------------------


class NotSupportedProtocol(FramedProtocol):
    """
    Distributor and distributee ports: bound, and answering "not supported
    yet" until distribution is built.
    """

    def connectionMade(self):
        FramedProtocol.connectionMade(self)
        self.send(
            {
                "t": "error",
                "code": "not-supported",
                "message": "distribution is not supported yet",
            }
        )
        self.transport.loseConnection()

    def frame_received(self, header, body):
        pass


class NotSupportedFactory(PerHostLimitedFactory):
    protocol = NotSupportedProtocol
