"""
A lying peer, for the end-to-end tests only: the real C{twistd p2ppeer},
except that every even-numbered chunk it serves has its first byte flipped.

Run as C{python liar.py <twistd arguments>}; it makes the peer's streams
read chunks (rather than sendfile them) and patches that read, then runs
twistd.  Nothing in the product knows about it.
"""

import sys

from twisted_p2p.limits import CHUNK_SIZE
from twisted_p2p.transfer import streams

_honest_read = streams.OpenChunks.read


def lying_read(self, segments):
    data = bytearray(_honest_read(self, segments))
    position = 0
    for _, offset, length in segments:
        # The first byte of every even-numbered chunk in the range.
        for chunk_start in range(-(-offset // CHUNK_SIZE) * CHUNK_SIZE, offset + length,
                                 CHUNK_SIZE):
            if (chunk_start // CHUNK_SIZE) % 2 == 0:
                data[position + chunk_start - offset] ^= 0xFF
        position += length
    return bytes(data)


if __name__ == "__main__":
    streams.can_sendfile = lambda transport: False
    streams.OpenChunks.read = lying_read
    from twisted.scripts.twistd import run

    sys.argv = ["twistd"] + sys.argv[1:]
    run()
