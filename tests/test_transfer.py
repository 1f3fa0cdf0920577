"""
The transfer port protocols, on StringTransport with a Clock, fed all at once
and one byte at a time.
"""

import json
import struct

import pytest
from support import BufferedTransport, frame, framed, sent_frames, sent_headers
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p import wire
from twisted_p2p.limits import (
    HELLO_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS_PER_HOST,
    MAX_FRAME,
    MAX_HEADER,
    MAX_QUEUED_REQUESTS,
)
from twisted_p2p.manifest import CHUNK_SIZE, Manifest
from twisted_p2p.transfer import (
    ChunkPusher,
    Inbox,
    NotSupportedProtocol,
    ReceiverFactory,
    RequestRefused,
    SenderFactory,
)

PEER_HOST = "192.0.2.2"
OTHER_HOST = "192.0.2.3"
TOKEN = "ab" * 16


# -- helpers -----------------------------------------------------------------


def connect(factory, clock, host=PEER_HOST, transport_class=StringTransport):
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    protocol.callLater = clock.callLater
    transport = transport_class(peerAddress=IPv4Address("TCP", host, 40000))
    protocol.makeConnection(transport)
    return protocol, transport


# -- T+1: sender ---------------------------------------------------------------


class FakeUploads:
    """
    An uploads owner that answers from a script: each answer is a
    C{(header, body)}, a Deferred of one, or an exception to raise.
    """

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []

    def handle(self, header, host):
        self.calls.append((header, host))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def sender(uploads, clock):
    return connect(SenderFactory(uploads), clock)


def test_sender_answers_catalog(feed):
    uploads = FakeUploads(({"t": "catalog", "rev": "0" * 16, "files": []}, b""))
    protocol, transport = sender(uploads, task.Clock())
    feed(protocol, frame(wire.request("catalog")))
    assert uploads.calls == [({"t": "catalog", "v": 1}, PEER_HOST)]
    assert sent_frames(transport) == [({"t": "catalog", "rev": "0" * 16, "files": []}, b"")]
    assert not transport.disconnecting


def test_sender_answers_in_order_behind_a_slow_answer(feed):
    slow = defer.Deferred()
    uploads = FakeUploads(slow, ({"t": "second"}, b"2"))
    protocol, transport = sender(uploads, task.Clock())
    feed(protocol, frame(wire.request("first")) + frame(wire.request("second")))
    # The second request is not even looked at before the first is answered.
    assert [h["t"] for h, _ in uploads.calls] == ["first"]
    assert transport.value() == b""
    slow.callback(({"t": "first"}, b"1"))
    assert [h["t"] for h, _ in uploads.calls] == ["first", "second"]
    assert sent_frames(transport) == [({"t": "first"}, b"1"), ({"t": "second"}, b"2")]


def test_sender_answers_many_pipelined_requests_in_order():
    """
    Hundreds of requests queued behind one slow answer are all answered, in
    order, once it fires (no recursion limit on the queue).
    """
    slow = defer.Deferred()
    count = 500
    uploads = FakeUploads(slow, *[({"t": "ok", "n": n}, b"") for n in range(1, count)])
    protocol, transport = sender(uploads, task.Clock())
    protocol.dataReceived(b"".join(frame(wire.request("get", n=n)) for n in range(count)))
    slow.callback(({"t": "ok", "n": 0}, b""))
    assert [h["n"] for h in sent_headers(transport)] == list(range(count))


def test_sender_refusal_is_an_error_frame_and_keeps_the_connection(feed):
    uploads = FakeUploads(
        RequestRefused("busy", "serving too many requests"),
        ({"t": "catalog", "rev": "1" * 16, "files": []}, b""),
    )
    protocol, transport = sender(uploads, task.Clock())
    feed(protocol, frame(wire.request("get")) + frame(wire.request("catalog")))
    assert sent_headers(transport) == [
        {"t": "error", "code": "busy", "message": "serving too many requests"},
        {"t": "catalog", "rev": "1" * 16, "files": []},
    ]
    assert not transport.disconnecting


def test_sender_deferred_refusal_is_an_error_frame(feed):
    uploads = FakeUploads(defer.fail(RequestRefused("unreachable", "cannot connect back")))
    protocol, transport = sender(uploads, task.Clock())
    feed(protocol, frame(wire.request("get")))
    assert sent_headers(transport) == [
        {"t": "error", "code": "unreachable", "message": "cannot connect back"}
    ]
    assert not transport.disconnecting


def test_sender_bad_request_answers_then_drops(feed):
    uploads = FakeUploads(wire.ProtocolError("field 'id' is malformed"), ({"t": "never"}, b""))
    protocol, transport = sender(uploads, task.Clock())
    feed(protocol, frame(wire.request("manifest", id="x")) + frame(wire.request("catalog")))
    assert sent_headers(transport) == [
        {"t": "error", "code": "bad-request", "message": "field 'id' is malformed"}
    ]
    assert transport.disconnecting
    # Nothing after the bad request is served.
    assert len(uploads.calls) == 1


def test_sender_internal_error_still_answers_in_order(feed):
    """
    An unexpected failure in the owner is still one answer, so the answers
    after it are not matched to the wrong requests.
    """
    uploads = FakeUploads(KeyError("bug"), ({"t": "catalog", "rev": "2" * 16, "files": []}, b""))
    protocol, transport = sender(uploads, task.Clock())
    feed(protocol, frame(wire.request("manifest")) + frame(wire.request("catalog")))
    headers = sent_headers(transport)
    assert [h["t"] for h in headers] == ["error", "catalog"]
    assert headers[0]["code"] == "internal"


def test_sender_drops_an_oversized_frame(feed):
    uploads = FakeUploads()
    protocol, transport = sender(uploads, task.Clock())
    # Only the length prefix is needed for the verdict.
    feed(protocol, struct.pack("!I", MAX_HEADER + 1) + b"{" * 100)
    assert transport.disconnecting
    assert uploads.calls == []
    assert transport.value() == b""


def test_sender_accepts_a_frame_of_exactly_the_limit(feed):
    header = wire.encode_frame(wire.request("catalog"))
    payload = header[:-1] + b" " * (MAX_HEADER - len(header)) + b"\n"
    assert len(payload) == MAX_HEADER
    uploads = FakeUploads(({"t": "catalog", "rev": "0" * 16, "files": []}, b""))
    protocol, transport = sender(uploads, task.Clock())
    feed(protocol, framed(payload))
    assert not transport.disconnecting
    assert len(uploads.calls) == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"not json\n",
        b'{"t": "catalog", "v": 1}',  # no newline after the header
        b"[1, 2]\n",
        b'{"v": 1}\n',  # no type
        b'{"t": 7, "v": 1}\n',
        b"\xff\xfe\n",
        b"",
    ],
)
def test_sender_drops_a_garbage_frame(feed, payload):
    uploads = FakeUploads()
    protocol, transport = sender(uploads, task.Clock())
    feed(protocol, framed(payload) + frame(wire.request("catalog")))
    assert transport.disconnecting
    assert uploads.calls == []
    assert transport.value() == b""


def test_sender_idle_timeout_aborts():
    clock = task.Clock()
    uploads = FakeUploads(({"t": "catalog", "rev": "0" * 16, "files": []}, b""))
    protocol, transport = sender(uploads, clock)
    clock.advance(IDLE_TIMEOUT - 1)
    protocol.dataReceived(frame(wire.request("catalog")))  # resets the timer
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnected
    clock.advance(1)
    assert transport.disconnected
    protocol.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


class EndlessUploads:
    """
    An uploads owner that answers every request: at once with a body of
    C{body_size} bytes, or (C{slow}) with a Deferred the test fires.
    """

    def __init__(self, body_size=0, slow=False):
        self.body_size = body_size
        self.slow = slow
        self.calls = []
        self.pending = []

    def handle(self, header, host):
        self.calls.append(header["n"])
        answer = ({"t": "ok", "n": header["n"]}, b"x" * self.body_size)
        if not self.slow:
            return answer
        d = defer.Deferred()
        self.pending.append((d, answer))
        return d


def flood(count):
    return b"".join(frame(wire.request("manifest", n=n)) for n in range(count))


@pytest.mark.parametrize("piece", [4096, 1, 7], ids=["4 KiB reads", "bytewise", "7 bytes"])
def test_sender_stops_reading_while_the_requester_does_not_read(piece):
    """
    Pipelined requests from a requester that never reads its answers: the
    sender answers until the write buffer is full, then reads nothing more
    (the kernel holds the rest) until the buffer drains.
    """
    uploads = EndlessUploads(body_size=16 * 1024)
    protocol, transport = connect(
        SenderFactory(uploads), task.Clock(), transport_class=BufferedTransport
    )
    assert transport.producer is not None and transport.streaming
    transport.deliver(protocol, flood(1000), piece)
    assert transport.producerState == "paused"
    # Written: at most what fills the buffer, plus the answer that tipped it.
    assert transport.most_buffered <= transport.bufferSize + 16 * 1024 + 100
    assert len(uploads.calls) <= 5
    assert len(protocol._requests) <= MAX_QUEUED_REQUESTS
    assert transport.unread

    # Each drain lets a few more through; in the end every request is
    # answered, in order, and the buffer never held more than before.
    for _ in range(1000):
        if len(uploads.calls) == 1000:
            break
        transport.drain()
        transport.deliver(protocol, piece=piece)
    assert uploads.calls == list(range(1000))
    assert [h["n"] for h in sent_headers(transport)] == list(range(1000))
    assert transport.most_buffered <= transport.bufferSize + 16 * 1024 + 100


@pytest.mark.parametrize("piece", [None, 1], ids=["all at once", "bytewise"])
def test_sender_queues_at_most_a_few_requests_behind_a_slow_answer(piece):
    uploads = EndlessUploads(slow=True)
    protocol, transport = connect(
        SenderFactory(uploads), task.Clock(), transport_class=BufferedTransport
    )
    transport.deliver(protocol, flood(100), piece)
    assert uploads.calls == [0]
    assert len(protocol._requests) == MAX_QUEUED_REQUESTS
    assert transport.producerState == "paused"

    # One answer lets one more request in.
    d, answer = uploads.pending.pop(0)
    d.callback(answer)
    transport.deliver(protocol, piece=piece)
    assert uploads.calls == [0, 1]
    assert len(protocol._requests) == MAX_QUEUED_REQUESTS
    assert transport.producerState == "paused"

    while uploads.pending:
        d, answer = uploads.pending.pop(0)
        d.callback(answer)
        transport.deliver(protocol, piece=piece)
    assert uploads.calls == list(range(100))
    assert [h["n"] for h in sent_headers(transport)] == list(range(100))
    assert transport.producerState == "producing"
    assert not transport.disconnecting


def test_sender_reading_stays_paused_while_the_queue_is_full():
    """
    A drained write buffer does not resume reading while the request queue
    is still full.
    """
    uploads = EndlessUploads(slow=True)
    protocol, transport = connect(
        SenderFactory(uploads), task.Clock(), transport_class=BufferedTransport
    )
    transport.deliver(protocol, flood(20))
    transport.producer.pauseProducing()
    transport.producer.resumeProducing()
    assert transport.producerState == "paused"
    transport.deliver(protocol)
    assert len(protocol._requests) == MAX_QUEUED_REQUESTS


def test_sender_not_read_is_dropped_by_the_idle_timeout():
    clock = task.Clock()
    uploads = EndlessUploads(body_size=128 * 1024)
    protocol, transport = connect(SenderFactory(uploads), clock, transport_class=BufferedTransport)
    transport.deliver(protocol, flood(10))
    assert uploads.calls == [0]
    clock.advance(IDLE_TIMEOUT)
    assert transport.disconnected


def test_sender_bad_request_unregisters_the_write_gate(feed):
    """
    Otherwise a full buffer that drains would resume the gate instead of
    closing the connection.
    """
    uploads = FakeUploads(wire.ProtocolError("field 'id' is malformed"))
    protocol, transport = sender(uploads, task.Clock())
    feed(protocol, frame(wire.request("manifest", id="x")))
    assert transport.disconnecting
    assert transport.producer is None


# -- T: receiver ---------------------------------------------------------------


class FakeExpectation:
    """
    An outstanding request as the receiver sees it; deliveries return
    Deferreds the test fires.
    """

    def __init__(self, token=TOKEN, host=PEER_HOST, accepted=(0, 1, 2)):
        self.token = token
        self.host = host
        self.accepted = set(accepted)
        self.delivered = []
        self.pending = []
        self.events = []

    def accepts(self, index, length):
        return index in self.accepted

    def deliver(self, index, data):
        self.delivered.append((index, data))
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def finished(self):
        self.events.append("finished")

    def lost(self):
        self.events.append("lost")


def receiver(expectation, clock, host=PEER_HOST):
    inbox = Inbox()
    if expectation is not None:
        inbox.expect(expectation)
    protocol, transport = connect(ReceiverFactory(inbox), clock, host)
    return protocol, transport, inbox


def hello(token=TOKEN, version=1):
    return frame({"t": "hello", "v": version, "token": token})


def chunk(index, data):
    return frame({"t": "chunk", "i": index}, data)


def test_receiver_delivers_chunks_in_order_pausing_between_them(feed):
    expectation = FakeExpectation()
    protocol, transport, inbox = receiver(expectation, task.Clock())
    feed(protocol, hello() + chunk(0, b"zero") + chunk(2, b"two") + frame({"t": "done"}))
    assert len(inbox) == 0  # the token is used up
    assert expectation.delivered == [(0, b"zero")]
    assert transport.producerState == "paused"
    assert expectation.events == []

    expectation.pending[0].callback(None)
    assert expectation.delivered == [(0, b"zero"), (2, b"two")]
    assert transport.producerState == "paused"
    assert expectation.events == []

    expectation.pending[1].callback(None)
    assert transport.producerState == "producing"
    assert expectation.events == ["finished"]
    assert transport.disconnecting
    assert transport.value() == b""


def test_receiver_frames_arriving_while_paused_wait(feed):
    expectation = FakeExpectation()
    protocol, transport, _ = receiver(expectation, task.Clock())
    feed(protocol, hello() + chunk(1, b"one"))
    assert transport.producerState == "paused"
    feed(protocol, chunk(0, b"zero"))
    assert expectation.delivered == [(1, b"one")]
    expectation.pending[0].callback(None)
    assert expectation.delivered == [(1, b"one"), (0, b"zero")]


def test_receiver_failed_delivery_still_resumes(feed):
    expectation = FakeExpectation()
    protocol, transport, _ = receiver(expectation, task.Clock())
    feed(protocol, hello() + chunk(0, b"zero") + chunk(1, b"one"))
    expectation.pending[0].errback(OSError("disk full"))
    assert expectation.delivered == [(0, b"zero"), (1, b"one")]


def test_receiver_delivery_that_is_already_done(feed):
    """
    A deliver() that returns a fired Deferred does not re-parse frames
    already handled (no re-entrant resume).
    """
    expectation = FakeExpectation()
    expectation.deliver = lambda index, data: (
        expectation.delivered.append((index, data)) or defer.succeed(None)
    )
    protocol, transport, _ = receiver(expectation, task.Clock())
    feed(protocol, hello() + chunk(0, b"zero") + chunk(1, b"one") + frame({"t": "done"}))
    assert expectation.delivered == [(0, b"zero"), (1, b"one")]
    assert expectation.events == ["finished"]
    assert transport.producerState == "producing"


def test_receiver_connection_lost_tells_the_expectation():
    expectation = FakeExpectation()
    protocol, transport, _ = receiver(expectation, task.Clock())
    protocol.dataReceived(hello() + chunk(0, b"zero"))
    protocol.connectionLost(Failure(ConnectionDone()))
    assert expectation.events == ["lost"]


def test_receiver_connection_lost_before_hello_tells_nobody():
    expectation = FakeExpectation()
    protocol, transport, inbox = receiver(expectation, task.Clock())
    protocol.connectionLost(Failure(ConnectionDone()))
    assert expectation.events == []
    assert len(inbox) == 1


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(hello(token="cd" * 16), id="unknown token"),
        pytest.param(hello(token="not-a-token"), id="malformed token"),
        pytest.param(chunk(0, b"zero"), id="data before hello"),
        pytest.param(frame({"t": "done"}), id="done before hello"),
        pytest.param(hello(version=2), id="wrong version"),
        pytest.param(frame({"t": "hello", "token": TOKEN}), id="no version"),
        pytest.param(hello() + chunk(5, b"five"), id="chunk not accepted"),
        pytest.param(hello() + frame({"t": "chunk", "i": -1}, b"x"), id="negative index"),
        pytest.param(hello() + frame({"t": "chunk", "i": True}, b"x"), id="bool index"),
        pytest.param(hello() + frame({"t": "gossip"}), id="unknown frame type"),
        pytest.param(hello() + hello(), id="second hello"),
        pytest.param(framed(b"garbage"), id="garbage"),
        pytest.param(struct.pack("!I", MAX_FRAME + 1), id="oversized"),
    ],
)
def test_receiver_drops_a_bad_connection(feed, data):
    expectation = FakeExpectation()
    protocol, transport, _ = receiver(expectation, task.Clock())
    feed(protocol, data + chunk(0, b"zero"))
    assert transport.disconnecting
    assert expectation.delivered == []
    assert expectation.events == []


def test_receiver_drops_the_right_token_from_the_wrong_host(feed):
    expectation = FakeExpectation(host=PEER_HOST)
    protocol, transport, inbox = receiver(expectation, task.Clock(), host=OTHER_HOST)
    feed(protocol, hello() + chunk(0, b"zero"))
    assert transport.disconnecting
    assert expectation.delivered == []
    # The token is still there for the host it was sent to.
    assert inbox.claim(TOKEN, PEER_HOST) is expectation


def test_receiver_accepts_a_full_chunk_frame():
    expectation = FakeExpectation()
    protocol, transport, _ = receiver(expectation, task.Clock())
    data = b"\x5a" * CHUNK_SIZE
    protocol.dataReceived(hello() + chunk(0, data))
    assert not transport.disconnecting
    assert expectation.delivered == [(0, data)]


def test_receiver_hello_timeout_aborts():
    clock = task.Clock()
    protocol, transport, _ = receiver(FakeExpectation(), clock)
    clock.advance(HELLO_TIMEOUT - 0.5)
    assert not transport.disconnected
    clock.advance(0.5)
    assert transport.disconnected


def test_receiver_after_hello_waits_the_idle_timeout():
    clock = task.Clock()
    protocol, transport, _ = receiver(FakeExpectation(), clock)
    protocol.dataReceived(hello())
    clock.advance(HELLO_TIMEOUT)
    assert not transport.disconnected
    clock.advance(IDLE_TIMEOUT - HELLO_TIMEOUT)
    assert transport.disconnected


def test_inbox_claims_once_and_only_from_its_host():
    inbox = Inbox()
    expectation = FakeExpectation()
    inbox.expect(expectation)
    assert inbox.claim(TOKEN, OTHER_HOST) is None
    assert inbox.claim("cd" * 16, PEER_HOST) is None
    assert inbox.claim(TOKEN, PEER_HOST) is expectation
    assert inbox.claim(TOKEN, PEER_HOST) is None
    inbox.expect(expectation)
    inbox.withdraw(TOKEN)
    assert len(inbox) == 0


# -- ChunkPusher -----------------------------------------------------------------


class FakeLocalFile:
    def __init__(self, size):
        count = (size + CHUNK_SIZE - 1) // CHUNK_SIZE
        self.manifest = Manifest.build(size, [bytes([i]) * 32 for i in range(count)])
        self.path = "/shared/file.bin"


class FakeReader:
    def __init__(self):
        self.reads = []

    def __call__(self, path, offset, length):
        d = defer.Deferred()
        self.reads.append(((path, offset, length), d))
        return d


def pusher(chunks, size=3 * CHUNK_SIZE - 100, clock=None, pace=None):
    reader = FakeReader()
    protocol = ChunkPusher(TOKEN, FakeLocalFile(size), chunks, reader, pace=pace)
    protocol.callLater = (clock or task.Clock()).callLater
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, reader


def test_pusher_sends_hello_chunks_and_done():
    protocol, transport, reader = pusher([2, 0])
    done = []
    protocol.stream.done.addCallback(done.append)
    assert sent_headers(transport) == [{"t": "hello", "v": 1, "token": TOKEN}]
    assert [r for r, _ in reader.reads] == [("/shared/file.bin", 2 * CHUNK_SIZE, CHUNK_SIZE - 100)]

    reader.reads[0][1].callback(b"C" * (CHUNK_SIZE - 100))
    assert [r for r, _ in reader.reads][1] == ("/shared/file.bin", 0, CHUNK_SIZE)
    assert not transport.disconnecting

    reader.reads[1][1].callback(b"A" * CHUNK_SIZE)
    assert sent_frames(transport) == [
        ({"t": "hello", "v": 1, "token": TOKEN}, b""),
        ({"t": "chunk", "i": 2}, b"C" * (CHUNK_SIZE - 100)),
        ({"t": "chunk", "i": 0}, b"A" * CHUNK_SIZE),
        ({"t": "done"}, b""),
    ]
    assert transport.disconnecting
    assert transport.producer is None
    assert done == [True]


def test_pusher_reads_nothing_while_paused():
    protocol, transport, reader = pusher([0, 1, 2])
    assert transport.producer is protocol.stream
    assert transport.streaming
    transport.producer.pauseProducing()
    reader.reads[0][1].callback(b"A" * CHUNK_SIZE)
    # The read in flight is sent, but no new read starts.
    assert len(reader.reads) == 1
    assert [h["t"] for h in sent_headers(transport)] == ["hello", "chunk"]

    transport.producer.resumeProducing()
    assert len(reader.reads) == 2
    assert reader.reads[1][0][1] == CHUNK_SIZE
    # Pausing and resuming while a read is in flight starts no second read.
    transport.producer.pauseProducing()
    transport.producer.resumeProducing()
    assert len(reader.reads) == 2


def test_pusher_read_failure_ends_the_stream():
    protocol, transport, reader = pusher([0, 1])
    done = []
    protocol.stream.done.addCallback(done.append)
    reader.reads[0][1].errback(OSError("gone"))
    assert done == [False]
    assert transport.disconnecting
    assert len(reader.reads) == 1
    assert [h["t"] for h in sent_headers(transport)] == ["hello"]


def test_pusher_connection_lost_stops_the_stream():
    protocol, transport, reader = pusher([0, 1])
    done = []
    protocol.stream.done.addCallback(done.append)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert done == [False]
    reader.reads[0][1].callback(b"A" * CHUNK_SIZE)
    assert len(reader.reads) == 1
    assert [h["t"] for h in sent_headers(transport)] == ["hello"]


def test_pusher_drops_a_receiver_that_talks_back():
    protocol, transport, reader = pusher([0])
    protocol.dataReceived(frame({"t": "hello"}))
    assert transport.disconnecting


def test_pusher_sending_chunks_is_not_idle():
    """
    The receiver never talks: every chunk sent restarts the idle timeout, so
    a slow upload is not cut after IDLE_TIMEOUT.
    """
    clock = task.Clock()
    protocol, transport, reader = pusher([0, 1, 2], clock=clock)
    for i, length in enumerate([CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE - 100]):
        clock.advance(IDLE_TIMEOUT - 1)
        assert not transport.disconnected
        reader.reads[i][1].callback(b"x" * length)
    assert [h["t"] for h in sent_headers(transport)] == ["hello", "chunk", "chunk", "chunk", "done"]
    assert not transport.disconnected


def test_pusher_stalled_is_dropped_by_the_idle_timeout():
    clock = task.Clock()
    protocol, transport, reader = pusher([0, 1], clock=clock)
    reader.reads[0][1].callback(b"x" * CHUNK_SIZE)
    transport.producer.pauseProducing()  # the receiver stopped reading
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnected
    clock.advance(1)
    assert transport.disconnected


def test_pusher_waiting_on_the_upload_rate_is_not_idle():
    """
    A stream waiting for the token bucket (its own peer's rate) does not
    count that time against the receiver; the timeout runs again after.
    """
    clock = task.Clock()
    waits = []

    def pace(n):
        d = defer.Deferred()
        waits.append(d)
        return d

    protocol, transport, reader = pusher([0, 1], clock=clock, pace=pace)
    clock.advance(5 * IDLE_TIMEOUT)
    assert not transport.disconnected
    waits[0].callback(CHUNK_SIZE)
    reader.reads[0][1].callback(b"x" * CHUNK_SIZE)
    clock.advance(5 * IDLE_TIMEOUT)
    assert not transport.disconnected
    waits[1].callback(CHUNK_SIZE)
    # The read never finishes: now the timeout runs.
    clock.advance(IDLE_TIMEOUT)
    assert transport.disconnected


def test_pusher_receiver_that_talks_back_stops_the_stream():
    protocol, transport, reader = pusher([0, 1])
    done = []
    protocol.stream.done.addCallback(done.append)
    transport.producer.pauseProducing()
    protocol.dataReceived(frame({"t": "hello"}))
    assert transport.disconnecting
    assert transport.producer is None
    assert done == [False]


# -- T+2, T+3 ------------------------------------------------------------------


def test_not_supported_says_so_and_closes():
    protocol = NotSupportedProtocol()
    protocol.callLater = task.Clock().callLater
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert sent_frames(transport) == [
        (
            {
                "t": "error",
                "code": "not-supported",
                "message": "distribution is not supported yet",
            },
            b"",
        )
    ]
    assert transport.disconnecting
    # The error is plain JSON a client can read.
    assert json.loads(transport.value()[4:].split(b"\n")[0])["code"] == "not-supported"


def test_receiver_refuses_a_big_frame_before_hello(feed):
    # A stranger (no token yet) cannot make us buffer a chunk-sized frame:
    # the length prefix alone is enough to drop it.
    expectation = FakeExpectation()
    protocol, transport, _ = receiver(expectation, task.Clock())
    feed(protocol, struct.pack("!I", MAX_HEADER + 1))
    assert transport.disconnecting
    assert expectation.delivered == []


# -- connections per host ----------------------------------------------------------


def test_a_host_gets_at_most_its_share_of_connections():
    factory = ReceiverFactory(Inbox())
    limit = MAX_CONNECTIONS_PER_HOST
    first = [factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000 + i)) for i in range(limit)]
    assert all(p is not None for p in first)
    # One more from the same host is refused; Twisted closes it.
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50000)) is None
    # Other hosts are not affected.
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 50000)) is not None
    # A closed connection gives its place back.
    first[0].makeConnection(StringTransport())
    first[0].connectionLost(Failure(ConnectionDone()))
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50001)) is not None
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50002)) is None
    assert factory.refused == 2
