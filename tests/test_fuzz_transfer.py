"""
Fuzzing the framed transfer protocols (issue 11): the sender port's
requests answered by a real L{Uploads}, the answers a requester parses
(catalog, manifest and chunk-map pages), and the chunk frames of a data
connection read by a real L{SourceStream}.  Fed whole and one byte at a
time; nothing may raise but the documented errors, the sender never
answers C{internal} (a request that makes it fail is a bug), and what is
buffered stays bounded.
"""

import os
import tempfile
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SyncWorkers, frame, sent_frames, shared_file
from test_receiver import CONTENT, MANIFEST, Owner, RequestConnection, receiver
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport

from twisted_p2p import wire
from twisted_p2p.client import (
    CatalogChanged,
    PeerRefused,
    fetch_catalog,
    fetch_have,
    fetch_manifest,
)
from twisted_p2p.download.requests import GetRequest, Source, SourceStream
from twisted_p2p.index import PartialLocal
from twisted_p2p.limits import CHUNK_SIZE, MAX_FILE_SIZE, MAX_HEADER, MAX_RUN
from twisted_p2p.manifest import ManifestMismatch
from twisted_p2p.storage import ChunkMap
from twisted_p2p.transfer import RequestRefused, SenderFactory
from twisted_p2p.uploads import Uploads

REQUESTER = "192.0.2.2"
REVISION = "0123456789abcdef"

_folder = tempfile.mkdtemp(prefix="fuzz-transfer-")
WHOLE, _ = shared_file(_folder, "whole.bin", 3 * CHUNK_SIZE + 7, seed=1)
_half, _ = shared_file(_folder, "half.bin", 20 * CHUNK_SIZE + 1, seed=2)
_chunks = ChunkMap(_half.manifest.chunk_count)
for _i in range(0, _half.manifest.chunk_count, 3):
    _chunks.set(_i)
PARTIAL = PartialLocal("half.bin", _half.manifest, os.path.join(_folder, "half.bin"), _chunks)


class _Index:
    revision = REVISION

    def files(self):
        return [WHOLE]

    def partials(self):
        return [PARTIAL]

    def by_id(self, file_id):
        return WHOLE if file_id == WHOLE.file_id else None

    def partial_by_id(self, file_id):
        return PARTIAL if file_id == PARTIAL.file_id else None

    def rescan(self):
        pass


def _uploads():
    connects = []

    def connect(host, port, protocol):
        # Connecting back waits until the test gives up on it, as the
        # service's connect does after CONNECT_TIMEOUT.
        d = defer.Deferred()
        connects.append(d)
        return d

    uploads = Uploads(_Index(), connect, defer.maybeDeferred, SyncWorkers(), task.Clock(),
                      max_uploads=2)
    return uploads, connects


# -- requests --------------------------------------------------------------------------

_ids = st.sampled_from([WHOLE.file_id, PARTIAL.file_id, "0" * 64, "x"]) | st.integers()
_anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=10,
)
_chunk_lists = st.lists(st.integers(-3, 30) | st.just(2**63) | _anything, max_size=70)

requests = st.fixed_dictionaries(
    {"t": st.sampled_from(["catalog", "manifest", "have", "get", "cancel", "hello", "x"])},
    optional={
        "v": st.sampled_from([1, 1, 1, 2, True, 1.0, "1"]),
        "id": _ids,
        "start": st.integers(-2, 40) | st.just(2**40) | _anything,
        "chunks": _chunk_lists | _anything,
        "port": st.integers(-1, 70000) | _anything,
        "token": st.sampled_from(["ab" * 16, "cd" * 16, "AB" * 16, ""]) | _anything,
        "n": _anything,
    },
)


@settings(max_examples=300)
@given(st.lists(requests, min_size=1, max_size=8))
def test_uploads_answer_any_request_or_refuse_it_as_documented(headers):
    uploads, connects = _uploads()
    session = uploads.session(REQUESTER)
    for header in headers:
        try:
            answer = uploads.handle(header, session)
        except (wire.ProtocolError, RequestRefused):
            continue
        d = defer.maybeDeferred(lambda: answer)
        failures = []
        d.addErrback(failures.append)
        for failure in failures:
            assert failure.check(wire.ProtocolError, RequestRefused), failure
    assert uploads.active <= 2
    session.close()
    for d in connects:
        d.errback(ConnectionRefusedError())
    assert uploads.active == 0


def _sender():
    uploads, connects = _uploads()
    factory = SenderFactory(uploads)
    address = IPv4Address("TCP", REQUESTER, 40000)
    protocol = factory.buildProtocol(address)
    protocol.callLater = task.Clock().callLater
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport, uploads, connects


def _conversation(data, pieces):
    protocol, transport, uploads, connects = _sender()
    for i in range(0, len(data), pieces):
        protocol.dataReceived(data[i : i + pieces])
    answers = sent_frames(transport)
    protocol.connectionLost(None)
    for d in connects:
        d.errback(ConnectionRefusedError())
    assert uploads.active == 0
    return answers, transport.disconnecting


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests, min_size=1, max_size=6))
def test_the_sender_port_answers_alike_whole_and_bytewise_and_never_fails(headers):
    data = b"".join(frame(h) for h in headers)
    answers, closed = _conversation(data, max(len(data), 1))
    assert _conversation(data, 1) == (answers, closed)
    for header, _ in answers:
        assert header.get("code") != "internal", header
    # One answer per request until the first bad one, which closes.
    assert len(answers) <= len(headers)


@given(st.binary(max_size=300))
def test_the_sender_port_survives_garbage(data):
    protocol, transport, uploads, _ = _sender()
    protocol.dataReceived(data)
    for header, _ in sent_frames(transport):
        assert header.get("code") != "internal"


def test_a_request_over_the_header_limit_closes_at_once():
    protocol, transport, _, _ = _sender()
    protocol.dataReceived((MAX_HEADER + 1).to_bytes(4, "big"))
    assert transport.disconnecting
    protocol.dataReceived(b"x" * 100_000)
    assert protocol._unprocessed == b"" or len(protocol._unprocessed) < 100


# -- answers a requester parses --------------------------------------------------------


class _Scripted:
    """
    A sender client whose answers come from a list: C{(header, body)} each.
    """

    def __init__(self, answers):
        self.answers = list(answers)
        self.asked = 0

    def call(self, header):
        self.asked += 1
        if not self.answers:
            return defer.fail(wire.ProtocolError("no more answers"))
        return defer.succeed(self.answers.pop(0))


def _outcome(coroutine):
    d = defer.ensureDeferred(coroutine)
    results = []
    d.addBoth(results.append)
    [result] = results
    if hasattr(result, "check"):
        assert result.check(wire.ProtocolError, ManifestMismatch, CatalogChanged, PeerRefused), result
        return None
    return result


_answer_fields = {
    "t": st.sampled_from(["catalog", "manifest", "have", "error"]),
    "rev": st.sampled_from([REVISION, "f" * 16]) | _anything,
    "start": st.integers(-1, 20) | _anything,
    "total": st.integers(-1, 20) | st.just(2**31) | _anything,
    "count": st.integers(-1, 9000) | _anything,
    "size": st.integers(-1, 3 * CHUNK_SIZE) | st.just(MAX_FILE_SIZE + 1) | _anything,
    "id": st.just(WHOLE.file_id) | _anything,
    "all": _anything,
    "code": _anything,
    "message": _anything,
    "files": st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "id": st.just(WHOLE.file_id) | _anything,
                "name": st.sampled_from(["a.txt", "../x", "/etc/passwd", "\x1b[2J", ""])
                | st.text(max_size=300) | _anything,
                "size": st.integers(-1, 10) | _anything,
                "partial": _anything,
            },
        ) | _anything,
        max_size=5,
    ) | _anything,
}
answers = st.lists(
    st.tuples(st.fixed_dictionaries({}, optional=_answer_fields).map(lambda h: {"t": "x", **h}),
              st.binary(max_size=200)),
    max_size=6,
)


@settings(max_examples=300)
@given(answers)
def test_a_requester_takes_any_catalog_or_refuses_it(script):
    result = _outcome(fetch_catalog(_Scripted(script)))
    if result is not None:
        revision, files = result
        for file_id, name, size in files:
            assert "/" not in name and not name.startswith(".")


@settings(max_examples=300)
@given(answers)
def test_a_requester_takes_only_the_manifest_it_asked_for(script):
    result = _outcome(fetch_manifest(_Scripted(script), WHOLE.file_id))
    if result is not None:
        assert result == WHOLE.manifest


@settings(max_examples=300)
@given(answers, st.integers(1, 20))
def test_a_requester_takes_any_chunk_map_of_the_right_size_or_refuses_it(script, count):
    result = _outcome(fetch_have(_Scripted(script), WHOLE.file_id, count))
    assert result is None or len(result) == count


def test_a_manifest_of_a_billion_chunks_is_refused_on_its_first_page():
    size = 10**9 * CHUNK_SIZE
    client = _Scripted([({"t": "manifest", "id": WHOLE.file_id, "size": size, "start": 0,
                          "count": 0}, b"")])
    assert _outcome(fetch_manifest(client, WHOLE.file_id)) is None
    assert client.asked == 1


def test_a_manifest_whose_count_does_not_fit_its_size_is_refused():
    hashes = b"".join(WHOLE.manifest.chunk_hashes)
    for count, body in ((3, hashes), (4, hashes + hashes[:32]), (4, hashes[:96])):
        client = _Scripted([({"t": "manifest", "id": WHOLE.file_id, "size": WHOLE.size,
                              "start": 0, "count": count}, body)])
        assert _outcome(fetch_manifest(client, WHOLE.file_id)) is None


# -- chunk frames on a data connection ---------------------------------------------------


def _asked(*chunks):
    owner = Owner()
    source = Source(SimpleNamespace(host="192.0.2.2", label="peer", peer_id="p" * 32),
                    RequestConnection())
    clock = task.Clock()
    stream = SourceStream(owner, source, MANIFEST, MANIFEST.file_id, 7000, clock)
    stream.ask(GetRequest(stream, chunks))
    protocol, transport, _ = receiver(stream)
    protocol.dataReceived(frame({"t": "hello", "v": 1, "token": stream.token}))
    return owner, stream, protocol, transport


chunk_frames = st.lists(
    st.tuples(
        st.fixed_dictionaries(
            {"t": st.sampled_from(["chunk", "chunk", "hello", "done"])},
            optional={"i": st.integers(-1, 4) | st.just(2**31) | _anything,
                      "n": st.integers(-1, MAX_RUN + 1) | _anything},
        ),
        st.sampled_from([0, 1, 100, CHUNK_SIZE, 2 * CHUNK_SIZE + 100]),
    ),
    min_size=1,
    max_size=5,
)


def _chunk_stream(frames):
    return b"".join(frame(h, CONTENT[:length]) for h, length in frames)


def _receive(data, pieces):
    owner, stream, protocol, transport = _asked(0, 1, 2)
    for i in range(0, len(data), pieces):
        protocol.dataReceived(data[i : i + pieces])
    arrived = [(first, chunks) for first, chunks, _ in owner.arrived]
    closed = transport.disconnecting
    protocol.connectionLost(None)
    # Every buffer handed out came back, or is the stream's to give back.
    assert owner.buffers.out == 0
    return arrived, closed


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(chunk_frames)
def test_chunk_frames_are_read_alike_whole_and_bytewise(frames):
    data = _chunk_stream(frames)
    whole = _receive(data, len(data))
    assert _receive(data, 4093) == whole
    if len(data) < 3000:
        assert _receive(data, 1) == whole


def test_a_chunk_index_out_of_range_drops_the_connection():
    for index in (3, 2**31, -1):
        owner, stream, protocol, transport = _asked(0, 1, 2)
        protocol.dataReceived(frame({"t": "chunk", "i": index}, b"x" * 100))
        assert transport.disconnecting
        assert owner.arrived == []


def test_a_truncated_chunk_is_never_delivered():
    owner, stream, protocol, transport = _asked(0)
    data = frame({"t": "chunk", "i": 0}, CONTENT[:CHUNK_SIZE])
    protocol.dataReceived(data[:-1])
    protocol.connectionLost(None)
    assert owner.arrived == []
    assert owner.buffers.out == 0


# -- the network catalog, fed what peers answer -------------------------------------------


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(
    st.tuples(
        st.integers(0, 5),  # which peer
        st.one_of(
            st.none(),  # the fetch fails
            st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["a", "b", "c"]),
                               st.integers(0, 10)), max_size=40),
        ),
        st.booleans(),  # the peer leaves afterwards
    ),
    max_size=30,
))
def test_the_network_catalog_stays_within_its_limit_whatever_peers_answer(events):
    from twisted_p2p.catalog import NetworkCatalog
    from twisted_p2p.peers import PeerTable
    from twisted_p2p.wire import Announce

    clock = task.Clock()
    table = PeerTable(clock, 30.0)
    pending = {}

    def fetch(peer):
        pending[peer.peer_id] = defer.Deferred()
        return pending[peer.peer_id]

    limit = 50
    catalog = NetworkCatalog(table, fetch, clock, max_entries=limit)
    for which, files, leaves in events:
        peer_id = f"{which:032x}"
        table.heard(Announce(peer_id, "1" * 16, 4000, f"{len(events):016x}"),
                    f"192.0.2.{which + 1}", 5000)
        d = pending.pop(peer_id, None)
        if d is not None:
            if files is None:
                d.errback(ConnectionRefusedError())
            else:
                d.callback(("r" * 16, [(f"{i:064x}", name, size) for i, name, size in files]))
        if leaves:
            table.forget(peer_id, "test")
        assert catalog._entries <= limit
        assert catalog._entries == sum(len(f) for f in catalog._files.values())
        for offer in catalog.offers():
            assert all(p.peer_id in table for p in offer.peers)
    for d in pending.values():
        d.errback(ConnectionRefusedError())
    clock.advance(120)


def test_a_liar_claiming_a_huge_manifest_costs_only_its_hashes():
    """
    A peer claims a file of 2**17 chunks (32 GiB) and sends random hashes:
    the fetch is refused, having held about 32 bytes a chunk, not the ~100
    that a list of bytes objects would.
    """
    import tracemalloc

    count = 2**17
    size = count * CHUNK_SIZE
    pages = []
    for start in range(0, count, 8192):
        pages.append(({"t": "manifest", "id": WHOLE.file_id, "size": size, "start": start,
                       "count": 8192}, os.urandom(8192 * 32)))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert _outcome(fetch_manifest(_Scripted(pages), WHOLE.file_id)) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * count * 32, peak
