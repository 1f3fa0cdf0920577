"""
The secured connections of a private group: TLS 1.3 through Twisted's TLS
(pyOpenSSL), mutually authenticated with certificates of the group.

Every member derives the same certificate authority (CA) from the group
key (L{twisted_p2p.group.GroupKey.ca_seed}) and signs a certificate for
its own key pair with it (L{twisted_p2p.identity.Identity}).  Each side of
a connection shows its certificate and accepts only one that the group's
CA signed, so a peer without the key can neither connect nor be connected
to.  After the handshake, the public key in the other side's certificate
gives its peer id; where we know whom we meant to reach, it must be that
peer.  Only then does the transfer protocol see the connection.

The wrappers work at the endpoint level: L{GroupSecurity.server_endpoint}
and L{GroupSecurity.client_endpoint} wrap any TCP endpoint, and the
protocols over them are those of an open group, unaware of TLS (their
transport provides L{ISSLTransport}, so they can tell).

For speed: AES-GCM comes first (AES-NI makes it several times faster
than ChaCha20 on x86), and what one TCP read decrypts reaches the
protocol in one piece rather than one TLS record (16 KiB) at a time.
"""

import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import defer
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import alsoProvides, implementer

from twisted_p2p.identity import fingerprint_of, peer_id_of, public_bytes_of
from twisted_p2p.limits import EVICTABLE_AFTER, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS_PER_HOST
from twisted_p2p.wire import address_group

log = Logger()

#: TLS 1.3 cipher suites, preferred first.  AES-128-GCM is the fastest
#: with AES-NI (measured: ~2.7 GB/s against ~0.3-0.5 GB/s for ChaCha20 on
#: the project's machines); ChaCha20 stays for a peer without AES.
CIPHER_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

#: Certificates are valid from long ago to far ahead: a member is a member
#: until the group key changes, whatever its clock says.
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc)


class NotAMember(ConnectionError):
    """
    The other side of a connection is not the member of our group we meant
    to reach: the handshake failed, or its certificate is for another peer.
    """


def _ca_name(group_key):
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twisted-p2p"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"group {group_key.group_id_hex}"),
    ])


def ca_certificate(group_key):
    """
    The group's CA key and certificate.  Both follow from the group key
    alone (Ed25519 signatures are deterministic), so every member has the
    same.
    """
    ca_key = ed25519.Ed25519PrivateKey.from_private_bytes(group_key.ca_seed)
    name = _ca_name(group_key)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(int.from_bytes(group_key.group_id, "big") | 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, None)
    )
    return ca_key, certificate


def member_certificate(group_key, identity, ca_key=None):
    """
    A certificate for C{identity}'s key, signed by the group's CA.
    """
    if ca_key is None:
        ca_key, _ = ca_certificate(group_key)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)]))
        .issuer_name(_ca_name(group_key))
        .public_key(identity.private_key.public_key())
        .serial_number(int(identity.peer_id, 16) | 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, None)
    )


def _accept_verified(connection, certificate, error, depth, ok):
    # OpenSSL has checked the chain against the group's CA: take its word.
    return bool(ok)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class GroupCredentials:
    """
    Our certificate in the group, and the TLS context both sides of our
    connections use: TLS 1.3 only, a certificate required of the other
    side and checked against the group's CA (and nothing else), no
    session resumption (every connection shows its certificate).

    @ivar context: that pyOpenSSL context.
    """

    def __init__(self, group_key, identity):
        self.identity = identity
        ca_key, self.ca_certificate = ca_certificate(group_key)
        self.certificate = member_certificate(group_key, identity, ca_key)
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_tls13_ciphersuites(CIPHER_SUITES)
        context.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.use_certificate(self.certificate)
        context.use_privatekey(identity.private_key)
        context.check_privatekey()
        context.get_cert_store().add_cert(crypto.X509.from_cryptography(self.ca_certificate))
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _accept_verified)
        # The other side's certificate and the CA: no chains of members.
        context.set_verify_depth(1)
        self.context = context

    def serverConnectionForTLS(self, protocol):
        connection = SSL.Connection(self.context, None)
        connection.set_accept_state()
        return connection

    def clientConnectionForTLS(self, protocol):
        connection = SSL.Connection(self.context, None)
        connection.set_connect_state()
        return connection


def peer_of(transport):
    """
    C{(peer id, fingerprint)} of the other side of a TLS transport whose
    handshake is done, from the public key of its certificate.

    @raise NotAMember: no certificate, or not an Ed25519 key.
    """
    certificate = transport.getHandle().get_peer_certificate(as_cryptography=True)
    if certificate is None:
        raise NotAMember("it showed no certificate")
    public = public_bytes_of(certificate.public_key())
    if public is None:
        raise NotAMember("its certificate is not for an Ed25519 key")
    return peer_id_of(public), fingerprint_of(public)


def _describe(failure):
    """
    A TLS failure in a few words: OpenSSL's reasons, or the error's text.
    """
    error = failure.value
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        reasons = [entry[-1] for entry in error.args[0] if entry and entry[-1]]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return failure.getErrorMessage() or type(error).__name__


class _GroupTLS(BufferingTLSTransport):
    """
    Twisted's TLS transport, with three changes:

     - what one TCP read decrypts goes to the protocol above in one piece
       (see L{_Gate.hold}): a 256 KiB frame then arrives in 64 KiB pieces,
       as on plain TCP, rather than in 16 pieces that a framing protocol
       would join one by one;
     - it says it is an L{ISSLTransport}, whatever the transport below
       provides, so that the transfer code never bypasses it (no
       C{sendfile} to the socket under it);
     - its C{producer} is the one the protocol above registered, as a TCP
       transport's is (Twisted's shows the TCP transport's own, a wrapper),
       so that a protocol can tell whether its producer is registered.
    """

    def makeConnection(self, transport):
        BufferingTLSTransport.makeConnection(self, transport)
        alsoProvides(self, ISSLTransport)

    @property
    def producer(self):
        membrane = self._producer
        return None if membrane is None else membrane._producer

    def dataReceived(self, data):
        gate = self.wrappedProtocol
        gate.hold()
        try:
            BufferingTLSTransport.dataReceived(self, data)
        finally:
            gate.release()


class _TLSFactory(TLSMemoryBIOFactory):
    protocol = _GroupTLS
    noisy = False

    def buildProtocol(self, addr):
        # A refusal from the gates (too many handshakes from one host) is a
        # refusal here too: Twisted's wrapper would build a TLS protocol
        # around nothing, and fail with a traceback when it is connected.
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return self.protocol(self, wrapped)


@implementer(IHandshakeListener)
class _Gate(Protocol):
    """
    Sits between TLS and the transfer protocol: builds and connects the
    transfer protocol only once the handshake is done and the other side
    is the member we want; drops the connection if that takes longer than
    L{HANDSHAKE_TIMEOUT}.

    The transfer protocol is given the TLS transport itself; only incoming
    data passes through here.
    """

    def __init__(self, owner, address):
        self._owner = owner
        self._address = address
        self.app = None
        self._held = None
        self._timer = None

    def connectionMade(self):
        self._timer = self._owner.clock.callLater(HANDSHAKE_TIMEOUT, self._timed_out)

    def _timed_out(self):
        self._timer = None
        self._owner.refused(self, "the handshake took too long")
        self.transport.abortConnection()

    def _stop_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def handshakeCompleted(self):
        self._stop_timer()
        try:
            peer_id, fingerprint = peer_of(self.transport)
            self._owner.check(peer_id)
        except NotAMember as e:
            self._owner.refused(self, str(e))
            self.transport.abortConnection()
            return
        app = self._owner.build(self, self._address)
        if app is None:
            self.transport.loseConnection()
            return
        self.app = app
        self._owner.verified(peer_id, fingerprint)
        app.makeConnection(self.transport)
        self._owner.connected(self, app)

    def hold(self):
        """
        Keep what arrives until L{release}: the TLS transport calls these
        around each TCP read.
        """
        self._held = []

    def release(self):
        held, self._held = self._held, None
        if held and self.app is not None:
            self.app.dataReceived(held[0] if len(held) == 1 else b"".join(held))

    def dataReceived(self, data):
        if self._held is not None:
            self._held.append(data)
        elif self.app is not None:
            self.app.dataReceived(data)

    def connectionLost(self, reason):
        self._stop_timer()
        self.release()
        if self.app is not None:
            app, self.app = self.app, None
            app.connectionLost(reason)
        else:
            self._owner.lost(self, reason)


class _ServerGates(Factory):
    """
    The gates of one listening port: any member may connect.  At most
    L{MAX_CONNECTIONS_PER_HOST} handshakes may be under way from one host,
    so that a stranger cannot hold many open; past that, a new one aborts
    the host's oldest handshake if it has been under way for
    L{EVICTABLE_AFTER} (a member's takes milliseconds), so that a stranger
    stalling handshakes from a member's address cannot keep it out.  Past
    the handshake the transfer factory's own limits apply.
    """

    noisy = False

    def __init__(self, factory, clock, verified):
        self._factory = factory
        self.clock = clock
        self._verified = verified
        self._pending = {}

    def doStart(self):
        self._factory.doStart()

    def doStop(self):
        self._factory.doStop()

    def logPrefix(self):
        # "SenderFactory (TLS) starting on 27102" in the log, as for an
        # open peer's ports.
        return type(self._factory).__name__

    def buildProtocol(self, address):
        host = address_group(getattr(address, "host", None))
        pending = self._pending.setdefault(host, [])
        now = self.clock.seconds()
        if len(pending) >= MAX_CONNECTIONS_PER_HOST:
            oldest = pending[0]
            if now - oldest.since < EVICTABLE_AFTER or oldest.transport is None:
                return None
            self._done(oldest)
            oldest.transport.abortConnection()
        gate = _Gate(self, address)
        gate.factory = self
        gate.pending_host = host
        gate.since = now
        self._pending.setdefault(host, []).append(gate)
        return gate

    def _done(self, gate):
        # Once per gate: when its handshake is over, or it is lost before.
        host = gate.__dict__.pop("pending_host", None)
        pending = self._pending.get(host)
        if pending is not None and gate in pending:
            pending.remove(gate)
            if not pending:
                del self._pending[host]

    def check(self, peer_id):
        pass  # any member

    def build(self, gate, address):
        self._done(gate)
        return self._factory.buildProtocol(address)

    def verified(self, peer_id, fingerprint):
        self._verified(peer_id, fingerprint)

    def connected(self, gate, app):
        pass

    def refused(self, gate, why):
        gate.refused = True
        log.info(
            "Refused a connection from {host}: {why}",
            host=getattr(gate._address, "host", gate._address),
            why=why,
        )

    def lost(self, gate, reason):
        if not getattr(gate, "refused", False):
            self.refused(gate, f"the TLS handshake failed ({_describe(reason)})")
        self._done(gate)


class _ClientGate(Factory):
    """
    The gate of one outgoing connection: fires C{ready} with the transfer
    protocol once the other side is shown to be C{peer_id} (any member for
    C{None}), or fails it with L{NotAMember}.
    """

    noisy = False

    def __init__(self, factory, clock, peer_id, where, verified):
        self._factory = factory
        self.clock = clock
        self._peer_id = peer_id
        self._where = where
        self._verified = verified
        self._why = None
        self.ready = None

    def buildProtocol(self, address):
        gate = _Gate(self, address)
        gate.factory = self
        return gate

    def check(self, peer_id):
        if self._peer_id is not None and peer_id != self._peer_id:
            raise NotAMember(
                f"its certificate is for peer {peer_id[:8]}, not {self._peer_id[:8]}"
            )

    def build(self, gate, address):
        return self._factory.buildProtocol(address)

    def verified(self, peer_id, fingerprint):
        self._verified(peer_id, fingerprint)

    def connected(self, gate, app):
        if not self.ready.called:
            self.ready.callback(app)

    def refused(self, gate, why):
        self._why = why

    def lost(self, gate, reason):
        if self.ready.called:
            return
        why = self._why or _describe(reason)
        self.ready.errback(NotAMember(
            f"no secured connection to {self._where}: {why} "
            "(is it a member of this group, with the same key?)"
        ))


@implementer(IStreamServerEndpoint)
class GroupServerEndpoint:
    """
    A server endpoint whose connections are the group's TLS.
    """

    def __init__(self, security, wrapped):
        self._security = security
        self.wrapped = wrapped

    def listen(self, factory):
        gates = _ServerGates(factory, self._security.clock, self._security.verified)
        return self.wrapped.listen(_TLSFactory(self._security.credentials, False, gates))


@implementer(IStreamClientEndpoint)
class GroupClientEndpoint:
    """
    A client endpoint whose connection is the group's TLS, to C{peer_id}
    (or any member, for C{None}).  C{connect} fires once the other side is
    shown to be that peer, with the protocol built from the factory.
    """

    def __init__(self, security, wrapped, peer_id=None, where="the peer"):
        self._security = security
        self.wrapped = wrapped
        self._peer_id = peer_id
        self._where = where

    def connect(self, factory):
        gate = _ClientGate(
            factory, self._security.clock, self._peer_id, self._where, self._security.verified
        )
        connecting = self.wrapped.connect(_TLSFactory(self._security.credentials, True, gate))
        made = []

        def cancel(ready):
            if not connecting.called:
                connecting.cancel()
            elif made:
                made[0].abortConnection()

        gate.ready = ready = defer.Deferred(cancel)

        def tcp_failed(failure):
            if not ready.called:
                ready.errback(failure)

        connecting.addCallbacks(made.append, tcp_failed)
        return ready


class GroupSecurity:
    """
    What a peer of a private group secures its connections with: its
    credentials, and endpoint wrappers.

    @param clock: an L{IReactorTime}, for handshake timeouts.
    @param verified: C{verified(peer_id, fingerprint)}, told of every
        member a connection has proven to be who it is.
    """

    def __init__(self, group_key, identity, clock, verified=None):
        self.credentials = GroupCredentials(group_key, identity)
        self.clock = clock
        self.verified = verified or (lambda peer_id, fingerprint: None)

    def server_endpoint(self, endpoint):
        return GroupServerEndpoint(self, endpoint)

    def client_endpoint(self, endpoint, peer_id=None, where="the peer"):
        return GroupClientEndpoint(self, endpoint, peer_id, where)
