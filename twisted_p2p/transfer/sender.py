"""
T+1, the sender port: answers catalog, manifest, chunk map and chunk
requests, one at a time and in order, from an L{twisted_p2p.uploads.Uploads}.

Chunk data does not go back on this connection: a C{get} opens a data
connection back to the requester's receiver port (see C{streams.py}), which
every later C{get} of the same token reuses.  The streams a connection opened
end with it.
"""

from collections import deque

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from twisted_p2p.limits import MAX_HEADER, MAX_QUEUED_REQUESTS
from twisted_p2p.transfer.framed import FramedProtocol, PerHostLimitedFactory

log = Logger()


class SenderProtocol(FramedProtocol):
    """
    The sender port: answers requests one at a time, in order, from
    C{factory.uploads} (an L{Uploads}), in the L{session} it gave this
    connection: the chunk streams opened from here end when it closes.

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
        self.session = self.factory.uploads.session(
            self.transport.getPeer().host, self.resetTimeout, self.transport
        )

    def holds_work(self):
        open_streams = getattr(self.session, "open_streams", lambda: 0)
        return bool(self._busy or self._requests or open_streams())

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
                d = defer.maybeDeferred(self.factory.uploads.handle, header, self.session)
                d.addCallbacks(self.send_answer, self.send_refusal)
                d.addErrback(lambda f: log.failure("Answering a request failed", f))
                d.addBoth(self._answered)
        finally:
            self._looping = False

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

    def connectionLost(self, reason):
        FramedProtocol.connectionLost(self, reason)
        self.session.close()


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
