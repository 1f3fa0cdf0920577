"""
L{Download} with fake peers and clients, a real L{Inbox}, a real
L{PartialFile} and a clock: chunks are handed in as the receiver port would,
through the stream the inbox gives for a token (C{chunk_started}, then
C{chunk_arrived} with the filled buffer).
"""

import errno
import os
import random
import threading

import pytest
from support import SyncWorkers, result_of
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError

from twisted_p2p import wire
from twisted_p2p.cache import CacheMiss
from twisted_p2p.client import PeerRefused
from twisted_p2p.download import Bans, Download, DownloadFailed, Downloads
from twisted_p2p.download.download import PROGRESS_INTERVAL, copy_from_cache
from twisted_p2p.download.finder import ANSWER_TIMEOUT
from twisted_p2p.download.scheduler import run_for
from twisted_p2p.limits import (
    BAN_ADDRESS_SECONDS,
    BUSY_BACKOFF_MAX,
    BUSY_BACKOFF_MIN,
    ENDGAME_STALL,
    FRAME_READ_BUDGET,
    HAVE_REFRESH,
    INITIAL_WINDOW,
    MAX_CHUNKS_PER_REQUEST,
    MAX_RUN,
    MAX_STRIKES,
    MAX_TIMEOUTS,
    REQUEST_TIMEOUT,
    TIMEOUT_REST,
    VERIFY_FRAMES,
)
from twisted_p2p.manifest import CHUNK_SIZE, Manifest, chunk_hash, hash_file
from twisted_p2p.render import render
from twisted_p2p.storage import PartialFile
from twisted_p2p.transfer import Inbox

RECEIVER_PORT = 7100
A, B, C = "192.0.2.2", "192.0.2.3", "192.0.2.4"


def run_now(f, *args, **kwargs):
    """
    A synchronous stand-in for deferToThread.
    """
    return defer.maybeDeferred(f, *args, **kwargs)


class Threads:
    """
    A stand-in for deferToThread (and a worker pool) whose calls wait until
    the test runs them, so that it can see what runs "at once" in threads.
    """

    def __init__(self):
        self.queue = []

    def __call__(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.queue.append((f, args, kwargs, d))
        return d

    def pick(self, besides=None):
        return self

    def submit(self, f, *args):
        return self(f, *args)

    def names(self):
        return [f.__name__ for f, _, _, _ in self.queue]

    def run_next(self):
        f, args, kwargs, d = self.queue.pop(0)
        defer.maybeDeferred(f, *args, **kwargs).chainDeferred(d)

    def run_all(self):
        while self.queue:
            self.run_next()


class FakePeer:
    def __init__(self, host, transfer_port=7000):
        self.host = host
        self.peer_id = host
        self.name = None
        self.label = f"{host}:{transfer_port}"
        self.sender_port = transfer_port + 1


class FakeConnection:
    """
    The receiver port's side of a data connection, as a stream sees it.
    """

    def __init__(self):
        self.paused = False
        self.closed = False

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    def close(self):
        self.closed = True


class FakeClient:
    """
    A sender connection: manifest and "have" requests are answered at once
    from C{manifest} (or refused); a "get" is answered "sending" at once,
    or refused with C{refuse_gets}, or held with C{hold_gets}; a "cancel"
    is answered from C{cancellable} (the chunks it takes off; all by
    default) or held with C{hold_cancels}.  A C{silent} one never answers a
    manifest or "have" call; a C{holding} one answers them when the test
    calls L{release}.
    """

    def __init__(self, manifest=None, refuse_gets=None, have=None, silent=False,
                 holding=False):
        self.manifest = manifest
        self.refuse_gets = refuse_gets
        self.hold_gets = False
        self.hold_cancels = False
        self.cancellable = None
        #: None: the whole file; else the set of chunks held (a partial).
        self.have = have
        self.have_asked = 0
        self.gets = []
        self.cancels = []
        self.closed = False
        self.silent = silent
        self.holding = holding
        self.held = []
        self._closed = defer.Deferred()

    def call(self, header):
        if header["t"] in ("manifest", "have") and (self.silent or self.holding):
            d = defer.Deferred()
            if self.holding:
                self.held.append((d, header))
            return d
        return self._answer(header)

    def release(self):
        """
        Answer the calls held so far (but those given up on).
        """
        held, self.held = self.held, []
        for d, header in held:
            if not d.called:
                self._answer(header).chainDeferred(d)

    def _answer(self, header):
        if header["t"] == "manifest":
            if self.manifest is None:
                return defer.fail(PeerRefused("unknown-file", "this peer does not have that file"))
            assert header["id"] == self.manifest.file_id
            hashes = self.manifest.chunk_hashes[header["start"] :]
            reply = {
                "t": "manifest",
                "id": self.manifest.file_id,
                "size": self.manifest.size,
                "start": header["start"],
                "count": len(hashes),
            }
            return defer.succeed((reply, b"".join(hashes)))
        if header["t"] == "have":
            self.have_asked += 1
            if self.have is None:
                return defer.succeed(({"t": "have", "id": header["id"], "all": True}, b""))
            count = self.manifest.chunk_count
            flags = bytes(1 if i in self.have else 0 for i in range(count))
            reply = {"t": "have", "id": header["id"], "start": 0, "count": count}
            return defer.succeed((reply, wire.pack_bits(flags)))
        if header["t"] == "cancel":
            d = defer.Deferred()
            self.cancels.append((header, d))
            if not self.hold_cancels:
                self.answer_cancel(len(self.cancels) - 1)
            return d
        assert header["t"] == "get"
        assert header["port"] == RECEIVER_PORT
        d = defer.Deferred()
        self.gets.append((header, d))
        if self.refuse_gets is not None:
            d.errback(self.refuse_gets)
        elif not self.hold_gets:
            d.callback(({"t": "sending", "token": header["token"]}, b""))
        return d

    def answer_cancel(self, number, removed=None):
        header, d = self.cancels[number]
        if removed is None:
            removed = [i for i in header["chunks"]
                       if self.cancellable is None or i in self.cancellable]
        d.callback(({"t": "cancelled", "token": header["token"], "chunks": removed}, b""))

    def requested(self):
        return [i for header, _ in self.gets for i in header["chunks"]]

    def cancelled(self):
        return [i for header, _ in self.cancels for i in header["chunks"]]

    def when_closed(self):
        d = defer.Deferred()
        self._closed.addBoth(lambda r: d.callback(None) or r)
        return d

    def close(self):
        self.closed = True

    def drop(self):
        self._closed.callback(None)


class Harness:
    """
    One download of C{content} from C{hosts}, with everything it needs.
    """

    def __init__(self, tmp_path, content, hosts=(A,), name="movie.bin", clients=None,
                 bans=None, storage=None, have=None, index=None, run_in_thread=run_now,
                 workers=None, find_peers=None, local=None):
        source = tmp_path / "source"
        source.mkdir(exist_ok=True)
        (source / name).write_bytes(content)
        self.content = content
        self.manifest = hash_file(str(source / name))
        self.folder = tmp_path / "downloads"
        self.folder.mkdir(exist_ok=True)
        self.peers = [FakePeer(host) for host in hosts]
        have = have or {}
        self.clients = clients or {
            host: FakeClient(self.manifest, have=have.get(host)) for host in hosts
        }
        self.clock = task.Clock()
        self.inbox = Inbox()
        self.events = []
        self.streams = {}
        self.connections = {}
        self.storage = (storage or PartialFile)(str(self.folder), self.manifest.file_id)
        self.download = Download(
            name,
            self.manifest.file_id,
            self.peers,
            self.open_client,
            self.inbox,
            RECEIVER_PORT,
            self.storage,
            run_in_thread,
            workers if workers is not None else SyncWorkers(),
            self.clock,
            self.events.append,
            bans=bans,
            index=index,
            find_peers=find_peers,
            local=local(self.manifest) if local is not None else None,
        )

    @property
    def lines(self):
        """The events as the console would show them."""
        return [line for e in self.events for line in render(e)]

    def kinds(self):
        return [e["event"] for e in self.events]

    def open_client(self, peer):
        client = self.clients[peer.host]
        if isinstance(client, Exception):
            return defer.fail(client)
        return defer.succeed(client)

    def start(self):
        d = self.download.start()
        self.turn()
        return d

    def turn(self):
        """Run what the download planned for the next turn of the reactor."""
        self.clock.advance(0)

    def advance(self, seconds):
        self.clock.advance(seconds)
        self.turn()

    def chunk(self, index, count=1):
        return self.content[index * CHUNK_SIZE : (index + count) * CHUNK_SIZE]

    def stream(self, host, token):
        """
        What the receiver port gets for C{token}: claimed once, kept.
        """
        if token not in self.streams:
            stream = self.inbox.claim(token, host)
            if stream is None:
                return None
            self.connections[token] = FakeConnection()
            stream.attach(self.connections[token])
            self.streams[token] = stream
        return self.streams[token]

    def token_for(self, host, index):
        """The token of the last get to C{host} that asked for C{index}."""
        for header, _ in reversed(self.clients[host].gets):
            if index in header["chunks"]:
                return header["token"]
        raise AssertionError(f"chunk {index} was never asked of {host}")

    def send(self, host, index, data=None, count=1, token=None, line=b""):
        """
        Chunks C{index} to C{index + count - 1} (one frame, its header
        C{line}) from C{host}, arriving on the receiver port.  Whether the
        stream accepted them.
        """
        stream = self.stream(host, token or self.token_for(host, index))
        assert stream is not None, "the token was not (or no longer) expected"
        data = self.chunk(index, count) if data is None else data
        try:
            buffer = stream.chunk_started(index, count, len(data))
        except wire.ProtocolError:
            return False
        buffer[:] = data
        stream.bytes_arrived(len(data))
        stream.chunk_arrived(index, count, buffer, line)
        self.turn()
        return True

    def outstanding(self, host):
        """Chunks asked of C{host} and not yet sent (on its current stream)."""
        source = self.source(host)
        return list(source.stream.outstanding) if source.stream is not None else []

    def serve(self, host, skip=(), rounds=100):
        """
        Send everything asked of C{host} and not yet sent (but C{skip}), as
        often as it is asked more.
        """
        for _ in range(rounds):
            waiting = [i for i in self.outstanding(host) if i not in skip]
            if not waiting:
                return
            for index in waiting:
                if index in self.outstanding(host):
                    assert self.send(host, index)

    def source(self, host):
        return next(s for s in self.download.sources if s.peer.host == host)

    def downloaded(self, name):
        return (self.folder / name).read_bytes()


def content_of(size, seed=1):
    return random.Random(seed).randbytes(size)


# -- one source, then several -------------------------------------------------------


def test_download_from_one_source(tmp_path):
    size = 2 * CHUNK_SIZE + 1000
    h = Harness(tmp_path, content_of(size))
    done = h.start()
    client = h.clients[A]
    assert [header["chunks"] for header, _ in client.gets] == [[0, 1, 2]]
    header = client.gets[0][0]
    assert header["id"] == h.manifest.file_id
    assert header["v"] == 1
    assert h.lines == ["download movie.bin: 513.0 KiB in 3 chunks from 1 peer"]
    h.serve(A)
    final_name, signature = result_of(done)
    assert final_name == "movie.bin"
    assert signature[0] == size
    assert h.downloaded("movie.bin") == h.content
    assert os.listdir(h.folder) == ["movie.bin"]
    assert h.lines[-1].startswith(f"downloaded movie.bin to downloads{os.sep}movie.bin: 513.0 KiB in ")
    assert h.download.final_name == "movie.bin"
    assert client.closed
    assert len(h.inbox) == 0
    assert all(c.closed for c in h.connections.values())
    assert h.clock.getDelayedCalls() == []


# -- chunks this peer's own cache holds ----------------------------------------------


class FakeCache:
    """
    This peer's chunk cache, as a download sees it: C{chunks} by index;
    C{None} for one evicted after C{held} was asked.
    """

    def __init__(self, file_id, chunks):
        self.file_id = file_id
        self.chunks = dict(chunks)
        self.reads = []

    def held(self, file_id):
        return frozenset(self.chunks) if file_id == self.file_id else frozenset()

    def read(self, file_id, index):
        self.reads.append(index)
        data = self.chunks.get(index)
        if data is None:
            raise CacheMiss((file_id, index))
        return data


def test_chunks_in_this_peers_cache_are_copied_not_fetched(tmp_path):
    content = content_of(4 * CHUNK_SIZE + 10)
    chunk = lambda i: content[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]  # noqa: E731
    caches = []

    def local(manifest):
        caches.append(FakeCache(manifest.file_id, {1: chunk(1), 3: chunk(3)}))
        return caches[0]

    h = Harness(tmp_path, content, local=local)
    done = h.start()
    client = h.clients[A]
    assert sorted(i for header, _ in client.gets for i in header["chunks"]) == [0, 2, 4]
    assert h.lines == [
        "download movie.bin: 1.0 MiB in 5 chunks from 1 peer, 512.0 KiB copied from this "
        "peer's cache"
    ]
    h.serve(A)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == content
    assert "512.0 KiB was already here" in h.lines[-1]


def test_a_file_the_cache_holds_whole_is_not_fetched_at_all(tmp_path):
    content = content_of(3 * CHUNK_SIZE)
    h = Harness(tmp_path, content, local=lambda m: FakeCache(
        m.file_id, {i: content[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i in range(3)}))
    done = h.start()
    assert result_of(done)[0] == "movie.bin"
    assert h.clients[A].gets == []
    assert h.downloaded("movie.bin") == content
    assert h.lines[-1].endswith(" (all of it was already here)")


def test_a_cached_chunk_that_is_gone_wrong_or_not_of_the_file_is_fetched(tmp_path):
    content = content_of(3 * CHUNK_SIZE)
    cache = {}

    def local(manifest):
        cache["it"] = FakeCache(manifest.file_id, {
            0: b"x" * CHUNK_SIZE,  # damaged on disk
            1: None,  # evicted between held() and read()
            2: content[2 * CHUNK_SIZE :],
            3: b"y",  # an index past the file's end
        })
        return cache["it"]

    h = Harness(tmp_path, content, local=local)
    done = h.start()
    assert sorted(i for header, _ in h.clients[A].gets for i in header["chunks"]) == [0, 1]
    assert cache["it"].reads == [0, 1, 2]
    h.serve(A)
    assert h.downloaded("movie.bin") == content
    assert result_of(done)[0] == "movie.bin"


def test_copying_from_the_cache_resumes_with_what_is_on_disk_and_stops_when_asked(tmp_path):
    content = content_of(4 * CHUNK_SIZE)
    manifest = Manifest.build(len(content), [
        chunk_hash(content[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]) for i in range(4)])
    cache = FakeCache(manifest.file_id, {
        i: content[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i in range(4)})
    storage = PartialFile(str(tmp_path), manifest.file_id)
    storage.open(manifest.size, manifest)
    stop = threading.Event()
    assert copy_from_cache(cache, manifest, storage, [0, 2], stop) == [1, 3]
    assert cache.reads == [1, 3]
    assert sorted(storage.chunks.indexes()) == [1, 3]
    stop.set()
    assert copy_from_cache(cache, manifest, storage, [], stop) == []


def test_download_byte_identical_when_chunks_come_out_of_order(tmp_path):
    h = Harness(tmp_path, content_of(4 * CHUNK_SIZE - 1))
    done = h.start()
    for index in (3, 1, 0, 2):
        assert h.send(A, index)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_a_run_of_chunks_in_one_frame(tmp_path):
    h = Harness(tmp_path, content_of(MAX_RUN * CHUNK_SIZE + 77))
    done = h.start()
    assert h.send(A, 0, count=MAX_RUN)
    assert h.download.have == MAX_RUN
    assert h.send(A, MAX_RUN)
    assert h.downloaded(result_of(done)[0]) == h.content


def test_a_bad_chunk_in_a_run_is_the_only_one_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(MAX_RUN * CHUNK_SIZE))
    done = h.start()
    data = bytearray(h.chunk(0, MAX_RUN))
    data[CHUNK_SIZE + 5] ^= 0xFF  # chunk 1 is wrong
    assert h.send(A, 0, data=bytes(data), count=MAX_RUN)
    assert h.download.have == MAX_RUN - 1
    h.turn()
    assert h.clients[A].gets[-1][0]["chunks"] == [1]
    assert h.download.bans.strikes(A) == 1
    assert h.send(A, 1)
    assert h.downloaded(result_of(done)[0]) == h.content


def test_every_get_of_a_download_uses_one_stream(tmp_path):
    h = Harness(tmp_path, content_of(40 * CHUNK_SIZE))
    done = h.start()
    h.serve(A)
    assert result_of(done)[0] == "movie.bin"
    tokens = {header["token"] for header, _ in h.clients[A].gets}
    assert len(h.clients[A].gets) > 1
    assert len(tokens) == 1


def test_download_from_two_sources(tmp_path):
    chunks = 20
    h = Harness(tmp_path, content_of(chunks * CHUNK_SIZE), hosts=(A, B))
    done = h.start()
    a, b = h.clients[A], h.clients[B]
    assert a.gets and b.gets
    assert len(a.requested()) <= INITIAL_WINDOW
    assert len(b.requested()) <= INITIAL_WINDOW
    assert sorted(a.requested() + b.requested()) == list(range(chunks))
    assert all(len(header["chunks"]) <= MAX_CHUNKS_PER_REQUEST for header, _ in a.gets + b.gets)
    assert h.lines[0] == "download movie.bin: 5.0 MiB in 20 chunks from 2 peers"
    # Each chunk only on the stream it was asked on.
    first_of_a = a.gets[0][0]["chunks"][0]
    assert not h.send(B, first_of_a, token=b.gets[0][0]["token"])
    h.serve(A)
    h.serve(B)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content
    assert h.source(A).received + h.source(B).received == len(h.content)
    assert h.source(B).received > 0
    assert h.download.by_source() == {f"{A}:7000": h.source(A).received,
                                      f"{B}:7000": h.source(B).received}


def test_never_more_than_the_window_in_flight(tmp_path):
    chunks = 100
    h = Harness(tmp_path, content_of(chunks * CHUNK_SIZE - 5))
    done = h.start()
    while not done.called:
        in_flight = h.outstanding(A)
        assert 0 < len(in_flight) <= INITIAL_WINDOW or len(in_flight) <= 64
        assert h.send(A, in_flight[0])
    assert sorted(h.clients[A].requested()) == list(range(chunks))
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_corrupt_chunk_is_rejected_and_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    done = h.start()
    assert h.send(A, 1, data=bytes(CHUNK_SIZE))
    assert [header["chunks"] for header, _ in h.clients[A].gets] == [[0, 1, 2], [1]]
    assert h.download.have == 0
    assert h.send(A, 0)
    assert h.send(A, 2)
    assert h.send(A, 1)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content
    assert h.download.bans.strikes(A) == 1


def test_wrong_length_or_unasked_chunks_are_not_accepted(tmp_path):
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE))
    h.start()
    token = h.token_for(A, 0)
    assert not h.send(A, 0, data=b"short", token=token)
    assert not h.send(A, 5, data=bytes(CHUNK_SIZE), token=token)
    assert not h.send(A, 0, data=bytes(3 * CHUNK_SIZE), count=3, token=token)


def test_a_source_that_keeps_sending_bad_data_is_dropped(tmp_path):
    good, bad = A, B
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), hosts=(bad, good))
    done = h.start()
    bad_client, good_client = h.clients[bad], h.clients[good]
    assert [header["chunks"] for header, _ in bad_client.gets] == [[0, 1, 2]]
    assert good_client.gets == []

    garbage = b"\xee" * CHUNK_SIZE
    assert h.send(bad, 0, data=garbage)
    for strike in range(2, MAX_STRIKES + 1):
        # Chunk 0 is asked again of the same source while it may still be used.
        assert bad_client.gets[-1][0]["chunks"] == [0]
        assert h.send(bad, 0, data=garbage)
    assert h.download.bans.strikes(bad) == MAX_STRIKES
    banned = [line for line in h.lines if "bad data" in line]
    assert banned == [f"{bad}:7000 sent bad data 3 times and is banned for this session"]
    assert h.download.bans.is_banned(bad)
    # What it still owed goes to the good source at once; the bad one is
    # asked nothing new, and its stream is closed.
    gets_of_bad = len(bad_client.gets)
    assert sorted(good_client.requested()) == [0, 1, 2]
    assert h.source(bad).stream is None
    assert all(c.closed for c in h.connections.values())
    assert bad_client.closed

    h.serve(good)
    assert result_of(done)[0] == "movie.bin"
    assert len(bad_client.gets) == gets_of_bad
    assert [line for line in h.lines if "bad data" in line] == banned
    assert h.downloaded("movie.bin") == h.content


def test_strikes_count_for_the_session_and_the_ban_is_said_once(tmp_path):
    bans = Bans()
    for attempt in range(2):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        h = Harness(folder, content_of(2 * CHUNK_SIZE, seed=attempt), hosts=(A, B), bans=bans)
        done = h.start()
        if attempt == 0:
            for _ in range(MAX_STRIKES - 1):
                bad_chunk = h.outstanding(A)[0]
                assert h.send(A, bad_chunk, data=bytes(CHUNK_SIZE))
            h.serve(A)
            h.serve(B)
            assert result_of(done)
        else:
            # One more strike in another download bans it for the session.
            bad_chunk = h.outstanding(A)[0]
            assert h.send(A, bad_chunk, data=bytes(CHUNK_SIZE))
            assert bans.is_banned(A)
            assert [e["event"] for e in h.events].count("peer-banned") == 1
            h.serve(B)
            assert result_of(done)


def test_a_banned_peer_is_not_even_connected_to(tmp_path):
    bans = Bans()
    for _ in range(MAX_STRIKES):
        bans.strike(A)
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=(A, B), bans=bans)
    done = h.start()
    assert h.clients[A].gets == [] and h.clients[A].have_asked == 0
    h.serve(B)
    assert result_of(done)


def test_a_banned_peers_address_stays_banned_for_a_time_under_a_new_id():
    """
    Bans that stick (issue 11): a liar that comes back with a new peer id
    from the same address is still banned, for BAN_ADDRESS_SECONDS; an
    address is not banned for ever, as it may pass to someone else.
    """
    clock = task.Clock()
    bans = Bans(clock=clock)
    for _ in range(MAX_STRIKES):
        bans.strike("liar-id", "192.0.2.66")
    assert bans.is_banned("liar-id")
    clock.advance(1)
    # A new id first heard there after the ban is banned; a peer known
    # there before (another peer of the same host) is not.
    assert bans.is_banned("new-id", "192.0.2.66", joined=clock.seconds())
    assert not bans.is_banned("neighbour", "192.0.2.66", joined=clock.seconds() - 10)
    assert not bans.is_banned("new-id", "192.0.2.67", joined=clock.seconds())
    clock.advance(BAN_ADDRESS_SECONDS)
    assert not bans.is_banned("new-id", "192.0.2.66", joined=clock.seconds())
    assert bans.is_banned("liar-id", "192.0.2.67")  # the id itself, for the session


def test_a_liar_under_a_new_id_at_the_same_address_is_not_connected_to(tmp_path):
    clock = task.Clock()
    bans = Bans(clock=clock)
    for _ in range(MAX_STRIKES):
        bans.strike("the old id", A)
    clock.advance(1)
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=(A, B), bans=bans)
    assert h.peers[0].peer_id != "the old id"
    h.peers[0].joined = clock.seconds()  # first heard after the ban
    h.peers[1].joined = 0.0
    done = h.start()
    assert h.clients[A].gets == [] and h.clients[A].have_asked == 0
    h.serve(B)
    assert result_of(done)


# -- silence, timeouts and lost sources ------------------------------------------------


def test_a_silent_stream_is_given_up_and_its_chunks_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE))
    done = h.start()
    client = h.clients[A]
    first_token = client.gets[0][0]["token"]
    assert h.send(A, 0)
    h.advance(REQUEST_TIMEOUT - 1)
    assert len(client.gets) == 1
    h.advance(1)
    # The source rests first (there is no other to ask), then only the
    # chunk that never came is asked again, on a new stream.
    assert len(client.gets) == 1
    assert h.source(A).stream is None
    h.advance(TIMEOUT_REST)
    assert [header["chunks"] for header, _ in client.gets] == [[0, 1], [1]]
    assert client.gets[1][0]["token"] != first_token
    assert h.inbox.claim(first_token, A) is None
    assert h.connections[first_token].closed
    assert h.source(A).failures == 1
    assert h.send(A, 1)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_every_byte_that_arrives_restarts_the_silence(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    h.start()
    stream = h.stream(A, h.token_for(A, 0))
    # A slow source: a chunk's bytes trickle in over more than the timeout.
    buffer = stream.chunk_started(0, 1, CHUNK_SIZE)
    for second in range(3 * int(REQUEST_TIMEOUT)):
        stream.bytes_arrived(100)
        h.advance(1)
    assert h.source(A).failures == 0
    buffer[:] = h.chunk(0)
    stream.chunk_arrived(0, 1, buffer)
    assert h.download.have == 1
    assert len(h.clients[A].gets) == 1


def test_a_silent_streams_chunks_go_to_another_source(tmp_path):
    slow, fast = A, B
    h = Harness(tmp_path, content_of(20 * CHUNK_SIZE), hosts=(slow, fast))
    done = h.start()
    slow_chunks = set(h.clients[slow].requested())
    h.serve(fast)
    assert not done.called
    h.advance(REQUEST_TIMEOUT)
    h.serve(fast)
    assert result_of(done)[0] == "movie.bin"
    assert slow_chunks <= set(h.clients[fast].requested())
    assert h.downloaded("movie.bin") == h.content


def test_a_source_silent_too_often_is_lost(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    done = h.start()
    for _ in range(MAX_TIMEOUTS):
        h.advance(REQUEST_TIMEOUT)
        h.advance(TIMEOUT_REST)
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == "no peer is left to download movie.bin from"
    assert len(h.clients[A].gets) == MAX_TIMEOUTS
    assert "source-lost" in h.kinds()
    assert os.listdir(h.folder) == []


def test_a_stream_the_source_closes_is_opened_again(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    done = h.start()
    token = h.token_for(A, 0)
    assert h.send(A, 0)
    stream = h.streams[token]
    stream.detached(h.connections[token], "gone")
    assert h.source(A).stream is None
    h.advance(TIMEOUT_REST)
    assert h.clients[A].gets[-1][0]["chunks"] == [1, 2]
    assert h.clients[A].gets[-1][0]["token"] != token
    h.serve(A)
    assert result_of(done)


def test_unreachable_says_firewall_and_host(tmp_path):
    refused = PeerRefused("unreachable", "could not connect back to 192.0.2.9:7100")
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    h.clients[A].refuse_gets = refused
    done = h.start()
    [unreachable] = [line for line in h.lines if "could not connect back" in line]
    assert "firewall" in unreachable
    assert "--host" in unreachable
    assert f"{A}:7000" in unreachable
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert "no peer is left" in str(e.value)
    assert os.listdir(h.folder) == []


def test_unreachable_source_leaves_the_others(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=(A, B))
    h.clients[A].refuse_gets = PeerRefused("unreachable", "no route")
    done = h.start()
    assert h.clients[B].requested() == [0]
    assert h.send(B, 0)
    assert result_of(done)[0] == "movie.bin"


def test_a_dropped_sender_connection_is_not_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), hosts=(A, B))
    done = h.start()
    a, b = h.clients[A], h.clients[B]
    assert a.requested() == [0, 1, 2] and b.gets == []
    a.drop()
    h.turn()
    # It is said once, and its chunks go to the other source.
    [lost] = [e for e in h.events if e["event"] == "source-lost"]
    assert lost["peer"] == f"{A}:7000"
    assert lost["others"] == 1
    assert [line for line in h.lines if "lost" in line][0].endswith(
        "(the connection closed); going on with the other sources")
    assert a.requested() == [0, 1, 2]
    assert sorted(b.requested()) == [0, 1, 2]
    h.serve(B)
    assert result_of(done)[0] == "movie.bin"


def test_a_busy_source_rests_longer_each_time(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    client = h.clients[A]
    client.refuse_gets = PeerRefused("busy", "try later")
    done = h.start()
    waits = []
    for _ in range(6):
        before = len(client.gets)
        waited = 0.0
        while len(client.gets) == before:
            h.advance(0.125)
            waited += 0.125
        waits.append(waited)
    assert waits[0] == pytest.approx(BUSY_BACKOFF_MIN, abs=0.125)
    assert waits == sorted(waits)
    assert max(waits) <= BUSY_BACKOFF_MAX + 0.125
    client.refuse_gets = None
    h.advance(BUSY_BACKOFF_MAX)
    h.serve(A)
    assert result_of(done)


# -- the endgame ------------------------------------------------------------------------


def test_an_idle_source_takes_over_what_waits_at_a_slow_one(tmp_path):
    slow, fast = A, B
    h = Harness(tmp_path, content_of(24 * CHUNK_SIZE), hosts=(slow, fast))
    done = h.start()
    # Let both sources show their rates: the slow one sends one chunk a
    # second, the fast one everything it is asked at once.
    for _ in range(3):
        if h.outstanding(slow):
            assert h.send(slow, h.outstanding(slow)[0])
        h.serve(fast)
        h.advance(1)
    # The fast one took over what waited at the slow one, which was told to
    # cancel it.
    assert h.clients[slow].cancelled()
    assert set(h.clients[slow].cancelled()) <= set(h.clients[fast].requested())
    h.serve(fast)
    h.serve(slow)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content
    # A cancel the slow source honoured costs nothing.
    assert h.download.bytes_wasted == 0


def test_a_copy_that_comes_after_the_first_is_dropped(tmp_path):
    slow, fast = A, B
    h = Harness(tmp_path, content_of(4 * CHUNK_SIZE), hosts=(slow, fast))
    h.clients[slow].cancellable = set()  # it was sending them already
    done = h.start()
    assert h.clients[slow].requested() == [0, 1, 2, 3]
    h.advance(ENDGAME_STALL)
    # Stalled: asked of the other source too; the first copy wins.
    assert sorted(h.clients[fast].requested()) == [0, 1, 2, 3]
    h.serve(fast)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content
    # The slow source was told to cancel each chunk once it came from the
    # other, and the wait for them is over.
    assert sorted(h.clients[slow].cancelled()) == [0, 1, 2, 3]


def test_a_late_copy_of_a_chunk_is_accepted_and_wasted(tmp_path):
    slow, fast = A, B
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE), hosts=(slow, fast))
    h.clients[slow].hold_cancels = True
    done = h.start()
    h.advance(ENDGAME_STALL)
    slow_token = h.token_for(slow, 0)
    slow_stream = h.stream(slow, slow_token)
    assert h.send(fast, 0)
    # The cancel is not answered yet: the slow copy may still come, and does.
    assert h.send(slow, 0, token=slow_token)
    assert h.download.bytes_wasted == CHUNK_SIZE
    assert h.send(fast, 1)
    assert result_of(done)
    assert slow_stream.closed


def test_a_cancel_answered_gives_the_chunk_back_to_the_queue(tmp_path):
    slow, fast = A, B
    h = Harness(tmp_path, content_of(24 * CHUNK_SIZE), hosts=(slow, fast))
    h.clients[slow].hold_cancels = True
    done = h.start()
    # Both show their rates; the fast one's first chunks come in at once.
    assert h.send(slow, h.outstanding(slow)[0])
    for index in h.outstanding(fast):
        assert h.send(fast, index)
    h.advance(1)
    assert h.clients[slow].cancels, "the fast source took nothing over"
    taken_over = h.clients[slow].cancels[0][0]["chunks"]
    stream = h.source(slow).stream
    assert all(i in stream.cancelling and i in stream.outstanding for i in taken_over)
    h.clients[slow].answer_cancel(0)
    # Taken off the slow source: no longer waited for there.
    assert not any(i in stream.outstanding or i in stream.cancelling for i in taken_over)
    assert set(taken_over) <= set(h.outstanding(fast))
    h.serve(fast)
    h.serve(slow)
    assert result_of(done)
    assert h.downloaded("movie.bin") == h.content


# -- partial holders and rarity -----------------------------------------------------------


def test_rarest_chunks_go_first(tmp_path):
    full, a, b = A, B, C
    # Availability: 0-4 on a and full (2), 5-9 on all three (3), 10-14 on b
    # and full (2), 15-19 on full only (1).
    h = Harness(tmp_path, content_of(20 * CHUNK_SIZE), hosts=(full, a, b),
                have={a: set(range(10)), b: set(range(5, 15))})
    h.start()
    assert h.clients[full].gets[0][0]["chunks"][:5] == [15, 16, 17, 18, 19]
    assert set(h.clients[a].requested()) <= set(range(10))
    assert set(h.clients[b].requested()) <= set(range(5, 15))
    assert sorted(h.clients[full].requested() + h.clients[a].requested()
                  + h.clients[b].requested()) == list(range(20))


def test_a_partial_holder_is_asked_again_what_it_has(tmp_path):
    h = Harness(tmp_path, content_of(4 * CHUNK_SIZE), hosts=(B,), have={B: {0, 1}})
    done = h.start()
    client = h.clients[B]
    assert client.requested() == [0, 1]
    h.serve(B)
    # Nothing else is held yet: the download waits rather than fails.
    assert not done.called
    client.have = {0, 1, 2, 3}
    h.advance(HAVE_REFRESH)
    assert sorted(client.requested()) == [0, 1, 2, 3]
    h.serve(B)
    assert result_of(done)


def test_a_partial_holder_missing_chunks_is_asked_again_later(tmp_path):
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE), hosts=(B,), have={B: {0, 1}})
    client = h.clients[B]
    client.refuse_gets = PeerRefused("missing-chunks", "not yet")
    done = h.start()
    # Asked at once which chunks it has now; asked for them after a rest.
    assert client.have_asked == 2
    gets = len(client.gets)
    client.refuse_gets = None
    h.advance(BUSY_BACKOFF_MIN)
    assert len(client.gets) > gets
    h.serve(B)
    assert result_of(done)


def test_a_partial_holder_that_stops_answering_is_left_out(tmp_path):
    h = Harness(tmp_path, content_of(4 * CHUNK_SIZE), hosts=(A, B), have={B: {0, 1}})
    done = h.start()
    h.clients[B].silent = True
    h.advance(HAVE_REFRESH)
    h.advance(ANSWER_TIMEOUT)
    assert not h.source(B).usable
    assert "source-lost" in h.kinds()
    # A was silent meanwhile too, and rests; then it is asked for it all.
    h.advance(TIMEOUT_REST)
    h.serve(A)
    assert result_of(done)


def test_a_peer_that_offers_the_file_later_joins(tmp_path):
    later = FakePeer(B)
    offered = []
    h = Harness(tmp_path, content_of(40 * CHUNK_SIZE), hosts=(A, B),
                find_peers=lambda: offered)
    h.peers.remove(next(p for p in h.peers if p.host == B))
    h.download._peers = [p for p in h.download._peers if p.host != B]
    done = h.start()
    assert h.clients[B].gets == []
    offered.append(later)
    h.advance(HAVE_REFRESH)
    assert h.clients[B].gets
    h.serve(B)
    h.serve(A)
    assert result_of(done)
    assert h.source(B).received > 0


# -- manifests and the start --------------------------------------------------------------


def test_no_peer_gives_the_manifest(tmp_path):
    h = Harness(tmp_path, content_of(10), hosts=(A, B, C))
    h.clients[A] = ConnectionRefusedError("refused")
    h.clients[B] = FakeClient(manifest=None)
    h.clients[C] = FakeClient(manifest=None)
    done = h.start()
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value).startswith(f"no peer could give the manifest of movie.bin ({A}:7000: ")
    assert h.clients[B].closed and h.clients[C].closed
    assert os.listdir(h.folder) == []
    assert h.clock.getDelayedCalls() == []


def test_a_later_peer_gives_the_manifest(tmp_path):
    h = Harness(tmp_path, content_of(10), hosts=(A, B))
    h.clients[A] = FakeClient(manifest=None)
    done = h.start()
    assert h.clients[A].closed
    assert h.send(B, 0)
    assert h.downloaded(result_of(done)[0]) == h.content


def test_an_empty_file(tmp_path):
    h = Harness(tmp_path, b"", name="empty.txt")
    done = h.start()
    assert h.clients[A].gets == []
    assert result_of(done)[0] == "empty.txt"
    assert h.downloaded("empty.txt") == b""
    assert h.lines[0] == "download empty.txt: 0 B in 0 chunks from 1 peer"
    assert h.lines[-1].startswith(f"downloaded empty.txt to downloads{os.sep}empty.txt: 0 B in ")
    assert h.clock.getDelayedCalls() == []


def test_a_silent_peer_does_not_hold_up_the_others(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=(A, B))
    h.clients[A].silent = True
    done = h.start()
    # The other answered: the download goes on without waiting.
    assert h.clients[B].gets
    h.serve(B)
    assert result_of(done)
    assert h.clients[A].closed


def test_a_download_from_silent_peers_only_fails_after_the_answer_timeout(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=(A, B))
    for client in h.clients.values():
        client.silent = True
    done = h.start()
    h.advance(ANSWER_TIMEOUT - 1)
    assert not done.called
    h.advance(1)
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert "no answer in 10 s" in str(e.value)


def test_a_peer_that_answers_later_joins_the_download(tmp_path):
    h = Harness(tmp_path, content_of(40 * CHUNK_SIZE), hosts=(A, B))
    h.clients[B].holding = True
    done = h.start()
    assert h.clients[B].gets == []
    h.clients[B].release()  # which chunks it has: the manifest came from A
    h.turn()
    assert h.clients[B].gets
    h.serve(A)
    h.serve(B)
    assert result_of(done)


def test_a_peer_refused_at_once_does_not_end_the_wait_for_the_others(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=(A, B))
    h.clients[A] = ConnectionRefusedError("refused")
    h.clients[B].holding = True
    done = h.start()
    assert not done.called
    h.clients[B].release()  # the manifest
    h.clients[B].release()  # which chunks it has
    h.turn()
    h.serve(B)
    assert result_of(done)


def test_a_download_stopped_while_peers_connect_closes_them(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=(A, B))
    for client in h.clients.values():
        client.holding = True
    done = h.start()
    h.download.cancel()
    for client in h.clients.values():
        client.release()
    with pytest.raises(DownloadFailed):
        result_of(done)
    assert all(client.closed for client in h.clients.values())
    assert h.clock.getDelayedCalls() == []


# -- progress -----------------------------------------------------------------------------------


def test_progress_events(tmp_path):
    h = Harness(tmp_path, content_of(4 * CHUNK_SIZE))
    done = h.start()
    h.advance(PROGRESS_INTERVAL)
    assert h.events[-1]["event"] == "download-progress"
    assert (h.events[-1]["bytes"], h.events[-1]["percent"]) == (0, 0)
    assert h.send(A, 0)
    h.advance(PROGRESS_INTERVAL)
    progress = h.events[-1]
    assert progress["event"] == "download-progress"
    assert (progress["percent"], progress["bytes"], progress["size"]) == (25, CHUNK_SIZE, 4 * CHUNK_SIZE)
    assert progress["rate"] > 0 and progress["eta"] is not None
    assert progress["sources"] == 1
    for index in (1, 2, 3):
        assert h.send(A, index)
    assert result_of(done)[0] == "movie.bin"
    # No progress once it is over.
    events = len(h.events)
    h.advance(10 * PROGRESS_INTERVAL)
    assert len(h.events) == events


def test_status_has_sources_rate_and_eta(tmp_path):
    h = Harness(tmp_path, content_of(8 * CHUNK_SIZE), hosts=(A, B))
    h.start()
    h.advance(PROGRESS_INTERVAL)
    assert h.send(A, h.outstanding(A)[0])
    h.advance(PROGRESS_INTERVAL)
    status = h.download.status()
    assert status["file"] == "movie.bin"
    assert status["sources"] == 2
    assert status["bytes"] == CHUNK_SIZE
    assert status["rate"] > 0
    assert status["eta"] > 0
    assert status["by_source"] == {f"{A}:7000": CHUNK_SIZE}


# -- the end, storage and the index ---------------------------------------------------------------


def test_an_existing_file_is_not_overwritten(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE + 1))
    (h.folder / "movie.bin").write_bytes(b"my own movie")
    done = h.start()
    h.serve(A)
    final_name, _ = result_of(done)
    assert final_name == "movie (1).bin"
    assert h.downloaded("movie.bin") == b"my own movie"
    assert h.downloaded("movie (1).bin") == h.content
    assert "(movie.bin already existed)" in h.lines[-1]
    assert f"downloads{os.sep}movie (1).bin" in h.lines[-1]


def test_cancel_discards_the_partial(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    done = h.start()
    assert h.send(A, 0)
    assert os.path.exists(h.storage.path)
    h.download.cancel()
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == "download movie.bin was cancelled"
    assert os.listdir(h.folder) == []
    assert len(h.inbox) == 0
    assert h.clock.getDelayedCalls() == []


def test_pause_keeps_the_partial_for_a_resume(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    done = h.start()
    assert h.send(A, 0)
    h.download.pause()
    with pytest.raises(DownloadFailed):
        result_of(done)
    assert h.events[-1]["event"] == "download-stopped"
    assert h.events[-1]["percent"] == 33
    assert sorted(os.listdir(h.folder)) == sorted(
        [os.path.basename(h.storage.path), os.path.basename(h.storage.map_path)])


def test_resume_after_a_crash_fetches_only_what_is_missing(tmp_path):
    content = content_of(4 * CHUNK_SIZE)
    first = Harness(tmp_path, content)
    first.start()
    assert first.send(A, 0)
    assert first.send(A, 2)
    # A crash: nothing is closed or released.
    second = Harness(tmp_path, content)
    done = second.start()
    assert second.clients[A].requested() == [1, 3]
    assert second.events[0]["resumed"] == 2 * CHUNK_SIZE
    assert "resuming with 512.0 KiB already here" in second.lines[0]
    second.serve(A)
    assert second.downloaded(result_of(done)[0]) == content


def test_resume_fetches_again_a_marked_chunk_whose_bytes_are_wrong(tmp_path):
    content = content_of(2 * CHUNK_SIZE)
    first = Harness(tmp_path, content)
    first.start()
    assert first.send(A, 0)
    first.storage.write(0, b"\x00" * 10)  # as after a power loss
    second = Harness(tmp_path, content)
    done = second.start()
    assert second.clients[A].requested() == [0, 1]
    second.serve(A)
    assert second.downloaded(result_of(done)[0]) == content


def test_a_full_disk_fails_clearly_and_keeps_the_partial(tmp_path):
    from twisted_p2p.storage import StorageError, describe_os_error

    class Storage(PartialFile):
        writes = 0

        def store_run(self, first, count, offset, buffer):
            Storage.writes += 1
            if Storage.writes > 1:
                raise StorageError(describe_os_error(OSError(errno.ENOSPC, "full"), self.folder))
            return PartialFile.store_run(self, first, count, offset, buffer)

    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), storage=Storage)
    done = h.start()
    assert h.send(A, 0)
    assert h.send(A, 1)
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert "no space left in the downloads folder" in str(e.value)
    assert h.events[-1]["event"] == "download-failed"
    assert os.path.exists(h.storage.path)  # kept for a resume


def test_a_vanished_downloads_folder_fails_clearly(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    os.rmdir(h.folder)
    done = h.start()
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert "is gone" in str(e.value)


class FakeIndex:
    def __init__(self):
        self.added = []
        self.partials = {}

    def add_partial(self, name, manifest, path, chunks):
        self.partials[manifest.file_id] = (name, path, chunks)

    def remove_partial(self, file_id):
        self.partials.pop(file_id, None)

    def add(self, folder, name, manifest, signature):
        self.added.append((folder, name, manifest))


def test_downloads_offer_the_verified_chunks_while_they_run(tmp_path):
    index = FakeIndex()
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), index=index)
    done = h.start()
    name, path, chunks = index.partials[h.manifest.file_id]
    assert (name, path) == ("movie.bin", h.storage.path)
    assert h.send(A, 1)
    assert 1 in chunks and 0 not in chunks
    h.serve(A)
    assert result_of(done)
    assert index.partials == {}


def test_downloads_adds_the_finished_file_to_the_index(tmp_path):
    h = Harness(tmp_path, content_of(10))
    index = FakeIndex()
    downloads = Downloads(lambda name, file_id, peers, report, bans, index: h.download, index)
    d = downloads.start("movie.bin", h.manifest.file_id, h.peers, h.events.append)
    h.turn()
    assert list(downloads.active) == [h.manifest.file_id]
    with pytest.raises(DownloadFailed) as e:
        downloads.start("movie.bin", h.manifest.file_id, h.peers, h.events.append)
    assert str(e.value) == "movie.bin is already being downloaded"
    assert h.send(A, 0)
    assert result_of(d) == "movie.bin"
    assert index.added == [(str(h.folder), "movie.bin", h.manifest)]
    assert downloads.active == {}


def test_downloads_cancel_all(tmp_path):
    h = Harness(tmp_path, content_of(10))
    index = FakeIndex()
    downloads = Downloads(lambda name, file_id, peers, report, bans, index: h.download, index)
    d = downloads.start("movie.bin", h.manifest.file_id, h.peers, h.events.append)
    downloads.cancel_all()
    with pytest.raises(DownloadFailed):
        result_of(d)
    assert downloads.active == {}
    assert index.added == []


# -- work in threads --------------------------------------------------------------------------


def test_reading_pauses_while_too_many_bytes_wait_to_be_verified(tmp_path):
    threads = Threads()
    h = Harness(tmp_path, content_of(40 * CHUNK_SIZE), workers=threads)
    h.start()
    h.download.verify_limit = 5 * CHUNK_SIZE
    for index in range(4):
        assert h.send(A, index)
    [connection] = h.connections.values()
    assert not connection.paused
    assert h.send(A, 4)
    assert connection.paused
    # Resumed once the worker has caught up by half; time paused is not
    # silence.
    h.advance(2 * REQUEST_TIMEOUT)
    assert h.source(A).failures == 0
    while connection.paused:
        threads.run_next()  # a frame: its hashes, then its write
    assert h.download.have == 3
    assert h.download.buffers.out == 2


def test_frames_wait_to_be_verified_by_their_bytes_not_their_number(tmp_path):
    threads = Threads()
    h = Harness(tmp_path, content_of(40 * CHUNK_SIZE), workers=threads)
    h.start()
    h.download.verify_limit = 5 * CHUNK_SIZE
    assert h.send(A, 0, count=4)
    [connection] = h.connections.values()
    assert not connection.paused
    assert h.send(A, 4, count=2)  # two frames, six chunks: over
    assert connection.paused
    threads.run_next()  # the first frame: two chunks wait, under half
    assert not connection.paused and h.download.have == 4


def test_the_bytes_that_may_wait_are_two_frames_of_the_longest_run(tmp_path):
    (tmp_path / "alone").mkdir()
    (tmp_path / "four").mkdir()
    alone = Harness(tmp_path / "alone", content_of(40 * CHUNK_SIZE))
    alone.start()
    assert alone.download.verify_limit == VERIFY_FRAMES * MAX_RUN * CHUNK_SIZE
    hosts = tuple(f"192.0.2.{n}" for n in range(11, 15))
    four = Harness(tmp_path / "four", content_of(64 * CHUNK_SIZE), hosts=hosts)
    four.start()
    assert four.download.verify_limit == VERIFY_FRAMES * run_for(4) * CHUNK_SIZE


def test_a_download_asks_its_streams_for_runs_that_fit_its_budget(tmp_path):
    """
    Each stream is asked once for a run that fits the download's budget
    (L{run_for} the streams open, it among them), and every "get" on it
    names that run.
    """
    h = Harness(tmp_path, content_of(40 * CHUNK_SIZE))
    h.start()
    [stream] = [s.stream for s in h.download.sources if s.stream is not None]
    assert stream.run == run_for(1) == MAX_RUN
    assert {header["run"] for header, _ in h.clients[A].gets} == {MAX_RUN}
    # A frame over it is refused: the data connection holds no more.
    assert not h.send(A, 0, count=MAX_RUN + 1)
    assert h.send(A, 0, count=MAX_RUN)


def test_the_streams_of_a_download_of_many_sources_are_asked_shorter_runs(tmp_path):
    hosts = tuple(f"192.0.2.{n}" for n in range(11, 15))
    h = Harness(tmp_path, content_of(64 * CHUNK_SIZE), hosts=hosts)
    h.start()
    runs = [s.stream.run for s in h.download.sources if s.stream is not None]
    # Each asked for its share of the budget of a download of four sources.
    assert runs == [run_for(4)] * 4
    assert sum(runs) * CHUNK_SIZE <= FRAME_READ_BUDGET


def test_the_partial_is_released_only_after_the_stores_in_flight(tmp_path):
    threads = Threads()
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), workers=threads)
    done = h.start()
    assert h.send(A, 0)
    assert threads.names() == ["verify_and_store"]
    h.download.cancel()
    with pytest.raises(DownloadFailed):
        result_of(done)
    # The store still runs in its thread: the partial file is still there.
    assert os.path.exists(h.storage.path)
    threads.run_all()
    assert os.listdir(h.folder) == []


def test_a_download_stopped_while_the_partial_opens_releases_it_after(tmp_path):
    threads = Threads()
    h = Harness(tmp_path, content_of(CHUNK_SIZE), run_in_thread=threads)
    done = h.start()
    assert threads.names() == ["open"]
    h.download.cancel()
    with pytest.raises(DownloadFailed):
        result_of(done)
    threads.run_all()  # the open, then the release it waited for
    threads.run_all()
    assert os.listdir(h.folder) == []


def test_a_download_cancelled_before_its_cache_copy_runs_copies_nothing(tmp_path):
    content = content_of(3 * CHUNK_SIZE)
    caches = []

    def local(manifest):
        caches.append(FakeCache(manifest.file_id, {
            i: content[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i in range(3)}))
        return caches[0]

    threads = Threads()
    h = Harness(tmp_path, content, run_in_thread=threads, local=local)
    done = h.start()
    assert threads.names() == ["open_and_copy"]
    h.download.cancel()
    with pytest.raises(DownloadFailed):
        result_of(done)
    threads.run_all()  # the open and copy, then the release it waited for
    threads.run_all()
    assert caches[0].reads == []
    assert os.listdir(h.folder) == []


def test_a_source_lost_while_the_partial_opens_leaves_the_others(tmp_path):
    threads = Threads()
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=(A, B), run_in_thread=threads)
    done = h.start()
    h.clients[A].drop()
    threads.run_all()
    h.turn()
    assert h.clients[B].requested() == [0]
    assert h.send(B, 0)
    threads.run_all()
    assert result_of(done)


def test_a_source_that_leaves_the_network_is_lost_at_once(tmp_path):
    h = Harness(tmp_path, content_of(8 * CHUNK_SIZE), hosts=(A, B))
    downloads = Downloads(lambda *args: h.download, None)
    done = downloads.start("movie.bin", h.manifest.file_id, h.peers, h.events.append)
    h.turn()
    assert h.outstanding(A)
    downloads.left(h.peers[0], "timed out")
    h.turn()
    [lost] = [e for e in h.events if e["event"] == "source-lost"]
    assert lost["peer"] == f"{A}:7000" and "left the network" in lost["reason"]
    assert h.clients[A].closed
    # What it owed went to the other source.
    h.serve(B)
    assert result_of(done) == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_a_chunk_its_source_sends_anyway_is_cancelled_at_the_other(tmp_path):
    """
    A steal asks the chunk of a faster source and cancels it at the slow
    one; if the slow one is sending it already, the faster one is told to
    cancel its copy instead: one copy travels, not two.
    """
    slow, fast = A, B
    h = Harness(tmp_path, content_of(24 * CHUNK_SIZE), hosts=(slow, fast))
    h.clients[slow].cancellable = set()  # it sends everything it was asked
    done = h.start()
    assert h.send(slow, h.outstanding(slow)[0])
    for index in h.outstanding(fast):
        assert h.send(fast, index)
    h.advance(1)
    taken_over = h.clients[slow].cancelled()
    assert taken_over, "the fast source took nothing over"
    # The slow source refused: the fast one is told to cancel those.
    assert set(taken_over) <= set(h.clients[fast].cancelled())
    h.serve(slow)
    h.serve(fast)
    assert result_of(done)
    assert h.downloaded("movie.bin") == h.content
    assert h.download.bytes_wasted == 0


def test_a_cancel_that_came_too_late_teaches_how_much_is_on_its_way(tmp_path):
    slow, fast = A, B
    h = Harness(tmp_path, content_of(24 * CHUNK_SIZE), hosts=(slow, fast))
    h.clients[slow].cancellable = set()
    h.start()
    assert h.send(slow, h.outstanding(slow)[0])
    for index in h.outstanding(fast):
        assert h.send(fast, index)
    h.advance(1)
    [(header, _)] = h.clients[slow].cancels[:1]
    assert h.source(slow).in_transit > 0


# -- the queue of a folder download ----------------------------------------------


class QueuedDownload:
    """A download that ends when the test says."""

    def __init__(self, name, file_id):
        self.name, self.file_id = name, file_id
        self.done = defer.Deferred()
        self.paused = False
        self.storage = None
        self.manifest = None

    def start(self):
        return self.done

    def pause(self):
        self.paused = True
        self.done.errback(DownloadFailed(f"{self.name} stopped"))


def queued_downloads(parallel=2):
    made = []

    def make(name, file_id, peers, report, bans, index):
        made.append(QueuedDownload(name, file_id))
        return made[-1]

    return Downloads(make, None, parallel=parallel), made


def test_queued_downloads_run_a_few_at_a_time():
    downloads, made = queued_downloads(parallel=2)
    results = [downloads.queue(f"f/{i}", f"{i:064x}", (), lambda e: None) for i in range(5)]
    assert [d.name for d in made] == ["f/0", "f/1"]
    assert downloads.waiting == ["f/2", "f/3", "f/4"]
    made[0].done.callback(("f/0", None))
    assert [d.name for d in made] == ["f/0", "f/1", "f/2"]
    assert result_of(results[0]) == "f/0"
    # A file started by itself does not take a place of the queue's.
    downloads.start("alone", "a" * 64, (), lambda e: None)
    assert len(made) == 4 and downloads.waiting == ["f/3", "f/4"]


def test_the_same_content_twice_waits_for_the_first():
    downloads, made = queued_downloads(parallel=4)
    first = downloads.queue("d/a", "1" * 64, (), lambda e: None)
    second = downloads.queue("d/copy of a", "1" * 64, (), lambda e: None)
    third = downloads.queue("d/b", "2" * 64, (), lambda e: None)
    assert [d.name for d in made] == ["d/a", "d/b"]
    made[0].done.callback(("d/a", None))
    assert [d.name for d in made] == ["d/a", "d/b", "d/copy of a"]
    made[2].done.callback(("d/copy of a", None))
    made[1].done.callback(("d/b", None))
    assert [result_of(d) for d in (first, second, third)] == ["d/a", "d/copy of a", "d/b"]


def test_stopping_drops_the_waiting_ones():
    downloads, made = queued_downloads(parallel=1)
    running = downloads.queue("f/0", "0" * 64, (), lambda e: None)
    waiting = downloads.queue("f/1", "1" * 64, (), lambda e: None)
    failures = []
    running.addErrback(failures.append)
    waiting.addErrback(failures.append)
    downloads.cancel_all()
    assert made[0].paused and len(made) == 1
    assert sorted(str(f.value) for f in failures) == [
        "f/0 stopped", "f/1 was waiting its turn when the peer stopped"]


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a//b", ".x", "a/../../b"])
def test_a_download_never_starts_under_an_illegal_path(name):
    downloads, made = queued_downloads()
    with pytest.raises(DownloadFailed):
        downloads.start(name, "0" * 64, (), lambda e: None)
    failure = []
    downloads.queue(name, "1" * 64, (), lambda e: None).addErrback(failure.append)
    assert failure and made == []


def test_a_folder_name_nothing_uses(tmp_path):
    downloads = Downloads(lambda *a: None, None, folder=str(tmp_path))
    assert downloads.free_folder("photos") == "photos"
    (tmp_path / "photos").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "photos (1)")
    assert downloads.free_folder("photos") == "photos (2)"


def test_unqueue_drops_only_what_it_is_told():
    downloads, made = queued_downloads(parallel=1)
    downloads.queue("a/0", "0" * 64, (), lambda e: None)
    dropped = downloads.queue("a/1", "1" * 64, (), lambda e: None)
    kept = downloads.queue("b/2", "2" * 64, (), lambda e: None)
    failures = []
    dropped.addErrback(failures.append)
    assert downloads.unqueue(lambda name: name.startswith("a/")) == ["a/1"]
    assert failures and failures[0].value.reported
    assert downloads.waiting == ["b/2"]
    made[0].done.callback(("a/0", None))
    assert [d.name for d in made] == ["a/0", "b/2"] and not kept.called


def test_a_download_whose_sources_all_go_after_some_chunks_came_fails(tmp_path):
    # A request that got all its chunks is over: it must not keep the
    # download waiting for "requests in flight" once every source is gone.
    h = Harness(tmp_path, content_of(40 * CHUNK_SIZE))
    done = h.start()
    a = h.clients[A]
    first = a.gets[0][0]["chunks"]
    assert len(first) < 40
    for index in first:
        assert h.send(A, index)
    assert len(a.gets) > 1
    a.drop()
    h.turn()
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == (
        "no peer is left to download movie.bin from; "
        "what came is kept: 'resume movie.bin' goes on once one is back"
    )
    assert h.download.have == len(first)
    # No "going on with the other sources" when there is none.
    [lost] = [line for line in h.lines if "lost" in line]
    assert lost == f"download movie.bin: lost {A}:7000 (the connection closed)", lost
