"""
A streaming parser of transfer frames, for connections that carry chunk data.

A frame is a 4-byte big-endian length, then that many bytes: a JSON header
line ending in a newline, then an optional binary body (see C{PROTOCOL.md}).
C{Int32StringReceiver} gathers each frame whole before handing it on, copying
the growing buffer on every read; for 256 KiB chunks that was the receiver's
biggest cost.  L{FrameParser} gathers only the length and the header line, and
hands the body on as it arrives, in slices of what the socket gave (no copy),
so a chunk goes from the socket to the hash and the disk as it came.

Pure code: no reactor, no I/O.
"""

from twisted_p2p import wire

_LENGTH = 4


class FrameParser:
    """
    Splits a byte stream into frames and tells C{owner} about each:

     - C{owner.header_received(header, body_length)} once its header is in
       (a dict with a string C{t}, checked by L{wire.decode_header});
     - C{owner.body_received(piece)} for each piece of its body, a
       C{memoryview} of the data fed (valid as long as the caller keeps it:
       it is a slice of the bytes passed to L{feed});
     - C{owner.frame_ended()} once the whole body is in (at once after the
       header for a frame without a body).

    Any of these may raise L{wire.ProtocolError} to refuse the frame: the
    parser then stops for good (L{stopped}) and re-raises it from L{feed}.
    So does the parser for a frame that breaks the framing itself: a length
    over C{max_frame}, or a header line over C{max_header} bytes.

    @ivar max_frame: the largest frame length accepted; may be changed
        between frames (a connection accepts larger frames once it knows who
        is talking).
    """

    def __init__(self, owner, max_frame, max_header):
        self._owner = owner
        self.max_frame = max_frame
        self._max_header = max_header
        self._head = bytearray()
        self._body_left = 0
        self._in_body = False
        self.stopped = False

    def feed(self, data):
        """
        Parse C{data}, the next bytes of the stream.

        @raise wire.ProtocolError: a frame was refused; nothing more is parsed.
        """
        if self.stopped:
            return
        try:
            self._feed(data)
        except wire.ProtocolError:
            self.stopped = True
            raise

    def _feed(self, data):
        view = memoryview(data)
        position, end = 0, len(view)
        owner = self._owner
        while position < end:
            if self.stopped:
                return
            if self._in_body:
                take = min(self._body_left, end - position)
                owner.body_received(view[position : position + take])
                position += take
                self._body_left -= take
                if not self._body_left:
                    self._in_body = False
                    owner.frame_ended()
                continue
            position = self._gather_head(data, view, position, end)

    def _gather_head(self, data, view, position, end):
        """
        Take the length prefix and header line from C{data} at C{position};
        the position after what was taken.
        """
        head = self._head
        if not head and end - position > _LENGTH:
            # The common case: the whole head is in this piece of data.
            limit = min(end, position + _LENGTH + self._max_header)
            newline = data.find(b"\n", position + _LENGTH, limit)
            if newline >= 0:
                length = int.from_bytes(view[position : position + _LENGTH], "big")
                self._check_length(length)
                line = bytes(view[position + _LENGTH : newline])
                self._start_frame(length, line)
                return newline + 1
        # Gather the head across pieces, a bounded amount at a time.
        room = _LENGTH + self._max_header - len(head)
        piece = view[position : min(end, position + room)]
        if len(head) < _LENGTH:
            take = min(_LENGTH - len(head), len(piece))
            head += piece[:take]
            if len(head) == _LENGTH:
                self._check_length(int.from_bytes(head, "big"))
            return position + take
        newline = bytes(piece).find(b"\n")
        if newline < 0:
            if len(piece) >= room:
                raise wire.ProtocolError("a frame header is too long")
            head += piece
            return position + len(piece)
        head += piece[:newline]
        length = int.from_bytes(head[:_LENGTH], "big")
        line = bytes(head[_LENGTH:])
        del head[:]
        self._start_frame(length, line)
        return position + newline + 1

    def _check_length(self, length):
        if length > self.max_frame:
            raise wire.ProtocolError(f"a frame of {length} bytes is over the limit")

    def _start_frame(self, length, line):
        body_length = length - len(line) - 1
        if body_length < 0:
            raise wire.ProtocolError("a frame shorter than its header")
        header = wire.decode_header(line)
        self._owner.header_received(header, body_length)
        if self.stopped:
            return
        if body_length:
            self._in_body = True
            self._body_left = body_length
        else:
            self._owner.frame_ended()


def frame_head(header, body_length=0):
    """
    The bytes that go before a body of C{body_length} bytes: the length
    prefix and the header line.
    """
    line = wire.encode_frame(header)
    return (len(line) + body_length).to_bytes(_LENGTH, "big") + line
