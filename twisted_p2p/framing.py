"""
Reading transfer frames into buffers, for connections that carry chunk data.

A frame is a 4-byte big-endian length, then that many bytes: a JSON header
line ending in a newline, then an optional binary body (see C{PROTOCOL.md}).
C{Int32StringReceiver} gathers each frame whole in a growing buffer, copying
it on every read, before handing it on; for 256 KiB chunks that was the
receiver's biggest cost.  A L{FrameReader} instead tells its reader where
the next bytes should go (L{FrameReader.buffer}): a small head area while a
length prefix and header line are read, then the buffer the owner gave for
the body, so the socket can C{recv_into} a chunk's own buffer, which then
goes to the hash and the disk as it is.  Head reads are small
(L{HEAD_READ}), so the bytes of a body read with its head, and copied, are
few.

Pure code: no reactor, no I/O.
"""

from twisted_p2p import wire

_LENGTH = 4

#: Bytes asked for at a time while a frame's head is read: a chunk header
#: (C{{"t":"chunk","i":N}} and its newline) with its length prefix fits.
HEAD_READ = 64


class FrameReader:
    """
    Reads a byte stream frame by frame and tells C{owner} about each:

     - C{owner.header_received(header, body_length)} once its header is in
       (a dict with a string C{t}, checked by L{wire.decode_header}); for a
       frame with a body it returns a writable buffer (C{memoryview}) of
       exactly C{body_length} bytes, where the body is read;
     - C{owner.body_progress(count)} as C{count} more bytes of it arrive;
     - C{owner.frame_ended()} once the whole body is in its buffer (at once
       after the header for a frame without a body).

    The owner refuses a frame by raising L{wire.ProtocolError}; the reader
    then stops for good (L{stopped}) and passes it on.  So does the reader
    for a frame that breaks the framing: a length over L{max_frame}, a
    header line over C{max_header} bytes, a length shorter than the header.

    Bytes come in either way:

     - L{buffer} gives where the next bytes go, L{filled} says how many were
       written there (a socket's C{recv_into});
     - L{feed} copies bytes from elsewhere (a transport that hands data).

    @ivar max_frame: the largest frame length accepted; may change between
        frames (a connection takes larger frames once it knows who talks).
    @ivar line: the header line of the frame being read, as it came (what a
        sealed frame's body is bound to; see C{seal.py}).
    """

    def __init__(self, owner, max_frame, max_header):
        self._owner = owner
        self.max_frame = max_frame
        self._max_header = max_header
        self._head = bytearray(_LENGTH + max_header)
        self._head_view = memoryview(self._head)
        self._head_used = 0
        self._body = None
        self._body_used = 0
        self.line = b""
        self.stopped = False

    def buffer(self):
        """
        Where the next bytes should go: a writable C{memoryview}, never
        empty while the reader runs.
        """
        if self._body is not None:
            return self._body[self._body_used :]
        end = min(len(self._head), self._head_used + HEAD_READ)
        return self._head_view[self._head_used : end]

    def filled(self, count):
        """
        C{count} bytes were written at the start of the last L{buffer}.

        @raise wire.ProtocolError: a frame was refused; nothing more is read.
        """
        if self.stopped:
            return
        try:
            self._filled(count)
        except wire.ProtocolError:
            self.stopped = True
            raise

    def feed(self, data):
        """
        Take C{data}, the next bytes of the stream, copying them where
        L{buffer} says.

        @raise wire.ProtocolError: as L{filled}.
        """
        view = memoryview(data)
        while view and not self.stopped:
            target = self.buffer()
            count = min(len(target), len(view))
            target[:count] = view[:count]
            view = view[count:]
            self.filled(count)

    def _filled(self, count):
        if self._body is not None:
            self._body_used += count
            self._owner.body_progress(count)
            if self._body_used == len(self._body):
                self._end_body()
            return
        self._head_used += count
        self._parse_heads()

    def _parse_heads(self):
        """
        Take every whole head gathered: a frame's head, and what was read
        past it, which is its body or the next frame.
        """
        while not self.stopped and self._head_used >= _LENGTH:
            head = self._head
            length = int.from_bytes(head[:_LENGTH], "big")
            if length > self.max_frame:
                raise wire.ProtocolError(f"a frame of {length} bytes is over the limit")
            newline = head.find(b"\n", _LENGTH, self._head_used)
            if newline < 0:
                if self._head_used == len(head):
                    raise wire.ProtocolError("a frame header is too long")
                return
            line_length = newline + 1 - _LENGTH
            body_length = length - line_length
            if body_length < 0:
                raise wire.ProtocolError("a frame shorter than its header")
            self.line = bytes(head[_LENGTH:newline])
            header = wire.decode_header(self.line)
            target = self._owner.header_received(header, body_length)
            rest = bytes(self._head_view[newline + 1 : self._head_used])
            if body_length:
                if target is None or len(target) != body_length:
                    raise wire.ProtocolError("no place for the body of a frame")
                early = min(len(rest), body_length)
                target[:early] = rest[:early]
                rest = rest[early:]
                self._body, self._body_used = target, early
            # What was read past the body belongs to the next frame.
            head[: len(rest)] = rest
            self._head_used = len(rest)
            if self._body is None:
                self._owner.frame_ended()
                continue
            if self._body_used:
                self._owner.body_progress(self._body_used)
            if self._body_used < len(self._body):
                return
            self._body, self._body_used = None, 0
            self._owner.frame_ended()

    def _end_body(self):
        self._body = None
        self._body_used = 0
        self._owner.frame_ended()


def frame_head(header, body_length=0):
    """
    The bytes that go before a body of C{body_length} bytes: the length
    prefix and the header line.
    """
    line = wire.encode_frame(header)
    return (len(line) + body_length).to_bytes(_LENGTH, "big") + line
