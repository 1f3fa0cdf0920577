"""
Sealed streams: the data connections of a private group, encrypted and
authenticated without TLS.

In a private group every request connection (sender port, T+1) is TLS 1.3
between two members (see C{tls.py}).  The chunks themselves travel on data
connections the sender opens back to the requester's receiver port; TLS
there cost 3-4 times the CPU of the transfer itself (Twisted's TLS and
pyOpenSSL handle each 16 KiB record in Python), so they are sealed instead:

 - the key of a stream is the TLS exporter (RFC 8446, section 7.5) of the
   request connection it was asked on, with the stream's token as context:
   only the two members at the ends of that TLS connection know it, and
   every stream has its own key;
 - each frame after the hello keeps its length prefix and header line in
   the clear, and its body is sealed with AES-128-GCM: the header line is
   the associated data (so it cannot be changed), the nonce is the frame's
   number on the stream (0, 1, 2, ... in the order sent, never reused under
   one key), and the 16-byte tag follows the ciphertext;
 - a frame that does not open (altered, replayed, reordered, from another
   stream or from someone without the key) drops the connection.

A data connection only ever carries data one way, from sender to
requester, so one key and one counter suffice.  The cipher is the
C{cryptography} package's AES-GCM; nothing here is a cipher of its own.
"""

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.interfaces import ISSLTransport

from twisted_p2p import wire

#: Bytes a sealed body is longer than the plain one: the GCM tag.
TAG_SIZE = 16

#: The TLS exporter's label for stream keys (RFC 8446, section 7.5).
EXPORTER_LABEL = b"EXPORTER-twisted-p2p stream v1"

_KEY_SIZE = 16


class SealBroken(wire.ProtocolError):
    """
    A sealed frame that does not open: altered, out of order, or not sealed
    with this stream's key.
    """


class StreamSeal:
    """
    Seals (sender) or opens (receiver) the frames of one stream.

    The sender seals frames in the order it sends them, and the seal counts
    them (L{counter}); the receiver numbers frames as they arrive, and says
    which one it opens, since frames may be opened in other threads.

    @ivar counter: the number of the next frame the sender seals.
    """

    overhead = TAG_SIZE

    def __init__(self, key):
        self._aead = AESGCM(key)
        self.counter = 0

    @staticmethod
    def _nonce(number):
        return number.to_bytes(12, "big")

    def seal_into(self, header_line, plaintext, out):
        """
        Seal the next frame's body C{plaintext}, bound to its C{header_line},
        into C{out} (C{len(plaintext) + TAG_SIZE} bytes).
        """
        number, self.counter = self.counter, self.counter + 1
        self._aead.encrypt_into(self._nonce(number), plaintext, header_line, out)

    def open_in_place(self, number, header_line, buffer):
        """
        Open sealed body C{buffer} (a writable buffer: the ciphertext and
        its tag) of frame C{number}, in place; the plain body, the start of
        C{buffer}.

        @raise SealBroken: it does not open.
        """
        view = memoryview(buffer)
        if len(view) < TAG_SIZE:
            raise SealBroken("a sealed body shorter than its tag")
        plain = view[: len(view) - TAG_SIZE]
        try:
            self._aead.decrypt_into(self._nonce(number), view, header_line, plain)
        except InvalidTag:
            raise SealBroken("a sealed frame that does not open")
        return plain


def stream_seal(transport, token):
    """
    The L{StreamSeal} of the stream C{token} asked on the request connection
    C{transport}, if that is a private group's TLS connection; C{None} for a
    plain one (an open group: streams go unsealed).
    """
    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    handle = getattr(transport, "getHandle", None)
    connection = handle() if handle is not None else None
    export = getattr(connection, "export_keying_material", None)
    if export is None:
        return None
    return StreamSeal(export(EXPORTER_LABEL, _KEY_SIZE, bytes.fromhex(token)))
