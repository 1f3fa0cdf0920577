"""
Helpers shared by the unit tests: Deferred results and transfer frames.
"""

import contextlib
import os
import random
import socket
import struct

import pytest_twisted
from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p import wire
from twisted_p2p.index import LocalFile, file_signature
from twisted_p2p.manifest import hash_file


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


@contextlib.contextmanager
def log_events(at_least=LogLevel.debug):
    """
    The global log's events at level C{at_least} or above, gathered in a
    list while the block runs.
    """
    events = []

    def observe(event):
        if event.get("log_level", LogLevel.info) >= at_least:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


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


def frames_in(data):
    """
    The C{(header, body)} of every frame in C{data}, which holds whole
    frames only.
    """
    frames = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        assert len(data) >= 4 + length, "a partial frame was written"
        frames.append(wire.decode_frame(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


def sent_frames(transport):
    """
    The C{(header, body)} of every frame written to C{transport}.
    """
    return frames_in(transport.value())


def sent_headers(transport):
    """
    The headers of every frame written to C{transport}.
    """
    return [header for header, _ in sent_frames(transport)]


class BufferedTransport(StringTransport):
    """
    A StringTransport that behaves like a TCP transport under load: what is
    written stays in a buffer until L{drain} (the peer reads it), a streaming
    producer is paused once the buffer holds more than C{bufferSize} bytes
    and resumed when it drains, and while the protocol has paused reading,
    L{deliver} hands it nothing.
    """

    bufferSize = 64 * 1024

    def __init__(self, *args, **kwargs):
        StringTransport.__init__(self, *args, **kwargs)
        self.buffered = 0
        self.most_buffered = 0
        self.producer_paused = False
        self.unread = b""

    def write(self, data):
        StringTransport.write(self, data)
        self.buffered += len(data)
        self.most_buffered = max(self.most_buffered, self.buffered)
        if self.producer is not None and self.buffered > self.bufferSize:
            if not self.producer_paused:
                self.producer_paused = True
                self.producer.pauseProducing()

    def drain(self):
        """
        The peer reads everything written so far.
        """
        self.buffered = 0
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()

    def deliver(self, protocol, data=b"", piece=None):
        """
        Queue C{data} from the peer and hand it to C{protocol}, C{piece}
        bytes per dataReceived (all at once if C{None}), as long as reading
        is not paused.  What is not handed over stays in L{unread}.
        """
        self.unread += data
        while self.unread and self.producerState == "producing" and not self.disconnecting:
            size = len(self.unread) if piece is None else piece
            chunk, self.unread = self.unread[:size], self.unread[size:]
            protocol.dataReceived(chunk)



def can_bind(kind, port, host="127.0.0.1"):
    """
    Whether a socket of C{kind} can bind C{(host, port)} now.
    """
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.bind((host, port))
    except OSError:
        return False
    finally:
        sock.close()
    return True


class FakeIndex:
    """
    The files of C{shared/}, as the command layer sees them.
    """

    def __init__(self, files=()):
        self._files = list(files)

    def files(self):
        return list(self._files)

    def by_id(self, file_id):
        return next((f for f in self._files if f.file_id == file_id), None)


class FakeTable:
    """
    The peer table, as the command layer sees it.
    """

    def __init__(self, peers=()):
        self._peers = list(peers)

    def peers(self):
        return list(self._peers)

    def __len__(self):
        return len(self._peers)


class FakeCatalog:
    """
    What the network offers, as the command layer sees it: the lookups of
    L{twisted_p2p.catalog.NetworkCatalog} that L{Commands} calls, done by
    walking the C{offers} it was given (which serve as its paths too: one
    offer per path and id).  C{size} (entries kept) may be set by a test.
    """

    size = 0

    def __init__(self, offers=(), files_of=None):
        self._offers = list(offers)
        self._files_of = files_of or {}

    def offers(self):
        return list(self._offers)

    def paths(self):
        return list(self._offers)

    def path_names(self):
        return sorted({o.name for o in self._offers})

    def named(self, name):
        return [o for o in self._offers if o.name == name]

    def with_id_prefix(self, prefix):
        return [o for o in self._offers if o.file_id.startswith(prefix)]

    def offer_of(self, file_id):
        return next((o for o in self._offers if o.file_id == file_id), None)

    def files_of(self, peer_id):
        return self._files_of.get(peer_id, [])

    def count_of(self, peer_id):
        return len(self.files_of(peer_id))


class FakeDownload:
    """
    A download in progress, as C{status}, C{cancel} and C{exit} see it.
    """

    def __init__(self, name, file_id, percent=0):
        self.name = name
        self.file_id = file_id
        self.percent = percent
        self.cancelled = False

    def status(self):
        return {
            "file": self.name, "id": self.file_id, "size": 1 << 20,
            "bytes": (1 << 20) * self.percent // 100, "percent": self.percent,
            "rate": 1 << 19, "sources": 1, "eta": 90, "by_source": {},
        }

    def cancel(self):
        self.cancelled = True


class FakeDownloads:
    """
    L{Downloads} as the command layer sees it: C{start} records each call
    with a Deferred the test fires.
    """

    def __init__(self):
        self.started = []
        self.active = {}

    def start(self, name, file_id, peers, report):
        d = defer.Deferred()
        self.started.append((name, file_id, peers, report, d))
        return d

    #: Folder names the downloads folder holds already.
    taken = frozenset()

    def queue(self, name, file_id, peers, report):
        return self.start(name, file_id, peers, report)

    #: Paths below downloads/ that hold the content asked already, by id.
    here = {}

    def folder_here(self, name):
        return name in self.taken

    def already_here(self, entries, known=None):
        self.checked = (list(entries), known)
        return [self.here.get(name) == file_id for name, file_id, _ in entries]

    def free_folder(self, name):
        n, candidate = 0, name
        while candidate in self.taken:
            n += 1
            candidate = f"{name} ({n})"
        return candidate


class CommandParts:
    """
    Everything L{Commands} is given, as fakes, and the L{Commands} itself.
    """

    def __init__(self, local=(), offers=(), peers=(), files_of=None, partials=None, hub=None,
                 catalog=None, table=None):
        from twisted.internet import task

        from twisted_p2p.commands import Commands

        self.index = FakeIndex(local)
        self.table = FakeTable(peers) if table is None else table
        self.catalog = FakeCatalog(offers, files_of) if catalog is None else catalog
        self.downloads = FakeDownloads()
        self.dropped = {}
        self.uploads = 0
        self.clock = task.Clock()
        self.clock.advance(100)
        self.shutdowns = 0
        self.commands = Commands(
            index=self.index, table=self.table, catalog=self.catalog,
            downloads=self.downloads, clock=self.clock, shutdown=self.shutdown,
            hub=hub, dropped=lambda: self.dropped, uploads_active=lambda: self.uploads,
            partials=partials, partial_files="/dl/.p2ppeer-<id>.part",
        )

    def shutdown(self):
        self.shutdowns += 1


class SyncWorkers:
    """
    Stands in for a L{twisted_p2p.workers.WorkerPool}: each job runs at
    once, on the calling thread, and its Deferred has fired on return.
    """

    def __init__(self):
        self.jobs = []

    def pick(self, besides=None):
        return self

    def submit(self, f, *args):
        self.jobs.append(f)
        return defer.maybeDeferred(f, *args)


class HeldWorkers:
    """
    Stands in for a L{twisted_p2p.workers.WorkerPool} whose jobs wait until
    the test runs them (L{run}), so that it can act while one is "in a
    thread".
    """

    def __init__(self):
        self.held = []

    def pick(self):
        return self

    def submit(self, f, *args):
        d = defer.Deferred()
        self.held.append((f, args, d))
        return d

    def run(self):
        """
        Run the jobs held so far, in order, and fire their Deferreds.
        """
        held, self.held = self.held, []
        for f, args, d in held:
            defer.maybeDeferred(f, *args).chainDeferred(d)
        return len(held)


def shared_file(folder, name, size, seed=0):
    """
    A file of C{size} random bytes in C{folder}, indexed: its
    L{twisted_p2p.index.LocalFile} and its content.
    """
    path = os.path.join(folder, name)
    content = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(content)
    signature = file_signature(os.stat(path))
    return LocalFile(name, folder, hash_file(path), signature), content


def pull(transport):
    """
    Let the pull producer registered with C{transport} write until it has
    nothing more to write now (a transport whose peer reads everything):
    the number of turns that wrote something.
    """
    turns = 0
    while transport.producer is not None:
        before = len(transport.value())
        transport.producer.resumeProducing()
        if len(transport.value()) == before:
            break
        turns += 1
    return turns


@contextlib.contextmanager
def running(*peers):
    """
    Start the in-process peer services C{peers} (as twistd would), and
    stop those that started when the block ends, however it ends.
    """
    started = []
    try:
        for peer in peers:
            peer.privilegedStartService()
            peer.startService()
            started.append(peer)
        yield
    finally:
        for peer in started:
            if peer.running:
                pytest_twisted.blockon(defer.maybeDeferred(peer.stopService))
