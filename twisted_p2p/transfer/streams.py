"""
Chunk streams: the data connections a sender opens back to a requester's
receiver port, one for each download and source, that carry every chunk the
download asks of this peer.

An L{OutgoingStream} owns one of them: the chunks asked on it, in the order
asked, and their sending, paced by the peer's upload rate.  It never hashes
what it sends (the index holds the hashes) and never holds a chunk in memory
when it can help it: on a plain TCP connection the chunks go from the file to
the socket with C{os.sendfile}, in batches sent until the socket's buffer is
full; on any other transport (TLS, tests) a worker reads a few chunks at a
time and the reactor writes them.  Before and after every batch the file is
checked to be the one indexed (size, mtime and inode).

A sendfile batch whose bytes are all in the page cache is sent on the
reactor's thread: it then costs no more than copying them to the socket,
and handing it to a worker and back cost more than that (two thread
wake-ups per batch, on each of several processes when one downloader draws
on several seeders of one machine).  Any other batch, which would wait for
the disk, goes to a worker.  Whether the bytes are in memory is asked of
the kernel with C{preadv2(RWF_NOWAIT)}, a byte at the start of every chunk
and at the end of the batch (L{OpenChunks.in_memory}).
"""

import os
import socket

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_p2p import wire
from twisted_p2p.framing import frame_head
from twisted_p2p.index import file_signature
from twisted_p2p.limits import CHUNK_SIZE, DEFAULT_RUN, IDLE_TIMEOUT, STREAM_BATCH_BYTES

log = Logger()

#: preadv2's flag to fail rather than wait for the disk (Linux 4.14 on),
#: and the one-byte buffer L{OpenChunks.in_memory} reads into.
_NOWAIT = getattr(os, "RWF_NOWAIT", None)
_PROBE = [bytearray(1)]


class FileChanged(OSError):
    """
    A shared file is no longer the one that was indexed.
    """


class OpenChunks:
    """
    One file held open for a stream, and where each of its chunks is.

    Opening blocks on the disk: a worker thread does it.  L{check} is two
    stats of what was just opened or sent (in the inode cache, then), made
    around every batch on whichever thread sends it.

    @param signature: the file's signature when it was indexed, for a whole
        shared file; C{None} for a partial download, whose bytes are ours.
    @raise FileChanged: the file is not the one indexed any more.
    @raise OSError: it cannot be opened (gone, unreadable, a symlink now).
    """

    def __init__(self, path, manifest, signature=None):
        self.path = path
        self.manifest = manifest
        self._signature = tuple(signature) if signature is not None else None
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            self.check()
        except BaseException:
            self.close()
            raise

    def segments(self, first, count):
        """
        Where chunks C{first} to C{first + count - 1} are: a list of
        C{(fd, offset, length)} to send one after the other (one, for a
        whole file, whose chunks follow each other).
        """
        manifest = self.manifest
        last = first + count - 1
        offset = manifest.chunk_offset(first)
        end = manifest.chunk_offset(last) + manifest.chunk_length(last)
        return [(self.fd, offset, end - offset)]

    def check(self):
        """
        Raise L{FileChanged} unless the file, open and at its path, is still
        the one indexed.
        """
        if self._signature is None:
            return
        if file_signature(os.fstat(self.fd)) != self._signature or (
            file_signature(os.stat(self.path, follow_symlinks=False)) != self._signature
        ):
            raise FileChanged(f"{self.path} changed since it was indexed")

    def in_memory(self, segments):
        """
        Whether the bytes of C{segments} can be read without waiting for the
        disk, as far as a byte at the start of every chunk, and the last
        byte, tell: for a file read or written lately they are in the page
        cache together.  C{False} wherever the kernel cannot say.

        A page evicted between two of those bytes costs the caller one wait
        for the disk; asking about every page would cost more than sending
        them.  Never blocks.  A probe that misses starts the kernel reading
        there (and ahead), so the worker that then sends the batch finds it
        on its way.
        """
        if _NOWAIT is None:
            return False
        probe = _PROBE
        try:
            for fd, offset, length in segments:
                end = offset + length - 1
                for at in (*range(offset, end, CHUNK_SIZE), end):
                    if os.preadv(fd, probe, at, _NOWAIT) != 1:
                        return False  # past the end: the file is shorter
        except OSError:
            # EAGAIN: not in memory; EOPNOTSUPP and the like: cannot say.
            return False
        return True

    def read_into(self, segments, buffer):
        """
        Read C{segments} into the start of the writable C{buffer}; how many
        bytes that is.
        """
        view = memoryview(buffer)
        position = 0
        for fd, offset, length in segments:
            target = view[position : position + length]
            while target:
                got = os.preadv(fd, [target], offset)
                if got == 0:
                    raise FileChanged(f"{self.path} is shorter than when it was indexed")
                target = target[got:]
                offset += got
            position += length
        return position

    def read(self, segments):
        """
        The bytes of C{segments} (for transports that cannot sendfile).
        """
        data = []
        for fd, offset, length in segments:
            piece = os.pread(fd, length, offset)
            if len(piece) != length:
                raise FileChanged(f"{self.path} is shorter than when it was indexed")
            data.append(piece)
        return b"".join(data)

    def close(self):
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class CachedChunks(OpenChunks):
    """
    The chunks of a file this peer caches for others, held open for a
    stream: each chunk is a file of its own (see L{twisted_p2p.cache}), so
    a run is one segment per chunk.

    A chunk's file is opened when a frame for it is made, and closed once
    the frames that use it are sent (L{sent}), so that a stream holds a few
    descriptors whatever the file's size.  Opening is the only disk work
    done on the reactor's thread: a name looked up, no data read.  Its
    bytes are ours (checked when they were stored, and again at every
    start), so there is no signature to check.

    @param open_chunk: C{open_chunk(index)}, a descriptor of that chunk's
        file (the caller's to close); raises L{OSError} if it is not held.
    """

    def __init__(self, name, manifest, open_chunk):
        self.path = name
        self.manifest = manifest
        self._signature = None
        self._open_chunk = open_chunk
        self._fds = {}  # index -> [fd, frames using it]
        self.fd = None

    def segments(self, first, count):
        segments = []
        for index in range(first, first + count):
            entry = self._fds.get(index)
            if entry is None:
                try:
                    fd = self._open_chunk(index)
                except OSError as e:
                    raise FileChanged(f"chunk {index} of {self.path} left the cache ({e})")
                entry = self._fds[index] = [fd, 0]
            entry[1] += 1
            segments.append((entry[0], 0, self.manifest.chunk_length(index)))
        return segments

    def sent(self, chunks):
        """
        Frames of C{chunks} went out: close what no frame uses any more.
        """
        for index in chunks:
            entry = self._fds.get(index)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._fds[index]
                    os.close(entry[0])

    def close(self):
        fds, self._fds = self._fds, {}
        for fd, _ in fds.values():
            os.close(fd)


class _Outgoing:
    """
    One frame to send: its head (length prefix and header line), and the
    file ranges that are its body: chunks C{first} to C{first + count - 1}
    (C{first} is C{None} for the hello).  On a sealed stream, C{sealed}
    holds the sealed body once a worker has sealed it (it then must be
    sent: the next frame's nonce follows).  The C{*_sent} counts and
    C{sealed} are written by the worker thread while it sends, and read by
    the reactor only after.
    """

    __slots__ = ("first", "count", "head", "line", "segments", "length", "head_sent",
                 "segment", "segment_sent", "sealed")

    def __init__(self, first, count, head, segments=(), line=b""):
        self.first = first
        self.count = count
        self.head = head
        self.line = line
        self.segments = list(segments)
        self.length = sum(length for _, _, length in self.segments)
        self.head_sent = 0
        self.segment = 0
        self.segment_sent = 0
        self.sealed = None

    @property
    def chunks(self):
        return range(self.first, self.first + self.count) if self.first is not None else ()

    @property
    def started(self):
        return self.head_sent > 0 or self.sealed is not None

    @property
    def size(self):
        return len(self.head) + self.length


def _send_head(sock, item):
    """
    Send what is left of C{item}'s head; whether it is all sent (else the
    socket would block).
    """
    head = item.head
    while item.head_sent < len(head):
        try:
            # MSG_MORE: the head goes out with the body that follows.
            item.head_sent += sock.send(memoryview(head)[item.head_sent :], socket.MSG_MORE)
        except BlockingIOError:
            return False
    return True


def send_batch(sock, items, opened):
    """
    Send C{items} in order on the non-blocking socket C{sock}, the bodies
    with C{os.sendfile}, until they are all sent or the socket would block.
    Blocks on disk reads: run it in a worker thread.

    @return: C{(items fully sent, whether the socket would block)}.
    @raise FileChanged: the file changed before or during the batch.
    """
    opened.check()
    fileno = sock.fileno()
    done = 0
    for item in items:
        if not _send_head(sock, item):
            return done, True
        while item.segment < len(item.segments):
            fd, offset, length = item.segments[item.segment]
            while item.segment_sent < length:
                try:
                    sent = os.sendfile(
                        fileno, fd, offset + item.segment_sent, length - item.segment_sent
                    )
                except BlockingIOError:
                    return done, True
                if sent == 0:
                    raise FileChanged(f"{opened.path} is shorter than when it was indexed")
                item.segment_sent += sent
            item.segment += 1
            item.segment_sent = 0
        done += 1
    opened.check()
    return done, False


def seal_batch(sock, items, opened, seal, buffer):
    """
    Like L{send_batch} for a sealed stream: each body is read into
    C{buffer}, sealed there (the next nonce of C{seal}) and sent as it comes
    to be sent, so a frame not yet reached can still be cancelled; only one
    frame is sealed and not yet sent at a time, so one buffer of the stream
    serves them all.  Blocking: run it in a worker thread.
    """
    opened.check()
    done = 0
    for item in items:
        if item.first is not None and item.sealed is None:
            length = opened.read_into(item.segments, buffer)
            view = memoryview(buffer)
            seal.seal_into(item.line, view[:length], view[: length + seal.overhead])
            item.sealed = view[: length + seal.overhead]
        if not _send_head(sock, item):
            return done, True
        body = item.sealed or b""
        while item.segment_sent < len(body):
            try:
                item.segment_sent += sock.send(memoryview(body)[item.segment_sent :])
            except BlockingIOError:
                return done, True
        item.sealed = b"" if item.sealed is not None else None  # sent: let it go
        done += 1
    opened.check()
    return done, False


def read_batch(items, opened, seal=None):
    """
    The bodies of C{items}, read from the file, and sealed on a sealed
    stream (for transports that cannot sendfile).  Blocking: run it in a
    worker thread.
    """
    opened.check()
    bodies = []
    for item in items:
        body = opened.read(item.segments)
        if seal is not None:
            sealed = bytearray(len(body) + seal.overhead)
            seal.seal_into(item.line, body, sealed)
            body = bytes(sealed)
        bodies.append(body)
    opened.check()
    return bodies


def can_sendfile(transport):
    """
    Whether chunks can go from a file straight to C{transport}'s socket: a
    plain TCP connection of Twisted's own (not TLS), on a system with
    C{os.sendfile}.
    """
    return (
        hasattr(os, "sendfile")
        and ITCPTransport.providedBy(transport)
        and not ISSLTransport.providedBy(transport)
        and callable(getattr(transport, "fileno", None))
        and callable(getattr(transport, "startWriting", None))
    )


@implementer(IPullProducer)
class OutgoingStream:
    """
    Owns one data connection to a requester, opened for one token: the
    chunks asked on it (in the order asked), pacing them by the upload rate,
    and sending them.  See the module docstring.

    Registered with its transport as a pull producer: Twisted calls
    L{resumeProducing} whenever the transport can take more.

    @param token: the token the requester handed out for this stream.
    @param local: the file served (a L{LocalFile} or L{PartialLocal}).
    @param opened: the L{OpenChunks} of it.
    @param workers: a L{WorkerPool} for the blocking sends and reads.
    @param clock: an L{IReactorTime}, for the stall timeout.
    @param pace: C{pace(n)} giving a Deferred that fires once C{n} bytes may
        be sent (a L{TokenBucket}'s C{take}), or C{None} for no limit.
    @param progress: called with no argument whenever bytes went out (keeps
        the request connection from timing out meanwhile).
    @param run: the most chunks the requester takes in one frame (its
        "get"'s C{run}); a sealed stream keeps to L{DEFAULT_RUN} at most, as
        each frame is sealed in a buffer of the stream's, and so does one on
        a transport that cannot C{sendfile}, whose frames are read into
        memory.
    @param longest: the most chunks the sender puts in a frame (an upload
        cap's, L{TokenBucket.longest_run}), or C{None}.
    @ivar run_asked: C{run}, as asked.
    @ivar done: fires with C{(chunks sent, bytes sent, reason)} once the
        stream has ended; the file is closed by then.
    """

    stall_timeout = IDLE_TIMEOUT

    def __init__(self, token, local, opened, workers, clock, pace=None, progress=None,
                 seal=None, run=DEFAULT_RUN, longest=None):
        self.token = token
        self._seal = seal
        self.run_asked = run
        self._run = min(run, DEFAULT_RUN) if seal is not None else run
        if longest is not None:
            self._run = max(1, min(self._run, longest))
        self._seal_buffer = None
        self.local = local
        self._opened = opened
        self._workers = workers
        self._clock = clock
        self._pace = pace
        self._progress = progress or (lambda: None)
        self._queue = []  # chunk indexes asked and not yet paid for
        self._paid = []  # _Outgoing frames paid for and not yet sent
        self._asked = set()  # every chunk asked and not yet sent
        self._waiting = None  # the pace Deferred waited on
        self._credit = 0  # bytes paid for by chunks that went back to the queue
        self._job = None  # the batch (or read) in a worker thread
        self._writable = False
        self._sock = None
        self._sendfile = False
        self._stall = None
        self.transport = None
        self.started = clock.seconds()
        self.last_progress = self.started
        self.chunks_sent = 0
        self.bytes_sent = 0
        self.ended = False
        self.failure = None
        self.done = defer.Deferred()

    # -- from the sender port -----------------------------------------------

    def add(self, chunks):
        """
        Queue C{chunks} (distinct indexes the file has) to be sent after
        those asked before.

        @raise wire.ProtocolError: one of them is asked already and not yet
            sent.
        """
        if any(index in self._asked for index in chunks):
            raise wire.ProtocolError("a chunk is asked for again before it was sent")
        self._asked.update(chunks)
        self._queue.extend(chunks)
        if self._stall is None or not self._stall.active():
            # Only if nothing was due: what counts is the time since a chunk
            # last went out, which asking more does not change.
            self._arm_stall()
        self._pump()

    def pending(self):
        """
        How many chunks are asked and not yet sent.
        """
        return len(self._asked)

    def cancel(self, chunks):
        """
        Take C{chunks} off the queue, but those already being sent: the
        list of those taken off.
        """
        wanted = set(chunks) & self._asked
        if not wanted or self.ended:
            return []  # an ended stream sends nothing more, and has no file
        sending = set()
        in_batch = set()
        for item in self._job or ():
            sending.update(item.chunks)
            in_batch.add(id(item))
        kept = []
        back = []
        for item in self._paid:
            movable = (
                not item.started
                and id(item) not in in_batch  # a worker is sending it: it goes whole
                and item.first is not None
            )
            if movable and (back or wanted.intersection(item.chunks)):
                # Paid for and not started: the rest of its run goes back to
                # the queue, with its payment, and so do the runs paid after
                # it, so that the chunks still go in the order asked.
                rest = [index for index in item.chunks if index not in wanted]
                self._credit += item.length - sum(self._opened.manifest.chunk_length(i)
                                                  for i in item.chunks if i in wanted)
                back.append(rest)
                continue
            if item.started:
                sending.update(item.chunks)
            kept.append(item)
        self._paid = kept
        self._queue[:0] = [index for rest in back for index in rest]
        removed = [index for index in chunks if index in wanted and index not in sending]
        gone = set(removed)
        self._queue = [index for index in self._queue if index not in gone]
        self._asked -= gone
        if not self._asked and self._stall is not None and self._stall.active():
            self._stall.cancel()
        return removed

    def close(self, reason="closed"):
        """
        End the stream: the connection is closed, and the file once no
        worker uses it.
        """
        if self.ended:
            return
        self.ended = True
        self._reason = reason
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        transport = self.transport
        if transport is not None:
            if transport.producer is self:
                transport.unregisterProducer()
            transport.loseConnection()
        if self._job is None:
            self._release()

    def _release(self):
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()
        if self._opened is not None:
            opened, self._opened = self._opened, None
            # Blocking only in name: closing a file descriptor.
            opened.close()
        self.done.callback((self.chunks_sent, self.bytes_sent, self._reason))

    # -- from the data connection ---------------------------------------------

    def connected(self, transport):
        """
        The data connection is open: say hello, then send what is asked.
        """
        if self.ended:
            transport.loseConnection()
            return
        self.transport = transport
        hello = frame_head({"t": "hello", "v": wire.PROTOCOL_VERSION, "token": self.token})
        self._sendfile = can_sendfile(transport)
        if self._sendfile:
            # The worker sends on its own descriptor of the socket, so that
            # it stays valid until the worker is done with it.
            self._sock = socket.socket(fileno=os.dup(transport.fileno()))
            self._sock.setblocking(False)
            self._paid.insert(0, _Outgoing(None, 0, hello))
        else:
            # Its frames are read into memory, a batch at a time: runs of
            # the default keep that as it was before runs grew.
            self._run = min(self._run, DEFAULT_RUN)
            transport.write(hello)
        transport.registerProducer(self, False)

    def lost(self, reason):
        self.transport = None
        self.close(reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else reason)

    # -- IPullProducer ----------------------------------------------------------

    def resumeProducing(self):
        self._writable = True
        self._pump()

    def stopProducing(self):
        self.close("the connection is gone")

    # -- sending ------------------------------------------------------------------

    def _pump(self):
        if self.ended or self._job is not None or not self._writable:
            return
        self._take_paid()
        if not self._paid:
            return
        self._writable = False
        if self._sendfile:
            batch = list(self._paid)
            self._job = batch
            if self._seal is None and self._opened.in_memory(
                [segment for item in batch for segment in item.segments[item.segment :]]
            ):
                self._send_here(batch)
                return
            if self._seal is None:
                d = self._workers.submit(send_batch, self._sock, batch, self._opened)
            else:
                if self._seal_buffer is None:
                    self._seal_buffer = bytearray(self._run * CHUNK_SIZE + self._seal.overhead)
                d = self._workers.submit(
                    seal_batch, self._sock, batch, self._opened, self._seal, self._seal_buffer
                )
            d.addCallbacks(self._sent, self._failed, callbackArgs=(batch,))
        else:
            batch = [item for item in self._paid if item.first is not None]
            self._job = batch
            d = self._workers.submit(read_batch, batch, self._opened, self._seal)
            d.addCallbacks(self._read, self._failed, callbackArgs=(batch,))

    def _send_here(self, batch):
        """
        Send C{batch}, all in memory, on this thread.  Whatever it leaves
        waits for the reactor's next turn (it says when the socket can take
        more), so that one stream never holds the reactor for more than a
        batch.
        """
        try:
            done, _ = send_batch(self._sock, batch, self._opened)
        except Exception:
            self._failed(Failure())
            return
        self._sent((done, True), batch)

    def _take_paid(self):
        """
        Move chunks from the queue to frames paid for, as far as the upload
        rate allows, up to a batch's worth: runs of up to the stream's run
        of chunks that follow each other, one frame each.
        """
        paid_bytes = sum(item.size for item in self._paid)
        queue = self._queue
        taken = 0
        manifest = self._opened.manifest
        while taken < len(queue) and paid_bytes < STREAM_BATCH_BYTES and self._waiting is None:
            first = queue[taken]
            count = 1
            while (
                count < self._run
                and taken + count < len(queue)
                and queue[taken + count] == first + count
            ):
                count += 1
            length = sum(manifest.chunk_length(i) for i in range(first, first + count))
            taken += count
            cost = length - min(self._credit, length)
            self._credit -= length - cost
            if self._pace is not None and cost:
                d = self._pace(cost)
                if not d.called:
                    self._waiting = d
                    d.addCallback(self._paced, first, count)
                    d.addErrback(lambda f: None)  # cancelled by close()
                    break
            self._paid.append(self._frame(first, count))
            paid_bytes += length
        del queue[:taken]

    def _paced(self, _, first, count):
        self._waiting = None
        if self.ended:
            return
        # Chunks cancelled meanwhile are not sent; the others are, as runs.
        kept = [index for index in range(first, first + count) if index in self._asked]
        for run_first, run_count in _runs(kept, self._run):
            self._paid.append(self._frame(run_first, run_count))
        self._pump()

    def _frame(self, first, count):
        segments = self._opened.segments(first, count)
        length = sum(length for _, _, length in segments)
        header = {"t": "chunk", "i": first} if count == 1 else {"t": "chunk", "i": first, "n": count}
        sealed = length + (self._seal.overhead if self._seal is not None else 0)
        head = frame_head(header, sealed)
        # The header line, as the receiver reads it: what a seal binds to.
        return _Outgoing(first, count, head, segments, line=head[4:-1])

    def _sent(self, result, batch):
        done, blocked = result
        self._job = None
        self._count(batch[:done])
        del self._paid[:done]
        if self.ended:
            self._release()
            return
        if blocked:
            # Twisted calls resumeProducing once the socket is writable.
            self.transport.startWriting()
        else:
            self._writable = True
            self._pump()

    def _read(self, bodies, batch):
        self._job = None
        if self.ended:
            self._release()
            return
        for item, body in zip(batch, bodies):
            self.transport.write(item.head)
            self.transport.write(body)
        sent = set(id(item) for item in batch)
        self._paid = [item for item in self._paid if id(item) not in sent]
        self._count(batch)

    def _count(self, items):
        """
        C{items} are sent: progress, for the stall timeout and the request
        connection's idle timeout.
        """
        sent = getattr(self._opened, "sent", None)
        for item in items:
            self._asked.difference_update(item.chunks)
            self.chunks_sent += item.count if item.first is not None else 0
            self.bytes_sent += item.length
            if sent is not None and item.first is not None:
                sent(item.chunks)
        if items:
            self.last_progress = self._clock.seconds()
            self._progress()
            self._arm_stall()

    def _failed(self, failure):
        self._job = None
        if not self.ended:
            if failure.check(FileChanged):
                log.info("{error}; stopping the upload", error=failure.getErrorMessage())
            elif failure.check(OSError):
                log.info(
                    "Upload of {name} stopped: {error}",
                    name=self.local.name,
                    error=failure.getErrorMessage(),
                )
            else:
                log.failure("Sending chunks failed", failure)
            self.failure = failure
            self.close(failure.getErrorMessage())
        else:
            self._release()

    # -- a receiver that does not read -------------------------------------------

    def stalled_for(self):
        """
        Seconds this stream has sent nothing while chunks wait on it and it
        is free to send (connected, not held back by our own upload rate);
        0 if it is sending, or has nothing to send.
        """
        if self.ended or not self._asked or self.transport is None or self._waiting is not None:
            return 0.0
        return max(self._clock.seconds() - self.last_progress, 0.0)

    def _arm_stall(self):
        """
        While chunks are asked, some must go out every L{stall_timeout}
        seconds (waiting on our own upload rate does not count), or the
        requester is not reading and the stream ends.
        """
        if self.ended:
            return
        if not self._asked:
            if self._stall is not None and self._stall.active():
                self._stall.cancel()
            return
        if self._stall is not None and self._stall.active():
            self._stall.reset(self.stall_timeout)
        else:
            self._stall = self._clock.callLater(self.stall_timeout, self._stalled)

    def _stalled(self):
        if self._waiting is not None:
            self._arm_stall()  # held back by our own upload rate
            return
        log.info(
            "Upload of {name} stopped: the requester read nothing for {seconds:.0f} s",
            name=self.local.name,
            seconds=self.stall_timeout,
        )
        if self.transport is not None:
            self.transport.abortConnection()
        self.close("the requester stopped reading")


def _runs(indexes, longest=DEFAULT_RUN):
    """
    C{(first, count)} of each run of consecutive C{indexes} (in order), of
    at most C{longest}.
    """
    runs = []
    for index in indexes:
        if runs and runs[-1][0] + runs[-1][1] == index and runs[-1][1] < longest:
            runs[-1][1] += 1
        else:
            runs.append([index, 1])
    return [tuple(run) for run in runs]


class StreamConnection(Protocol):
    """
    The sender's end of a data connection: it hands its transport to the
    L{OutgoingStream}.  The receiver never talks on it, so anything it sends
    drops the connection.
    """

    def __init__(self, stream):
        self.stream = stream

    def connectionMade(self):
        self.stream.connected(self.transport)

    def dataReceived(self, data):
        log.info("Dropping a data connection: the receiver talked on it")
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.stream.lost(reason)

