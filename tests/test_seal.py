"""
Sealed streams, a private group's data connections: the seal itself (what
opens and what does not), the key a stream gets from its request
connection's TLS, a sealed stream on the sending side in copy and sendfile
mode (frames open in order, with their lengths telling the tag), the
receiving side (frame numbers, the buffer that has room for the tag) and a
download that gets a frame that does not open.
"""

import os

import pytest
from support import frames_in, result_of
from test_download import A, Harness, content_of
from test_streams import HELLO, TOKEN, Opened, eleven, link  # noqa: F401 (fixtures)
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from twisted_p2p import wire
from twisted_p2p.download import download as download_module
from twisted_p2p.download.buffers import BufferPool
from twisted_p2p.limits import MAX_RUN
from twisted_p2p.manifest import CHUNK_SIZE
from twisted_p2p.seal import EXPORTER_LABEL, TAG_SIZE, SealBroken, StreamSeal, stream_seal

KEY = bytes(range(16))
OTHER_KEY = bytes(range(1, 17))
LINE = b'{"t":"chunk","i":3}'


def sealed(key, number, line, plain):
    """C{plain} sealed as frame C{number} of a stream keyed C{key}."""
    seal = StreamSeal(key)
    seal.counter = number
    out = bytearray(len(plain) + TAG_SIZE)
    seal.seal_into(line, plain, out)
    return out


# -- the seal ------------------------------------------------------------------------


def test_a_sealed_body_opens_in_place_to_the_plain_one():
    plain = os.urandom(1000)
    seal = StreamSeal(KEY)
    out = bytearray(len(plain) + TAG_SIZE)
    seal.seal_into(LINE, plain, out)
    assert seal.counter == 1
    assert plain not in bytes(out)
    opened = StreamSeal(KEY).open_in_place(0, LINE, out)
    assert bytes(opened) == plain
    assert bytes(out[: len(plain)]) == plain  # in place: the same buffer


def test_frames_are_numbered_in_the_order_sealed():
    seal = StreamSeal(KEY)
    bodies = [os.urandom(100) for _ in range(3)]
    outs = []
    for body in bodies:
        out = bytearray(len(body) + TAG_SIZE)
        seal.seal_into(LINE, body, out)
        outs.append(out)
    opener = StreamSeal(KEY)
    for number, (body, out) in enumerate(zip(bodies, outs)):
        assert bytes(opener.open_in_place(number, LINE, out)) == body


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda b: b.__setitem__(0, b[0] ^ 1), id="a body byte"),
        pytest.param(lambda b: b.__setitem__(-1, b[-1] ^ 1), id="a tag byte"),
    ],
)
def test_an_altered_body_does_not_open(change):
    out = sealed(KEY, 0, LINE, b"x" * 500)
    change(out)
    with pytest.raises(SealBroken):
        StreamSeal(KEY).open_in_place(0, LINE, out)


def test_an_altered_header_line_does_not_open():
    """The header (which chunks these are) is bound to the body."""
    out = sealed(KEY, 0, LINE, b"x" * 500)
    with pytest.raises(SealBroken):
        StreamSeal(KEY).open_in_place(0, b'{"t":"chunk","i":4}', out)


def test_a_frame_out_of_order_or_replayed_does_not_open():
    out = sealed(KEY, 5, LINE, b"x" * 500)
    for number in (0, 4, 6):
        with pytest.raises(SealBroken):
            StreamSeal(KEY).open_in_place(number, LINE, bytearray(out))
    assert bytes(StreamSeal(KEY).open_in_place(5, LINE, out)) == b"x" * 500


def test_a_frame_of_another_stream_does_not_open():
    out = sealed(OTHER_KEY, 0, LINE, b"x" * 500)
    with pytest.raises(SealBroken):
        StreamSeal(KEY).open_in_place(0, LINE, out)


@pytest.mark.parametrize("length", [0, 1, TAG_SIZE - 1])
def test_a_body_shorter_than_a_tag_does_not_open(length):
    with pytest.raises(SealBroken):
        StreamSeal(KEY).open_in_place(0, LINE, bytearray(length))


def test_seal_broken_is_a_protocol_error():
    """So every path that drops a connection on a bad frame drops it."""
    assert issubclass(SealBroken, wire.ProtocolError)


# -- the key of a stream -------------------------------------------------------------


class FakeConnection:
    """What C{getHandle} gives on a TLS transport: a pyOpenSSL connection."""

    def __init__(self, secret):
        self.secret = secret
        self.asked = []

    def export_keying_material(self, label, length, context):
        self.asked.append((label, length, context))
        return (self.secret + context)[:length]


@implementer(ISSLTransport)
class FakeTLSTransport(StringTransport):
    def __init__(self, secret):
        StringTransport.__init__(self)
        self.connection = FakeConnection(secret)

    def getHandle(self):
        return self.connection


def test_a_plain_request_connection_gives_no_seal():
    assert stream_seal(StringTransport(), TOKEN) is None
    assert stream_seal(None, TOKEN) is None


def test_a_tls_request_connection_keys_the_stream_by_its_exporter_and_token():
    ours, theirs = FakeTLSTransport(b"s" * 8), FakeTLSTransport(b"s" * 8)
    sender, receiver = stream_seal(ours, TOKEN), stream_seal(theirs, TOKEN)
    assert ours.connection.asked == [(EXPORTER_LABEL, 16, bytes.fromhex(TOKEN))]
    out = bytearray(100 + TAG_SIZE)
    sender.seal_into(LINE, b"y" * 100, out)
    assert bytes(receiver.open_in_place(0, LINE, out)) == b"y" * 100


def test_another_token_is_another_key():
    transport = FakeTLSTransport(b"s" * 4)
    sender = stream_seal(transport, TOKEN)
    receiver = stream_seal(transport, "cd" * 16)
    out = bytearray(100 + TAG_SIZE)
    sender.seal_into(LINE, b"y" * 100, out)
    with pytest.raises(SealBroken):
        receiver.open_in_place(0, LINE, out)


# -- the sending side ----------------------------------------------------------------


def opened_frames(data):
    """
    The C{(first, count, plain body)} of the sealed chunk frames in C{data},
    opened in the order they came, as the receiver numbers them.
    """
    opener = StreamSeal(KEY)
    frames = frames_in(data)
    assert frames[0] == (HELLO, b""), "the hello goes in the clear"
    found = []
    for number, (header, body) in enumerate(frames[1:]):
        line = wire.encode_frame(header)[:-1]
        plain = opener.open_in_place(number, line, bytearray(body))
        found.append((header["i"], header.get("n", 1), bytes(plain)))
    return found


def test_a_sealed_stream_sends_frames_that_open_in_order(link, eleven):
    local, content = eleven
    opened = Opened(local, link.transport, seal=StreamSeal(KEY))
    opened.stream.add([0, 1, 2, 3, 4, 9, 10, 7])
    link.pull()
    data = link.data()
    frames = opened_frames(data)
    assert [(first, count) for first, count, _ in frames] == [(0, 4), (4, 1), (9, 2), (7, 1)]
    for first, count, plain in frames:
        assert plain == content[first * CHUNK_SIZE : (first + count) * CHUNK_SIZE]
    assert content[:CHUNK_SIZE] not in data
    assert opened.stream.bytes_sent == sum(
        local.manifest.chunk_length(i) for i in [0, 1, 2, 3, 4, 9, 10, 7]
    )


def test_a_cancel_on_a_sealed_stream_keeps_the_numbers_in_step(link, eleven):
    """
    Cancelled chunks are never sealed, so the frames that do go still
    open with the receiver's count.
    """
    local, content = eleven
    opened = Opened(local, link.transport, seal=StreamSeal(KEY))
    opened.stream.add([0])
    opened.stream.add([2])
    opened.stream.add([4])
    opened.stream.cancel([2])
    opened.stream.add([6])
    link.pull()
    frames = opened_frames(link.data())
    assert [first for first, _, _ in frames] == [0, 4, 6]
    for first, count, plain in frames:
        assert plain == content[first * CHUNK_SIZE : (first + count) * CHUNK_SIZE]


# -- the receiving side --------------------------------------------------------------


def test_a_pool_buffer_holds_a_whole_sealed_run():
    pool = BufferPool()
    buffer = pool.take(MAX_RUN * CHUNK_SIZE + TAG_SIZE)
    assert len(buffer) == MAX_RUN * CHUNK_SIZE + TAG_SIZE


class SealedHarness(Harness):
    """
    A download whose streams are sealed with L{KEY}, as if asked on a
    private group's TLS connection; L{send} seals what a sender would.
    """

    def __init__(self, tmp_path, content, monkeypatch, **kwargs):
        monkeypatch.setattr(download_module, "stream_seal", lambda transport, token: StreamSeal(KEY))
        Harness.__init__(self, tmp_path, content, **kwargs)
        self.seals = {}

    def send_sealed(self, host, index, count=1, alter=False):
        token = self.token_for(host, index)
        seal = self.seals.setdefault(token, StreamSeal(KEY))
        header = {"t": "chunk", "i": index} if count == 1 else {"t": "chunk", "i": index, "n": count}
        line = wire.encode_frame(header)[:-1]
        data = self.chunk(index, count)
        body = bytearray(len(data) + TAG_SIZE)
        seal.seal_into(line, data, body)
        if alter:
            body[7] ^= 0x40
        return self.send(host, index, data=bytes(body), count=count, token=token, line=line)


def test_a_sealed_download_opens_every_frame_and_is_byte_identical(tmp_path, monkeypatch):
    h = SealedHarness(tmp_path, content_of(MAX_RUN * CHUNK_SIZE + 3 * CHUNK_SIZE + 5), monkeypatch)
    done = h.start()
    assert h.send_sealed(A, 0, count=MAX_RUN)
    for index in (MAX_RUN + 2, MAX_RUN, MAX_RUN + 1, MAX_RUN + 3):
        assert h.send_sealed(A, index)
    assert h.downloaded(result_of(done)[0]) == h.content


def test_a_sealed_frame_must_carry_its_tag(tmp_path, monkeypatch):
    """A plain-length frame on a sealed stream is not what was asked."""
    h = SealedHarness(tmp_path, content_of(2 * CHUNK_SIZE), monkeypatch)
    h.start()
    assert not h.send(A, 0)


def test_a_frame_that_does_not_open_closes_the_stream_and_is_asked_again(tmp_path, monkeypatch):
    h = SealedHarness(tmp_path, content_of(3 * CHUNK_SIZE), monkeypatch)
    done = h.start()
    first_token = h.token_for(A, 0)
    assert h.send_sealed(A, 0, alter=True)
    assert h.connections[first_token].closed
    assert h.download.have == 0
    # Nothing is written, and nobody is banned: the frame may have been
    # altered on the way.
    assert h.download.bans.strikes(A) == 0
    h.advance(30)
    assert h.token_for(A, 0) != first_token
    h.seals.clear()
    for index in h.outstanding(A):
        assert h.send_sealed(A, index)
    h.advance(30)
    for index in h.outstanding(A):
        assert h.send_sealed(A, index)
    assert h.downloaded(result_of(done)[0]) == h.content
