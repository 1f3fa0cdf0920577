"""
What the sender port serves, and how fast.

Uploads are paced by one L{TokenBucket} for the whole peer (C{--max-upload-rate}),
shared by every chunk stream, and capped at C{--max-uploads} streams at once.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger

from twisted_p2p import wire
from twisted_p2p.index import file_signature
from twisted_p2p.limits import (
    CATALOG_PAGE_BYTES,
    HAVE_PAGE,
    MANIFEST_PAGE,
    MAX_CATALOG_FILES,
    MAX_CHUNKS_PER_REQUEST,
    MAX_UPLOADS,
    UPLOAD_BURST,
)
from twisted_p2p.transfer import ChunkPusher, RequestRefused

log = Logger()


class FileChanged(OSError):
    """
    A shared file is no longer the one that was indexed.
    """


def read_range(path, offset, length, signature=None):
    """
    C{length} bytes of C{path} from C{offset}.  Blocks: run it in a thread.

    @param signature: the file's signature when it was indexed (see
        L{file_signature}); if given, it is checked before and after the
        read, so that a file changed while it is served is noticed.
    @raise FileChanged: the file is not the one indexed any more.
    @raise OSError: the file is gone or shorter than it was when indexed.
    """
    with open(path, "rb") as f:
        if signature is not None and file_signature(os.fstat(f.fileno())) != tuple(signature):
            raise FileChanged(f"{path} changed since it was indexed")
        data = os.pread(f.fileno(), length, offset)
        if signature is not None and file_signature(os.fstat(f.fileno())) != tuple(signature):
            raise FileChanged(f"{path} changed while it was read")
    if len(data) != length:
        raise OSError(f"{path} is shorter than when it was indexed")
    return data


class TokenBucket:
    """
    Owns the upload rate of the whole peer: every chunk stream takes the
    bytes of its next chunk from this one bucket before reading and sending
    it, so all streams together stay under C{rate} bytes per second.

    It is a virtual scheduler: each L{take} is given the time at which the
    bucket will have earned its bytes, and waits for it on the clock (never
    by sleeping).  Up to C{burst} bytes go at once after a quiet spell.
    Takes are served in the order they were made.
    """

    def __init__(self, rate, clock, burst=UPLOAD_BURST):
        if rate <= 0:
            raise ValueError("a rate must be positive")
        self.rate = rate
        self._clock = clock
        self._burst = burst
        self._paid_until = 0.0

    def take(self, n):
        """
        A Deferred that fires (with C{n}) once C{n} bytes may be sent;
        already fired if they may go now.  Cancelling it gives up the wait.
        """
        now = self._clock.seconds()
        self._paid_until = max(self._paid_until, now) + n / self.rate
        delay = self._paid_until - self._burst / self.rate - now
        if delay <= 0:
            return defer.succeed(n)
        call = None

        def cancel(d):
            if call.active():
                call.cancel()

        d = defer.Deferred(cancel)
        call = self._clock.callLater(delay, d.callback, n)
        return d


class Uploads:
    """
    Owns the answers of the sender port: the catalog, manifest pages, and
    the chunk streams it opens back to requesters.

    @param index: the L{SharedIndex} we serve from.
    @param connect: C{connect(host, port, protocol)} returning a Deferred
        that fires when the connection is made.
    @param read_chunk: C{read_chunk(path, offset, length[, signature])}
        returning a Deferred of bytes (L{read_range} in a thread, in
        production).
    @param max_uploads: chunk streams served at once; more are "busy".
    @param max_rate: bytes per second for all uploads together, or C{None}.
    @param clock: an L{IReactorTime}, needed with C{max_rate}.
    """

    def __init__(
        self, index, connect, read_chunk, max_uploads=MAX_UPLOADS, max_rate=None, clock=None
    ):
        self._index = index
        self._connect = connect
        self._read_chunk = read_chunk
        self._max_uploads = max_uploads
        self.bucket = None
        if max_rate:
            if clock is None:
                from twisted.internet import reactor as clock
            self.bucket = TokenBucket(max_rate, clock)
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
            return self._catalog(header), b""
        if kind == "manifest":
            return self._manifest(header)
        if kind == "get":
            return self._get(header, host)
        if kind == "have":
            return self._have(header)
        raise wire.ProtocolError(f"unknown request {kind!r}")

    def _catalog(self, header):
        """
        One page of the catalog: the entries from C{start} on, as many as fit
        in L{CATALOG_PAGE_BYTES} of JSON (at least one), and the C{total}.
        """
        listed = self._index.files()[:MAX_CATALOG_FILES]
        partials = self._index.partials()[: MAX_CATALOG_FILES - len(listed)]
        total = len(listed) + len(partials)
        # A request without "start" (a peer before paging) gets the first page.
        start = wire.int_field(header, "start", 0, total) if "start" in header else 0
        entries = []
        used = 0
        for i in range(start, total):
            if i < len(listed):
                f = listed[i]
                entry = {"id": f.file_id, "name": f.name, "size": f.size}
            else:
                p = partials[i - len(listed)]
                entry = {"id": p.file_id, "name": p.name, "size": p.size, "partial": True}
            used += len(wire.encode_frame(entry))  # its JSON, and a byte for the comma
            if entries and used > CATALOG_PAGE_BYTES:
                break
            entries.append(entry)
        return {
            "t": "catalog",
            "rev": self._index.revision,
            "start": start,
            "total": total,
            "files": entries,
        }

    def _local(self, header):
        """
        The file a request names: a whole one we offer, else a partial
        download of it.
        """
        file_id = wire.file_id_field(header)
        local = self._index.by_id(file_id) or self._index.partial_by_id(file_id)
        if local is None:
            raise RequestRefused("unknown-file", "this peer does not have that file")
        return local

    def _have(self, header):
        local = self._local(header)
        if self._index.by_id(local.file_id) is local:
            return {"t": "have", "id": local.file_id, "all": True}, b""
        total = local.manifest.chunk_count
        start = wire.int_field(header, "start", 0, max(total - 1, 0))
        if start % 8:
            raise wire.ProtocolError("a chunk map page starts at a multiple of 8")
        count = min(HAVE_PAGE, total - start)
        bitmap = local.chunks.snapshot()[start // 8 : (start + count + 7) // 8]
        reply = {"t": "have", "id": local.file_id, "start": start, "count": count}
        return reply, bitmap

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
        holds = getattr(local, "holds", None)
        if holds is not None and not all(holds(i) for i in chunks):
            raise RequestRefused(
                "missing-chunks", "this peer has not got all of those chunks yet"
            )
        if self.active >= self._max_uploads:
            raise RequestRefused("busy", "this peer is serving too many requests; try later")
        # Chunk data goes only to the address the request came from.
        pace = self.bucket.take if self.bucket is not None else None
        pusher = ChunkPusher(token, local, chunks, self._reader_for(local), pace=pace)
        self.active += 1
        d = self._connect(host, port, pusher)

        def connected(_):
            pusher.stream.done.addBoth(self._upload_ended, pusher.stream, local, host)
            return {"t": "sending", "token": token}, b""

        def unreachable(failure):
            self.active -= 1
            raise RequestRefused(
                "unreachable",
                f"could not connect back to {host}:{port} "
                f"({failure.getErrorMessage()})",
            )

        return d.addCallbacks(connected, unreachable)

    def _upload_ended(self, result, stream, local, host):
        self.active -= 1
        log.info(
            "Sent {chunks} chunk(s), {bytes} B of {name} to {host}",
            event="upload-done",
            chunks=stream.chunks_sent,
            bytes=stream.bytes_sent,
            name=local.name,
            host=host,
        )
        return result

    def _reader_for(self, local):
        """
        How a stream reads C{local}: a whole file is checked against its
        signature (and re-indexed if it changed); a partial one is not.
        """
        signature = getattr(local, "signature", None)

        def read(path, offset, length):
            if signature is None:
                d = defer.maybeDeferred(self._read_chunk, path, offset, length)
            else:
                d = defer.maybeDeferred(self._read_chunk, path, offset, length, signature)

            def count(data):
                self.bytes_sent += len(data)
                return data

            def changed(failure):
                failure.trap(FileChanged)
                log.info(
                    "{path} changed while it was being served; indexing it again",
                    event="file-changed",
                    path=path,
                )
                self._index.rescan()
                return failure

            return d.addCallbacks(count, changed)

        return read
