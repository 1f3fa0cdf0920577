"""
What the transfer ports share: a cap on the connections one host may hold
to each port.
"""

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from support import frame
from twisted_p2p.limits import DESCRIPTOR_RESERVE, EVICTABLE_AFTER, MAX_CONNECTIONS_PER_HOST
from twisted_p2p.transfer import (
    ConnectionBudget,
    DistributeeFactory,
    DistributorFactory,
    Inbox,
    ReceiverFactory,
    SenderFactory,
)


class NoUploads:
    def session(self, host, keepalive=None, transport=None):
        return self

    def close(self):
        pass


FACTORIES = {
    "receiver": lambda: ReceiverFactory(Inbox()),
    "sender": lambda: SenderFactory(NoUploads()),
    "distributor": lambda: DistributorFactory(None),
    "distributee": lambda: DistributeeFactory(NoUploads()),
}


def connected(protocol, host):
    protocol.callLater = task.Clock().callLater
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, 1)))
    return protocol


@pytest.mark.parametrize("make", FACTORIES.values(), ids=FACTORIES.keys())
def test_a_host_gets_at_most_its_share_of_connections(make):
    factory = make()
    limit = MAX_CONNECTIONS_PER_HOST
    first = [
        factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000 + i)) for i in range(limit)
    ]
    assert all(p is not None for p in first)
    # One more from the same host is refused; Twisted closes it.
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50000)) is None
    # Other hosts are not affected.
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 50000)) is not None
    # A closed connection gives its place back, once.
    closed = connected(first[0], "192.0.2.7")
    closed.connectionLost(Failure(ConnectionDone()))
    closed.connectionLost(Failure(ConnectionDone()))
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50001)) is not None
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50002)) is None
    assert factory.refused == 2


# -- making room: idle connections give way, working ones never ------------------------


class BusySession:
    """
    An uploads session whose connection has a stream open (or not).
    """

    def __init__(self, streams=0):
        self.streams = streams

    def open_streams(self):
        return self.streams

    def close(self):
        pass


class SessionUploads:
    def __init__(self):
        self.sessions = []

    def session(self, host, keepalive=None, transport=None):
        self.sessions.append(BusySession())
        return self.sessions[-1]

    def handle(self, header, session):
        return {"t": "catalog", "rev": "0" * 16, "files": []}, b""


def connect_to(factory, clock, host="192.0.2.7", port=40000):
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    if protocol is None:
        return None
    protocol.callLater = clock.callLater
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, port)))
    return protocol


def test_a_host_at_its_limit_makes_room_by_closing_its_least_active_idle_connection():
    clock = task.Clock()
    uploads = SessionUploads()
    factory = SenderFactory(uploads)
    factory.clock = clock
    held = [connect_to(factory, clock, port=40000 + i) for i in range(MAX_CONNECTIONS_PER_HOST)]
    # All but two have a stream open: they hold work and are never closed.
    for session in uploads.sessions[2:]:
        session.streams = 1
    # Too soon: nobody has been idle long enough, and the newcomer is refused.
    clock.advance(EVICTABLE_AFTER / 2)
    assert connect_to(factory, clock, port=50000) is None
    clock.advance(EVICTABLE_AFTER)
    # The second one spoke since: the first is the least recently active.
    held[1].dataReceived(frame({"t": "catalog", "v": 1}))
    uploads.sessions[1].streams = 0
    newcomer = connect_to(factory, clock, port=50001)
    assert newcomer is not None
    assert held[0].transport.disconnected or held[0].transport.disconnecting
    assert not held[1].transport.disconnecting
    assert factory.evicted == 1
    # The place is the newcomer's: the closed one's connectionLost gives
    # back nothing more.
    held[0].connectionLost(Failure(ConnectionDone()))
    assert factory.connections() == MAX_CONNECTIONS_PER_HOST


def test_a_slowloris_connection_counts_as_idle():
    clock = task.Clock()
    factory = SenderFactory(SessionUploads())
    factory.clock = clock
    held = [connect_to(factory, clock, port=40000 + i) for i in range(MAX_CONNECTIONS_PER_HOST)]
    for protocol in held:
        protocol.dataReceived((1000).to_bytes(4, "big"))
    for _ in range(10):
        clock.advance(EVICTABLE_AFTER)
        for protocol in held:
            protocol.dataReceived(b"{")  # a byte at a time, never a whole frame
    assert not any(protocol.transport.disconnecting for protocol in held)
    assert connect_to(factory, clock, port=50000) is not None


def test_a_data_connection_is_idle_until_its_hello():
    clock = task.Clock()
    inbox = Inbox()
    factory = ReceiverFactory(inbox)
    factory.clock = clock
    held = [connect_to(factory, clock, port=40000 + i) for i in range(MAX_CONNECTIONS_PER_HOST)]
    held[0].stream = object()  # a stream owns it once its hello came
    clock.advance(EVICTABLE_AFTER)
    assert connect_to(factory, clock, port=50000) is not None
    assert not held[0].transport.disconnecting
    assert held[1].transport.disconnecting


def test_the_budget_of_all_ports_makes_room_on_the_busiest_host_or_refuses():
    clock = task.Clock()
    budget = ConnectionBudget(limit=3)
    senders, receivers = SenderFactory(SessionUploads()), ReceiverFactory(Inbox())
    for factory in (senders, receivers):
        factory.clock = clock
        budget.watch(factory)
    a1 = connect_to(senders, clock, "192.0.2.1")
    b1 = connect_to(receivers, clock, "192.0.2.2", 1)
    clock.advance(0.5)
    b2 = connect_to(senders, clock, "192.0.2.2", 2)
    assert budget.used() == 3
    assert connect_to(senders, clock, "192.0.2.3") is None  # nobody idle yet
    clock.advance(EVICTABLE_AFTER)
    newcomer = connect_to(receivers, clock, "192.0.2.3")
    assert newcomer is not None
    # The host with the most gave way, its least recently active first.
    assert b1.transport.disconnecting and not b2.transport.disconnecting
    assert not a1.transport.disconnecting
    assert (budget.used(), budget.evicted, budget.refused) == (3, 1, 1)


def test_the_default_budget_keeps_the_reserve():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert ConnectionBudget().limit == max(soft - DESCRIPTOR_RESERVE, MAX_CONNECTIONS_PER_HOST)


def test_at_the_budget_a_crowded_host_cannot_make_room_for_itself():
    """
    A flood reconnecting as fast as it is closed cannot take the places a
    host with few connections is owed: only a less crowded host makes room.
    """
    clock = task.Clock()
    budget = ConnectionBudget(limit=4)
    senders = SenderFactory(SessionUploads())
    senders.clock = clock
    budget.watch(senders)
    flood = [connect_to(senders, clock, "198.51.100.9", 40000 + i) for i in range(3)]
    honest = connect_to(senders, clock, "192.0.2.1")
    clock.advance(EVICTABLE_AFTER)
    assert connect_to(senders, clock, "198.51.100.9", 50000) is None
    assert connect_to(senders, clock, "198.51.100.10", 50000) is not None
    assert sum(p.transport.disconnecting for p in flood) == 1
    assert not honest.transport.disconnecting
