"""
The asking side of a download: the sources it draws from, the stream it
keeps with each, and the requests ("get") and cancels sent on it.

A L{SourceStream} is one data connection the source opens back to our
receiver port, for one token: every chunk this download asks of that source
comes on it, in the order asked.  The download (its C{owner}) decides what
to ask and what to do with what arrives; the stream keeps the bookkeeping of
what is outstanding on it and talks to the source.
"""

import secrets

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from twisted_p2p import wire
from twisted_p2p.download.scheduler import window_for
from twisted_p2p.download.status import RateMeter
from twisted_p2p.limits import DEFAULT_RUN

log = Logger()


class Source:
    """
    One peer a download draws chunks from, over one request connection to
    its sender port.

    @ivar has: what it held when last asked: C{None} for a full copy, else
        one byte per chunk (1 = held).
    @ivar usable: whether it is still asked for anything.
    @ivar rest_until: it is not asked before this time (busy, or it timed
        out).
    @ivar failures: streams of it given up (silent for too long, or lost).
    @ivar received: verified bytes from it.
    @ivar stream: its L{SourceStream}, while one is open.
    @ivar in_transit: how much of its queue it has been seen to send before
        a cancel could reach it.
    """

    def __init__(self, peer, client):
        self.peer = peer
        self.key = getattr(peer, "peer_id", None) or peer.label
        self.label = peer.label
        self.client = client
        self.has = None
        self.usable = True
        self.rest_until = 0.0
        self.backoff = 0.0
        self.failures = 0
        self.received = 0
        self.meter = RateMeter()
        self.stream = None
        #: The most chunks at the head of its queue it was found to have on
        #: their way (a cancel it could not honour); none are taken over.
        self.in_transit = 0

    def rate(self, now):
        return self.meter.rate(now)

    def window(self, now):
        return window_for(self.rate(now))

    @property
    def run(self):
        """
        The most chunks a frame of its stream carries.
        """
        return self.stream.run if self.stream is not None else DEFAULT_RUN

    def queue(self):
        """
        The chunks asked of it and not yet here, in the order asked, but for
        those it is being told to cancel.
        """
        stream = self.stream
        if stream is None:
            return []
        cancelling = stream.cancelling
        return [index for index in stream.outstanding if index not in cancelling]

    def __repr__(self):
        return f"<Source {self.label}>"


class GetRequest:
    """
    One "get": the chunks it asked for.  The ledger's key for them.
    """

    __slots__ = ("stream", "chunks")

    def __init__(self, stream, chunks):
        self.stream = stream
        self.chunks = tuple(chunks)


class SourceStream:
    """
    Owns one stream from one source: its token (in the L{Inbox} until the
    source connects back with it), the data connection once attached, and
    the chunks asked on it and not yet here, in the order asked.

    What the receiver port calls (L{attach}, L{chunk_started},
    L{bytes_arrived}, L{chunk_arrived}, L{detached}) is checked here; chunks
    are read into buffers from the owner's C{buffers} (a L{BufferPool}); what
    arrives goes to the C{owner} (the L{Download}): C{chunk_arrived(stream,
    request, index, buffer)}, C{stream_lost(stream, reason)},
    C{get_refused(stream, request, failure)} and
    C{cancel_answered(stream, withdrawn, coming)}.

    @ivar outstanding: chunk index -> the L{GetRequest} that asked it, in the
        order asked.
    @ivar cancelling: chunks the source was told to cancel and may still
        send (then they are accepted, and the owner decides).
    @ivar run: the most chunks a frame of it may carry: what every "get" on
        it asks for (the frame the data connection holds while it reads is
        at most that).
    """

    def __init__(self, owner, source, manifest, file_id, receiver_port, clock, seal=None,
                 run=DEFAULT_RUN):
        self.owner = owner
        self.source = source
        self.host = source.peer.host
        self.token = secrets.token_hex(16)
        self._manifest = manifest
        self._file_id = file_id
        self._receiver_port = receiver_port
        self.connection = None
        self.outstanding = {}
        self.cancelling = set()
        self._clock = clock
        #: In a private group, what opens its sealed frames (L{StreamSeal}).
        self.seal = seal
        self.run = run
        self.frames = 0
        #: When chunk data last arrived, or it was last given something to
        #: wait for while it waited for nothing (the silence check).
        self.heard_at = clock.seconds()
        self.closed = False
        self._reading = None
        self._cancel_positions = {}

    # -- asking ------------------------------------------------------------------

    def ask(self, request):
        """
        Send C{request}'s "get" on the source's request connection.
        """
        if not self.outstanding:
            self.heard_at = self._clock.seconds()  # the wait starts now
        for index in request.chunks:
            self.outstanding[index] = request
        header = wire.request(
            "get",
            id=self._file_id,
            chunks=list(request.chunks),
            port=self._receiver_port,
            token=self.token,
            run=self.run,
        )
        d = self.source.client.call(header)
        d.addErrback(self._refused, request)

    def _refused(self, failure, request):
        if self.closed:
            return
        for index in request.chunks:
            if self.outstanding.get(index) is request:
                del self.outstanding[index]
                self.cancelling.discard(index)
        self.owner.get_refused(self, request, failure)

    def cancel(self, chunks):
        """
        Tell the source not to send C{chunks}; those it has not started are
        withdrawn when it answers (C{owner.cancel_answered}).
        """
        chunks = [i for i in chunks if i in self.outstanding and i not in self.cancelling]
        if not chunks or self.closed:
            return
        # Where each waits in the queue: one the source sends anyway tells
        # how much of its queue is on its way (see Source.in_transit).
        order = {index: position for position, index in enumerate(self.outstanding)}
        self._cancel_positions.update((i, order[i]) for i in chunks)
        self.cancelling.update(chunks)
        d = self.source.client.call(wire.request("cancel", token=self.token, chunks=chunks))
        d.addCallbacks(self._cancel_answered, self._cancel_failed,
                       callbackArgs=(chunks,), errbackArgs=(chunks,))

    def _cancel_answered(self, answer, chunks):
        header, _ = answer
        if self.closed:
            return
        removed = header.get("chunks")
        if header.get("t") != "cancelled" or not isinstance(removed, list):
            # Nonsense: the chunks may still come, and are accepted then.
            log.info("{peer} answered a cancel with nonsense", peer=self.source.label)
            return
        withdrawn = []
        taken_off = set()
        for index in removed:
            if isinstance(index, int) and index in self.cancelling:
                self.cancelling.discard(index)
                taken_off.add(index)
                request = self.outstanding.pop(index, None)
                if request is not None:
                    withdrawn.append((request, index))
        # Those it is sending anyway: they will come from here.
        coming = [i for i in chunks if i not in taken_off and i in self.outstanding]
        positions = self._cancel_positions
        for index in coming:
            self.source.in_transit = max(self.source.in_transit, positions.get(index, -1) + 1)
        for index in chunks:
            positions.pop(index, None)
        self.owner.cancel_answered(self, withdrawn, coming)

    def _cancel_failed(self, failure, chunks):
        # The connection is gone (the stream goes with it) or the source
        # answered nonsense: those chunks may still come, and are accepted.
        if not failure.check(CancelledError):
            log.debug("A cancel was not answered: {error}", error=failure.getErrorMessage())

    # -- the receiver port's side ---------------------------------------------------

    def attach(self, connection):
        """
        The source connected back with our token.
        """
        if self.closed:
            connection.close()
            return
        self.connection = connection
        self.owner.stream_attached(self)

    def chunk_started(self, first, count, length):
        """
        Check a frame's header, chunks C{first} to C{first + count - 1}: they
        must be asked on this stream, and the body their length; and give
        the buffer it is read into.

        @raise wire.ProtocolError: it is not.
        """
        if count > self.run:
            raise wire.ProtocolError(f"a frame of {count} chunks is over the run asked")
        manifest = self._manifest
        expected = self.seal.overhead if self.seal is not None else 0
        for index in range(first, first + count):
            if index not in self.outstanding:
                raise wire.ProtocolError(f"chunk {index} was not asked for")
            expected += manifest.chunk_length(index)
        if length != expected:
            raise wire.ProtocolError(f"chunks from {first} are of the wrong length")
        self._reading = self.owner.buffers.take(length)
        return self._reading

    def bytes_arrived(self, count):
        self.heard_at = self._clock.seconds()

    def chunk_arrived(self, first, count, buffer, line=b""):
        self._reading = None
        # Frames are numbered as they come: a sealed one opens with its
        # number as nonce (see seal.py).
        number, self.frames = self.frames, self.frames + 1
        outstanding, cancelling = self.outstanding, self.cancelling
        arrived = []
        for index in range(first, first + count):
            # None: withdrawn by a cancel answered while this frame came in
            # (the source said it would not send it); not wanted, dropped.
            arrived.append((index, outstanding.pop(index, None)))
            cancelling.discard(index)
        opener = (self.seal, number, line) if self.seal is not None else None
        self.owner.chunks_arrived(self, first, arrived, buffer, opener)

    def detached(self, connection, reason):
        self.connection = None
        if self._reading is not None:
            # Cut off in the middle of a chunk.
            self.owner.buffers.give_back(self._reading)
            self._reading = None
        if not self.closed:
            self.owner.stream_lost(self, reason)

    # -- the end ---------------------------------------------------------------------

    def requests(self):
        """
        The requests that still wait for something on this stream.
        """
        return list({id(r): r for r in self.outstanding.values()}.values())

    def close(self):
        """
        Stop using this stream: its connection is closed; what is
        outstanding is the owner's to give to others.
        """
        if self.closed:
            return
        self.closed = True
        if self.connection is not None:
            self.connection.close()
