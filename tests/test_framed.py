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

from twisted_p2p.limits import MAX_CONNECTIONS_PER_HOST
from twisted_p2p.transfer import (
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
