"""
The streaming frame parser: fed whole, one byte at a time and in random
pieces, it must see the same frames; what breaks the framing stops it.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import frame

from twisted_p2p import wire
from twisted_p2p.framing import FrameParser, frame_head


class Recorder:
    """
    A parser owner that records frames as (header, body) pairs.
    """

    def __init__(self, refuse=None):
        self.frames = []
        self._body = None
        self._refuse = refuse

    def header_received(self, header, body_length):
        if self._refuse == "header":
            raise wire.ProtocolError("no thanks")
        self._body = [header, body_length, bytearray()]

    def body_received(self, piece):
        assert isinstance(piece, memoryview)
        if self._refuse == "body":
            raise wire.ProtocolError("no thanks")
        self._body[2] += piece

    def frame_ended(self):
        header, length, body = self._body
        assert len(body) == length
        self.frames.append((header, bytes(body)))


class Parser:
    """
    A parser with a recorder, fed through the C{feed} fixture's protocol
    interface.
    """

    def __init__(self, max_frame=1 << 20, max_header=256, refuse=None):
        self.owner = Recorder(refuse)
        self.parser = FrameParser(self.owner, max_frame, max_header)

    def dataReceived(self, data):
        self.parser.feed(data)


FRAMES = [
    ({"t": "hello", "v": 1, "token": "ab" * 16}, b""),
    ({"t": "chunk", "i": 0}, bytes(range(256)) * 40),
    ({"t": "chunk", "i": 1}, b"\n\n\x00\xff"),
    ({"t": "done"}, b""),
]


def stream(frames=FRAMES):
    return b"".join(frame(header, body) for header, body in frames)


def test_frames_whole_and_bytewise(feed):
    p = Parser()
    feed(p, stream())
    assert p.owner.frames == FRAMES


@given(st.lists(st.integers(min_value=1, max_value=5000), max_size=40))
def test_frames_in_random_pieces(sizes):
    data = stream()
    p = Parser()
    position = 0
    for size in sizes:
        p.dataReceived(data[position : position + size])
        position += size
    p.dataReceived(data[position:])
    assert p.owner.frames == FRAMES


def test_frame_head_matches_encode_frame():
    header, body = {"t": "chunk", "i": 7}, b"xyz"
    assert frame_head(header, len(body)) + body == frame(header, body)


def test_body_pieces_are_slices_not_copies():
    data = frame({"t": "chunk", "i": 0}, b"a" * 1000)
    pieces = []

    class Owner(Recorder):
        def body_received(self, piece):
            pieces.append(piece)
            Recorder.body_received(self, piece)

    parser = FrameParser(Owner(), 1 << 20, 256)
    parser.feed(data)
    assert len(pieces) == 1 and pieces[0].obj is data


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
def test_bad_framing_stops_the_parser(feed, data, reason):
    p = Parser()
    with pytest.raises(wire.ProtocolError, match=reason):
        feed(p, data)
    assert p.parser.stopped
    p.dataReceived(stream())  # nothing more is parsed
    assert p.owner.frames == []


@pytest.mark.parametrize("where", ["header", "body"])
def test_owner_refusal_stops_the_parser(where):
    p = Parser(refuse=where)
    with pytest.raises(wire.ProtocolError):
        p.dataReceived(frame({"t": "chunk", "i": 0}, b"abc"))
    assert p.parser.stopped
    p.dataReceived(stream())
    assert p.owner.frames == []


def test_max_frame_may_grow_between_frames():
    p = Parser(max_frame=64)
    p.dataReceived(frame({"t": "hello"}))
    p.parser.max_frame = 1 << 20
    p.dataReceived(frame({"t": "chunk", "i": 0}, b"z" * 10000))
    assert [h["t"] for h, _ in p.owner.frames] == ["hello", "chunk"]


@given(st.binary(max_size=2000))
def test_garbage_never_crashes(data):
    p = Parser(max_frame=4096, max_header=128)
    for piece in (data[: len(data) // 2], data[len(data) // 2 :]):
        try:
            p.dataReceived(piece)
        except wire.ProtocolError:
            assert p.parser.stopped
            break
