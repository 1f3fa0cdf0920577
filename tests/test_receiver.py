"""
T, the receiver port: a data connection's hello and chunk frames, fed whole,
one byte at a time, and read into the stream's buffers as recv_into does;
what breaks the rules drops the connection.  With a recording stream, with
the real L{SourceStream} (which checks what was asked and the lengths), and
on real sockets through L{ReceiverEndpoint}.
"""

import socket
import struct
from types import SimpleNamespace

import pytest
import pytest_twisted
from support import frame, framed
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p import wire
from twisted_p2p.download.buffers import BufferPool
from twisted_p2p.download.requests import GetRequest, Source, SourceStream
from twisted_p2p.limits import (
    CHUNK_SIZE,
    DATA_RECEIVE_BUFFER,
    HELLO_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_DATA_HEADER,
    MAX_RUN,
)
from twisted_p2p.manifest import Manifest
from twisted_p2p.transfer import Inbox, ReceiverEndpoint, ReceiverFactory, ReceiverProtocol
from twisted_p2p.transfer import receiver as receiver_module
from twisted_p2p.transfer.receiver import (
    _RecvIntoPort,
    data_receive_buffer,
    granted_receive_buffer,
    receive_buffer_to_ask,
    tune_receive_buffer,
)

PEER_HOST = "192.0.2.2"
OTHER_HOST = "192.0.2.3"
TOKEN = "ab" * 16


class FakeStream:
    """
    An incoming stream as the receiver port sees it: records what it is
    told, and gives each frame a buffer of its own (or refuses frames from
    C{refuse_from} on).
    """

    seal = None  # an open group's stream: not sealed

    def __init__(self, token=TOKEN, host=PEER_HOST, refuse_from=None, run=MAX_RUN):
        self.token = token
        self.host = host
        self.run = run
        self.events = []
        self.buffers = []
        self.arrived_bytes = 0
        self.connection = None
        self._refuse_from = refuse_from

    def attach(self, connection):
        self.connection = connection
        self.events.append("attach")

    def chunk_started(self, first, count, length):
        if self._refuse_from is not None and first >= self._refuse_from:
            raise wire.ProtocolError("not asked")
        self.events.append(("started", first, count, length))
        buffer = memoryview(bytearray(length))
        self.buffers.append(buffer)
        return buffer

    def bytes_arrived(self, count):
        self.arrived_bytes += count

    def chunk_arrived(self, first, count, buffer, line=b""):
        assert buffer is self.buffers[-1]
        self.events.append(("arrived", first, count, bytes(buffer)))

    def detached(self, connection, reason):
        assert connection is self.connection
        self.events.append(("detached", reason.type))

    def arrivals(self):
        return [event[1:] for event in self.events if event[0] == "arrived"]


def connect(factory, clock, host=PEER_HOST):
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    protocol.callLater = clock.callLater
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def receiver(stream, clock=None, host=PEER_HOST):
    """
    A receiver port connection from C{host}, with C{stream} expected; the
    protocol, its transport, and the inbox.
    """
    inbox = Inbox()
    if stream is not None:
        inbox.expect(stream)
    protocol, transport = connect(ReceiverFactory(inbox), clock or task.Clock(), host)
    return protocol, transport, inbox


def hello(token=TOKEN, version=1):
    return frame({"t": "hello", "v": version, "token": token})


def chunk(index, data, count=None):
    header = {"t": "chunk", "i": index}
    if count is not None:
        header["n"] = count
    return frame(header, data)


# -- with a recording stream -----------------------------------------------------------


def test_hello_then_chunks_and_runs_go_to_the_stream(feed):
    stream = FakeStream()
    protocol, transport, inbox = receiver(stream)
    feed(protocol, hello() + chunk(0, b"zero") + chunk(1, b"onetwo", count=2) + chunk(7, b"7"))
    assert len(inbox) == 0  # the token is used up
    assert stream.connection is protocol
    assert stream.events == [
        "attach",
        ("started", 0, 1, 4),
        ("arrived", 0, 1, b"zero"),
        ("started", 1, 2, 6),
        ("arrived", 1, 2, b"onetwo"),
        ("started", 7, 1, 1),
        ("arrived", 7, 1, b"7"),
    ]
    assert stream.arrived_bytes == 11
    assert not transport.disconnecting
    assert transport.value() == b""  # the receiver never talks


@pytest.mark.parametrize("piece", [1, 5, 64, 4096, 1 << 20])
def test_bodies_are_read_straight_into_the_streams_buffers(piece):
    """
    As L{ReceiverEndpoint}'s connections do: C{recv_into} the buffer the
    protocol names, at most what has arrived; a body's bytes land in the
    buffer its stream gave, past the few read with the head.
    """
    stream = FakeStream()
    protocol, transport, _ = receiver(stream)
    bodies = [bytes(range(256)) * 300, b"\n" * 1000, b"x"]
    data = hello() + b"".join(chunk(i, body) for i, body in enumerate(bodies))
    position = 0
    landed_in_place = 0
    while position < len(data):
        target = protocol.read_buffer()
        assert len(target) > 0
        if stream.buffers and target.obj is stream.buffers[-1].obj:
            landed_in_place += 1
        count = min(len(target), piece, len(data) - position)
        target[:count] = data[position : position + count]
        protocol.read_done(count)
        position += count
    assert stream.arrivals() == [(i, 1, body) for i, body in enumerate(bodies)]
    assert landed_in_place > 0
    assert not transport.disconnecting


def padded(header, size):
    """
    The frame payload of C{header}, padded with spaces to C{size} bytes.
    """
    line = wire.encode_frame(header)
    return line[:-1] + b" " * (size - len(line)) + b"\n"


BAD_AFTER_HELLO = [
    pytest.param(chunk(0, b"x", count=0), id="n of 0"),
    pytest.param(chunk(0, b"x" * (MAX_RUN + 1), count=MAX_RUN + 1), id="n over MAX_RUN"),
    pytest.param(frame({"t": "chunk", "i": 0, "n": True}, b"xx"), id="bool n"),
    pytest.param(frame({"t": "chunk", "i": 0, "n": "2"}, b"xx"), id="string n"),
    pytest.param(frame({"t": "chunk", "i": -1}, b"x"), id="negative index"),
    pytest.param(frame({"t": "chunk", "i": True}, b"x"), id="bool index"),
    pytest.param(frame({"t": "chunk", "i": "0"}, b"x"), id="string index"),
    pytest.param(frame({"t": "chunk"}, b"x"), id="no index"),
    pytest.param(frame({"t": "done"}), id="done"),
    pytest.param(frame({"t": "gossip"}), id="unknown frame type"),
    pytest.param(hello(), id="second hello"),
    pytest.param(framed(b"garbage"), id="garbage"),
    pytest.param(framed(b"[1]\n"), id="not an object"),
    pytest.param(
        struct.pack("!I", MAX_DATA_HEADER + MAX_RUN * CHUNK_SIZE + 1), id="over the limit"
    ),
    pytest.param(framed(b"{" + b" " * MAX_DATA_HEADER + b"}\n"), id="header too long"),
]


@pytest.mark.parametrize("data", BAD_AFTER_HELLO)
def test_a_bad_frame_after_the_hello_drops_the_connection(feed, data):
    stream = FakeStream()
    protocol, transport, _ = receiver(stream)
    feed(protocol, hello() + data + chunk(0, b"zero"))
    assert transport.disconnected  # aborted
    assert stream.events == ["attach"]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(hello(token="cd" * 16), id="unknown token"),
        pytest.param(hello(token="not-a-token"), id="malformed token"),
        pytest.param(frame({"t": "hello", "v": 1}), id="no token"),
        pytest.param(chunk(0, b"zero"), id="data before hello"),
        pytest.param(
            frame({"t": "hello", "v": 1, "token": TOKEN}, b"body"), id="hello with a body"
        ),
        pytest.param(hello(version=2), id="wrong version"),
        pytest.param(frame({"t": "hello", "token": TOKEN}), id="no version"),
        pytest.param(frame({"t": "done"}), id="done before hello"),
        pytest.param(framed(b"garbage"), id="garbage"),
        pytest.param(struct.pack("!I", MAX_DATA_HEADER + 1), id="a big frame before hello"),
        pytest.param(framed(padded({"t": "hello", "v": 1, "token": TOKEN}, MAX_DATA_HEADER + 1)),
                     id="a hello over the limit"),
    ],
)
def test_a_bad_start_drops_the_connection(feed, data):
    stream = FakeStream()
    protocol, transport, inbox = receiver(stream)
    feed(protocol, data + hello() + chunk(0, b"zero"))
    assert transport.disconnected
    assert stream.events == []


def test_a_stranger_cannot_make_us_buffer_a_chunk(feed):
    """
    Before the hello, the length prefix of a frame bigger than a header is
    enough to drop the connection: nothing of it is kept.
    """
    stream = FakeStream()
    protocol, transport, _ = receiver(stream)
    feed(protocol, struct.pack("!I", CHUNK_SIZE + 100))
    assert transport.disconnected
    assert stream.events == []


def test_a_hello_at_the_limit_is_taken(feed):
    stream = FakeStream()
    protocol, transport, _ = receiver(stream)
    feed(protocol, framed(padded({"t": "hello", "v": 1, "token": TOKEN}, MAX_DATA_HEADER)))
    assert stream.events == ["attach"]
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(chunk(0, b"x" * 5, count=5), id="n over the stream's run"),
        pytest.param(struct.pack("!I", MAX_DATA_HEADER + 4 * CHUNK_SIZE + 1), id="over its frame"),
    ],
)
def test_a_frame_over_the_run_its_stream_asked_drops_the_connection(feed, data):
    stream = FakeStream(run=4)
    protocol, transport, _ = receiver(stream)
    feed(protocol, hello() + data + chunk(0, b"zero"))
    assert transport.disconnected
    assert stream.events == ["attach"]


def test_a_frame_of_the_streams_run_at_its_limit_is_taken():
    stream = FakeStream(run=4)
    protocol, transport, _ = receiver(stream)
    body = b"\x5a" * (4 * CHUNK_SIZE)
    payload = padded({"t": "chunk", "i": 0, "n": 4}, MAX_DATA_HEADER) + body
    protocol.dataReceived(hello() + framed(payload))
    assert stream.arrivals() == [(0, 4, body)]
    assert not transport.disconnecting


def test_a_frame_of_max_run_chunks_at_the_limit_is_taken():
    stream = FakeStream()
    protocol, transport, _ = receiver(stream)
    body = b"\x5a" * (MAX_RUN * CHUNK_SIZE)
    payload = padded({"t": "chunk", "i": 0, "n": MAX_RUN}, MAX_DATA_HEADER) + body
    assert len(payload) == MAX_DATA_HEADER + MAX_RUN * CHUNK_SIZE
    protocol.dataReceived(hello() + framed(payload))
    assert stream.arrivals() == [(0, MAX_RUN, body)]
    assert not transport.disconnecting


def test_a_frame_the_stream_refuses_drops_the_connection(feed):
    stream = FakeStream(refuse_from=1)
    protocol, transport, _ = receiver(stream)
    feed(protocol, hello() + chunk(0, b"a") + chunk(1, b"b") + chunk(0, b"c"))
    assert transport.disconnected
    assert stream.arrivals() == [(0, 1, b"a")]


def test_the_right_token_from_the_wrong_host_is_dropped(feed):
    stream = FakeStream(host=PEER_HOST)
    protocol, transport, inbox = receiver(stream, host=OTHER_HOST)
    feed(protocol, hello() + chunk(0, b"zero"))
    assert transport.disconnected
    assert stream.events == []
    # The token is still there for the host it was handed to.
    assert inbox.claim(TOKEN, PEER_HOST) is stream


def test_no_hello_in_time_drops_the_connection():
    clock = task.Clock()
    protocol, transport, inbox = receiver(FakeStream(), clock)
    clock.advance(HELLO_TIMEOUT / 2)
    protocol.dataReceived(hello()[:10])  # dribbling does not buy time
    clock.advance(HELLO_TIMEOUT / 2 - 0.1)
    assert not transport.disconnected
    clock.advance(0.1)
    assert transport.disconnected
    assert len(inbox) == 1


def test_after_the_hello_silence_is_the_streams_business():
    clock = task.Clock()
    stream = FakeStream()
    protocol, transport, _ = receiver(stream, clock)
    protocol.dataReceived(hello())
    assert clock.getDelayedCalls() == []
    clock.advance(10 * IDLE_TIMEOUT)
    assert not transport.disconnecting


def test_the_connection_lost_tells_the_stream():
    stream = FakeStream()
    protocol, transport, _ = receiver(stream)
    protocol.dataReceived(hello() + chunk(0, b"zero"))
    protocol.connectionLost(Failure(ConnectionDone()))
    assert stream.events[-1] == ("detached", ConnectionDone)
    assert protocol.stream is None


def test_the_connection_lost_before_the_hello_tells_nobody():
    stream = FakeStream()
    protocol, transport, inbox = receiver(stream)
    protocol.dataReceived(hello()[:7])
    protocol.connectionLost(Failure(ConnectionDone()))
    assert stream.events == []
    assert len(inbox) == 1


def test_the_stream_pauses_resumes_and_closes_its_connection():
    stream = FakeStream()
    protocol, transport, _ = receiver(stream)
    protocol.dataReceived(hello())
    stream.connection.pause()
    assert transport.producerState == "paused"
    stream.connection.resume()
    assert transport.producerState == "producing"
    stream.connection.close()
    assert transport.disconnecting and not transport.disconnected  # a clean close
    stream.connection.pause()  # nothing more happens to a closing connection
    assert transport.producerState == "producing"


def test_inbox_claims_once_and_only_from_its_host():
    inbox = Inbox()
    stream = FakeStream()
    inbox.expect(stream)
    assert len(inbox) == 1
    assert inbox.claim(TOKEN, OTHER_HOST) is None
    assert inbox.claim("cd" * 16, PEER_HOST) is None
    assert inbox.claim(TOKEN, PEER_HOST) is stream
    assert inbox.claim(TOKEN, PEER_HOST) is None
    inbox.expect(stream)
    inbox.withdraw(TOKEN)
    inbox.withdraw(TOKEN)
    assert len(inbox) == 0
    assert inbox.claim(TOKEN, PEER_HOST) is None


# -- with the real SourceStream: what was asked, and the lengths ------------------------


class Owner:
    """
    A download as its L{SourceStream}s see it: it records what arrives, and
    gives each buffer back at once.
    """

    def __init__(self):
        self.buffers = BufferPool()
        self.arrived = []
        self.attached = []
        self.lost = []

    def stream_attached(self, stream):
        self.attached.append(stream)

    def chunks_arrived(self, stream, first, arrived, buffer, opener=None):
        self.arrived.append((first, [index for index, _ in arrived], bytes(buffer)))
        self.buffers.give_back(buffer)

    def stream_lost(self, stream, reason):
        self.lost.append(stream)

    def get_refused(self, stream, request, failure):
        pass

    def cancel_answered(self, stream, withdrawn, coming=()):
        pass


class RequestConnection:
    """
    The source's request connection: every request waits for the answer
    the test gives (C{answers[i].callback(...)}).
    """

    def __init__(self):
        self.requests = []
        self.answers = []

    def call(self, header):
        self.requests.append(header)
        self.answers.append(defer.Deferred())
        return self.answers[-1]


#: Three chunks, the last one short.
MANIFEST = Manifest.build(2 * CHUNK_SIZE + 100, [bytes([i]) * 32 for i in range(3)])
CONTENT = bytes(range(256)) * (MANIFEST.size // 256) + b"t" * (MANIFEST.size % 256)


def body(first, count=1):
    return CONTENT[first * CHUNK_SIZE : (first + count) * CHUNK_SIZE]


def asked(*chunks):
    """
    A L{SourceStream} that asked for C{chunks}, expected at a receiver port;
    its owner, and the receiver connection.
    """
    owner = Owner()
    source = Source(SimpleNamespace(host=PEER_HOST, label="peer", peer_id="p" * 32),
                    RequestConnection())
    clock = task.Clock()
    stream = SourceStream(owner, source, MANIFEST, MANIFEST.file_id, 7000, clock)
    stream.ask(GetRequest(stream, chunks))
    protocol, transport, inbox = receiver(stream)
    return SimpleNamespace(
        owner=owner, stream=stream, protocol=protocol, transport=transport, clock=clock,
        hello=hello(stream.token),
    )


def test_a_source_stream_takes_a_run_and_a_chunk():
    s = asked(0, 1, 2)
    s.clock.advance(5)
    s.protocol.dataReceived(s.hello + chunk(0, body(0, 2), count=2) + chunk(2, body(2)))
    assert s.owner.attached == [s.stream]
    assert s.owner.arrived == [(0, [0, 1], body(0, 2)), (2, [2], body(2))]
    assert s.stream.outstanding == {}
    assert s.stream.heard_at == 5  # chunk data arrived: no silence now
    assert s.owner.buffers.out == 0
    assert not s.transport.disconnecting


def test_a_source_stream_fed_one_byte_at_a_time(feed):
    s = asked(2)
    feed(s.protocol, s.hello + chunk(2, body(2)))
    assert s.owner.arrived == [(2, [2], body(2))]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(chunk(2, body(2)[:-1]), id="short"),
        pytest.param(chunk(2, body(2) + b"x"), id="long"),
        pytest.param(chunk(0, body(0, 2)[:-1], count=2), id="a short run"),
        pytest.param(chunk(0, body(0), count=2), id="a run of the length of one chunk"),
        pytest.param(chunk(0, b""), id="empty"),
        pytest.param(chunk(1, body(1)), id="not asked"),
        pytest.param(chunk(2, body(2), count=2), id="a run past the end"),
        pytest.param(chunk(5, b"x"), id="past the end"),
        pytest.param(chunk(0, body(0, 3), count=3), id="a run across a gap"),
        pytest.param(chunk(2, body(2)) + chunk(2, body(2)), id="twice"),
    ],
)
def test_a_source_stream_refuses_what_was_not_asked_or_has_the_wrong_length(feed, data):
    s = asked(0, 2)
    feed(s.protocol, s.hello + data + chunk(0, body(0)))
    assert s.transport.disconnected
    assert s.owner.arrived in ([], [(2, [2], body(2))])  # "twice": the first is taken
    assert s.owner.buffers.out == 0


def test_a_source_stream_cut_off_mid_chunk_gives_its_buffer_back():
    s = asked(0)
    data = s.hello + chunk(0, body(0))
    s.protocol.dataReceived(data[: len(data) // 2])
    assert s.owner.buffers.out == 1
    s.protocol.connectionLost(Failure(ConnectionLost()))
    assert s.owner.buffers.out == 0
    assert s.owner.lost == [s.stream]
    assert s.owner.arrived == []


def test_a_source_that_cancels_a_chunk_it_is_sending_does_not_break_the_receiver():
    """
    A (lying) source answers a cancel with a chunk whose frame it has
    started: the frame's end must not raise out of the protocol (it would
    reach the reactor as an unhandled error).
    """
    s = asked(0, 2)
    data = chunk(2, body(2))
    s.stream.cancel([2])
    s.protocol.dataReceived(s.hello + data[:40])
    requests = s.stream.source.client
    assert requests.requests[-1]["t"] == "cancel"
    cancelled = {"t": "cancelled", "token": s.stream.token, "chunks": [2]}
    requests.answers[-1].callback((cancelled, b""))
    s.protocol.dataReceived(data[40:])


def test_a_source_stream_closed_before_its_source_connects_closes_the_connection():
    s = asked(0)
    s.stream.close()
    s.protocol.dataReceived(s.hello)
    assert s.transport.disconnecting
    assert s.owner.attached == []


# -- on real sockets ------------------------------------------------------------------


class Sender(Protocol):
    """
    The far end of a data connection: writes C{data}, then waits.
    """

    def __init__(self, data):
        self.data = data

    def connectionMade(self):
        self.transport.write(self.data)


async def wait_for(reactor, condition, timeout=10.0):
    waited = 0.0
    while not condition():
        assert waited < timeout, "condition not met in time"
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


async def receive_over(reactor, interface, client_endpoint, monkeypatch):
    """
    Listen with a L{ReceiverEndpoint} on C{interface}, send a hello and a run
    of chunks from C{client_endpoint(port)}, and check they land in the
    stream's buffers without going through C{dataReceived} (which copies).
    """

    def copied(self, data):
        raise AssertionError("the bytes were copied through dataReceived")

    monkeypatch.setattr(ReceiverProtocol, "dataReceived", copied)
    host = "::1" if ":" in interface else "127.0.0.1"
    stream = FakeStream(host=host)
    inbox = Inbox()
    inbox.expect(stream)
    port = await ReceiverEndpoint(reactor, 0, interface=interface).listen(ReceiverFactory(inbox))
    run = bytes(range(256)) * (MAX_RUN * CHUNK_SIZE // 256)
    data = hello() + chunk(0, run, count=MAX_RUN) + chunk(9, b"last")
    client = await client_endpoint(port.getHost().port).connect(
        Factory.forProtocol(lambda: Sender(data))
    )
    try:
        await wait_for(reactor, lambda: len(stream.arrivals()) == 2)
        assert stream.arrivals() == [(0, MAX_RUN, run), (9, 1, b"last")]
        client.transport.loseConnection()
        await wait_for(reactor, lambda: stream.events[-1][0] == "detached")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_receiver_endpoint_reads_into_the_stream_buffers(monkeypatch):
    from twisted.internet import reactor

    await receive_over(
        reactor, "127.0.0.1",
        lambda number: TCP4ClientEndpoint(reactor, "127.0.0.1", number), monkeypatch,
    )


def has_ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest_twisted.ensureDeferred
async def test_the_receiver_endpoint_reads_into_the_stream_buffers_on_ipv6(monkeypatch):
    from twisted.internet import reactor

    await receive_over(
        reactor, "::1", lambda number: TCP6ClientEndpoint(reactor, "::1", number), monkeypatch
    )


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_receiver_port_takes_ipv6_only_so_the_ipv4_one_stays_free():
    """
    With C{--host any} the receiver port listens on C{::} and on IPv4 with
    the same number.  Checked on sockets that are bound and never listen
    (the kernel makes a socket bound to one IPv6 address, C{::1} say,
    IPv6-only by itself, so only the wildcard shows it).
    """
    from twisted.internet import reactor

    port = _RecvIntoPort(0, ReceiverFactory(Inbox()), 50, "::", reactor)
    six = port.createInternetSocket()
    four = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        six.bind(("::", 0))
        four.bind(("127.0.0.1", six.getsockname()[1]))  # EADDRINUSE if dual-stack
    finally:
        six.close()
        four.close()


@pytest_twisted.ensureDeferred
async def test_the_receiver_endpoint_serves_a_protocol_that_names_no_buffer():
    from twisted.internet import reactor

    class Collector(Protocol):
        def __init__(self):
            self.data = b""

        def dataReceived(self, data):
            self.data += data

    collector = Collector()
    port = await ReceiverEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: collector)
    )
    try:
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: Sender(b"plain bytes"))
        )
        await wait_for(reactor, lambda: collector.data == b"plain bytes")
        client.transport.loseConnection()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_receiver_endpoint_on_a_taken_port_cannot_listen():
    from twisted.internet import reactor

    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(CannotListenError):
            await ReceiverEndpoint(reactor, taken.getsockname()[1], interface="127.0.0.1").listen(
                ReceiverFactory(Inbox())
            )
    finally:
        taken.close()


# -- the data connections' receive buffer -------------------------------------------


@pytest.mark.parametrize(
    "granted, platform, asked",
    [
        (2 * DATA_RECEIVE_BUFFER, "linux", DATA_RECEIVE_BUFFER),  # all of it (doubled)
        (2 * DATA_RECEIVE_BUFFER - 2, "linux", None),  # rmem_max just short of it
        (425984, "linux", None),  # Debian's default rmem_max, 208 KiB, doubled
        (DATA_RECEIVE_BUFFER, "darwin", DATA_RECEIVE_BUFFER),  # reported as asked
        (DATA_RECEIVE_BUFFER - 1, "darwin", None),
        (None, "linux", None),  # the kernel would not say
    ],
)
def test_a_data_connection_asks_for_its_buffer_only_where_it_is_granted_whole(
    granted, platform, asked
):
    seen = []

    def probe(size):
        seen.append(size)
        return granted

    assert receive_buffer_to_ask(granted=probe, platform=platform) == asked
    assert seen == [DATA_RECEIVE_BUFFER]


def test_the_probe_reports_what_the_kernel_gives():
    got = granted_receive_buffer(64 * 1024)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        assert got == sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def default_receive_buffer():
    with socket.socket() as fresh:
        return fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def test_tuning_sets_the_buffer_asked_for_or_leaves_the_socket_alone():
    with socket.socket() as tuned, socket.socket() as untouched, socket.socket() as same:
        tune_receive_buffer(tuned, 96 * 1024)
        tune_receive_buffer(untouched, None)
        same.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 96 * 1024)
        assert tuned.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == same.getsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF
        )
        assert untouched.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == (
            default_receive_buffer()
        )
        assert default_receive_buffer() != same.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def test_a_socket_that_cannot_take_the_option_is_left_as_it_is():
    class Refusing:
        def setsockopt(self, *args):
            raise OSError(92, "Protocol not available")

    tune_receive_buffer(Refusing(), 4096)  # no error


async def accepted_socket(reactor):
    """The receiver port's end of one loopback connection to it."""
    accepted = []

    class Keep(Protocol):
        def connectionMade(self):
            accepted.append(self.transport)

    port = await ReceiverEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Keep)
    )
    try:
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Protocol)
        )
        await wait_for(reactor, lambda: accepted)
        size = accepted[0].getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        client.transport.loseConnection()
        return size
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_receiver_port_gives_its_connections_the_buffer_the_system_grants():
    from twisted.internet import reactor

    asked = data_receive_buffer()
    size = await accepted_socket(reactor)
    if asked is None:
        assert size == default_receive_buffer()
    else:
        assert size == granted_receive_buffer(asked) > default_receive_buffer()


@pytest_twisted.ensureDeferred
async def test_where_the_system_grants_less_the_connections_keep_the_kernels_buffer(
    monkeypatch,
):
    from twisted.internet import reactor

    monkeypatch.setattr(receiver_module, "_receive_buffer", [])
    monkeypatch.setattr(receiver_module, "granted_receive_buffer", lambda size: 425984)
    size = await accepted_socket(reactor)
    assert receiver_module.data_receive_buffer() is None
    assert size == default_receive_buffer()
