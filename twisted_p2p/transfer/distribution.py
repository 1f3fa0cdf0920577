"""
T+2, the distributor port, and T+3, the distributee port: thin protocols
that frame and parse, then hand each frame to the object that holds the
logic (L{twisted_p2p.distribution}), and answer in order.

 - T+2 takes C{pull} requests, answered by a L{Distributor}; the chunks it
   pulls come on the asker's T+3.
 - T+3 takes C{offer} and C{push} frames, answered by the
   L{DistributeeSession} of the connection.
"""

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger

from twisted_p2p import wire
from twisted_p2p.limits import MAX_DISTRIBUTION_QUEUE, MAX_HEADER
from twisted_p2p.transfer.framed import FramedProtocol, PerHostLimitedFactory, describe_peer

log = Logger()


class _OrderedProtocol(FramedProtocol):
    """
    Answers frames one at a time, in order, from L{answer} (a
    C{(header, body)} or a Deferred of one).  A peer that sends more than
    L{MAX_DISTRIBUTION_QUEUE} frames ahead of our answers is dropped: it
    could otherwise hold that many chunks in our memory.
    """

    def connectionMade(self):
        FramedProtocol.connectionMade(self)
        self._queue = deque()
        self._busy = False
        self._looping = False

    def frame_received(self, header, body):
        if len(self._queue) >= MAX_DISTRIBUTION_QUEUE:
            raise wire.ProtocolError("too many frames sent ahead of the answers")
        self._queue.append((header, body))
        self._next()

    def answer(self, header, body):
        raise NotImplementedError()

    def _next(self):
        if self._looping:
            return
        self._looping = True
        try:
            while self._queue and not self._busy and not self.transport.disconnecting:
                header, body = self._queue.popleft()
                self._busy = True
                d = defer.maybeDeferred(self.answer, header, body)
                d.addCallbacks(
                    self.send_answer, self.send_refusal, errbackArgs=("a distribution frame",)
                )
                d.addErrback(lambda f: log.failure("Answering a frame failed", f))
                d.addBoth(self._answered)
        finally:
            self._looping = False

    def _answered(self, _):
        self._busy = False
        if self.transport is not None:
            self._next()


class DistributeeProtocol(_OrderedProtocol):
    """
    T+3: offers and pushes of chunks for the cache, handed to the
    L{DistributeeSession} that C{factory.distributee} gives the connection.
    """

    def connectionMade(self):
        _OrderedProtocol.connectionMade(self)
        self.session = self.factory.distributee.session(describe_peer(self.transport))

    def answer(self, header, body):
        return self.session.handle(header, body)

    def connectionLost(self, reason):
        _OrderedProtocol.connectionLost(self, reason)
        self.session.close()


class DistributeeFactory(PerHostLimitedFactory):
    protocol = DistributeeProtocol

    def __init__(self, distributee):
        self.distributee = distributee


class DistributorProtocol(_OrderedProtocol):
    """
    T+2: C{pull} requests, answered by C{factory.distributor} (a
    L{Distributor}).
    """

    MAX_LENGTH = MAX_HEADER  # requests are headers only

    def answer(self, header, body):
        if body:
            raise wire.ProtocolError("a pull has no body")
        return self.factory.distributor.pull(header, describe_peer(self.transport))


class DistributorFactory(PerHostLimitedFactory):
    protocol = DistributorProtocol

    def __init__(self, distributor):
        self.distributor = distributor
