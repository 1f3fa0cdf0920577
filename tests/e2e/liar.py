"""
A lying peer, for the end-to-end tests only: the real C{twistd p2ppeer},
except that every even-numbered chunk it serves has its first byte flipped.

Run as C{python liar.py <twistd arguments>}; it patches the read function
the peer service hands to its uploads, then runs twistd.  Nothing in the
product knows about it.
"""

import sys

from twisted_p2p import service, uploads
from twisted_p2p.limits import CHUNK_SIZE


def lying_read(path, offset, length, signature=None):
    data = uploads.read_range(path, offset, length, signature)
    if (offset // CHUNK_SIZE) % 2 == 0 and data:
        data = bytes([data[0] ^ 0xFF]) + data[1:]
    return data


if __name__ == "__main__":
    service.read_range = lying_read
    from twisted.scripts.twistd import run

    sys.argv = ["twistd"] + sys.argv[1:]
    run()
