"""
Helpers shared by the unit tests: Deferred results and transfer frames.
"""

import struct

from twisted.python.failure import Failure

from twisted_p2p import wire


def result_of(d):
    """
    The result of a Deferred that has already fired; a failure is raised.
    A success is passed on, so the result can be asked for again.
    """
    results = []
    d.addBoth(lambda r: results.append(r) or (None if isinstance(r, Failure) else r))
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def framed(payload):
    """
    C{payload} with its Int32 length prefix, as it travels.
    """
    return struct.pack("!I", len(payload)) + payload


def frame(header, body=b""):
    """
    One transfer frame on the wire.
    """
    return framed(wire.encode_frame(header, body))


def sent_frames(transport):
    """
    The C{(header, body)} of every frame written to C{transport}.
    """
    data = transport.value()
    frames = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        assert len(data) >= 4 + length, "a partial frame was written"
        frames.append(wire.decode_frame(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


def sent_headers(transport):
    """
    The headers of every frame written to C{transport}.
    """
    return [header for header, _ in sent_frames(transport)]
