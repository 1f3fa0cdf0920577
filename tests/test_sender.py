"""
T+1, the sender port's protocol: requests answered one at a time and in
order from its uploads owner, in one session per connection; reading
paused while requests queue up or answers are not read; bad requests drop
the connection.  On StringTransport with a Clock, fed all at once and one
byte at a time.
"""

import struct

import pytest
from support import BufferedTransport, frame, framed, sent_frames, sent_headers
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p import wire
from twisted_p2p.limits import IDLE_TIMEOUT, MAX_HEADER, MAX_QUEUED_REQUESTS
from twisted_p2p.transfer import RequestRefused, SenderFactory

PEER_HOST = "192.0.2.2"
EMPTY_CATALOG = {"t": "catalog", "rev": "0" * 16, "files": []}


class FakeSession:
    """
    The session an uploads owner keeps for one request connection.
    """

    def __init__(self, host, keepalive):
        self.host = host
        self.keepalive = keepalive
        self.closed = 0

    def close(self):
        self.closed += 1


class FakeUploads:
    """
    An uploads owner that answers from a script: each answer is a
    C{(header, body)}, a Deferred of one, or an exception to raise.
    """

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []
        self.sessions = []

    def session(self, host, keepalive=None, transport=None):
        session = FakeSession(host, keepalive)
        self.sessions.append(session)
        return session

    def handle(self, header, session):
        assert session is self.sessions[-1]
        self.calls.append(header)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class EndlessUploads(FakeUploads):
    """
    An uploads owner that answers every request: at once with a body of
    C{body_size} bytes, or (C{slow}) with a Deferred the test fires.
    """

    def __init__(self, body_size=0, slow=False):
        FakeUploads.__init__(self)
        self.body_size = body_size
        self.slow = slow
        self.pending = []

    def handle(self, header, session):
        self.calls.append(header["n"])
        answer = ({"t": "ok", "n": header["n"]}, b"x" * self.body_size)
        if not self.slow:
            return answer
        d = defer.Deferred()
        self.pending.append((d, answer))
        return d


def connect(uploads, clock=None, transport_class=StringTransport, host=PEER_HOST):
    factory = SenderFactory(uploads)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    protocol.callLater = (clock or task.Clock()).callLater
    transport = transport_class(peerAddress=IPv4Address("TCP", host, 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def flood(count):
    return b"".join(frame(wire.request("manifest", n=n)) for n in range(count))


# -- answers ---------------------------------------------------------------------


def test_answers_a_request(feed):
    uploads = FakeUploads((EMPTY_CATALOG, b""))
    protocol, transport = connect(uploads)
    feed(protocol, frame(wire.request("catalog")))
    assert uploads.calls == [{"t": "catalog", "v": 1}]
    assert sent_frames(transport) == [(EMPTY_CATALOG, b"")]
    assert not transport.disconnecting


def test_one_session_per_connection_for_the_host_it_comes_from(feed):
    uploads = FakeUploads((EMPTY_CATALOG, b""), (EMPTY_CATALOG, b""))
    protocol, transport = connect(uploads)
    feed(protocol, frame(wire.request("catalog")) + frame(wire.request("catalog")))
    assert [s.host for s in uploads.sessions] == [PEER_HOST]
    assert len(uploads.calls) == 2  # both handed the same session (see handle)


def test_the_session_ends_with_the_connection():
    """
    The streams a request connection opened end when it closes.
    """
    uploads = FakeUploads()
    protocol, transport = connect(uploads)
    session = uploads.sessions[0]
    assert session.closed == 0
    protocol.connectionLost(Failure(ConnectionDone()))
    assert session.closed == 1


def test_the_session_ends_when_a_bad_request_drops_the_connection(feed):
    uploads = FakeUploads(wire.ProtocolError("no"))
    protocol, transport = connect(uploads)
    feed(protocol, frame(wire.request("get")))
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert uploads.sessions[0].closed == 1


def test_answers_in_order_behind_a_slow_answer(feed):
    slow = defer.Deferred()
    uploads = FakeUploads(slow, ({"t": "second"}, b"2"))
    protocol, transport = connect(uploads)
    feed(protocol, frame(wire.request("first")) + frame(wire.request("second")))
    # The second request is not even looked at before the first is answered.
    assert [h["t"] for h in uploads.calls] == ["first"]
    assert transport.value() == b""
    slow.callback(({"t": "first"}, b"1"))
    assert [h["t"] for h in uploads.calls] == ["first", "second"]
    assert sent_frames(transport) == [({"t": "first"}, b"1"), ({"t": "second"}, b"2")]


def test_answers_many_pipelined_requests_in_order():
    """
    Hundreds of requests queued behind one slow answer are all answered, in
    order, once it fires (no recursion limit on the queue).
    """
    slow = defer.Deferred()
    count = 500
    uploads = FakeUploads(slow, *[({"t": "ok", "n": n}, b"") for n in range(1, count)])
    protocol, transport = connect(uploads)
    protocol.dataReceived(b"".join(frame(wire.request("get", n=n)) for n in range(count)))
    slow.callback(({"t": "ok", "n": 0}, b""))
    assert [h["n"] for h in sent_headers(transport)] == list(range(count))


def test_a_refusal_is_an_error_frame_and_keeps_the_connection(feed):
    uploads = FakeUploads(
        RequestRefused("busy", "serving too many requests"),
        (EMPTY_CATALOG, b""),
    )
    protocol, transport = connect(uploads)
    feed(protocol, frame(wire.request("get")) + frame(wire.request("catalog")))
    assert sent_headers(transport) == [
        {"t": "error", "code": "busy", "message": "serving too many requests"},
        EMPTY_CATALOG,
    ]
    assert not transport.disconnecting


def test_a_deferred_refusal_is_an_error_frame(feed):
    uploads = FakeUploads(defer.fail(RequestRefused("unreachable", "cannot connect back")))
    protocol, transport = connect(uploads)
    feed(protocol, frame(wire.request("get")))
    assert sent_headers(transport) == [
        {"t": "error", "code": "unreachable", "message": "cannot connect back"}
    ]
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "error",
    [wire.ProtocolError("field 'id' is malformed"), wire.WrongVersion("field 'id' is malformed")],
    ids=["malformed", "another version"],
)
def test_a_bad_request_is_answered_then_dropped(feed, error):
    uploads = FakeUploads(error, ({"t": "never"}, b""))
    protocol, transport = connect(uploads)
    feed(protocol, frame(wire.request("manifest", id="x")) + frame(wire.request("catalog")))
    assert sent_headers(transport) == [
        {"t": "error", "code": "bad-request", "message": "field 'id' is malformed"}
    ]
    assert transport.disconnecting
    # Nothing after the bad request is served.
    assert len(uploads.calls) == 1


def test_a_deferred_bad_request_is_answered_then_dropped(feed):
    uploads = FakeUploads(defer.fail(wire.ProtocolError("too many streams")))
    protocol, transport = connect(uploads)
    feed(protocol, frame(wire.request("get")))
    assert sent_headers(transport)[0]["code"] == "bad-request"
    assert transport.disconnecting


def test_an_internal_error_still_answers_in_order(feed):
    """
    An unexpected failure in the owner is still one answer, so the answers
    after it are not matched to the wrong requests.
    """
    uploads = FakeUploads(KeyError("bug"), (EMPTY_CATALOG, b""))
    protocol, transport = connect(uploads)
    feed(protocol, frame(wire.request("manifest")) + frame(wire.request("catalog")))
    headers = sent_headers(transport)
    assert [h["t"] for h in headers] == ["error", "catalog"]
    assert headers[0]["code"] == "internal"
    assert not transport.disconnecting


def test_a_bad_request_unregisters_the_write_gate(feed):
    """
    Otherwise a full buffer that drains would resume the gate instead of
    closing the connection.
    """
    uploads = FakeUploads(wire.ProtocolError("field 'id' is malformed"))
    protocol, transport = connect(uploads)
    assert transport.producer is not None and transport.streaming
    feed(protocol, frame(wire.request("manifest", id="x")))
    assert transport.disconnecting
    assert transport.producer is None


# -- frames ------------------------------------------------------------------------


def test_drops_an_oversized_frame(feed):
    uploads = FakeUploads()
    protocol, transport = connect(uploads)
    # Only the length prefix is needed for the verdict.
    feed(protocol, struct.pack("!I", MAX_HEADER + 1) + b"{" * 100)
    assert transport.disconnecting
    assert uploads.calls == []
    assert transport.value() == b""


def test_accepts_a_frame_of_exactly_the_limit(feed):
    header = wire.encode_frame(wire.request("catalog"))
    payload = header[:-1] + b" " * (MAX_HEADER - len(header)) + b"\n"
    assert len(payload) == MAX_HEADER
    uploads = FakeUploads((EMPTY_CATALOG, b""))
    protocol, transport = connect(uploads)
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
def test_drops_a_garbage_frame(feed, payload):
    uploads = FakeUploads()
    protocol, transport = connect(uploads)
    feed(protocol, framed(payload) + frame(wire.request("catalog")))
    assert transport.disconnecting
    assert uploads.calls == []
    assert transport.value() == b""


# -- time ----------------------------------------------------------------------------


def test_a_silent_connection_is_dropped_by_the_idle_timeout():
    clock = task.Clock()
    uploads = FakeUploads((EMPTY_CATALOG, b""))
    protocol, transport = connect(uploads, clock)
    clock.advance(IDLE_TIMEOUT - 1)
    protocol.dataReceived(frame(wire.request("catalog")))  # resets the timer
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnected
    clock.advance(1)
    assert transport.disconnected
    protocol.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_a_stream_making_progress_keeps_its_request_connection():
    """
    A requester says nothing while its chunks stream: the session's
    keepalive (called as its streams send) holds off the idle timeout.
    """
    clock = task.Clock()
    uploads = FakeUploads()
    protocol, transport = connect(uploads, clock)
    keepalive = uploads.sessions[0].keepalive
    for _ in range(5):
        clock.advance(IDLE_TIMEOUT - 1)
        keepalive()
    assert not transport.disconnected
    clock.advance(IDLE_TIMEOUT)
    assert transport.disconnected


# -- memory bounds -----------------------------------------------------------------------


@pytest.mark.parametrize("piece", [4096, 1, 7], ids=["4 KiB reads", "bytewise", "7 bytes"])
def test_stops_reading_while_the_requester_does_not_read(piece):
    """
    Pipelined requests from a requester that never reads its answers: the
    sender answers until the write buffer is full, then reads nothing more
    (the kernel holds the rest) until the buffer drains.
    """
    uploads = EndlessUploads(body_size=16 * 1024)
    protocol, transport = connect(uploads, transport_class=BufferedTransport)
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
def test_queues_at_most_a_few_requests_behind_a_slow_answer(piece):
    uploads = EndlessUploads(slow=True)
    protocol, transport = connect(uploads, transport_class=BufferedTransport)
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


def test_reading_stays_paused_while_the_queue_is_full():
    """
    A drained write buffer does not resume reading while the request queue
    is still full.
    """
    uploads = EndlessUploads(slow=True)
    protocol, transport = connect(uploads, transport_class=BufferedTransport)
    transport.deliver(protocol, flood(20))
    transport.producer.pauseProducing()
    transport.producer.resumeProducing()
    assert transport.producerState == "paused"
    transport.deliver(protocol)
    assert len(protocol._requests) == MAX_QUEUED_REQUESTS


def test_a_requester_that_does_not_read_is_dropped_by_the_idle_timeout():
    clock = task.Clock()
    uploads = EndlessUploads(body_size=128 * 1024)
    protocol, transport = connect(uploads, clock, transport_class=BufferedTransport)
    transport.deliver(protocol, flood(10))
    assert uploads.calls == [0]
    clock.advance(IDLE_TIMEOUT)
    assert transport.disconnected
