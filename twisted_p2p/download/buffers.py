"""
The buffers a download reads chunks into.
"""

from twisted_p2p.limits import CHUNK_SIZE, KEEP_BUFFER_BYTES, MAX_RUN
from twisted_p2p.seal import TAG_SIZE

#: The largest frame body: L{MAX_RUN} chunks, and a seal's tag.
FRAME_BUFFER = MAX_RUN * CHUNK_SIZE + TAG_SIZE


def buffer_size(length):
    """
    The size of the buffer a frame body of C{length} bytes is read into: a
    power of two of chunks, and a seal's tag.  Few sizes, so that buffers
    are used again across runs of slightly different lengths.

    @raise ValueError: C{length} is over L{FRAME_BUFFER}.
    """
    if length > FRAME_BUFFER:
        raise ValueError(f"a buffer of {length} bytes is over {FRAME_BUFFER}")
    chunks = 1
    while chunks * CHUNK_SIZE + TAG_SIZE < length:
        chunks *= 2
    return chunks * CHUNK_SIZE + TAG_SIZE


class Shelf:
    """
    Free buffers, by size (L{buffer_size}), kept for whichever download
    takes one next: at most C{keep} bytes of them, counted by the chunks
    they hold (those past it are let go).  Used from the reactor thread
    only.
    """

    def __init__(self, keep=KEEP_BUFFER_BYTES):
        self._keep = keep
        self._free = {}  # size -> [buffers]
        self.kept = 0  # bytes of chunks the free buffers hold

    def __len__(self):
        return sum(len(buffers) for buffers in self._free.values())

    def take(self, length):
        """
        A buffer of C{buffer_size(length)} bytes: a free one if there is.
        """
        size = buffer_size(length)
        free = self._free.get(size)
        if free:
            self.kept -= _held(size)
            return free.pop()
        return bytearray(size)

    def put(self, buffer):
        # A buffer given back twice would be read into by two frames at
        # once: refused loudly, never shelved a second time.
        free = self._free.setdefault(len(buffer), [])
        if any(other is buffer for other in free):
            raise ValueError("a buffer was given back twice")
        if self.kept + _held(len(buffer)) <= self._keep:
            free.append(buffer)
            self.kept += _held(len(buffer))


def _held(size):
    return size // CHUNK_SIZE * CHUNK_SIZE


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
    one); the owner keeps the bytes out bounded: one frame per data
    connection being read (of the run it asked that connection for), and
    those waiting to be verified, which it caps by pausing its data
    connections.

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
        buffer = self._shelf.take(length)
        self.out += 1
        return memoryview(buffer)[:length]

    def give_back(self, view):
        """
        C{view}, from L{take}, is not used any more.
        """
        self._shelf.put(view.obj)
        self.out -= 1
