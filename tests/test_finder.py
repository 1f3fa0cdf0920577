"""
The L{Finder} on its own, with a sender connection whose answers the test
gives one at a time, in the order asked (as the real one does), and no
reactor.
"""

import gc
from collections import deque

import pytest
from twisted.internet import defer, task
from support import log_events
from twisted.logger import LogLevel

from twisted_p2p.client import PeerRefused
from twisted_p2p.download.finder import Finder
from twisted_p2p.manifest import CHUNK_SIZE, Manifest, compute_file_id
from twisted_p2p.peers import Peer

PEER = Peer("a" * 32, "1" * 16, "192.0.2.8", 27000, 7100, "1" * 16, last_seen=0.0)


def manifest_of(chunks):
    hashes = [bytes([i]) * 32 for i in range(chunks)]
    size = chunks * CHUNK_SIZE
    return Manifest.build(size, hashes, compute_file_id(size, (b"".join(hashes),)))


class OrderedClient:
    """
    A sender connection that records each call and answers them only when
    the test says, in the order they were asked.
    """

    def __init__(self):
        self.asked = []
        self._waiting = deque()
        self.closed = False

    def call(self, header):
        self.asked.append(header["t"])
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def answer(self, header, body=b""):
        self._waiting.popleft().callback((header, body))

    def refuse(self):
        self._waiting.popleft().errback(PeerRefused("busy", "no"))

    def answer_manifest(self, manifest):
        self.answer({"t": "manifest", "id": manifest.file_id, "size": manifest.size,
                     "start": 0, "count": manifest.chunk_count},
                    b"".join(manifest.chunk_hashes))

    def answer_have_all(self, manifest):
        self.answer({"t": "have", "id": manifest.file_id, "all": True})

    def close(self):
        self.closed = True
        while self._waiting:
            self._waiting.popleft().errback(ConnectionError("closed"))


class Owner:
    def __init__(self):
        self.manifests, self.sources, self.over = [], [], []

    def manifest_found(self, manifest):
        self.manifests.append(manifest)

    def source_found(self, source):
        self.sources.append(source)

    def finding_over(self, errors):
        self.over.append(errors)


@pytest.fixture
def unhandled():
    """
    Fails the test if an error is logged while it runs (an unhandled
    Deferred failure is logged when it is collected).
    """
    with log_events(LogLevel.error) as events:
        yield
        gc.collect()
    assert events == []


def find(manifest, client, offered):
    owner = Owner()
    finder = Finder(owner, manifest.file_id, lambda peer: defer.succeed(client), task.Clock(),
                    size_offered=lambda peer: offered)
    finder.add([PEER])
    return finder, owner


def test_which_chunks_a_source_holds_is_asked_with_the_manifest_not_after_it(unhandled):
    # The catalog offered the size: both questions go out at once, so the
    # chunk map costs no round trip of its own.
    manifest = manifest_of(3)
    client = OrderedClient()
    _, owner = find(manifest, client, manifest.size)
    assert client.asked == ["manifest", "have"]
    client.answer_manifest(manifest)
    assert owner.manifests == [manifest] and owner.sources == []
    client.answer_have_all(manifest)
    assert [s.has for s in owner.sources] == [None]
    assert owner.over == [[]]


def test_without_an_offered_size_the_chunk_map_waits_for_the_manifest(unhandled):
    manifest = manifest_of(3)
    client = OrderedClient()
    _, owner = find(manifest, client, None)
    assert client.asked == ["manifest"]
    client.answer_manifest(manifest)
    assert client.asked == ["manifest", "have"]
    client.answer({"t": "have", "id": manifest.file_id, "start": 0, "count": 3}, bytes([0b101]))
    assert [bytes(s.has) for s in owner.sources] == [bytes([1, 0, 1])]


def test_a_chunk_map_asked_for_another_count_is_dropped_and_asked_again(unhandled):
    # Another source's manifest won the race, and its count is not what
    # this peer's catalog offered: the early answer is not used.
    manifest = manifest_of(3)
    honest, odd = OrderedClient(), OrderedClient()
    other = Peer("b" * 32, "2" * 16, "192.0.2.9", 27000, 7200, "2" * 16, last_seen=0.0)
    clients = {PEER.peer_id: honest, other.peer_id: odd}
    offered = {PEER.peer_id: manifest.size, other.peer_id: 5 * CHUNK_SIZE}
    owner = Owner()
    finder = Finder(owner, manifest.file_id, lambda peer: defer.succeed(clients[peer.peer_id]),
                    task.Clock(), size_offered=lambda peer: offered[peer.peer_id])
    finder.add([PEER, other])
    honest.answer_manifest(manifest)
    honest.answer_have_all(manifest)
    assert odd.asked == ["manifest", "have", "have"]
    # The two cancelled calls are answered (late, and dropped), then the new one.
    odd.answer_manifest(manifest_of(5))
    odd.answer({"t": "have", "id": manifest.file_id, "start": 0, "count": 5}, bytes([0b11111]))
    odd.answer({"t": "have", "id": manifest.file_id, "start": 0, "count": 3}, bytes([0b011]))
    assert [s.has if s.has is None else bytes(s.has) for s in owner.sources] == [
        None, bytes([1, 1, 0])]
    assert owner.over == [[]]


@pytest.fixture
def asked(unhandled):
    """
    A finder that has asked one peer for the manifest and the chunk map at
    once, neither answered: C{(manifest, client, finder, owner)}.
    """
    manifest = manifest_of(3)
    client = OrderedClient()
    finder, owner = find(manifest, client, manifest.size)
    assert client.asked == ["manifest", "have"]
    return manifest, client, finder, owner


def test_a_refused_manifest_drops_the_chunk_map_asked_with_it(asked):
    _, client, _, owner = asked
    client.refuse()
    assert client.closed
    assert owner.sources == [] and owner.manifests == []
    assert len(owner.over) == 1 and "no" in owner.over[0][0]


def test_a_refused_chunk_map_after_a_good_manifest_is_this_sources_error(asked):
    manifest, client, _, owner = asked
    client.answer_manifest(manifest)
    client.refuse()
    assert owner.manifests == [manifest] and owner.sources == []
    assert client.closed and len(owner.over[0]) == 1


def test_stopped_while_both_are_asked_leaves_nothing_behind(asked):
    _, client, finder, owner = asked
    finder.stop()
    assert client.closed
    assert owner.sources == [] and owner.manifests == []


def four_peers(manifest, clock=None):
    peers = [Peer(c * 32, "1" * 16, f"192.0.2.{10 + n}", 27000, 7100, "1" * 16, last_seen=0.0)
             for n, c in enumerate("abcd")]
    clients = {p.peer_id: OrderedClient() for p in peers}
    owner = Owner()
    finder = Finder(owner, manifest.file_id, lambda peer: defer.succeed(clients[peer.peer_id]),
                    clock or task.Clock(), size_offered=lambda peer: manifest.size)
    finder.add(peers)
    return finder, owner, [clients[p.peer_id] for p in peers]


def test_two_sources_race_for_the_manifest_and_the_others_wait(unhandled):
    # Each racer fetches the whole manifest before the race is decided: the
    # sources past MANIFEST_RACERS ask only which chunks they hold, once
    # the manifest is known.
    manifest = manifest_of(3)
    _, owner, clients = four_peers(manifest)
    # Those waiting ask which chunks they hold meanwhile, nothing more.
    assert [c.asked for c in clients] == [["manifest", "have"], ["manifest", "have"],
                                          ["have"], ["have"]]
    clients[2].answer_have_all(manifest)
    assert owner.sources == []
    clients[1].answer_manifest(manifest)
    assert owner.manifests == [manifest]
    assert [c.asked for c in clients[2:]] == [["have"], ["have"]]
    assert len(owner.sources) == 1  # the one whose chunk map was in
    for client in clients[1:]:
        if client is not clients[2]:
            client.answer_have_all(manifest)
    # The loser's cancelled fetch is answered late, and dropped.
    clients[0].answer_manifest(manifest)
    clients[0].answer_have_all(manifest)
    assert len(owner.sources) == 4 and owner.over == [[]]


def test_a_racer_that_fails_gives_its_place_to_a_waiting_source(unhandled):
    manifest = manifest_of(3)
    _, owner, clients = four_peers(manifest)
    clients[0].refuse()
    assert clients[0].closed
    # Its chunk map asked while it waited, it asks for the manifest behind it.
    assert [c.asked for c in clients[2:]] == [["have", "manifest"], ["have"]]
    clients[1].refuse()
    assert [c.asked for c in clients[2:]] == [["have", "manifest"], ["have", "manifest"]]
    clients[3].answer_have_all(manifest)
    clients[3].answer_manifest(manifest)
    clients[2].answer_have_all(manifest)
    clients[2].answer_manifest(manifest)
    assert owner.manifests == [manifest] and len(owner.sources) == 2
    assert len(owner.over) == 1 and len(owner.over[0]) == 2


def test_stopped_while_sources_wait_for_the_race(unhandled):
    manifest = manifest_of(3)
    finder, owner, clients = four_peers(manifest)
    finder.stop()
    assert all(c.closed for c in clients)
    assert owner.sources == [] and owner.manifests == []


def test_sources_waiting_join_a_race_that_stalls(unhandled):
    # Two silent racers hold the download up for MANIFEST_RACE_PATIENCE at
    # most: then one more source races, and one more each time the race
    # stalls again.
    from twisted_p2p.limits import MANIFEST_RACE_PATIENCE

    manifest = manifest_of(3)
    clock = task.Clock()
    finder, owner, clients = four_peers(manifest, clock)
    clock.advance(MANIFEST_RACE_PATIENCE * 0.9)
    assert [c.asked for c in clients[2:]] == [["have"], ["have"]]
    clock.advance(MANIFEST_RACE_PATIENCE * 0.1)
    assert [c.asked for c in clients[2:]] == [["have", "manifest"], ["have"]]
    clock.advance(MANIFEST_RACE_PATIENCE)
    assert [c.asked for c in clients[2:]] == [["have", "manifest"], ["have", "manifest"]]
    clients[3].answer_have_all(manifest)
    clients[3].answer_manifest(manifest)
    assert owner.manifests == [manifest]
    finder.stop()


def test_a_race_that_gets_pages_is_not_stalled(unhandled):
    # A manifest of two pages: its first page is progress, so the sources
    # waiting go on waiting until the race has had nothing for as long.
    from twisted_p2p.limits import MANIFEST_PAGE, MANIFEST_RACE_PATIENCE

    chunks = MANIFEST_PAGE + 1
    hashes = [i.to_bytes(32, "big") for i in range(chunks)]
    size = chunks * CHUNK_SIZE
    manifest = Manifest.build(size, hashes, compute_file_id(size, (b"".join(hashes),)))
    clock = task.Clock()
    finder, owner, clients = four_peers(manifest, clock)
    clock.advance(MANIFEST_RACE_PATIENCE * 0.9)
    clients[0].answer({"t": "manifest", "id": manifest.file_id, "size": size, "start": 0,
                       "count": MANIFEST_PAGE}, b"".join(hashes[:MANIFEST_PAGE]))
    clock.advance(MANIFEST_RACE_PATIENCE * 0.99)
    assert [c.asked for c in clients[2:]] == [["have"], ["have"]]
    clock.advance(MANIFEST_RACE_PATIENCE * 0.01)
    assert [c.asked for c in clients[2:]] == [["have", "manifest"], ["have"]]
    finder.stop()
