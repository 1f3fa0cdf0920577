"""
Chunk streams, the sender's end of a data connection: which frames go out
and in what order, pacing by the upload rate, cancels, the stall timeout and
a file that changes under a stream.  In copy mode on a StringTransport, in
sendfile mode on one end of a socket pair (both with workers that run at
once, or when the test says), and once on a real loopback connection with a
real reactor and real worker threads.
"""

import os
import socket

import pytest
import pytest_twisted
from support import HeldWorkers, SyncWorkers, frame, frames_in, pull, result_of, shared_file
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from twisted_p2p import wire
from twisted_p2p.index import PartialLocal
from twisted_p2p.limits import (
    DEFAULT_RUN,
    IDLE_TIMEOUT,
    MAX_RUN,
    PACED_FRAME_SECONDS,
    STREAM_BATCH_BYTES,
    UPLOAD_BURST,
)
from twisted_p2p.manifest import CHUNK_SIZE
from twisted_p2p.seal import StreamSeal
from twisted_p2p.transfer import streams
from twisted_p2p.transfer.streams import (
    FileChanged,
    OpenChunks,
    OutgoingStream,
    StreamConnection,
    can_sendfile,
)
from twisted_p2p.uploads import TokenBucket
from twisted_p2p.workers import WorkerPool

TOKEN = "ab" * 16
HELLO = {"t": "hello", "v": 1, "token": TOKEN}


# -- the two kinds of data connection ------------------------------------------


class CopyLink:
    """
    A data connection on a StringTransport: not a socket, so the stream reads
    chunks in a worker and writes them through the transport (copy mode).
    The receiver reads everything whenever the test says (L{pull}).
    """

    def __init__(self):
        self.transport = StringTransport()

    def pull(self):
        pull(self.transport)

    def data(self):
        return self.transport.value()


@implementer(ITCPTransport)
class SocketTransport(StringTransport):
    """
    A StringTransport that stands for a TCP connection over C{sock}: a
    stream in sendfile mode sends on the socket itself, and asks for
    L{startWriting} when it is full.
    """

    def __init__(self, sock):
        StringTransport.__init__(self)
        self.sock = sock
        self.writing = 0

    def fileno(self):
        return self.sock.fileno()

    def startWriting(self):
        self.writing += 1


class SendfileLink:
    """
    A data connection over a socket pair with small buffers, so a stream in
    sendfile mode fills it at once.  L{pull} reads the other end and tells
    the stream it may write again, as Twisted does once a socket drains.
    """

    def __init__(self):
        self.ours, self.theirs = socket.socketpair()
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        self.theirs.setblocking(False)
        self.transport = SocketTransport(self.ours)
        self.received = bytearray()

    def read(self):
        while True:
            try:
                data = self.theirs.recv(1 << 20)
            except BlockingIOError:
                return
            if not data:
                return
            self.received += data

    def pull(self):
        for _ in range(10_000):
            self.read()
            if self.transport.producer is None:
                return
            before = len(self.received)
            self.transport.producer.resumeProducing()
            self.read()
            if len(self.received) == before:
                return
        raise AssertionError("the stream never stopped sending")

    def data(self):
        self.read()
        return bytes(self.received)

    def close(self):
        self.ours.close()
        self.theirs.close()


@pytest.fixture(params=[CopyLink, SendfileLink], ids=["copy", "sendfile"])
def link(request):
    made = request.param()
    yield made
    if hasattr(made, "close"):
        made.close()


@pytest.fixture
def eleven(tmp_path):
    """
    A shared file of ten whole chunks and a short one: its L{LocalFile} and
    content.
    """
    return shared_file(str(tmp_path), "eleven.bin", 10 * CHUNK_SIZE + 100, seed=11)


@pytest.fixture
def forty(tmp_path):
    """
    A shared file of 40 chunks: 10 MiB, more than a batch.
    """
    return shared_file(str(tmp_path), "forty.bin", 40 * CHUNK_SIZE, seed=40)


class Opened:
    """
    A stream on a data connection, and what the test looks at: its file,
    transport and the end it reports.
    """

    def __init__(self, local, transport, workers=None, clock=None, pace=None, seal=None,
                 **kwargs):
        self.local = local
        self.clock = clock or task.Clock()
        self.workers = workers or SyncWorkers()
        self.progress = 0
        self.opened = OpenChunks(local.path, local.manifest, getattr(local, "signature", None))
        self.stream = OutgoingStream(
            TOKEN, local, self.opened, self.workers, self.clock, pace=pace,
            progress=self._progressed, seal=seal, **kwargs,
        )
        self.ends = []
        self.stream.done.addCallback(self.ends.append)
        self.connection = StreamConnection(self.stream)
        self.transport = transport
        self.connection.makeConnection(transport)

    def _progressed(self):
        self.progress += 1


def open_on(link, local, **kwargs):
    return Opened(local, link.transport, **kwargs)


def chunk_frames(data):
    """
    C{(first, count, body)} of every chunk frame in C{data}, after a hello;
    a single chunk's frame must not carry "n".
    """
    frames = frames_in(data)
    assert frames[0] == (HELLO, b"")
    found = []
    for header, body in frames[1:]:
        assert header["t"] == "chunk" and set(header) <= {"t", "i", "n"}
        assert header.get("n", 2) > 1, "a single chunk is sent without n"
        found.append((header["i"], header.get("n", 1), body))
    return found


def runs(data):
    return [(first, count) for first, count, _ in chunk_frames(data)]


def check_bodies(data, content):
    """
    Every chunk frame in C{data} carries its chunks' bytes of C{content}.
    """
    for first, count, body in chunk_frames(data):
        assert body == content[first * CHUNK_SIZE : (first + count) * CHUNK_SIZE]


class Pacer:
    """
    C{pace(n)} for a stream: records each payment and holds it until the
    test fires it (L{release}), or lets it through at once while L{open}.
    """

    def __init__(self, open=False):
        self.open = open
        self.calls = []

    def __call__(self, n):
        d = defer.succeed(n) if self.open else defer.Deferred()
        self.calls.append((n, d))
        return d

    def release(self, i):
        n, d = self.calls[i]
        d.callback(n)

    @property
    def paid(self):
        return [n for n, _ in self.calls]


# -- what goes out -----------------------------------------------------------------


def test_hello_first_and_no_read_before_the_connection_asks(eleven):
    local, _ = eleven
    workers = SyncWorkers()
    opened = Opened(local, StringTransport(), workers=workers)
    transport, stream = opened.transport, opened.stream
    assert frames_in(transport.value()) == [(HELLO, b"")]
    assert transport.producer is stream and not transport.streaming
    stream.add([0, 1])
    assert workers.jobs == []
    transport.producer.resumeProducing()
    assert workers.jobs == [streams.read_batch]
    assert runs(transport.value()) == [(0, 2)]


@pytest.mark.parametrize(
    "asked, expected",
    [
        pytest.param(list(range(9)), [(0, 4), (4, 4), (8, 1)], id="at most the default run a frame"),
        pytest.param([0, 2, 4], [(0, 1), (2, 1), (4, 1)], id="not across gaps"),
        pytest.param([3, 2, 1, 0], [(3, 1), (2, 1), (1, 1), (0, 1)], id="not backwards"),
        pytest.param([5, 6, 0, 1], [(5, 2), (0, 2)], id="in the order asked"),
        pytest.param([8, 9, 10], [(8, 3)], id="with the short last chunk"),
        pytest.param([7, 8, 9, 10, 0], [(7, 4), (0, 1)], id="a run, then the first"),
    ],
)
def test_chunks_go_in_runs_in_the_order_asked(link, eleven, asked, expected):
    local, content = eleven
    opened = open_on(link, local)
    opened.stream.add(asked)
    link.pull()
    data = link.data()
    assert runs(data) == expected
    check_bodies(data, content)
    stream = opened.stream
    assert stream.pending() == 0
    assert stream.chunks_sent == len(asked)
    assert stream.bytes_sent == sum(local.manifest.chunk_length(i) for i in asked)
    assert not stream.ended and not link.transport.disconnecting


@pytest.mark.parametrize(
    "run, expected",
    [
        (1, [(i, 1) for i in range(11)]),
        (3, [(0, 3), (3, 3), (6, 3), (9, 2)]),
        (8, [(0, 8), (8, 3)]),
        (MAX_RUN, [(0, 11)]),
    ],
)
def test_runs_are_as_long_as_the_requester_asked(eleven, run, expected):
    local, content = eleven
    link = SendfileLink()
    try:
        opened = open_on(link, local, run=run)
        opened.stream.add(list(range(11)))
        link.pull()
        assert runs(link.data()) == expected
        check_bodies(link.data(), content)
    finally:
        link.close()


def test_a_stream_that_cannot_sendfile_keeps_to_the_default_run(eleven):
    """
    Its frames are read into memory a batch at a time: longer runs would
    hold more of them.
    """
    local, content = eleven
    opened = Opened(local, StringTransport(), run=MAX_RUN)
    opened.stream.add(list(range(11)))
    pull(opened.transport)
    assert runs(opened.transport.value()) == [(0, DEFAULT_RUN), (4, DEFAULT_RUN), (8, 3)]
    check_bodies(opened.transport.value(), content)


def test_a_sealed_stream_keeps_to_the_default_run(link, eleven):
    local, content = eleven
    opened = open_on(link, local, seal=StreamSeal(b"k" * 32), run=MAX_RUN)
    assert opened.stream.run_asked == MAX_RUN
    opened.stream.add(list(range(11)))
    link.pull()
    heads = [header for header, _ in frames_in(link.data())[1:]]
    assert [(h["i"], h.get("n", 1)) for h in heads] == [(0, DEFAULT_RUN), (4, DEFAULT_RUN), (8, 3)]


def test_chunks_paid_for_late_go_in_runs_of_the_stream(eleven):
    clock = task.Clock()
    bucket = TokenBucket(2 * CHUNK_SIZE, clock, burst=CHUNK_SIZE)
    opened = Opened(eleven[0], StringTransport(), clock=clock, pace=bucket.take, run=2)
    opened.stream.add(list(range(5)))
    for _ in range(20):
        pull(opened.transport)
        clock.advance(0.5)
    assert runs(opened.transport.value()) == [(0, 2), (2, 2), (4, 1)]


@pytest.mark.parametrize(
    "longest, expected", [(1, [(i, 1) for i in range(6)]), (4, [(0, 4), (4, 2)]), (None, [(0, 6)])]
)
def test_a_sender_keeps_its_frames_to_the_longest_it_allows(eleven, longest, expected):
    link = SendfileLink()
    try:
        opened = open_on(link, eleven[0], run=MAX_RUN, longest=longest)
        opened.stream.add(list(range(6)))
        link.pull()
        assert runs(link.data()) == expected
    finally:
        link.close()


def test_an_upload_cap_takes_an_eighth_of_a_second_a_frame_at_most():
    clock = task.Clock()
    assert TokenBucket(8_000_000, clock).longest_run() == 3
    assert TokenBucket(1_000, clock).longest_run() == 1
    assert TokenBucket(1e9, clock).longest_run() >= MAX_RUN
    assert PACED_FRAME_SECONDS == 0.125


def test_gets_queued_together_make_one_run_later_ones_follow(eleven):
    local, content = eleven
    opened = Opened(local, StringTransport())
    opened.stream.add([0, 1])
    opened.stream.add([2, 3])
    pull(opened.transport)
    opened.stream.add([4])
    pull(opened.transport)
    assert runs(opened.transport.value()) == [(0, 4), (4, 1)]
    check_bodies(opened.transport.value(), content)


def test_a_turn_of_the_connection_sends_at_most_a_batch(forty):
    """
    Memory stays flat: one write turn reads (and holds) at most about
    L{STREAM_BATCH_BYTES}, however many chunks are asked.
    """
    local, content = forty
    opened = Opened(local, StringTransport())
    opened.stream.add(list(range(40)))
    sizes = []
    while opened.stream.pending():
        before = len(opened.transport.value())
        opened.transport.producer.resumeProducing()
        sizes.append(len(opened.transport.value()) - before)
    assert len(sizes) > 2
    assert all(0 < size <= STREAM_BATCH_BYTES + MAX_RUN * CHUNK_SIZE for size in sizes)
    check_bodies(opened.transport.value(), content)
    assert sum(count for _, count in runs(opened.transport.value())) == 40


def test_a_chunk_asked_again_before_it_went_is_a_protocol_error(eleven):
    local, _ = eleven
    opened = Opened(local, StringTransport())
    opened.stream.add([1])
    with pytest.raises(wire.ProtocolError):
        opened.stream.add([2, 1])
    assert opened.stream.pending() == 1  # nothing of the refused ask was taken
    pull(opened.transport)
    opened.stream.add([1])  # sent by now: it may be asked again
    pull(opened.transport)
    assert runs(opened.transport.value()) == [(1, 1), (1, 1)]


def test_progress_is_told_of_what_goes_out(forty):
    local, _ = forty
    opened = Opened(local, StringTransport())
    opened.stream.add(list(range(40)))
    turns = pull(opened.transport)
    assert turns >= 3
    assert opened.progress == turns


# -- cancel ----------------------------------------------------------------------


def test_cancel_takes_queued_chunks_off(link, eleven):
    local, content = eleven
    opened = open_on(link, local)
    opened.stream.add([0, 1, 2, 5, 6])
    assert opened.stream.cancel([1, 5, 9]) == [1, 5]  # 9 was never asked
    assert opened.stream.pending() == 3
    link.pull()
    assert runs(link.data()) == [(0, 1), (2, 1), (6, 1)]
    check_bodies(link.data(), content)
    assert opened.stream.cancel([0]) == []  # sent already


def test_cancel_leaves_the_chunks_of_a_batch_being_sent(link, forty, monkeypatch):
    """
    Chunks handed to a worker go out whole: a cancel cannot take them back,
    and none of them is sent twice.  (In sendfile mode only bytes that are
    not in memory go to a worker.)
    """
    monkeypatch.setattr(OpenChunks, "in_memory", lambda self, segments: False)
    local, content = forty
    workers = HeldWorkers()
    opened = open_on(link, local, workers=workers)
    opened.stream.add(list(range(20)))
    opened.transport.producer.resumeProducing()
    assert len(workers.held) == 1  # the first batch, in a worker
    assert opened.stream.cancel([1, 5, 19]) == [19]
    for _ in range(10_000):
        workers.run()
        link.data()  # the receiver reads what came
        if not opened.stream.pending() or opened.transport.producer is None:
            break
        opened.transport.producer.resumeProducing()
    data = link.data()
    sent = [i for first, count in runs(data) for i in range(first, first + count)]
    assert sent == list(range(19))
    check_bodies(data, content)
    assert not opened.transport.disconnecting


def test_what_is_left_of_a_cancelled_paid_run_goes_unpaid(eleven):
    """
    A run paid for and not yet sent, of which a chunk is cancelled: the
    rest goes back to the queue with its payment, and is not paid again.
    """
    local, content = eleven
    pacer = Pacer()
    opened = Opened(local, StringTransport(), pace=pacer)
    stream, transport = opened.stream, opened.transport
    stream.add(list(range(8)))
    transport.producer.resumeProducing()
    assert pacer.paid == [4 * CHUNK_SIZE]  # one payment per run
    pacer.release(0)  # 0-3 go out; 4-7 are paid for next
    assert pacer.paid == [4 * CHUNK_SIZE, 4 * CHUNK_SIZE]
    pacer.release(1)  # paid, but the connection has not asked for more yet
    assert runs(transport.value()) == [(0, 4)]
    assert stream.cancel([5]) == [5]
    pull(transport)
    assert runs(transport.value()) == [(0, 4), (4, 1), (6, 2)]
    check_bodies(transport.value(), content)
    assert pacer.paid == [4 * CHUNK_SIZE, 4 * CHUNK_SIZE]


def test_chunks_cancelled_while_their_run_waits_for_the_rate_are_not_sent(eleven):
    local, content = eleven
    pacer = Pacer()
    opened = Opened(local, StringTransport(), pace=pacer)
    opened.stream.add([0, 1, 2, 3])
    opened.transport.producer.resumeProducing()
    assert opened.stream.cancel([1]) == [1]
    pacer.release(0)
    pull(opened.transport)
    assert runs(opened.transport.value()) == [(0, 1), (2, 2)]
    check_bodies(opened.transport.value(), content)


def test_cancelling_everything_while_waiting_for_the_rate(eleven):
    local, _ = eleven
    pacer = Pacer()
    opened = Opened(local, StringTransport(), pace=pacer)
    opened.stream.add([0, 1, 2, 3])
    opened.transport.producer.resumeProducing()
    assert sorted(opened.stream.cancel([3, 2, 1, 0])) == [0, 1, 2, 3]
    assert opened.clock.getDelayedCalls() == []  # no stall timeout: nothing is due
    pacer.release(0)
    pull(opened.transport)
    assert runs(opened.transport.value()) == []
    assert opened.stream.pending() == 0


def test_cancel_after_the_stream_ended_takes_nothing(eleven):
    local, _ = eleven
    pacer = Pacer()
    opened = Opened(local, StringTransport(), pace=pacer)
    opened.stream.add(list(range(8)))
    opened.transport.producer.resumeProducing()
    pacer.release(0)
    pacer.release(1)  # 4-7 paid for, not sent
    opened.stream.close()
    assert opened.stream.cancel([5]) == []


@pytest.mark.parametrize(
    "cancelled, removed, expected",
    [
        ([1, 5, 9], [5, 9], [(0, 4), (4, 1), (6, 3), (10, 1)]),
        ([1, 5], [5], [(0, 4), (4, 1), (6, 4), (10, 1)]),
        ([9, 8, 10], [9, 8, 10], [(0, 4), (4, 4)]),
    ],
)
def test_sendfile_cancel_leaves_a_started_run_and_keeps_the_order(
    eleven, cancelled, removed, expected
):
    """
    A run whose head is on the socket goes out whole; runs paid for behind
    it are still cancellable, and what is left of them, and the runs paid
    after them, go out in the order asked, in runs again.
    """
    local, content = eleven
    link = SendfileLink()
    try:
        opened = open_on(link, local)
        opened.stream.add(list(range(11)))
        link.transport.producer.resumeProducing()
        # The socket holds far less than a run: the first one has started.
        assert link.transport.writing == 1
        assert opened.stream.cancel(cancelled) == removed
        link.pull()
        data = link.data()
        assert runs(data) == expected
        check_bodies(data, content)
        assert opened.stream.pending() == 0
    finally:
        link.close()


# -- pacing --------------------------------------------------------------------------


def test_pacing_by_the_token_bucket_per_run(eleven):
    from twisted_p2p.uploads import TokenBucket

    local, content = eleven
    clock = task.Clock()
    clock.advance(100)
    rate = CHUNK_SIZE  # a chunk a second
    bucket = TokenBucket(rate, clock)
    opened = Opened(local, StringTransport(), clock=clock, pace=bucket.take)
    opened.transport.producer.resumeProducing()
    opened.stream.add(list(range(11)))
    sent = []
    for _ in range(15):
        pull(opened.transport)
        sent.append(sum(len(body) for _, _, body in chunk_frames(opened.transport.value())))
        clock.advance(1)
    assert sent[-1] == local.size
    for seconds, total in enumerate(sent):
        # Never more than the rate and its burst allow, and not far less.
        assert total <= rate * seconds + UPLOAD_BURST
        assert total >= rate * seconds - (MAX_RUN * CHUNK_SIZE) or total == local.size
    check_bodies(opened.transport.value(), content)


# -- the stall timeout -----------------------------------------------------------------


def test_a_receiver_that_does_not_read_is_dropped(forty):
    local, _ = forty
    opened = Opened(local, StringTransport())
    opened.stream.add(list(range(20)))
    opened.transport.producer.resumeProducing()  # a batch; then nothing is read
    assert opened.stream.pending()
    opened.clock.advance(IDLE_TIMEOUT - 1)
    assert not opened.transport.disconnected
    opened.clock.advance(1)
    assert opened.transport.disconnected  # aborted, not closed politely
    assert opened.stream.ended
    assert [reason for _, _, reason in opened.ends] == ["the requester stopped reading"]
    assert opened.opened.fd is None
    assert opened.clock.getDelayedCalls() == []


def test_chunks_going_out_keep_a_slow_stream_alive(forty):
    local, _ = forty
    opened = Opened(local, StringTransport())
    opened.stream.add(list(range(40)))
    while opened.stream.pending():
        opened.clock.advance(IDLE_TIMEOUT - 1)
        opened.transport.producer.resumeProducing()
    assert not opened.transport.disconnecting
    # Nothing asked: an idle stream waits for the next get as long as it
    # takes (it ends with its request connection).
    assert opened.clock.getDelayedCalls() == []
    opened.clock.advance(10 * IDLE_TIMEOUT)
    assert not opened.transport.disconnecting


def test_asking_more_does_not_hold_off_the_stall_timeout(forty):
    """
    What counts is the time since a chunk last went out: a requester that
    keeps asking but never reads is dropped all the same.
    """
    local, _ = forty
    opened = Opened(local, StringTransport())
    opened.stream.add(list(range(20)))
    opened.transport.producer.resumeProducing()
    opened.clock.advance(IDLE_TIMEOUT - 1)
    opened.stream.add([20])
    opened.clock.advance(1)
    assert opened.transport.disconnected


def test_a_stream_asked_for_chunks_that_sends_none_is_dropped(eleven):
    local, _ = eleven
    opened = Opened(local, StringTransport())
    opened.clock.advance(5 * IDLE_TIMEOUT)  # nothing asked: no timeout
    opened.stream.add([0])  # and the connection never asks for data
    opened.clock.advance(IDLE_TIMEOUT)
    assert opened.transport.disconnected


def test_waiting_on_our_own_rate_does_not_count(eleven):
    local, _ = eleven
    pacer = Pacer()
    opened = Opened(local, StringTransport(), pace=pacer)
    opened.stream.add(list(range(8)))
    opened.transport.producer.resumeProducing()
    opened.clock.advance(5 * IDLE_TIMEOUT)
    assert not opened.transport.disconnecting
    pacer.release(0)  # 0-3 go out, and 4-7 wait for the rate again
    opened.clock.advance(5 * IDLE_TIMEOUT)
    assert not opened.transport.disconnecting
    pacer.release(1)  # 4-7 may go now, but the receiver reads nothing more
    opened.clock.advance(IDLE_TIMEOUT - 1)
    assert not opened.transport.disconnected
    opened.clock.advance(1)
    assert opened.transport.disconnected


# -- a file that changes, a connection that ends -------------------------------------------


@pytest.mark.parametrize("change", ["rewritten", "replaced"])
def test_a_file_changed_mid_stream_ends_it(link, forty, change):
    local, _ = forty
    opened = open_on(link, local)
    opened.stream.add(list(range(20)))
    opened.transport.producer.resumeProducing()  # a batch, or a socketful
    before = link.data()
    assert len(before) > 1000
    if change == "rewritten":
        with open(local.path, "r+b") as f:
            f.write(b"changed")
        os.utime(local.path, ns=(1, 1))
    else:
        other = local.path + ".new"
        with open(local.path, "rb") as f, open(other, "wb") as g:
            g.write(f.read())
        os.replace(other, local.path)
    link.pull()
    assert opened.stream.ended
    assert opened.stream.failure.check(FileChanged)
    assert link.transport.disconnecting
    assert opened.opened.fd is None
    assert len(opened.ends) == 1
    assert link.data() == before  # nothing went out once the change was seen


def test_a_partial_file_shorter_than_its_chunks_ends_the_stream(link, eleven, tmp_path):
    local, content = eleven
    path = tmp_path / "partial.bin"
    path.write_bytes(content[: 2 * CHUNK_SIZE])
    partial = PartialLocal("eleven.bin", local.manifest, str(path), chunks={0, 1, 5})
    opened = open_on(link, partial)
    opened.stream.add([5])
    link.pull()
    assert opened.stream.ended
    assert opened.stream.failure.check(FileChanged)
    assert "shorter" in opened.stream.failure.getErrorMessage()


def test_the_data_connection_lost_ends_the_stream(eleven):
    local, _ = eleven
    opened = Opened(local, StringTransport())
    opened.stream.add([0, 1])
    opened.connection.connectionLost(Failure(ConnectionDone()))
    assert opened.stream.ended
    assert opened.ends == [(0, 0, "Connection was closed cleanly.")]
    assert opened.opened.fd is None
    assert opened.clock.getDelayedCalls() == []


def test_a_close_while_a_worker_reads_waits_for_it(eleven):
    local, _ = eleven
    workers = HeldWorkers()
    opened = Opened(local, StringTransport(), workers=workers)
    opened.stream.add([0, 1])
    opened.transport.producer.resumeProducing()
    opened.stream.close()
    assert opened.transport.disconnecting
    assert opened.transport.producer is None
    assert opened.ends == [] and opened.opened.fd is not None  # the worker uses it
    workers.run()
    assert opened.ends == [(0, 0, "closed")]
    assert opened.opened.fd is None
    assert runs(opened.transport.value()) == []  # nothing written after the close
    opened.stream.close()
    assert len(opened.ends) == 1


def test_a_receiver_that_talks_is_dropped(eleven):
    local, _ = eleven
    opened = Opened(local, StringTransport())
    opened.connection.dataReceived(b"\x00\x00\x00\x02{}")
    assert opened.transport.disconnected


def test_a_stream_closed_before_it_connects_closes_the_connection(eleven):
    local, _ = eleven
    opened = OpenChunks(local.path, local.manifest, local.signature)
    stream = OutgoingStream(TOKEN, local, opened, SyncWorkers(), task.Clock())
    stream.close("the request connection closed")
    transport = StringTransport()
    StreamConnection(stream).makeConnection(transport)
    assert transport.disconnecting
    assert transport.value() == b""
    assert result_of(stream.done)[2] == "the request connection closed"


# -- opening a file, and which transports can sendfile ---------------------------------------


def test_open_chunks_refuses_a_file_changed_since_it_was_indexed(eleven):
    local, _ = eleven
    with open(local.path, "ab") as f:
        f.write(b"more")
    with pytest.raises(FileChanged):
        OpenChunks(local.path, local.manifest, local.signature)


def test_open_chunks_refuses_a_symlink(eleven, tmp_path):
    local, _ = eleven
    link_path = tmp_path / "link.bin"
    link_path.symlink_to(local.path)
    with pytest.raises(OSError):
        OpenChunks(str(link_path), local.manifest)


def test_open_chunks_of_a_partial_download_is_not_checked(eleven):
    local, content = eleven
    opened = OpenChunks(local.path, local.manifest)
    with open(local.path, "ab") as f:
        f.write(b"more")
    opened.check()  # ours: no signature to compare with
    assert opened.read(opened.segments(9, 2)) == content[9 * CHUNK_SIZE :]
    opened.close()
    assert opened.fd is None


def test_only_plain_tcp_transports_can_sendfile():
    assert not can_sendfile(StringTransport())
    a, b = socket.socketpair()
    try:
        plain = SocketTransport(a)
        assert can_sendfile(plain)
        alsoProvides(plain, ISSLTransport)
        assert not can_sendfile(plain)
    finally:
        a.close()
        b.close()


# -- sending on the reactor's thread what is in memory ----------------------------------------


def evicted(path):
    """
    Drop C{path}'s pages from the page cache; whether they are gone (a
    file system that keeps its files in memory keeps them).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # A read that misses starts reading, with read-ahead unless this
        # says not to: then only the probed page comes back, later.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        try:
            os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)


needs_nowait = pytest.mark.skipif(
    not hasattr(os, "RWF_NOWAIT"), reason="preadv2(RWF_NOWAIT) is Linux's"
)


@pytest.fixture
def cold_forty(forty):
    """
    L{forty}, its pages dropped from the page cache; skips where that
    cannot be done or seen.
    """
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("preadv2(RWF_NOWAIT) is Linux's")
    if not evicted(forty[0].path):
        pytest.skip("this file system keeps its files in memory")
    return forty


@needs_nowait
def test_bytes_just_written_are_in_memory(eleven):
    local, _ = eleven
    opened = OpenChunks(local.path, local.manifest, local.signature)
    try:
        assert opened.in_memory(opened.segments(0, 4))
        assert opened.in_memory(opened.segments(8, 3))  # to the short last chunk
        # Past the end of the file (it shrank): not for this thread to find out.
        fd, offset, length = opened.segments(10, 1)[0]
        assert not opened.in_memory([(fd, offset, length + 1)])
    finally:
        opened.close()


def test_bytes_that_would_wait_for_the_disk_are_not_in_memory(cold_forty):
    local, _ = cold_forty
    opened = OpenChunks(local.path, local.manifest, local.signature)
    # Each probe that misses starts reading what it probed: so every check
    # asks about chunks no read has touched, and nothing reads ahead.
    os.posix_fadvise(opened.fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        assert not opened.in_memory(opened.segments(10, 4))
        os.pread(opened.fd, CHUNK_SIZE, 20 * CHUNK_SIZE)  # chunk 20 alone comes back
        assert opened.in_memory(opened.segments(20, 1))
        assert not opened.in_memory(opened.segments(20, 2))
    finally:
        opened.close()


def test_without_a_way_to_ask_nothing_is_in_memory(eleven, monkeypatch):
    monkeypatch.setattr(streams, "_NOWAIT", None)
    local, _ = eleven
    opened = OpenChunks(local.path, local.manifest, local.signature)
    try:
        assert not opened.in_memory(opened.segments(0, 1))
    finally:
        opened.close()


@needs_nowait
def test_a_batch_in_memory_is_sent_here_one_per_turn(eleven, monkeypatch):
    """
    In sendfile mode, chunks in the page cache go out on this thread, with
    no worker; each turn of the connection sends one batch and then waits
    for the reactor to say the socket takes more.
    """
    monkeypatch.setattr(streams, "STREAM_BATCH_BYTES", CHUNK_SIZE)
    local, content = eleven
    link = SendfileLink()
    link.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    try:
        workers = HeldWorkers()
        opened = open_on(link, local, workers=workers)
        opened.stream.add([0, 2, 4])
        assert link.transport.writing == 0  # nothing before the connection asks
        link.transport.producer.resumeProducing()
        assert runs(link.data()) == [(0, 1)]
        assert link.transport.writing == 1
        link.transport.producer.resumeProducing()
        assert runs(link.data()) == [(0, 1), (2, 1)]
        assert link.transport.writing == 2
        link.pull()
        data = link.data()
        assert runs(data) == [(0, 1), (2, 1), (4, 1)]
        check_bodies(data, content)
        assert workers.held == []
        assert opened.stream.pending() == 0 and opened.progress == 3
    finally:
        link.close()


def test_a_batch_that_would_wait_for_the_disk_goes_to_a_worker(cold_forty):
    local, content = cold_forty
    link = SendfileLink()
    try:
        workers = HeldWorkers()
        opened = open_on(link, local, workers=workers)
        opened.stream.add(list(range(8)))
        link.transport.producer.resumeProducing()
        assert [f for f, _, _ in workers.held] == [streams.send_batch]
        assert link.data() == b""
        for _ in range(10_000):
            workers.run()
            if not opened.stream.pending():
                break
            link.read()
            link.transport.producer.resumeProducing()
        data = link.data()
        assert runs(data) == [(0, 4), (4, 4)]
        check_bodies(data, content)
    finally:
        link.close()


def test_a_file_changed_before_a_batch_sent_here_ends_the_stream(forty):
    local, _ = forty
    link = SendfileLink()
    try:
        opened = open_on(link, local)
        opened.stream.add([0])
        with open(local.path, "ab") as f:
            f.write(b"more")
        link.transport.producer.resumeProducing()
        assert opened.ends and "changed" in opened.ends[0][2]
        assert isinstance(opened.stream.failure.value, FileChanged)
        assert link.transport.disconnecting
    finally:
        link.close()


# -- on a real loopback connection ------------------------------------------------------------


class Collector(Protocol):
    """
    The receiving end of a real data connection: gathers what arrives.  Its
    receive buffer is kept small (no autotuning), so that the sender's
    socket fills while it does not read.
    """

    def __init__(self):
        self.data = bytearray()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost.callback(None)


async def wait_for(reactor, condition, timeout=20.0):
    waited = 0.0
    while not condition():
        assert waited < timeout, "condition not met in time"
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


@pytest_twisted.ensureDeferred
async def test_sendfile_on_a_real_loopback_connection(tmp_path, monkeypatch):
    """
    With a real reactor and worker threads, on 127.0.0.1: the chunks go by
    sendfile (never read into memory), the socket fills while the receiver
    does not read, and everything arrives once it does.
    """
    from twisted.internet import reactor

    count = 64  # 16 MiB: far more than the socket buffers hold
    local, content = shared_file(str(tmp_path), "big.bin", count * CHUNK_SIZE, seed=64)
    batches = []
    real_send_batch = streams.send_batch

    def recording_send_batch(sock, items, opened):
        result = real_send_batch(sock, items, opened)
        batches.append(result)
        return result

    def no_copy(items, opened):
        raise AssertionError("a chunk was read into memory")

    monkeypatch.setattr(streams, "send_batch", recording_send_batch)
    monkeypatch.setattr(streams, "read_batch", no_copy)

    collector = Collector()
    server = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await server.listen(Factory.forProtocol(lambda: collector))
    workers = WorkerPool(reactor, 2, "test-streams")
    try:
        opened = OpenChunks(local.path, local.manifest, local.signature)
        stream = OutgoingStream(TOKEN, local, opened, workers, reactor, run=MAX_RUN)
        client = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        connection = await client.connect(Factory.forProtocol(lambda: StreamConnection(stream)))
        assert can_sendfile(connection.transport)
        await wait_for(reactor, lambda: collector.transport is not None)
        collector.transport.pauseProducing()
        stream.add(list(range(count)))
        await wait_for(reactor, lambda: any(blocked for _, blocked in batches))
        assert len(collector.data) < len(content)
        collector.transport.resumeProducing()
        expected = len(frame(HELLO)) + count * CHUNK_SIZE + sum(
            len(frame({"t": "chunk", "i": i, "n": MAX_RUN})) for i in range(0, count, MAX_RUN)
        )
        await wait_for(reactor, lambda: len(collector.data) >= expected)
        data = bytes(collector.data)
        assert runs(data) == [(i, MAX_RUN) for i in range(0, count, MAX_RUN)]
        check_bodies(data, content)
        assert stream.pending() == 0 and stream.chunks_sent == count
        stream.close()
        await collector.lost
        ended = []
        stream.done.addCallback(ended.append)
        await wait_for(reactor, lambda: ended)
        assert ended == [(count, count * CHUNK_SIZE, "closed")]
        assert opened.fd is None
    finally:
        await port.stopListening()
        await workers.stop()


def test_cached_chunks_go_from_their_own_files_and_are_closed_once_sent(link, eleven, tmp_path):
    """
    A stream of chunks cached for others: one file per chunk, a run one
    segment per chunk, each file closed once its frames went out.
    """
    from twisted_p2p.transfer.streams import CachedChunks

    local, content = eleven
    folder = tmp_path / "chunks"
    folder.mkdir()
    for i in range(local.manifest.chunk_count):
        (folder / str(i)).write_bytes(content[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE])
    opened_fds = []

    def open_chunk(index):
        if index == 9:
            raise OSError("evicted")
        fd = os.open(folder / str(index), os.O_RDONLY)
        opened_fds.append(fd)
        return fd

    cached = CachedChunks("eleven.bin", local.manifest, open_chunk)
    stream = OutgoingStream(TOKEN, local, cached, SyncWorkers(), task.Clock())
    StreamConnection(stream).makeConnection(link.transport)
    stream.add([2, 3, 4, 5, 6, 10])
    link.pull()
    assert runs(link.data()) == [(2, 4), (6, 1), (10, 1)]
    check_bodies(link.data(), content)
    assert cached._fds == {}
    for fd in opened_fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    # A chunk that left the cache since it was offered: the stream ends.
    with pytest.raises(FileChanged):
        cached.segments(9, 1)
    stream.close()
