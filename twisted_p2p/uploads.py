"""
What the sender port serves, and how.
"""

import os

from twisted.internet import defer

from twisted_p2p import wire
from twisted_p2p.limits import (
    MANIFEST_PAGE,
    MAX_CATALOG_FILES,
    MAX_CHUNKS_PER_REQUEST,
    MAX_UPLOADS,
)
from twisted_p2p.transfer import ChunkPusher, RequestRefused


def read_range(path, offset, length):
    """
    C{length} bytes of C{path} from C{offset}.  Blocks: run it in a thread.

    @raise OSError: the file is gone or shorter than it was when indexed.
    """
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise OSError(f"{path} is shorter than when it was indexed")
    return data


class Uploads:
    """
    Owns the answers of the sender port: the catalog, manifest pages, and
    the chunk streams it opens back to requesters.

    @param index: the L{SharedIndex} we serve from.
    @param connect: C{connect(host, port, protocol)} returning a Deferred
        that fires when the connection is made.
    @param read_chunk: C{read_chunk(path, offset, length)} returning a
        Deferred of bytes (a thread, in production).
    """

    def __init__(
        self, index, connect, read_chunk, max_uploads=MAX_UPLOADS, max_rate=None, clock=None
    ):
        self._index = index
        self._max_rate = max_rate
        self._clock = clock
        self._connect = connect
        self._read_chunk = read_chunk
        self._max_uploads = max_uploads
        self.active = 0
        self.bytes_sent = 0

    def handle(self, header, host):
        """
        The C{(reply header, body)} for one request from C{host}, or a
        Deferred of it.

        @raise wire.ProtocolError: a malformed request.
        @raise RequestRefused: a request we will not serve.
        """
        wire.check_version(header)
        kind = header["t"]
        if kind == "catalog":
            return self._catalog(), b""
        if kind == "manifest":
            return self._manifest(header)
        if kind == "get":
            return self._get(header, host)
        raise wire.ProtocolError(f"unknown request {kind!r}")

    def _catalog(self):
        files = self._index.files()[:MAX_CATALOG_FILES]
        return {
            "t": "catalog",
            "rev": self._index.revision,
            "files": [{"id": f.file_id, "name": f.name, "size": f.size} for f in files],
        }

    def _local(self, header):
        local = self._index.by_id(wire.file_id_field(header))
        if local is None:
            raise RequestRefused("unknown-file", "this peer does not have that file")
        return local

    def _manifest(self, header):
        local = self._local(header)
        hashes = local.manifest.chunk_hashes
        start = wire.int_field(header, "start", 0, len(hashes))
        page = hashes[start : start + MANIFEST_PAGE]
        reply = {
            "t": "manifest",
            "id": local.file_id,
            "size": local.size,
            "start": start,
            "count": len(page),
        }
        return reply, b"".join(page)

    def _get(self, header, host):
        local = self._local(header)
        chunks = wire.list_field(header, "chunks", MAX_CHUNKS_PER_REQUEST)
        count = local.manifest.chunk_count
        if not chunks or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in chunks
        ):
            raise wire.ProtocolError("chunk indexes out of range")
        if len(set(chunks)) != len(chunks):
            raise wire.ProtocolError("a chunk is asked for twice")
        port = wire.port_field(header, "port")
        token = wire.token_field(header)
        if self.active >= self._max_uploads:
            raise RequestRefused("busy", "this peer is serving too many requests; try later")
        # Chunk data goes only to the address the request came from.
        pusher = ChunkPusher(token, local, chunks, self._counting_reader())
        self.active += 1
        d = self._connect(host, port, pusher)

        def connected(_):
            pusher.stream.done.addBoth(self._upload_ended)
            return {"t": "sending", "token": token}, b""

        def unreachable(failure):
            self.active -= 1
            raise RequestRefused(
                "unreachable",
                f"could not connect back to {host}:{port} "
                f"({failure.getErrorMessage()})",
            )

        return d.addCallbacks(connected, unreachable)

    def _upload_ended(self, result):
        self.active -= 1
        return result

    def _counting_reader(self):
        def read(path, offset, length):
            d = defer.maybeDeferred(self._read_chunk, path, offset, length)

            def count(data):
                self.bytes_sent += len(data)
                return data

            return d.addCallback(count)

        return read
