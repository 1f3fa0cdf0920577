"""
The frame reader: fed whole, one byte at a time, in random pieces, or read
into its buffers as a socket's recv_into would, it must see the same frames;
what breaks the framing stops it.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import frame

from twisted_p2p import wire
from twisted_p2p.framing import HEAD_READ, FrameReader, frame_head


class Recorder:
    """
    A reader owner that records frames as (header, body) pairs, giving each
    body a buffer of its own.
    """

    def __init__(self, refuse=None):
        self.frames = []
        self.progress = 0
        self._current = None
        self._refuse = refuse

    def header_received(self, header, body_length):
        if self._refuse == "header":
            raise wire.ProtocolError("no thanks")
        body = bytearray(body_length)
        self._current = (header, body)
        return memoryview(body) if body_length else None

    def body_progress(self, count):
        if self._refuse == "body":
            raise wire.ProtocolError("no thanks")
        self.progress += count

    def frame_ended(self):
        header, body = self._current
        self.frames.append((header, bytes(body)))


class Reader:
    """
    A reader with a recorder, fed through the C{feed} fixture's protocol
    interface.
    """

    def __init__(self, max_frame=1 << 20, max_header=256, refuse=None):
        self.owner = Recorder(refuse)
        self.reader = FrameReader(self.owner, max_frame, max_header)

    def dataReceived(self, data):
        self.reader.feed(data)


FRAMES = [
    ({"t": "hello", "v": 1, "token": "ab" * 16}, b""),
    ({"t": "chunk", "i": 0}, bytes(range(256)) * 40),
    ({"t": "chunk", "i": 1}, b"\n\n\x00\xff"),
    ({"t": "done"}, b""),
    ({"t": "chunk", "i": 2}, b"z" * (HEAD_READ * 3 + 1)),
]


def stream(frames=FRAMES):
    return b"".join(frame(header, body) for header, body in frames)


def test_frames_whole_and_bytewise(feed):
    r = Reader()
    feed(r, stream())
    assert r.owner.frames == FRAMES
    assert r.owner.progress == sum(len(body) for _, body in FRAMES)


@given(st.lists(st.integers(min_value=1, max_value=5000), max_size=40))
def test_frames_in_random_pieces(sizes):
    data = stream()
    r = Reader()
    position = 0
    for size in sizes:
        r.dataReceived(data[position : position + size])
        position += size
    r.dataReceived(data[position:])
    assert r.owner.frames == FRAMES


@given(st.lists(st.integers(min_value=1, max_value=70000), min_size=1, max_size=60))
def test_frames_read_into_the_buffers(sizes):
    """
    As a socket's recv_into does: at most what the buffer holds, and at
    most what has arrived.
    """
    data = stream()
    r = Reader()
    position, turn = 0, 0
    while position < len(data):
        target = r.reader.buffer()
        assert len(target) > 0
        count = min(len(target), sizes[turn % len(sizes)], len(data) - position)
        target[:count] = data[position : position + count]
        r.reader.filled(count)
        position += count
        turn += 1
    assert r.owner.frames == FRAMES


def test_bodies_are_read_into_the_owners_buffer():
    """
    Past the first few bytes (read with the head), a body goes straight to
    the buffer its owner gave: the reader's next buffer is that one.
    """
    r = Reader()
    body = b"b" * 1000
    data = frame({"t": "chunk", "i": 0}, body)
    head = r.reader.buffer()
    assert len(head) == HEAD_READ
    head[:HEAD_READ] = data[:HEAD_READ]
    r.reader.filled(HEAD_READ)
    target = r.reader.buffer()
    header, owned = r.owner._current
    assert target.obj is owned
    rest = data[HEAD_READ:]
    target[: len(rest)] = rest
    r.reader.filled(len(rest))
    assert r.owner.frames == [({"t": "chunk", "i": 0}, body)]


def test_frame_head_matches_encode_frame():
    header, body = {"t": "chunk", "i": 7}, b"xyz"
    assert frame_head(header, len(body)) + body == frame(header, body)


@pytest.mark.parametrize(
    "data, reason",
    [
        ((1 << 21).to_bytes(4, "big") + b'{"t":"x"}\n', "over the limit"),
        ((300).to_bytes(4, "big") + b"x" * 300, "too long"),
        ((3).to_bytes(4, "big") + b'{"t":"x"}\n', "shorter than its header"),
        ((4).to_bytes(4, "big") + b"[1]\n", "not a JSON object"),
        ((8).to_bytes(4, "big") + b'{"a":1}\n', "'t'"),
        ((4).to_bytes(4, "big") + b"\xff\xfe\x00\n", "not JSON"),
    ],
)
def test_bad_framing_stops_the_reader(feed, data, reason):
    r = Reader()
    with pytest.raises(wire.ProtocolError, match=reason):
        feed(r, data)
    assert r.reader.stopped
    r.dataReceived(stream())  # nothing more is read
    assert r.owner.frames == []


@pytest.mark.parametrize("where", ["header", "body"])
def test_owner_refusal_stops_the_reader(where):
    r = Reader(refuse=where)
    with pytest.raises(wire.ProtocolError):
        r.dataReceived(frame({"t": "chunk", "i": 0}, b"abc"))
    assert r.reader.stopped
    r.dataReceived(stream())
    assert r.owner.frames == []


def test_a_body_without_a_place_is_refused():
    class NoPlace(Recorder):
        def header_received(self, header, body_length):
            return None

    reader = FrameReader(NoPlace(), 1 << 20, 256)
    with pytest.raises(wire.ProtocolError, match="no place"):
        reader.feed(frame({"t": "chunk", "i": 0}, b"abc"))


def test_max_frame_may_grow_between_frames():
    r = Reader(max_frame=64)
    r.dataReceived(frame({"t": "hello"}))
    r.reader.max_frame = 1 << 20
    r.dataReceived(frame({"t": "chunk", "i": 0}, b"z" * 10000))
    assert [h["t"] for h, _ in r.owner.frames] == ["hello", "chunk"]


@given(st.binary(max_size=2000))
def test_garbage_never_crashes(data):
    r = Reader(max_frame=4096, max_header=128)
    for piece in (data[: len(data) // 2], data[len(data) // 2 :]):
        try:
            r.dataReceived(piece)
        except wire.ProtocolError:
            assert r.reader.stopped
            break
