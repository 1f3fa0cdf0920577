"""
The group's TLS: certificates, and connections on real loopback sockets
between members, members of another group, and strangers without TLS.
"""

import socket

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from support import log_events
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.threads import deferToThread
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from twisted_p2p import tls
from twisted_p2p.group import GroupKey
from twisted_p2p.identity import Identity, peer_id_of, public_bytes_of
from twisted_p2p.limits import HANDSHAKE_TIMEOUT, MAX_CONNECTIONS_PER_HOST

GROUP = GroupKey(bytes(range(32)))
OTHER_GROUP = GroupKey(bytes(range(1, 33)))


# -- certificates --------------------------------------------------------------


def test_every_member_derives_the_same_ca():
    _, first = tls.ca_certificate(GROUP)
    _, again = tls.ca_certificate(GroupKey(bytes(range(32))))
    _, other = tls.ca_certificate(OTHER_GROUP)
    der = serialization.Encoding.DER
    assert first.public_bytes(der) == again.public_bytes(der)
    assert first.public_key() != other.public_key()


def _verifies(certificate, ca):
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(ca))
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(certificate))
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True


def test_a_member_certificate_is_checked_against_its_group():
    identity = Identity.generate()
    certificate = tls.member_certificate(GROUP, identity)
    assert _verifies(certificate, tls.ca_certificate(GROUP)[1])
    assert not _verifies(certificate, tls.ca_certificate(OTHER_GROUP)[1])
    # A certificate carries the member's own key, so its peer id follows.
    assert peer_id_of(public_bytes_of(certificate.public_key())) == identity.peer_id


# -- connections -------------------------------------------------------------------


class Recorder(Protocol):
    """
    Records what arrives, in the pieces it arrives in.
    """

    def __init__(self):
        self.pieces = []
        self.made = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.pieces.append(data)

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)

    @property
    def data(self):
        return b"".join(self.pieces)


class Server:
    """
    A member listening on loopback with a L{Recorder} per connection.
    """

    def __init__(self, group=GROUP, clock=reactor):
        self.identity = Identity.generate()
        self.verified = []
        self.security = tls.GroupSecurity(
            group, self.identity, clock, lambda *a: self.verified.append(a)
        )
        self.protocols = []
        self.connected = defer.Deferred()
        self.port = None

    async def listen(self):
        def build():
            protocol = Recorder()
            self.protocols.append(protocol)
            if not self.connected.called:
                self.connected.callback(protocol)
            return protocol

        endpoint = self.security.server_endpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        self.port = await endpoint.listen(Factory.forProtocol(build))
        return self

    @property
    def address(self):
        return self.port.getHost().port


def client(group, port, peer_id=None, verified=None):
    security = tls.GroupSecurity(group, Identity.generate(), reactor, verified)
    wrapped = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    endpoint = security.client_endpoint(wrapped, peer_id, where=f"127.0.0.1:{port}")
    return security, endpoint.connect(Factory.forProtocol(Recorder))


@pytest.fixture
def server():
    made = []

    async def start(**kwargs):
        made.append(await Server(**kwargs).listen())
        return made[-1]

    yield start
    for s in made:
        pytest_twisted.blockon(defer.maybeDeferred(s.port.stopListening))


async def settle(seconds=0.1):
    await task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_two_members_connect_and_know_each_other(server):
    s = await server()
    seen = []
    security, connecting = client(GROUP, s.address, s.identity.peer_id, lambda *a: seen.append(a))
    protocol = await connecting
    assert ISSLTransport.providedBy(protocol.transport)
    connection = protocol.transport.getHandle()
    assert connection.get_protocol_version_name() == "TLSv1.3"
    assert connection.get_cipher_name() == "TLS_AES_128_GCM_SHA256"
    protocol.transport.write(b"hello, member")
    theirs = await s.connected
    while theirs.data != b"hello, member":
        await settle(0.01)
    assert seen == [(s.identity.peer_id, s.identity.fingerprint)]
    me = security.credentials.identity
    assert s.verified == [(me.peer_id, me.fingerprint)]
    protocol.transport.loseConnection()
    await theirs.lost


@pytest_twisted.ensureDeferred
async def test_a_decrypted_read_arrives_in_one_piece(server):
    s = await server()
    _, connecting = client(GROUP, s.address)
    protocol = await connecting
    payload = bytes(range(256)) * 4096  # 1 MiB: 64 TLS records
    protocol.transport.write(payload)
    protocol.transport.loseConnection()
    theirs = await s.connected
    await theirs.lost
    assert theirs.data == payload
    # Records are 16 KiB; pieces are what a TCP read brought.
    assert max(len(p) for p in theirs.pieces) > 16384
    assert len(theirs.pieces) < 64


@pytest_twisted.ensureDeferred
async def test_a_member_that_is_not_the_peer_we_meant_is_refused(server):
    s = await server()
    _, connecting = client(GROUP, s.address, peer_id="0" * 32)
    with pytest.raises(tls.NotAMember, match="is for peer .*, not 00000000"):
        await connecting


@pytest_twisted.ensureDeferred
async def test_another_group_can_neither_connect_nor_be_connected_to(server):
    s = await server()
    _, connecting = client(OTHER_GROUP, s.address)
    with pytest.raises(tls.NotAMember, match="member of this group"):
        await connecting
    await settle()
    assert s.protocols == []
    assert s.verified == []


@pytest.fixture
def logged():
    with log_events() as events:
        yield lambda: [formatEvent(e) for e in events]


@pytest_twisted.ensureDeferred
async def test_a_stranger_without_tls_gets_nothing(server, logged):
    s = await server()
    request = b'\x00\x00\x00\x1d{"t":"catalog","v":1,"start":0}\n'
    answer = await _raw_exchange(s.address, request)
    assert b'"t"' not in answer  # at most a TLS alert
    assert s.protocols == []
    await settle()
    refusals = [line for line in logged() if line.startswith("Refused a connection")]
    assert len(refusals) == 1, refusals
    assert refusals[0].startswith("Refused a connection from 127.0.0.1: the TLS handshake failed (")


def _raw_exchange(port, data):
    """
    Send C{data} over plain TCP in a thread and read until the server
    closes; what came back.
    """

    def exchange():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(data)
            received = b""
            while True:
                try:
                    piece = sock.recv(65536)
                except ConnectionResetError:
                    return received
                if not piece:
                    return received
                received += piece

    return deferToThread(exchange)


@pytest_twisted.ensureDeferred
async def test_a_silent_stranger_is_dropped_after_the_handshake_timeout(server, logged):
    clock = task.Clock()
    s = await server(clock=clock)
    lost = defer.Deferred()

    class Silent(Protocol):
        def connectionLost(self, reason):
            lost.callback(None)

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", s.address)
    await endpoint.connect(Factory.forProtocol(Silent))
    await settle()
    assert not lost.called
    clock.advance(HANDSHAKE_TIMEOUT)
    await lost
    assert s.protocols == []
    await settle()
    assert [line for line in logged() if line.startswith("Refused")] == [
        "Refused a connection from 127.0.0.1: the handshake took too long"
    ]


@pytest_twisted.ensureDeferred
async def test_a_connection_can_be_cancelled_during_the_handshake(server):
    clock = task.Clock()
    s = await server(clock=clock)

    # A server that never answers: the handshake stays under way.
    silent = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    try:
        _, connecting = client(GROUP, silent.getHost().port)
        await settle()
        connecting.cancel()
        with pytest.raises(defer.CancelledError):
            await connecting
    finally:
        await silent.stopListening()
    assert s.protocols == []


def test_handshakes_under_way_from_one_host_are_bounded():
    gates = tls._ServerGates(Factory.forProtocol(Recorder), task.Clock(), lambda *a: None)
    address = IPv4Address("TCP", "192.0.2.1", 5000)
    made = [gates.buildProtocol(address) for _ in range(MAX_CONNECTIONS_PER_HOST)]
    assert None not in made
    assert gates.buildProtocol(address) is None
    assert gates.buildProtocol(IPv4Address("TCP", "192.0.2.2", 5000)) is not None
    # One given up makes room for one more; counted once however it ends.
    made[0].refused = True
    gates.lost(made[0], Failure(ConnectionDone()))
    gates.lost(made[0], Failure(ConnectionDone()))
    assert gates.buildProtocol(address) is not None
    assert gates.buildProtocol(address) is None


def test_a_stalled_handshake_gives_way_to_a_new_one_from_its_host():
    """
    A stranger holding MAX_CONNECTIONS_PER_HOST handshakes open from a
    member's address cannot keep the member out: once the oldest has
    stalled for EVICTABLE_AFTER, a new one aborts it.
    """
    from twisted.internet.testing import StringTransport

    from twisted_p2p.limits import EVICTABLE_AFTER

    clock = task.Clock()
    gates = tls._ServerGates(Factory.forProtocol(Recorder), clock, lambda *a: None)
    address = IPv4Address("TCP", "192.0.2.1", 5000)
    made = [gates.buildProtocol(address) for _ in range(MAX_CONNECTIONS_PER_HOST)]
    for gate in made:
        gate.makeConnection(StringTransport())
    assert gates.buildProtocol(address) is None  # none stalled long enough
    clock.advance(EVICTABLE_AFTER)
    assert gates.buildProtocol(address) is not None
    assert made[0].transport.disconnecting and not made[1].transport.disconnecting


def test_a_handshake_refused_by_the_gates_is_refused_by_the_tls_factory():
    """
    Past MAX_CONNECTIONS_PER_HOST handshakes from one host, the listening
    port's TLS factory refuses the connection (C{None}) rather than build a
    TLS protocol around nothing, which failed with a traceback when it was
    connected (found by the end-to-end handshake flood).
    """
    security = tls.GroupSecurity(GROUP, Identity.generate(), task.Clock(), None)
    gates = tls._ServerGates(Factory.forProtocol(Recorder), task.Clock(), lambda *a: None)
    factory = tls._TLSFactory(security.credentials, False, gates)
    address = IPv4Address("TCP", "192.0.2.1", 5000)
    made = [factory.buildProtocol(address) for _ in range(MAX_CONNECTIONS_PER_HOST)]
    assert None not in made
    assert factory.buildProtocol(address) is None
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 5000)) is not None
