"""
The buffers a download reads chunks into.
"""

from twisted_p2p.limits import CHUNK_SIZE, KEEP_BUFFERS, MAX_RUN
from twisted_p2p.seal import TAG_SIZE

#: The largest frame body: L{MAX_RUN} chunks, and a seal's tag.
FRAME_BUFFER = MAX_RUN * CHUNK_SIZE + TAG_SIZE


class Shelf:
    """
    Free buffers of one size, kept for whichever download takes one next
    (at most C{keep} of them; those past it are let go).  Used from the
    reactor thread only.
    """

    def __init__(self, size=FRAME_BUFFER, keep=KEEP_BUFFERS):
        self.size = size
        self._keep = keep
        self._free = []

    def __len__(self):
        return len(self._free)

    def take(self):
        return self._free.pop() if self._free else bytearray(self.size)

    def put(self, buffer):
        # A buffer given back twice would be read into by two frames at
        # once: refused loudly, never shelved a second time.
        if any(free is buffer for free in self._free):
            raise ValueError("a buffer was given back twice")
        if len(self._free) < self._keep:
            self._free.append(buffer)


#: The process's shelf: every download's frames are read into its buffers.
SHELF = Shelf()


class BufferPool:
    """
    The chunk buffers of one download, taken from a L{Shelf} (the
    process's) and given back to it: each frame is read into one (see
    L{twisted_p2p.framing.FrameReader}), verified and written from it, and
    the buffer is then used again, by this download or the next.  Reused
    buffers cost no allocation and no page faults; a fresh 256 KiB bytes
    object per read cost both.

    A buffer is always given (a stream in the middle of a frame must have
    one); the owner keeps the number out bounded: one per data connection
    being read, and those waiting to be verified, which it caps by pausing
    its data connections.

    @ivar out: buffers given and not yet given back.
    """

    def __init__(self, shelf=None):
        self._shelf = SHELF if shelf is None else shelf
        self.out = 0

    def take(self, length):
        """
        A writable C{memoryview} of C{length} bytes (at most a frame's
        body: L{MAX_RUN} chunks, and a seal's tag).
        """
        if length > self._shelf.size:
            raise ValueError(f"a buffer of {length} bytes is over {self._shelf.size}")
        buffer = self._shelf.take()
        self.out += 1
        return memoryview(buffer)[:length]

    def give_back(self, view):
        """
        C{view}, from L{take}, is not used any more.
        """
        self._shelf.put(view.obj)
        self.out -= 1
