"""
What every transfer connection shares: frames in and out, a connection
dropped on the first bad frame or after a silence, and a cap on the
connections one host may hold to a port.
"""

import resource

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.policies import TimeoutMixin

from twisted_p2p import wire
from twisted_p2p.limits import (
    DESCRIPTOR_RESERVE,
    EVICTABLE_AFTER,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS_PER_HOST,
    MAX_FRAME,
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
        self.last_active = _now(self)

    def holds_work(self):
        """
        Whether this connection has something under way (a request being
        answered, a stream open) and must not be closed to make room.
        """
        return False

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
        self.last_active = _now(self)
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

    def send_answer(self, answer):
        """
        Send C{answer}, a C{(header, body)}, unless the connection is going.
        """
        reply, body = answer
        if not self.transport.disconnecting:
            self.send(reply, body)

    def send_refusal(self, failure, what="a request"):
        """
        Answer a request whose handling failed with C{failure}: its own
        error for a L{RequestRefused}; C{bad-request}, then a dropped
        connection, for a L{wire.ProtocolError}; else C{internal}, logged.
        Still one answer per request, or every later answer would be
        matched to the wrong request.
        """
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
        log.failure("Answering {what} failed", failure, what=what)
        self.send({"t": "error", "code": "internal", "message": "this peer failed to answer"})

    def timeoutConnection(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.setTimeout(None)
        release_place(self)


def _now(owner):
    """
    The time by the clock of C{owner}, a factory or one of its protocols.
    """
    factory = owner if isinstance(owner, Factory) else getattr(owner, "factory", None)
    clock = getattr(factory, "clock", None)
    if clock is None:
        from twisted.internet import reactor as clock
    return clock.seconds()


def release_place(protocol):
    """
    Give back the place C{protocol} held in its factory's per-host count.
    """
    release = getattr(getattr(protocol, "factory", None), "release", None)
    if release is not None:
        release(protocol)


def evictable(protocol, now):
    """
    Whether C{protocol} may be closed to make room for a new connection:
    connected, silent for L{EVICTABLE_AFTER} seconds, and holding no work.
    """
    transport = getattr(protocol, "transport", None)
    if transport is None or transport.disconnecting:
        return False
    last = getattr(protocol, "last_active", None)
    return last is not None and now - last >= EVICTABLE_AFTER and not protocol.holds_work()


def evict(protocol, reason):
    log.info(
        "Closing an idle {kind} connection from {host} to make room: {reason}",
        kind=type(protocol).__name__,
        host=describe_peer(protocol.transport),
        reason=reason,
    )
    release_place(protocol)
    protocol.transport.abortConnection()


class ConnectionBudget:
    """
    Owns the count of connections accepted on all our ports together, so
    that they never take the descriptors the peer needs for its own work
    (L{DESCRIPTOR_RESERVE}).  At the limit, a new connection from a host
    holding at least two fewer than the host holding the most makes room by
    closing the least recently active idle one (see L{evictable}) of that
    host; else it is refused.  So a flood from many addresses, however fast
    it reconnects, ends up with the connections shared out between hosts,
    and a host with few still gets in.

    @param limit: connections at most; by default the process's descriptor
        limit less the reserve.
    """

    def __init__(self, limit=None):
        if limit is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft == resource.RLIM_INFINITY:
                soft = 1 << 20
            limit = max(soft - DESCRIPTOR_RESERVE, MAX_CONNECTIONS_PER_HOST)
        self.limit = limit
        self._factories = []
        self.refused = 0
        self.evicted = 0

    def watch(self, factory):
        factory.budget = self
        self._factories.append(factory)

    def used(self):
        return sum(factory.connections() for factory in self._factories)

    def make_room(self, now, host=None):
        """
        Whether a new connection from C{host} may be accepted, closing an
        idle one of a more crowded host if that is what it takes.
        """
        if self.used() < self.limit:
            return True
        by_host = {}
        for factory in self._factories:
            for held_host, protocols in factory.places().items():
                by_host.setdefault(held_host, []).extend(protocols)
        mine = len(by_host.get(host, ()))
        for held_host, protocols in sorted(by_host.items(), key=lambda item: -len(item[1])):
            if len(protocols) < mine + 2:
                break
            idle = [p for p in protocols if evictable(p, now)]
            if idle:
                evict(min(idle, key=lambda p: p.last_active), "too many connections in all")
                self.evicted += 1
                return True
        self.refused += 1
        return False


class PerHostLimitedFactory(Factory):
    """
    A server factory that holds at most L{MAX_CONNECTIONS_PER_HOST}
    connections of one host, so that one host cannot hold thousands of
    half-sent frames in our memory.  A host at its limit may still connect:
    its least recently active idle connection is closed to make room (see
    L{evictable}), so that idle or slowloris connections cannot keep out an
    honest peer on the same host; if none is idle, the new one is refused.
    Its protocols hand their place back when they close (L{release_place}).

    @ivar clock: an L{IReactorTime} (the global reactor if none is set).
    @ivar budget: the L{ConnectionBudget} shared by all our ports, or
        C{None}.
    """

    noisy = False
    max_per_host = MAX_CONNECTIONS_PER_HOST
    clock = None
    budget = None

    def places(self):
        """
        Host -> the protocols holding a place of it.
        """
        return self.__dict__.setdefault("_places", {})

    def connections(self):
        return sum(len(protocols) for protocols in self.places().values())

    def buildProtocol(self, addr):
        places = self.places()
        host = wire.address_group(getattr(addr, "host", None))
        now = _now(self)
        held = places.get(host, ())
        if len(held) >= self.max_per_host:
            idle = [p for p in held if evictable(p, now)]
            if not idle:
                return self._refuse()
            evict(min(idle, key=lambda p: p.last_active), "its host has too many")
            self.__dict__["evicted"] = self.__dict__.get("evicted", 0) + 1
        if self.budget is not None and not self.budget.make_room(now, host):
            return self._refuse()
        protocol = Factory.buildProtocol(self, addr)
        protocol._limited_host = host
        places.setdefault(host, []).append(protocol)
        return protocol

    def _refuse(self):
        self.__dict__["refused"] = self.__dict__.get("refused", 0) + 1
        return None  # Twisted closes the connection

    def release(self, protocol):
        host = protocol.__dict__.pop("_limited_host", None)
        held = self.places().get(host)
        if held is not None and protocol in held:
            held.remove(protocol)
            if not held:
                del self.places()[host]
