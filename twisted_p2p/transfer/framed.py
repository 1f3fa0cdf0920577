"""
What every transfer connection shares: frames in and out, a connection
dropped on the first bad frame or after a silence, and a cap on the
connections one host may hold to a port.
"""

from collections import Counter

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.policies import TimeoutMixin

from twisted_p2p import wire
from twisted_p2p.limits import IDLE_TIMEOUT, MAX_CONNECTIONS_PER_HOST, MAX_FRAME

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


def describe_peer(transport):
    """
    The host a transport is connected to, for log lines.
    """
    peer = transport.getPeer()
    return getattr(peer, "host", peer)


class FramedProtocol(Int32StringReceiver, TimeoutMixin):
    """
    Frames in, frames out, and a connection dropped on the first bad one.
    Used for the request connections (sender port), whose frames are small;
    chunk data travels on data connections parsed by
    L{twisted_p2p.framing.FrameParser} instead.

    Subclasses implement L{frame_received}.
    """

    MAX_LENGTH = MAX_FRAME
    idle_timeout = IDLE_TIMEOUT

    def connectionMade(self):
        self.setTimeout(self.idle_timeout)

    def dataReceived(self, data):
        # Once a connection is dropped, what still arrives (over TLS, or
        # before the transport stops reading) is thrown away rather than
        # kept: a dropped peer cannot grow our buffer.
        if self._dropped:
            return
        Int32StringReceiver.dataReceived(self, data)

    _dropped = False

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
        log.info(
            "Dropping {kind} connection from {host}: {reason}",
            kind=type(self).__name__,
            host=describe_peer(self.transport),
            reason=reason,
        )
        self.paused = True  # parse nothing more from this connection
        self._dropped = True
        self._unprocessed = b""
        self.setTimeout(None)
        self.transport.loseConnection()

    def send(self, header, body=b""):
        self.sendString(wire.encode_frame(header, body))

    def timeoutConnection(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.setTimeout(None)
        release_place(self)


def release_place(protocol):
    """
    Give back the place C{protocol} held in its factory's per-host count.
    """
    release = getattr(getattr(protocol, "factory", None), "release", None)
    if release is not None:
        release(protocol)


class PerHostLimitedFactory(Factory):
    """
    A server factory that refuses a host's connections beyond
    L{MAX_CONNECTIONS_PER_HOST}, so that one host cannot hold thousands of
    half-sent frames in our memory.  Its protocols hand their place back
    when they close (L{release_place}).
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
