"""
Chunk streams: the data connections a sender opens back to a requester's
receiver port, one for each download and source, that carry every chunk the
download asks of this peer.

An L{OutgoingStream} owns one of them: the chunks asked on it, in the order
asked, and their sending, paced by the peer's upload rate.  It never hashes
what it sends (the index holds the hashes) and never holds a chunk in memory
when it can help it: on a plain TCP connection the chunks go from the file to
the socket with C{os.sendfile}, in batches run by a worker thread until the
socket's buffer is full; on any other transport (TLS, tests) a worker reads a
few chunks at a time and the reactor writes them.  Before and after every
batch the file is checked to be the one indexed (size, mtime and inode).
"""

import os
import socket

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from twisted_p2p import wire
from twisted_p2p.framing import frame_head
from twisted_p2p.index import file_signature
from twisted_p2p.limits import IDLE_TIMEOUT, STREAM_BATCH_BYTES

log = Logger()


class FileChanged(OSError):
    """
    A shared file is no longer the one that was indexed.
    """


class OpenChunks:
    """
    One file held open for a stream, and where each of its chunks is.

    Blocking (open, check): a worker thread calls these.

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

    def locate(self, index):
        """
        C{(fd, offset, length)} of chunk C{index}.
        """
        manifest = self.manifest
        return self.fd, manifest.chunk_offset(index), manifest.chunk_length(index)

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

    def read(self, index):
        """
        The bytes of chunk C{index} (for transports that cannot sendfile).
        """
        fd, offset, length = self.locate(index)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise FileChanged(f"{self.path} is shorter than when it was indexed")
        return data

    def close(self):
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class _Outgoing:
    """
    One frame to send: its head (length prefix and header line) and the
    range of the file that is its body.  The C{*_sent} counts are written by
    the worker thread while it sends, and read by the reactor only after.
    """

    __slots__ = ("index", "head", "fd", "offset", "length", "head_sent", "body_sent")

    def __init__(self, index, head, fd=None, offset=0, length=0):
        self.index = index
        self.head = head
        self.fd = fd
        self.offset = offset
        self.length = length
        self.head_sent = 0
        self.body_sent = 0

    @property
    def started(self):
        return self.head_sent > 0

    @property
    def size(self):
        return len(self.head) + self.length


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
        head = item.head
        while item.head_sent < len(head):
            try:
                # MSG_MORE: the head goes out with the body that follows.
                item.head_sent += sock.send(memoryview(head)[item.head_sent :], socket.MSG_MORE)
            except BlockingIOError:
                return done, True
        while item.body_sent < item.length:
            try:
                sent = os.sendfile(
                    fileno, item.fd, item.offset + item.body_sent, item.length - item.body_sent
                )
            except BlockingIOError:
                return done, True
            if sent == 0:
                raise FileChanged(f"{opened.path} is shorter than when it was indexed")
            item.body_sent += sent
        done += 1
    opened.check()
    return done, False


def read_batch(items, opened):
    """
    The bodies of C{items}, read from the file (for transports that cannot
    sendfile).  Blocking: run it in a worker thread.
    """
    opened.check()
    bodies = [opened.read(item.index) for item in items]
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
    @ivar done: fires with C{(chunks sent, bytes sent, reason)} once the
        stream has ended; the file is closed by then.
    """

    stall_timeout = IDLE_TIMEOUT

    def __init__(self, token, local, opened, workers, clock, pace=None, progress=None):
        self.token = token
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
        self._job = None  # the batch (or read) in a worker thread
        self._writable = False
        self._sock = None
        self._sendfile = False
        self._stall = None
        self.transport = None
        self.started = clock.seconds()
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
        if not wanted:
            return []
        in_flight = {item.index for item in (self._job or ())}
        in_flight.update(item.index for item in self._paid if item.started)
        removed = [index for index in chunks if index in wanted and index not in in_flight]
        gone = set(removed)
        self._queue = [index for index in self._queue if index not in gone]
        self._paid = [item for item in self._paid if item.index not in gone]
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
            self._paid.insert(0, _Outgoing(None, hello))
        else:
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
            d = self._workers.submit(send_batch, self._sock, batch, self._opened)
            d.addCallbacks(self._sent, self._failed, callbackArgs=(batch,))
        else:
            batch = [item for item in self._paid if item.index is not None]
            self._job = batch
            d = self._workers.submit(read_batch, batch, self._opened)
            d.addCallbacks(self._read, self._failed, callbackArgs=(batch,))

    def _take_paid(self):
        """
        Move chunks from the queue to the frames paid for, as far as the
        upload rate allows, up to a batch's worth.
        """
        paid_bytes = sum(item.size for item in self._paid)
        taken = 0
        while taken < len(self._queue) and paid_bytes < STREAM_BATCH_BYTES:
            if self._waiting is not None:
                break
            index = self._queue[taken]
            fd, offset, length = self._opened.locate(index)
            if self._pace is not None:
                d = self._pace(length)
                if not d.called:
                    self._waiting = d
                    d.addCallback(self._paced, index, fd, offset, length)
                    d.addErrback(lambda f: None)  # cancelled by close()
                    taken += 1
                    break
            self._paid.append(self._frame(index, fd, offset, length))
            paid_bytes += length
            taken += 1
        del self._queue[:taken]

    def _paced(self, _, index, fd, offset, length):
        self._waiting = None
        if self.ended:
            return
        if index in self._asked:  # not cancelled meanwhile
            self._paid.append(self._frame(index, fd, offset, length))
        self._pump()

    @staticmethod
    def _frame(index, fd, offset, length):
        return _Outgoing(index, frame_head({"t": "chunk", "i": index}, length), fd, offset, length)

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
        chunks = [item for item in items if item.index is not None]
        for item in chunks:
            self._asked.discard(item.index)
            self.bytes_sent += item.length
        self.chunks_sent += len(chunks)
        if items:
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

