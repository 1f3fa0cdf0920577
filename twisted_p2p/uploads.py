"""
What the sender port serves, and how fast.

Uploads are paced by one L{TokenBucket} for the whole peer (C{--max-upload-rate}),
shared by every chunk stream, and capped at C{--max-uploads} streams at once.
A stream is one data connection back to a requester, for one of its
downloads: it carries every chunk that download asks of us (see
C{transfer/streams.py}), and ends with the request connection that opened it.
"""

from collections import Counter

from twisted.internet import defer
from twisted.logger import Logger

from twisted_p2p import events, wire
from twisted_p2p.interfaces import format_address
from twisted_p2p.seal import stream_seal
from twisted_p2p.limits import (
    CATALOG_PAGE_BYTES,
    CHUNK_SIZE,
    DEFAULT_RUN,
    HAVE_PAGE,
    MANIFEST_PAGE,
    MAX_CATALOG_FILES,
    MAX_CHUNKS_PER_REQUEST,
    MAX_RUN,
    MAX_STREAM_QUEUE,
    MAX_STREAMS_PER_CONNECTION,
    MAX_UPLOADS,
    UPLOAD_BURST,
    UPLOAD_RECLAIM_AFTER,
    UPLOADS_PER_HOST_SHARE,
    MIN_UPLOADS_PER_HOST,
    PACED_FRAME_SECONDS,
)
from twisted_p2p.transfer.framed import RequestRefused
from twisted_p2p.transfer.streams import FileChanged, OpenChunks, OutgoingStream, StreamConnection

log = Logger()


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

    def longest_run(self):
        """
        The most chunks a frame under this cap carries: what it earns in
        L{PACED_FRAME_SECONDS}, and at least one.
        """
        return max(1, int(self.rate * PACED_FRAME_SECONDS // CHUNK_SIZE))

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


#: What a catalog entry's JSON adds to its fields' own text (see
#: L{catalog_entry_bytes}): {"id":"","name":"","size":} and a comma.
_ENTRY_FRAME = len('{"id":"","name":"","size":}') + 1
_PARTIAL = len(',"partial":true')


def catalog_entry_bytes(entry):
    """
    The bytes C{entry} (a catalog entry: a hex id, a name, a size, perhaps
    C{partial}) takes in a catalog page, as L{wire.encode_frame} writes it,
    and a byte for the comma before the next: without encoding it where
    the name needs no escapes (printable ASCII, no quote or backslash),
    which with 100,000 entries was most of the time a page took.
    """
    name = entry["name"]
    if name.isascii() and name.isprintable() and '"' not in name and "\\" not in name:
        name_bytes = len(name)
    else:
        name_bytes = len(wire.encode_frame(name)) - 3  # its quotes and the newline
    return (
        _ENTRY_FRAME
        + len(entry["id"])
        + name_bytes
        + len(str(entry["size"]))
        + (_PARTIAL if entry.get("partial") else 0)
    )


class Uploads:
    """
    Owns the answers of the sender port: the catalog, manifest and chunk map
    pages, and the chunk streams it opens back to requesters.

    @param index: the L{SharedIndex} we serve from.
    @param connect: C{connect(host, port, protocol)} returning a Deferred
        that fires when the connection is made.
    @param run_in_thread: C{run_in_thread(f, *args)}, a Deferred of the
        result of blocking C{f} (opening a file to serve).
    @param workers: the L{WorkerPool} that sends chunks.
    @param clock: an L{IReactorTime}.
    @param max_uploads: chunk streams served at once; more are "busy".
    @param max_rate: bytes per second for all uploads together, or C{None}.
    @param publish: C{publish(event)}, for the events every face may show
        (an upload started, an upload finished).
    @param free_space: C{free_space()}, the bytes of cache this peer has
        free for other peers' chunks, or C{None} when it hosts nothing: told
        in the catalog answer.
    @ivar active: streams open or opening now.
    """

    def __init__(
        self,
        index,
        connect,
        run_in_thread,
        workers,
        clock,
        max_uploads=MAX_UPLOADS,
        max_rate=None,
        publish=None,
        free_space=None,
    ):
        self._index = index
        self._connect = connect
        self._run = run_in_thread
        self._workers = workers
        self._clock = clock
        self._max_uploads = max_uploads
        self._publish = publish or (lambda event: None)
        self._free_space = free_space
        self.bucket = TokenBucket(max_rate, clock) if max_rate else None
        self.active = 0
        self.bytes_sent = 0
        self.reclaimed = 0
        self._streams = set()
        self._per_host = Counter()
        #: Streams one address may hold at once.
        self.max_per_host = max(
            max_uploads // UPLOADS_PER_HOST_SHARE, min(max_uploads, MIN_UPLOADS_PER_HOST)
        )

    def session(self, host, keepalive=None, transport=None):
        """
        The state of one request connection from C{host}: the streams it
        opens end when it closes (L{UploadSession.close}).

        @param keepalive: called whenever one of its streams makes progress.
        @param transport: the request connection's transport: in a private
            group, its TLS keys the seal of the streams it opens.
        """
        return UploadSession(host, keepalive, transport)

    def handle(self, header, session):
        """
        The C{(reply header, body)} for one request of C{session}, or a
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
            return self._get(header, session)
        if kind == "cancel":
            return self._cancel(header, session), b""
        if kind == "have":
            return self._have(header)
        raise wire.ProtocolError(f"unknown request {kind!r}")

    def _catalog(self, header):
        """
        One page of the catalog: the entries from C{start} on, as many as fit
        in L{CATALOG_PAGE_BYTES} of JSON (at least one), and the C{total}.
        """
        # Read in place, not sliced: a page is asked for every few hundred
        # entries, and a copy of 100,000 cost more than the page.
        listed = self._index.files()
        whole = min(len(listed), MAX_CATALOG_FILES)
        partials = self._index.partials()[: MAX_CATALOG_FILES - whole]
        total = whole + len(partials)
        # A request without "start" (a peer before paging) gets the first page.
        start = wire.int_field(header, "start", 0, total) if "start" in header else 0
        entries = []
        used = 0
        for i in range(start, total):
            if i < whole:
                f = listed[i]
                entry = {"id": f.file_id, "name": f.name, "size": f.size}
            else:
                p = partials[i - whole]
                entry = {"id": p.file_id, "name": p.name, "size": p.size, "partial": True}
            used += catalog_entry_bytes(entry)  # its JSON, and a byte for the comma
            if entries and used > CATALOG_PAGE_BYTES:
                break
            entries.append(entry)
        answer = {
            "t": "catalog",
            "rev": self._index.revision,
            "start": start,
            "total": total,
            "files": entries,
        }
        free = self._free_space() if self._free_space is not None else None
        if free is not None:
            answer["free"] = free
        return answer

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
        return reply, bytes(page)

    def _get(self, header, session):
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
        run = wire.int_field(header, "run", 1, MAX_RUN) if "run" in header else DEFAULT_RUN
        holds = getattr(local, "holds", None)
        if holds is not None and not all(holds(i) for i in chunks):
            raise RequestRefused(
                "missing-chunks", "this peer has not got all of those chunks yet"
            )
        reply = {"t": "sending", "token": token}, b""
        stream = session.streams.get(token)
        if stream is not None:
            if stream.ended:
                raise RequestRefused("stream-closed", "that stream has ended; ask on a new one")
            if stream.local.file_id != local.file_id or session.ports[token] != port:
                raise wire.ProtocolError("a stream carries one file to one port")
            if stream.run_asked != run:
                raise wire.ProtocolError("a stream's run does not change")
            if stream.pending() + len(chunks) > MAX_STREAM_QUEUE:
                raise wire.ProtocolError("too many chunks asked on one stream")
            stream.add(chunks)
            return reply
        if session.open_streams() >= MAX_STREAMS_PER_CONNECTION:
            raise wire.ProtocolError("too many streams on one connection")
        group = wire.address_group(session.host)
        if self._per_host[group] >= self.max_per_host:
            self._reclaim(group)
        if self._per_host[group] >= self.max_per_host:
            raise RequestRefused("busy", "this peer serves your address its share already; try later")
        if self.active >= self._max_uploads:
            self._reclaim()
        if self.active >= self._max_uploads:
            raise RequestRefused("busy", "this peer is serving too many requests; try later")
        self.active += 1
        self._per_host[group] += 1
        d = self._open_stream(local, token, port, session, run)

        def opened(stream):
            stream.add(chunks)
            return reply

        def failed(failure):
            self._slot_freed(session.host)
            return failure

        return d.addCallbacks(opened, failed)

    async def _open(self, local, token, port, session, run=DEFAULT_RUN):
        """
        Open C{local} and a data connection to C{port} at the address the
        request came from (never an address named in a request).
        """
        path = local.path
        signature = getattr(local, "signature", None)
        # Chunks cached for others are files of their own (see cache.py).
        open_chunks = getattr(local, "open_chunks", None)
        try:
            if open_chunks is not None:
                opened = await self._run(open_chunks)
            else:
                opened = await self._run(OpenChunks, path, local.manifest, signature)
        except FileChanged:
            self._changed(path)
            raise RequestRefused("unknown-file", "that file changed; ask again later")
        except OSError as e:
            raise RequestRefused("internal", f"this peer cannot read that file ({e.strerror or e})")
        stream = OutgoingStream(
            token,
            local,
            opened,
            self._workers,
            self._clock,
            pace=self.bucket.take if self.bucket is not None else None,
            progress=session.keepalive,
            seal=stream_seal(session.transport, token),
            run=run,
            longest=self.bucket.longest_run() if self.bucket is not None else None,
        )
        # Known to the session before the connection is up: a second "get"
        # of the token, queued behind this one, finds it.
        session.add(token, port, stream)
        if stream.ended:
            raise RequestRefused("stream-closed", "the request connection closed")
        try:
            await self._connect(session.host, port, StreamConnection(stream))
        except Exception as e:
            stream.close("could not connect")
            raise RequestRefused(
                "unreachable",
                f"could not connect back to {session.host}:{port} ({e})",
            )
        log.info(
            "Sending {name} to {peer}",
            event="upload-started",
            name=local.name,
            peer=format_address(session.host, port),
        )
        self._publish(
            events.event(
                "upload-started",
                peer=format_address(session.host, port),
                file=local.name,
            )
        )
        # After "started": a stream may have ended already (its request
        # connection closed while it connected), and then ends at once.
        stream.host = session.host
        self._streams.add(stream)
        stream.done.addCallback(self._stream_ended, stream, session.host, port)
        return stream

    def _slot_freed(self, host):
        self.active -= 1
        group = wire.address_group(host)
        self._per_host[group] -= 1
        if self._per_host[group] <= 0:
            del self._per_host[group]

    def _reclaim(self, group=None):
        """
        Every slot is taken (of address C{group}, if given; else of all):
        close the stream stalled longest, if it has sent
        nothing for L{UPLOAD_RECLAIM_AFTER} seconds though chunks wait (its
        requester does not read), so that its slot goes to the new request.
        Its slot is free at once, or, while a worker still sends on it, as
        soon as that is done (the new request is "busy" meanwhile).
        """
        streams = self._streams
        if group is not None:
            streams = [s for s in streams if wire.address_group(s.host) == group]
        stalled = max(streams, key=lambda s: s.stalled_for(), default=None)
        if stalled is None or stalled.stalled_for() < UPLOAD_RECLAIM_AFTER:
            return
        log.info(
            "Upload of {name} stopped: the requester read nothing for {seconds:.0f} s, "
            "and its slot is wanted",
            name=stalled.local.name,
            seconds=stalled.stalled_for(),
        )
        self.reclaimed += 1
        self._streams.discard(stalled)
        if stalled.transport is not None:
            stalled.transport.abortConnection()
        stalled.close("the requester stopped reading, and its slot was wanted")

    def _open_stream(self, local, token, port, session, run=DEFAULT_RUN):
        return defer.ensureDeferred(self._open(local, token, port, session, run))

    def _cancel(self, header, session):
        token = wire.token_field(header)
        chunks = wire.list_field(header, "chunks", MAX_STREAM_QUEUE)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in chunks):
            raise wire.ProtocolError("chunk indexes are not integers")
        stream = session.streams.get(token)
        removed = stream.cancel(chunks) if stream is not None else []
        return {"t": "cancelled", "token": token, "chunks": removed}

    def _stream_ended(self, result, stream, host, port):
        chunks, sent, reason = result
        self._slot_freed(host)
        self._streams.discard(stream)
        self.bytes_sent += sent
        seconds = max(self._clock.seconds() - stream.started, 0.0)
        name = stream.local.name
        if stream.failure is not None and stream.failure.check(FileChanged):
            self._changed(stream.local.path)
        log.info(
            "Sent {chunks} chunk(s), {bytes} B of {name} to {peer} in {seconds:.1f} s",
            event="upload-done",
            chunks=chunks,
            bytes=sent,
            name=name,
            peer=format_address(host, port),
            seconds=seconds,
        )
        self._publish(
            events.event(
                "upload-finished",
                peer=format_address(host, port),
                file=name,
                bytes=sent,
                seconds=round(seconds, 3),
            )
        )
        return result

    def _changed(self, path):
        log.info(
            "{path} changed while it was being served; indexing it again",
            event="file-changed",
            path=path,
        )
        self._index.rescan()


class UploadSession:
    """
    Owns the streams one request connection opened, by token: they end when
    it closes.

    @ivar host: where its streams connect back to.
    @ivar keepalive: called whenever one of its streams sends something.
    """

    def __init__(self, host, keepalive=None, transport=None):
        self.host = host
        self.keepalive = keepalive
        self.transport = transport
        self.streams = {}
        self.ports = {}
        self.closed = False

    def open_streams(self):
        """
        How many of its streams have not ended.
        """
        return sum(1 for stream in self.streams.values() if not stream.ended)

    def add(self, token, port, stream):
        # The streams that ended are forgotten once another opens (a get of
        # theirs is "stream-closed" until then), so that a connection that
        # keeps opening streams holds only a few.
        for old in [t for t, s in self.streams.items() if s.ended]:
            del self.streams[old], self.ports[old]
        self.streams[token] = stream
        self.ports[token] = port
        if self.closed:
            stream.close("the request connection closed")

    def close(self):
        self.closed = True
        for stream in list(self.streams.values()):
            stream.close("the request connection closed")
