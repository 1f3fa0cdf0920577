"""
Tests for L{twisted_p2p.distribution}, L{twisted_p2p.distributor},
L{twisted_p2p.distributee} and the T+2/T+3 protocols: the distributee
with a real L{ChunkCache} in a temporary folder, the distributor with
fakes for the network, both on a L{Clock}; no sockets.
"""

import hashlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import FakeIndex, frame, log_events, result_of, sent_frames, shared_file
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p import wire
from twisted_p2p.cache import ChunkCache
from twisted_p2p.catalog import NetworkCatalog
from twisted_p2p.client import PeerRefused
from twisted_p2p.distributee import Distributee
from twisted_p2p.distribution import CacheAnnouncer, CachedLocal, DistributionStats
from twisted_p2p.distributor import Distributor
from twisted_p2p.index import SharedIndex
from twisted_p2p import distributee
from twisted_p2p.limits import (
    BAN_ADDRESS_SECONDS,
    CHUNK_SIZE,
    DISTRIBUTION_ANSWER_TIMEOUT,
    DISTRIBUTION_TRICKLE,
    DISTRIBUTION_YIELD,
    MAX_DISTRIBUTION_QUEUE,
    MAX_PULLS_AT_ONCE,
    MAX_STRIKES,
    PENDING_PUSH_SECONDS,
)
from twisted_p2p.peers import PeerTable
from twisted_p2p.transfer import (
    DistributeeFactory,
    DistributorFactory,
)
from twisted_p2p.transfer.framed import RequestRefused
from twisted_p2p.uploads import Uploads
from twisted_p2p.wire import Announce

ORIGIN = "0" * 32
CACHE_A = "a" * 32
CACHE_B = "b" * 32
CACHE_C = "c" * 32
ORIGIN_2 = "9" * 32
ADDRESSES = {ORIGIN: "192.0.2.1", CACHE_A: "192.0.2.2", CACHE_B: "192.0.2.3", CACHE_C: "192.0.2.4",
             ORIGIN_2: "192.0.2.5"}


def now(f, *args, **kwargs):
    """A run_in_thread that runs at once."""
    return defer.maybeDeferred(f, *args, **kwargs)


class ManifestServer:
    """A sender client that answers manifest requests for C{local}."""

    def __init__(self, local):
        self.local = local
        self.closed = False

    def call(self, header, body=b""):
        assert header["t"] == "manifest"
        hashes = self.local.manifest.chunk_hashes[header["start"]:]
        return defer.succeed((
            {"t": "manifest", "id": self.local.file_id, "size": self.local.size,
             "start": header["start"], "count": len(hashes)},
            b"".join(hashes),
        ))

    def close(self):
        self.closed = True


class Network:
    """A peer table and catalog on a clock, with peers that announce."""

    def __init__(self):
        self.clock = Clock()
        self.table = PeerTable(self.clock, 3600)
        self.fetches = {}
        self.catalog = NetworkCatalog(self.table, self._fetch, self.clock)

    def _fetch(self, peer):
        d = defer.Deferred()
        self.fetches[peer.peer_id] = d
        return d

    def peer(self, peer_id, files=(), free=None, holdings=None):
        """A peer joins, with this catalog."""
        self.table.heard(Announce(peer_id, "1" * 16, 4000, "2" * 16), ADDRESSES[peer_id], 5000)
        entries = [(f.file_id, f.name, f.size) for f in files]
        self.fetches.pop(peer_id).callback(("2" * 16, entries, free, holdings or {}))


@pytest.fixture
def shared(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    local, content = shared_file(str(folder), "big.bin", 10 * CHUNK_SIZE + 100)
    return local, content


def chunk(content, index):
    return content[index * CHUNK_SIZE:(index + 1) * CHUNK_SIZE]


# -- the distributee -----------------------------------------------------------


class Cache:
    def __init__(self, tmp_path, shared, quota=64 * CHUNK_SIZE, offered_whole=None):
        self.local, self.content = shared
        self.net = Network()
        self.net.peer(ORIGIN, [self.local])
        self.cache = ChunkCache(str(tmp_path / "cache"), quota, CACHE_A)
        self.cache.open()
        self.stats = DistributionStats()
        self.changes = []
        self.clients = []
        self.distributee = Distributee(
            self.cache, self.net.catalog, self._open_client, now, self.net.clock,
            self.stats, lambda: self.changes.append(1),
            **({"offered_whole": offered_whole} if offered_whole is not None else {}),
        )

    def _open_client(self, peer):
        assert peer.peer_id == ORIGIN
        client = ManifestServer(self.local)
        self.clients.append(client)
        return defer.succeed(client)

    def session(self, host=None):
        return self.distributee.session(host or ADDRESSES[ORIGIN])


def offer(session, file_id, chunks):
    reply, _ = result_of(session.handle(wire.request("offer", id=file_id, chunks=chunks), b""))
    return reply


def push(session, file_id, index, data):
    reply, _ = result_of(session.handle(wire.request("push", id=file_id, i=index), data))
    return reply


def refusal(d):
    with pytest.raises(RequestRefused) as caught:
        result_of(d)
    return caught.value.code


class TestDistributee:
    def test_a_file_nobody_serves_is_refused(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        unknown = hashlib.sha256(b"x").hexdigest()
        d = c.session().handle(wire.request("offer", id=unknown, chunks=[0]), b"")
        assert refusal(d) == "unknown-file"
        assert c.cache.manifest(unknown) is None
        assert c.stats.refused_offers == 1

    def test_a_file_offered_whole_here_is_refused_as_held(self, tmp_path, shared):
        whole = set()
        c = Cache(tmp_path, shared, offered_whole=whole.__contains__)
        whole.add(c.local.file_id)
        session = c.session()
        reply = offer(session, c.local.file_id, [0, 3])
        held = [{"i": 0, "code": "already-held"}, {"i": 3, "code": "already-held"}]
        assert reply == {"t": "offered", "id": c.local.file_id, "accepted": [], "refused": held}
        # Nothing was fetched, reserved or claimed for it.
        assert c.clients == [] and c.cache.manifest(c.local.file_id) is None
        assert c.cache.reserved == 0 and c.distributee.offered_by(ADDRESSES[ORIGIN]) == 0
        assert c.stats.refused_offers == 1
        whole.clear()  # no longer here whole (deleted from shared/, say)
        assert offer(session, c.local.file_id, [0, 3])["accepted"] == [0, 3]

    def test_the_manifest_is_fetched_from_a_server_of_the_file(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        reply = offer(c.session(), c.local.file_id, [0, 3])
        assert reply == {"t": "offered", "id": c.local.file_id, "accepted": [0, 3], "refused": []}
        assert c.cache.manifest(c.local.file_id) == c.local.manifest
        assert [client.closed for client in c.clients] == [True]

    def test_a_good_chunk_is_stored_and_a_bad_one_refused(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        session = c.session()
        offer(session, c.local.file_id, [0, 1])
        assert push(session, c.local.file_id, 0, chunk(c.content, 0)) == {
            "t": "stored", "id": c.local.file_id, "i": 0}
        bad = bytearray(chunk(c.content, 1))
        bad[5] ^= 1
        d = session.handle(wire.request("push", id=c.local.file_id, i=1), bytes(bad))
        assert refusal(d) == "bad-hash"
        assert c.cache.held(c.local.file_id) == {0}
        assert c.cache.reserved == 0
        assert (c.stats.stored_chunks, c.stats.refused_pushes) == (1, 1)
        assert c.changes

    def test_an_address_that_pushes_bad_chunks_is_banned_for_a_while(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        file_id = c.local.file_id
        session = c.session()
        assert offer(session, file_id, [0, 1, 2, 3])["accepted"] == [0, 1, 2, 3]
        for index in range(MAX_STRIKES):
            bad = bytearray(chunk(c.content, index))
            bad[0] ^= 1
            d = session.handle(wire.request("push", id=file_id, i=index), bytes(bad))
            assert refusal(d) == "bad-hash"
        assert c.stats.banned_pushers == 1
        # Every connection from that address, this one and new ones.
        d = session.handle(wire.request("offer", id=file_id, chunks=[4]), b"")
        assert refusal(d) == "banned"
        d = c.session().handle(wire.request("offer", id=file_id, chunks=[4]), b"")
        assert refusal(d) == "banned"
        # A chunk accepted before the ban is still checked, and taken if good.
        assert push(session, file_id, 3, chunk(c.content, 3))["t"] == "stored"
        # Other addresses are not.
        other = c.session(ADDRESSES[CACHE_A])
        assert offer(other, file_id, [4])["accepted"] == [4]
        c.net.clock.advance(BAN_ADDRESS_SECONDS)
        assert offer(c.session(), file_id, [5])["accepted"] == [5]
        assert c.stats.banned_pushers == 1

    def test_a_bad_push_now_and_then_is_no_ban(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        file_id = c.local.file_id
        session = c.session()
        offer(session, file_id, list(range(MAX_STRIKES)))
        for index in range(MAX_STRIKES - 1):
            bad = bytearray(chunk(c.content, index))
            bad[0] ^= 1
            d = session.handle(wire.request("push", id=file_id, i=index), bytes(bad))
            assert refusal(d) == "bad-hash"
        assert push(session, file_id, MAX_STRIKES - 1, chunk(c.content, MAX_STRIKES - 1))
        assert offer(c.session(), file_id, [MAX_STRIKES])["accepted"] == [MAX_STRIKES]
        assert c.stats.banned_pushers == 0

    def test_a_push_must_be_offered_first(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        session = c.session()
        offer(session, c.local.file_id, [0])
        d = session.handle(wire.request("push", id=c.local.file_id, i=2), chunk(c.content, 2))
        assert refusal(d) == "not-offered"

    def test_a_held_chunk_is_refused_before_its_bytes_come(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        first, second = c.session(), c.session()
        offer(first, c.local.file_id, [0])
        # On its way from another pusher: refused too.
        reply = offer(second, c.local.file_id, [0, 1])
        assert reply["accepted"] == [1]
        assert reply["refused"] == [{"i": 0, "code": "already-held"}]

    def test_the_quota_holds_whoever_offers(self, tmp_path, shared):
        local, _ = shared
        c = Cache(tmp_path, shared, quota=3 * CHUNK_SIZE)
        sessions = [c.session() for _ in range(3)]
        accepted = []
        for n, session in enumerate(sessions):
            reply = offer(session, local.file_id, [n * 3, n * 3 + 1, n * 3 + 2])
            accepted += reply["accepted"]
            assert all(r["code"] == "over-quota" for r in reply["refused"])
            assert c.cache.used + c.cache.reserved <= c.cache.quota
        # The manifest takes some room: three chunks do not fit.
        assert len(accepted) == 2
        # A closed connection gives its room back.
        for session in sessions:
            session.close()
        assert c.cache.reserved == 0

    def test_a_manifest_fetched_for_nothing_goes_with_the_connection(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        kept, idle = c.session(), c.session()
        offer(kept, c.local.file_id, [0])
        push(kept, c.local.file_id, 0, chunk(c.content, 0))
        kept.close()
        assert c.cache.manifest(c.local.file_id) is not None
        c.cache.drop_file(c.local.file_id)
        offer(idle, c.local.file_id, [1])
        idle.close()
        assert c.cache.manifest(c.local.file_id) is None
        assert c.cache.used == c.cache.reserved == 0

    def test_one_address_holds_room_for_so_many_chunks(self, tmp_path, shared, monkeypatch):
        """
        Room offered to one address, over all its connections, is capped: a
        host with many connections cannot reserve the cache and keep the
        honest distributors out (MAX_OFFERED_CHUNKS_PER_HOST).
        """
        monkeypatch.setattr(distributee, "MAX_OFFERED_CHUNKS_PER_HOST", 4)
        c = Cache(tmp_path, shared)
        file_id = c.local.file_id
        sessions = [c.session() for _ in range(3)]
        assert offer(sessions[0], file_id, [0, 1])["accepted"] == [0, 1]
        assert offer(sessions[1], file_id, [2, 3])["accepted"] == [2, 3]
        d = sessions[2].handle(wire.request("offer", id=file_id, chunks=[4]), b"")
        assert refusal(d) == "busy"
        # Another address is not held back by it.
        other = c.distributee.session("192.0.2.77")
        assert offer(other, file_id, [4, 5])["accepted"] == [4, 5]
        # A push gives its place back, and so does a closed connection.
        push(sessions[0], file_id, 0, chunk(c.content, 0))
        assert offer(sessions[2], file_id, [6])["accepted"] == [6]
        sessions[1].close()
        assert c.distributee.offered_by(ADDRESSES[ORIGIN]) == 2
        assert offer(sessions[2], file_id, [7, 8])["accepted"] == [7, 8]
        # Refused chunks are not counted: one already held, one new.
        sessions[2].close()
        assert offer(sessions[0], file_id, [0, 9])["accepted"] == [9]
        assert c.distributee.offered_by(ADDRESSES[ORIGIN]) == 2
        for session in sessions + [other]:
            session.close()
        assert c.distributee.offered_by(ADDRESSES[ORIGIN]) == 0
        assert c.cache.reserved == 0

    def test_hosting_off_takes_nothing(self, tmp_path, shared):
        c = Cache(tmp_path, shared, quota=0)
        d = c.session().handle(wire.request("offer", id=c.local.file_id, chunks=[0]), b"")
        assert refusal(d) == "hosting-off"
        assert c.clients == []

    @pytest.mark.parametrize("header", [
        {"t": "offer", "v": 1, "id": "ab" * 32, "chunks": []},
        {"t": "offer", "v": 1, "id": "ab" * 32, "chunks": [1, 1]},
        {"t": "offer", "v": 1, "id": "ab" * 32, "chunks": [-1]},
        {"t": "offer", "v": 1, "id": "ab" * 32, "chunks": list(range(65))},
        {"t": "offer", "v": 1, "id": "nothex", "chunks": [0]},
        {"t": "offer", "v": 2, "id": "ab" * 32, "chunks": [0]},
        {"t": "push", "v": 1, "id": "ab" * 32, "i": "0"},
        {"t": "steal", "v": 1},
    ])
    def test_malformed_frames_are_protocol_errors(self, tmp_path, shared, header):
        c = Cache(tmp_path, shared)
        with pytest.raises(wire.ProtocolError):
            result_of(defer.maybeDeferred(c.session().handle, header, b""))


# -- the distributee port --------------------------------------------------------


def connected(factory, host="192.0.2.1"):
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    protocol.callLater = Clock().callLater
    protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, 40000)))
    return protocol


class TestDistributeePort:
    @pytest.mark.parametrize("byte_by_byte", [False, True])
    def test_frames_are_answered_in_order(self, tmp_path, shared, byte_by_byte):
        c = Cache(tmp_path, shared)
        protocol = connected(DistributeeFactory(c.distributee))
        data = (
            frame(wire.request("offer", id=c.local.file_id, chunks=[0]))
            + frame(wire.request("push", id=c.local.file_id, i=0), chunk(c.content, 0))
            + frame(wire.request("push", id=c.local.file_id, i=0), chunk(c.content, 0))
        )
        if byte_by_byte:
            for i in range(len(data)):
                protocol.dataReceived(data[i:i + 1])
        else:
            protocol.dataReceived(data)
        answers = [h for h, _ in sent_frames(protocol.transport)]
        assert [a["t"] for a in answers] == ["offered", "stored", "error"]
        assert answers[2]["code"] == "not-offered"
        assert not protocol.transport.disconnecting

    def test_a_malformed_frame_drops_the_connection(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        protocol = connected(DistributeeFactory(c.distributee))
        protocol.dataReceived(frame({"t": "offer", "v": 1, "id": "zz", "chunks": [0]}))
        assert sent_frames(protocol.transport)[0][0]["code"] == "bad-request"
        assert protocol.transport.disconnecting

    def test_too_many_frames_ahead_drop_the_connection(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        waiting = defer.Deferred()
        c.distributee.manifest_for = lambda file_id, host: waiting  # a slow manifest fetch
        protocol = connected(DistributeeFactory(c.distributee))
        request = frame(wire.request("offer", id=c.local.file_id, chunks=[0]))
        protocol.dataReceived(request * (MAX_DISTRIBUTION_QUEUE + 1))
        assert not protocol.transport.disconnecting
        protocol.dataReceived(request)
        assert protocol.transport.disconnecting

    def test_room_is_given_back_when_the_connection_closes(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        protocol = connected(DistributeeFactory(c.distributee))
        protocol.dataReceived(frame(wire.request("offer", id=c.local.file_id, chunks=[0, 1])))
        assert c.cache.reserved == 2 * CHUNK_SIZE
        protocol.connectionLost(Failure(ConnectionDone()))
        assert c.cache.reserved == 0


# -- serving what is cached --------------------------------------------------------


class TestCachedLocal:
    def test_cached_chunks_are_offered_and_sent_from_their_files(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        session = c.session()
        offer(session, c.local.file_id, [2, 3, 7])
        for i in (2, 3, 7):
            push(session, c.local.file_id, i, chunk(c.content, i))
        cached = CachedLocal("big.bin", c.local.manifest, c.cache, 3)
        assert [i for i in range(10) if cached.holds(i)] == [2, 3, 7]
        assert wire.expand_bits(cached.chunks.snapshot(), 11)[:8] == bytearray(
            [0, 0, 1, 1, 0, 0, 0, 1])
        opened = cached.open_chunks()
        segments = opened.segments(2, 2)
        assert [length for _, _, length in segments] == [CHUNK_SIZE, CHUNK_SIZE]
        assert opened.read(segments) == chunk(c.content, 2) + chunk(c.content, 3)
        opened.sent([2, 3])
        assert opened._fds == {}
        with pytest.raises(OSError):
            opened.segments(4, 1)
        opened.close()

    def test_the_index_offers_them_and_the_revision_follows_the_count(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        index = SharedIndex([], str(tmp_path / "hashes.json"), now)
        announcer = CacheAnnouncer(c.cache, index, now, c.net.clock)
        session = c.session()
        offer(session, c.local.file_id, [0, 1])
        push(session, c.local.file_id, 0, chunk(c.content, 0))
        announcer.changed()
        announcer.changed()
        assert index.partials() == []  # not before the delay
        c.net.clock.advance(1.0)
        [offered] = index.partials()
        assert index.partial_by_id(c.local.file_id) is offered and offered.held == 1
        revision = index.revision
        push(session, c.local.file_id, 1, chunk(c.content, 1))
        announcer.changed()
        c.net.clock.advance(1.0)
        assert index.revision != revision

    def cached_two(self, tmp_path, shared, run=now):
        """
        A cache holding chunks 0 and 1 of C{shared} and chunk 0 of another
        file, offered by an index whose changes its announcer follows.
        """
        c = Cache(tmp_path, shared)
        session = c.session()
        offer(session, c.local.file_id, [0, 1])
        push(session, c.local.file_id, 0, chunk(c.content, 0))
        push(session, c.local.file_id, 1, chunk(c.content, 1))
        other, content = shared_file(str(tmp_path / "shared"), "other.bin", 3 * CHUNK_SIZE, 7)
        c.cache.add_manifest(other.manifest, "other.bin")
        c.cache.put(other.file_id, 0, [chunk(content, 0)])
        index = SharedIndex([], str(tmp_path / "hashes.json"), now)
        announcer = CacheAnnouncer(c.cache, index, run, c.net.clock)
        index.on_change(announcer.index_changed)
        announcer.publish_now()
        assert {p.file_id for p in index.partials()} == {c.local.file_id, other.file_id}
        return c, index, announcer, other

    def test_a_file_the_index_offers_whole_is_dropped_from_the_cache(self, tmp_path, shared):
        c, index, announcer, other = self.cached_two(tmp_path, shared)
        with log_events() as events:
            # The download of big.bin finished into a shared downloads/.
            index.add(c.local.folder, c.local.name, c.local.manifest, c.local.signature)
        assert c.cache.held(c.local.file_id) == frozenset()
        assert c.cache.manifest(c.local.file_id) is None
        assert sorted(os.listdir(c.cache.folder)) == [other.file_id]
        assert [f.file_id for f in c.cache.files()] == [other.file_id]
        [dropped] = [e for e in events if e.get("event") == "cache-dropped-whole"]
        assert (dropped["id"], dropped["name"], dropped["size"]) == (
            c.local.file_id, "big.bin", 2 * CHUNK_SIZE)
        # The cache is offered anew after the delay, without the copy.
        assert index.partial_by_id(c.local.file_id) is not None
        c.net.clock.advance(1.0)
        assert index.partial_by_id(c.local.file_id) is None
        assert [p.file_id for p in index.partials()] == [other.file_id]
        assert index.by_id(c.local.file_id).name == "big.bin"

    def test_the_drop_runs_once_while_it_is_under_way(self, tmp_path, shared):
        jobs = []

        def later(f, *args):
            d = defer.Deferred()
            jobs.append((f, args, d))
            return d

        c, index, announcer, other = self.cached_two(tmp_path, shared, run=now)
        announcer._run = later
        index.add(c.local.folder, c.local.name, c.local.manifest, c.local.signature)
        announcer.index_changed()  # another change while the drop waits for its thread
        assert len(jobs) == 1 and jobs[0][1][1] == [c.local.file_id]
        f, args, d = jobs.pop()
        d.callback(f(*args))
        announcer.index_changed()
        assert jobs == []  # dropped: no longer counted as cached
        assert c.cache.held(c.local.file_id) == frozenset()

    def test_a_stopped_announcer_drops_nothing(self, tmp_path, shared):
        c, index, announcer, other = self.cached_two(tmp_path, shared)
        announcer.stop()
        index.add(c.local.folder, c.local.name, c.local.manifest, c.local.signature)
        assert c.cache.held(c.local.file_id) == frozenset([0, 1])

    def test_the_catalog_answer_says_how_much_is_free(self, tmp_path, shared):
        c = Cache(tmp_path, shared)
        index = SharedIndex([], str(tmp_path / "hashes.json"), now)
        uploads = Uploads(index, None, now, None, c.net.clock, free_space=lambda: c.cache.free)
        reply, _ = uploads.handle(wire.request("catalog", start=0), None)
        assert reply["free"] == c.cache.free == c.cache.quota
        plain = Uploads(index, None, now, None, c.net.clock)
        assert "free" not in plain.handle(wire.request("catalog", start=0), None)[0]


# -- the distributor ---------------------------------------------------------------


class FakeUploads:
    def __init__(self):
        self.active = 0
        self.bucket = None


class PushTarget:
    """
    A target's distributee port as a client sees it: it stores what it
    is pushed, if it checks out, in a set.
    """

    def __init__(self, peer_id, content, log):
        self.peer_id = peer_id
        self.content = content
        self.log = log
        self.held = set()
        self.refuse = set()
        self.closed = False

    def call(self, header, body=b""):
        self.log.append((self.peer_id, header["t"], header.get("chunks") or header.get("i")))
        if header["t"] == "offer":
            accepted = [i for i in header["chunks"] if i not in self.held | self.refuse]
            refused = [{"i": i, "code": "over-quota"} for i in header["chunks"] if i in self.refuse]
            return defer.succeed(({"t": "offered", "id": header["id"], "accepted": accepted,
                                   "refused": refused}, b""))
        if header["t"] == "push":
            if body != chunk(self.content, header["i"]):
                return defer.fail(PeerRefused("bad-hash", "no"))
            self.held.add(header["i"])
            return defer.succeed(({"t": "stored", "id": header["id"], "i": header["i"]}, b""))
        raise AssertionError(header)

    def close(self):
        self.closed = True


class Origin:
    def __init__(self, shared, replicas=2, targets=(CACHE_A, CACHE_B, CACHE_C), free=None):
        self.local, self.content = shared
        self.net = Network()
        for peer_id in targets:
            self.net.peer(peer_id, free=free or 100 * CHUNK_SIZE)
        self.uploads = FakeUploads()
        self.log = []
        self.targets = {}
        self.connects = []
        self.stats = DistributionStats()
        self.distributor = Distributor(
            ORIGIN, FakeIndex([self.local]), self.net.catalog, self.net.table, self.uploads,
            self._connect, now, self.net.clock, replicas, 10.0, self.stats,
        )

    def _connect(self, host, port, protocol, peer_id):
        self.connects.append((host, port, peer_id))
        target = self.targets.get(peer_id)
        if target is None:
            target = self.targets[peer_id] = PushTarget(peer_id, self.content, self.log)
        return defer.succeed(target)

    def copies(self):
        counts = [0] * self.local.manifest.chunk_count
        for target in self.targets.values():
            for i in target.held:
                counts[i] += 1
        return counts


class TestDistributor:
    def test_a_round_gives_every_chunk_its_copies_once(self, shared):
        o = Origin(shared)
        o.distributor.round()
        chunks = o.local.manifest.chunk_count
        assert o.copies() == [2] * chunks
        assert o.stats.pushed_chunks == 2 * chunks
        assert o.stats.pushed_bytes == 2 * o.local.size
        assert all(port == 4003 for _, port, _ in o.connects)
        assert all(t.closed for t in o.targets.values())
        # Until the catalogs show them, the copies pushed count as held.
        o.distributor.round()
        assert o.stats.pushed_chunks == 2 * chunks

    def test_copies_the_catalogs_show_are_not_sent(self, shared):
        local, _ = shared
        o = Origin(shared, targets=())
        o.net.peer(CACHE_A, [local], free=100 * CHUNK_SIZE,
                   holdings={local.file_id: b"\xff\x07"})
        o.net.peer(CACHE_B, free=100 * CHUNK_SIZE)
        o.distributor.round()
        # Every chunk had one copy (at A): one more each, all to B.
        assert set(o.targets) == {CACHE_B}
        assert o.targets[CACHE_B].held == set(range(local.manifest.chunk_count))

    def test_a_refused_chunk_is_planned_again_later(self, shared):
        o = Origin(shared, replicas=1, targets=(CACHE_A,))
        o._connect("x", 1, None, CACHE_A)
        o.targets[CACHE_A].refuse = {4}
        o.distributor.round()
        assert 4 not in o.targets[CACHE_A].held
        o.targets[CACHE_A].refuse = set()
        o.distributor.round()
        assert o.targets[CACHE_A].held == set(range(o.local.manifest.chunk_count))
        # And the pending copies expire if no catalog ever shows them.
        o.net.clock.advance(PENDING_PUSH_SECONDS + 1)
        assert o.distributor._planner() is not None
        assert o.distributor._pending == {}

    def test_downloads_go_first(self, shared):
        o = Origin(shared, replicas=1, targets=(CACHE_A,))
        o.uploads.active = 1
        o.distributor.round()
        assert [kind for _, kind, _ in o.log] == ["offer"]
        o.net.clock.advance(DISTRIBUTION_TRICKLE - DISTRIBUTION_YIELD)
        assert o.stats.pushed_chunks == 0
        o.uploads.active = 0
        o.net.clock.advance(1)
        assert o.stats.pushed_chunks > 0

    def test_a_peer_always_serving_still_distributes_a_trickle(self, shared):
        o = Origin(shared, replicas=1, targets=(CACHE_A, CACHE_B))
        assert o.local.manifest.chunk_count > 8
        o.uploads.active = 1
        o.distributor.round()
        pushed = []
        for _ in range(int(8 / DISTRIBUTION_YIELD)):
            o.net.clock.advance(DISTRIBUTION_YIELD)
            pushed.append(o.stats.pushed_chunks)
        # One chunk a second among both pushes, from the first second on.
        assert pushed[int(DISTRIBUTION_TRICKLE / DISTRIBUTION_YIELD) - 2] == 0
        assert pushed[-1] == 8
        assert all(b - a <= 1 for a, b in zip(pushed, pushed[1:]))
        o.uploads.active = 0
        o.net.clock.advance(1)
        assert o.stats.pushed_chunks > 8

    def test_a_pull_is_answered_with_the_askers_part(self, shared):
        o = Origin(shared, replicas=1, targets=())
        reply, _ = o.distributor.pull(
            wire.request("pull", peer=CACHE_C, port=6003, free=100 * CHUNK_SIZE), "192.0.2.9")
        chunks = o.local.manifest.chunk_count
        assert reply == {"t": "pulling", "chunks": chunks}
        # Pushed to the address the pull came from, at the port it named.
        assert o.connects == [("192.0.2.9", 6003, CACHE_C)]
        assert o.targets[CACHE_C].held == set(range(chunks))
        # Asked again, nothing more: it is all on its way.
        reply, _ = o.distributor.pull(
            wire.request("pull", peer=CACHE_C, port=6003, free=100 * CHUNK_SIZE), "192.0.2.9")
        assert reply["chunks"] == 0

    def test_a_pull_storm_from_one_address_is_told_busy(self, shared):
        """
        While one pull's pushes to an address are under way, that address's
        next pulls, under any peer id, are refused "busy": a pull storm
        queues nothing, and a distributee that never answers holds one place.
        """
        o = Origin(shared, replicas=2, targets=())
        answers = []

        class Silent(PushTarget):
            def call(self, header, body=b""):
                d = defer.Deferred()
                answers.append(d)
                return d

        o.targets[CACHE_C] = Silent(CACHE_C, o.content, o.log)
        pull = lambda peer, host: o.distributor.pull(
            wire.request("pull", peer=peer, port=6003, free=100 * CHUNK_SIZE), host)
        assert pull(CACHE_C, "192.0.2.9")[0]["chunks"] > 0
        for n in range(50):
            with pytest.raises(RequestRefused) as caught:
                pull(f"{n:032x}", "192.0.2.9")
            assert caught.value.code == "busy"
        assert len(o.connects) == 1 and len(o.distributor._jobs) == 1
        # Another address still gets its part.
        assert pull(CACHE_B, "192.0.2.10")[0]["chunks"] > 0
        # The silent one is given up: the address may pull again.
        o.net.clock.advance(DISTRIBUTION_ANSWER_TIMEOUT + 1)
        assert o.distributor._pulls == {}
        assert pull(CACHE_A, "192.0.2.9")[0]["chunks"] > 0

    def test_pulls_at_once_are_capped_over_all_addresses(self, shared):
        o = Origin(shared, replicas=16, targets=())

        class Silent(PushTarget):
            def call(self, header, body=b""):
                return defer.Deferred()

        codes = []
        for n in range(MAX_PULLS_AT_ONCE + 3):
            peer_id = f"{n + 1:032x}"
            o.targets[peer_id] = Silent(peer_id, o.content, o.log)
            try:
                o.distributor.pull(
                    wire.request("pull", peer=peer_id, port=6003, free=100 * CHUNK_SIZE),
                    f"192.0.2.{n + 20}")
                codes.append("pulling")
            except RequestRefused as e:
                codes.append(e.code)
        assert codes == ["pulling"] * MAX_PULLS_AT_ONCE + ["busy"] * 3

    @pytest.mark.parametrize("header", [
        {"t": "pull", "v": 1, "peer": "short", "port": 1, "free": 0},
        {"t": "pull", "v": 1, "peer": CACHE_A, "port": 0, "free": 0},
        {"t": "pull", "v": 1, "peer": CACHE_A, "port": 1, "free": -1},
        {"t": "offer", "v": 1},
    ])
    def test_a_bad_pull_drops_the_connection(self, shared, header):
        o = Origin(shared)
        protocol = connected(DistributorFactory(o.distributor))
        protocol.dataReceived(frame(header))
        assert sent_frames(protocol.transport)[0][0]["code"] == "bad-request"
        assert protocol.transport.disconnecting
        assert o.connects == []

    def test_nothing_to_do_without_replicas(self, shared):
        o = Origin(shared, replicas=0)
        o.distributor.round()
        assert o.connects == [] and o.stats.rounds == 0


# -- availability in the catalog -------------------------------------------------------


def test_availability_counts_whole_and_partial_holders(shared):
    local, _ = shared
    net = Network()
    net.peer(CACHE_A, [local], holdings={local.file_id: bytes([0b00001111, 0])})
    net.peer(CACHE_B, [local], holdings={local.file_id: bytes([0b11110000, 0b111])})
    chunks = local.manifest.chunk_count
    assert net.catalog.availability(local.file_id, chunks) == (1.0, 1)
    assert net.catalog.copies(local.file_id, 0) == 1
    net.peer(CACHE_C, [local], holdings={local.file_id: bytes([0b1, 0])})
    assert net.catalog.availability(local.file_id, chunks) == (1.0, 1)
    assert net.catalog.copies_counter()(local.file_id, 0) == 2
    net.peer(ORIGIN, [local])
    assert net.catalog.availability(local.file_id, chunks) == (1.0, 2)
    lonely = Network()
    lonely.peer(CACHE_A, [local], holdings={local.file_id: bytes([0b1, 0])})
    reachable, fewest = lonely.catalog.availability(local.file_id, chunks)
    assert (round(reachable, 3), fewest) == (round(1 / chunks, 3), 0)


class Silent(PushTarget):
    """A distributee port that takes connections and never answers."""

    def call(self, header, body=b""):
        self.log.append((self.peer_id, header["t"], None))
        return defer.Deferred()


def test_a_target_that_never_answers_is_given_up_and_left_alone(shared):
    from twisted_p2p.limits import (
        DISTRIBUTION_ANSWER_TIMEOUT,
        SILENT_TARGET_REST,
        SLOW_ANSWER,
    )

    o = Origin(shared, replicas=1, targets=(CACHE_A,))
    o.targets[CACHE_A] = Silent(CACHE_A, o.content, o.log)
    o.distributor.round()
    assert o.distributor._round is not None
    # The round stops waiting for it once it is slow; the push waits on.
    o.net.clock.advance(SLOW_ANSWER)
    assert o.distributor._round is None
    assert len(o.distributor._jobs) == 1
    o.net.clock.advance(DISTRIBUTION_ANSWER_TIMEOUT)
    given_up_at = o.net.clock.seconds()  # a Clock runs what is due at the end of an advance
    assert o.distributor._jobs == set()
    assert o.distributor._pending == {}
    assert o.targets[CACHE_A].closed
    # Left alone for a while: the next rounds do not try it.
    o.distributor.round()
    o.net.clock.advance(given_up_at + SILENT_TARGET_REST - 1 - o.net.clock.seconds())
    o.distributor.round()
    assert [kind for _, kind, _ in o.log] == ["offer"]
    # Then tried again.
    o.net.clock.advance(2)
    o.distributor.round()
    assert [kind for _, kind, _ in o.log] == ["offer", "offer"]


def test_a_silent_target_that_pulls_is_pushed_to_again(shared):
    from twisted_p2p.limits import DISTRIBUTION_ANSWER_TIMEOUT

    o = Origin(shared, replicas=1, targets=(CACHE_A,))
    o.targets[CACHE_A] = Silent(CACHE_A, o.content, o.log)
    o.distributor.round()
    o.net.clock.advance(DISTRIBUTION_ANSWER_TIMEOUT + 1)
    o.targets[CACHE_A] = PushTarget(CACHE_A, o.content, o.log)
    reply, _ = o.distributor.pull(
        wire.request("pull", peer=CACHE_A, port=6003, free=100 * CHUNK_SIZE), "192.0.2.9")
    assert reply["chunks"] == o.local.manifest.chunk_count


def test_targets_that_never_answer_do_not_hold_up_the_others(shared, monkeypatch):
    """
    Eight silent targets took the PUSHES_AT_ONCE places for 45 s each, in
    turn, and the round waited for them all: nothing went to the peer that
    answers for 90 s.  Now they leave their places once slow.
    """
    from twisted_p2p.limits import PUSHES_AT_ONCE, SLOW_ANSWER

    silent = [f"{n + 1:032x}" for n in range(2 * PUSHES_AT_ONCE)]
    for n, peer_id in enumerate(silent):
        monkeypatch.setitem(ADDRESSES, peer_id, f"192.0.2.{100 + n}")
    o = Origin(shared, replicas=16, targets=silent + [CACHE_A])
    for peer_id in silent:
        o.targets[peer_id] = Silent(peer_id, o.content, o.log)
    o.distributor.round()
    o.net.clock.advance(SLOW_ANSWER)  # the first PUSHES_AT_ONCE leave
    o.net.clock.advance(SLOW_ANSWER)  # the next ones
    chunks = o.local.manifest.chunk_count
    assert CACHE_A in o.targets, "the peer that answers was never pushed to"
    assert o.targets[CACHE_A].held == set(range(chunks))
    assert o.distributor._round is None


def test_distribution_keeps_to_the_upload_rate(shared):
    from twisted_p2p.uploads import TokenBucket

    o = Origin(shared, replicas=1, targets=(CACHE_A,))
    o.uploads.bucket = TokenBucket(CHUNK_SIZE, o.net.clock)  # a chunk a second
    o.distributor.round()
    # The burst (two chunks) at once, then one a second.
    assert o.stats.pushed_chunks <= 3
    o.net.clock.advance(4)
    assert o.stats.pushed_chunks <= 7
    for _ in range(20):
        o.net.clock.advance(1)
    # A round sends at most what the rate allows in an interval (10 s, so
    # 10 chunks); the next round sends the rest.
    assert o.stats.pushed_chunks == 10
    o.distributor.round()
    o.net.clock.advance(1)
    assert o.targets[CACHE_A].held == set(range(o.local.manifest.chunk_count))


# -- the service -------------------------------------------------------------------


class FakeDistributor:
    interval = 10.0

    def __init__(self):
        self.rounds = 0
        self.stopped = False

    def round(self):
        self.rounds += 1

    def stop(self):
        self.stopped = True


class FakeDistributee:
    def __init__(self):
        self.pulls = []

    def pull_from(self, peer, connect, own_id, port):
        self.pulls.append((peer.peer_id, own_id, port))


class ServedPeer:
    """What L{DistributionService} uses of a L{PeerService}."""

    def __init__(self, tmp_path, shared, quota=64 * CHUNK_SIZE):
        self.local, self.content = shared
        self.net = Network()
        self.reactor = self.net.clock
        self.table = self.net.table
        self.catalog = self.net.catalog
        self.cache = ChunkCache(str(tmp_path / "cache"), quota, CACHE_A)
        self.index = SharedIndex([], str(tmp_path / "hashes.json"), now)
        self.cache_announcer = CacheAnnouncer(self.cache, self.index, now, self.reactor)
        self.distributor = FakeDistributor()
        self.distributee = FakeDistributee()
        self.peer_id = CACHE_A
        self.transfer_port = 6000
        self.run_in_thread = now

    def _connect(self, *args):
        raise AssertionError("not here")


def test_the_service_opens_the_cache_offers_it_and_runs_rounds(tmp_path, shared):
    from twisted_p2p.service import DistributionService

    # A cache left by an earlier run, with a chunk damaged since.
    local, content = shared
    earlier = ChunkCache(str(tmp_path / "cache"), 64 * CHUNK_SIZE)
    earlier.open()
    earlier.add_manifest(local.manifest, "big.bin")
    earlier.put(local.file_id, 0, [chunk(content, 0)])
    earlier.put(local.file_id, 1, [chunk(content, 1)])
    earlier.close()
    damaged = tmp_path / "cache" / local.file_id / "1"
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])

    peer = ServedPeer(tmp_path, shared)
    service = DistributionService(peer)
    service.startService()
    [offered] = peer.index.partials()
    assert [i for i in range(11) if offered.holds(i)] == [0]
    assert not damaged.exists()
    peer.reactor.advance(10)
    peer.reactor.advance(10)
    assert peer.distributor.rounds == 2
    # A peer whose catalog lists files whole is asked what to hold, once.
    peer.net.peer(ORIGIN, [local])
    peer.catalog.refresh(ORIGIN)
    peer.net.fetches.pop(ORIGIN).callback(("3" * 16, [(local.file_id, "big.bin", local.size)]))
    assert peer.distributee.pulls == [(ORIGIN, CACHE_A, 6003)]
    service.stopService()
    assert peer.distributor.stopped
    peer.reactor.advance(10)
    assert peer.distributor.rounds == 2
    assert peer.cache._root is None


def test_a_peer_that_hosts_nothing_asks_for_nothing(tmp_path, shared):
    from twisted_p2p.service import DistributionService

    local, _ = shared
    peer = ServedPeer(tmp_path, shared, quota=0)
    service = DistributionService(peer)
    service.startService()
    peer.net.peer(ORIGIN, [local])
    assert peer.distributee.pulls == []
    service.stopService()


def test_a_pull_fed_a_byte_at_a_time_is_answered(shared):
    o = Origin(shared, replicas=1, targets=())
    protocol = connected(DistributorFactory(o.distributor), host="192.0.2.9")
    data = frame(wire.request("pull", peer=CACHE_C, port=6003, free=100 * CHUNK_SIZE))
    for i in range(len(data)):
        protocol.dataReceived(data[i:i + 1])
    [(answer, _)] = sent_frames(protocol.transport)
    assert answer == {"t": "pulling", "chunks": o.local.manifest.chunk_count}
    assert not protocol.transport.disconnecting


_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2**41), st.text(max_size=70),
    st.lists(st.one_of(st.integers(-2, 70), st.text(max_size=3)), max_size=70),
    st.sampled_from(["ab" * 32, "0" * 32, CACHE_A]),
)
_headers = st.fixed_dictionaries(
    {"t": st.sampled_from(["offer", "push", "pull", "x"]), "v": st.sampled_from([1, 1, 2, "1"])},
    optional={k: _values for k in ("id", "chunks", "i", "peer", "port", "free")},
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.tuples(_headers, st.binary(max_size=64)), min_size=1, max_size=3),
       byte_by_byte=st.booleans())
def test_no_frame_crashes_the_distribution_ports(tmp_path, shared, frames, byte_by_byte):
    """
    Whatever a peer sends, whole or a byte at a time, each port answers or
    drops the connection: never an internal error, and no room left held
    once the connection is gone.
    """
    c = Cache(tmp_path / "fuzz", shared)
    o = Origin(shared, replicas=1, targets=())
    data = b"".join(frame(header, body) for header, body in frames)
    for factory in (DistributeeFactory(c.distributee), DistributorFactory(o.distributor)):
        protocol = connected(factory)
        pieces = [data[i:i + 1] for i in range(len(data))] if byte_by_byte else [data]
        for piece in pieces:
            if protocol.transport.disconnecting:
                break
            protocol.dataReceived(piece)
        for answer, _ in sent_frames(protocol.transport):
            assert answer.get("code") != "internal", (frames, answer)
        protocol.connectionLost(Failure(ConnectionDone()))
    assert c.cache.reserved == 0
    assert c.distributee.offered_by(ADDRESSES[ORIGIN]) == 0
    assert c.distributee.offered_by("192.0.2.1") == 0
    c.cache.close()


def test_two_distributors_of_one_file_do_not_fill_the_same_gap(shared):
    """
    Two whole holders with the same view: between them, each chunk gets
    its missing copy once.
    """
    local, content = shared
    origins = []
    log, targets = [], {}
    for own, other in ((ORIGIN, ORIGIN_2), (ORIGIN_2, ORIGIN)):
        o = Origin(shared, replicas=2, targets=(CACHE_A, CACHE_B, CACHE_C))
        o.net.peer(other, [local])
        o.targets, o.log = targets, log
        o.distributor.own_id = own
        origins.append(o)
    for o in origins:
        o.distributor.round()
    chunks = local.manifest.chunk_count
    # Two whole copies already: one more each, and no more.
    assert sum(len(t.held) for t in targets.values()) == chunks
    assert sum(o.stats.pushed_chunks for o in origins) == chunks
    assert all(o.stats.pushed_chunks for o in origins), "one of them did everything"


def test_an_ipv6_host_counts_as_its_64(tmp_path, shared, monkeypatch):
    """
    A host may use any address of its /64: its room and its pulls are
    counted for the /64, not per address.
    """
    monkeypatch.setattr(distributee, "MAX_OFFERED_CHUNKS_PER_HOST", 2)
    c = Cache(tmp_path, shared)
    file_id = c.local.file_id
    first = c.distributee.session("2001:db8::1")
    second = c.distributee.session("2001:db8::2")
    assert offer(first, file_id, [0, 1])["accepted"] == [0, 1]
    d = second.handle(wire.request("offer", id=file_id, chunks=[2]), b"")
    assert refusal(d) == "busy"
    elsewhere = c.distributee.session("2001:db8:1::1")
    assert offer(elsewhere, file_id, [2])["accepted"] == [2]
    for session in (first, second, elsewhere):
        session.close()
    assert c.cache.reserved == 0

    o = Origin(shared, replicas=2, targets=())
    o.targets[CACHE_C] = type("Silent", (PushTarget,), {
        "call": lambda self, header, body=b"": defer.Deferred()})(CACHE_C, o.content, o.log)
    pull = lambda peer, host: o.distributor.pull(
        wire.request("pull", peer=peer, port=6003, free=100 * CHUNK_SIZE), host)
    assert pull(CACHE_C, "2001:db8::1")[0]["chunks"] > 0
    with pytest.raises(RequestRefused):
        pull(CACHE_B, "2001:db8::ffff")
