"""
The buffers a download reads chunks into.
"""

from twisted_p2p.limits import CHUNK_SIZE, MAX_RUN
from twisted_p2p.seal import TAG_SIZE


class BufferPool:
    """
    Owns the chunk buffers of one download: each chunk is read into one
    (see L{twisted_p2p.framing.FrameReader}), verified and written from it,
    and the buffer is then used again.  Reused buffers cost no allocation
    and no page faults; a fresh 256 KiB bytes object per read cost both.

    A buffer is always given (a stream in the middle of a frame must have
    one); the owner keeps the number out bounded: one per data connection
    being read, and those waiting to be verified, which it caps by pausing
    its data connections.

    @ivar out: buffers given and not yet given back.
    """

    def __init__(self, size=MAX_RUN * CHUNK_SIZE + TAG_SIZE):
        self._size = size
        self._free = []
        self.out = 0

    def take(self, length):
        """
        A writable C{memoryview} of C{length} bytes (at most a frame's
        body: L{MAX_RUN} chunks, and a seal's tag).
        """
        if length > self._size:
            raise ValueError(f"a buffer of {length} bytes is over {self._size}")
        buffer = self._free.pop() if self._free else bytearray(self._size)
        self.out += 1
        return memoryview(buffer)[:length]

    def give_back(self, view):
        """
        C{view}, from L{take}, is not used any more.
        """
        self.out -= 1
        self._free.append(view.obj)

    def clear(self):
        """
        Let go of the free buffers (the download is over).
        """
        self._free = []
