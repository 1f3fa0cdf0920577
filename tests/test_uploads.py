"""
L{Uploads}: what the sender port answers, and the chunk streams it opens,
against a fake index, a fake connect, workers that run at once and a
Clock; and once end to end on real loopback sockets.
"""

import os
import socket
from types import SimpleNamespace

import pytest
import pytest_twisted
from support import SyncWorkers, pull, result_of, sent_frames, shared_file
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p import uploads as uploads_module
from twisted_p2p import wire
from twisted_p2p.client import SenderClient
from twisted_p2p.download.buffers import BufferPool
from twisted_p2p.download.requests import GetRequest, Source, SourceStream
from twisted_p2p.index import LocalFile, PartialLocal, file_signature
from twisted_p2p.limits import (
    CATALOG_PAGE_BYTES,
    DEFAULT_RUN,
    IDLE_TIMEOUT,
    MAX_CHUNKS_PER_REQUEST,
    MAX_HEADER,
    MAX_RUN,
    MAX_STREAM_QUEUE,
    MAX_STREAMS_PER_CONNECTION,
    UPLOAD_BURST,
    UPLOAD_RECLAIM_AFTER,
)
from twisted_p2p.manifest import CHUNK_SIZE, Manifest
from twisted_p2p.storage import ChunkMap
from twisted_p2p.transfer import Inbox, ReceiverEndpoint, ReceiverFactory, RequestRefused
from twisted_p2p.transfer import SenderFactory
from twisted_p2p.transfer.streams import StreamConnection
from twisted_p2p.uploads import TokenBucket, Uploads
from twisted_p2p.workers import WorkerPool

REQUESTER = "192.0.2.2"
TOKEN = "ab" * 16
OTHER_TOKEN = "cd" * 16
REVISION = "0123456789abcdef"


class FakeIndex:
    def __init__(self, files):
        self._files = list(files)
        self._partials = {}
        self.rescans = 0
        self.revision = REVISION

    def files(self):
        return sorted(self._files, key=lambda f: f.name)

    def by_id(self, file_id):
        for f in self._files:
            if f.file_id == file_id:
                return f
        return None

    def partials(self):
        return sorted(self._partials.values(), key=lambda p: p.name)

    def partial_by_id(self, file_id):
        return self._partials.get(file_id)

    def rescan(self):
        self.rescans += 1


class FakeConnect:
    """
    C{connect(host, port, protocol)}, recording each call and giving a
    Deferred that L{connect_back} fires.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, host, port, protocol):
        d = defer.Deferred()
        self.calls.append(SimpleNamespace(host=host, port=port, protocol=protocol, d=d))
        return d


def connect_back(connect, i=-1):
    """
    The data connection of C{connect}'s call C{i} is made: its transport.
    """
    call = connect.calls[i]
    transport = StringTransport()
    call.protocol.makeConnection(transport)
    call.d.callback(call.protocol)
    return transport


class Peer:
    """
    Everything L{Uploads} is given, as fakes, the L{Uploads}, and a session
    of one request connection from L{REQUESTER}.
    """

    def __init__(self, files, max_uploads=2, max_rate=None, clock=None):
        self.index = FakeIndex(files)
        self.connect = FakeConnect()
        self.clock = clock or task.Clock()
        self.events = []
        self.uploads = Uploads(
            self.index, self.connect, defer.maybeDeferred, SyncWorkers(), self.clock,
            max_uploads=max_uploads, max_rate=max_rate, publish=self.events.append,
        )
        self.keepalives = 0
        self.session = self.new_session()

    def new_session(self):
        return self.uploads.session(REQUESTER, self._kept_alive)

    def _kept_alive(self):
        self.keepalives += 1

    def handle(self, header, session=None):
        return self.uploads.handle(header, session or self.session)

    def stream(self, local, chunks, token=TOKEN, session=None, **extra):
        """
        A get of C{chunks} answered, its data connection made: the transport.
        """
        d = self.handle(get(local.file_id, chunks, token=token, **extra), session)
        transport = connect_back(self.connect)
        assert result_of(d) == ({"t": "sending", "token": token}, b"")
        return transport


@pytest.fixture
def files(tmp_path):
    """
    Three shared files (as L{LocalFile}s): three.bin, empty.txt, five.bin.
    """
    three, _ = shared_file(str(tmp_path), "three.bin", 2 * CHUNK_SIZE + 100, seed=3)
    empty, _ = shared_file(str(tmp_path), "empty.txt", 0)
    five, _ = shared_file(str(tmp_path), "five.bin", 4 * CHUNK_SIZE + 1, seed=5)
    return [three, empty, five]


@pytest.fixture
def peer(files):
    return Peer(files)


def get(file_id, chunks, port=5555, token=TOKEN, **extra):
    return wire.request("get", id=file_id, chunks=chunks, port=port, token=token, **extra)


def cancel(chunks, token=TOKEN):
    return wire.request("cancel", token=token, chunks=chunks)


def content_of(local):
    with open(local.path, "rb") as f:
        return f.read()


def chunk_runs(transport):
    return [(h["i"], h.get("n", 1)) for h, _ in sent_frames(transport) if h["t"] == "chunk"]


def chunk_bytes(transport):
    return sum(len(body) for header, body in sent_frames(transport) if header["t"] == "chunk")


# -- catalog and manifest ----------------------------------------------------------


def test_catalog_lists_every_file(peer, files):
    three, empty, five = files
    assert peer.handle(wire.request("catalog")) == (
        {
            "t": "catalog",
            "rev": REVISION,
            "start": 0,
            "total": 3,
            "files": [
                {"id": empty.file_id, "name": "empty.txt", "size": 0},
                {"id": five.file_id, "name": "five.bin", "size": 4 * CHUNK_SIZE + 1},
                {"id": three.file_id, "name": "three.bin", "size": 2 * CHUNK_SIZE + 100},
            ],
        },
        b"",
    )


def test_catalog_is_capped(peer, monkeypatch):
    monkeypatch.setattr(uploads_module, "MAX_CATALOG_FILES", 2)
    header, _ = peer.handle(wire.request("catalog"))
    assert [f["name"] for f in header["files"]] == ["empty.txt", "five.bin"]
    assert header["total"] == 2


def many_files(count, name_of=lambda i: f"file {i:05}.bin"):
    """
    Stand-ins for C{count} shared files: the catalog needs only id, name
    and size.
    """
    return [
        SimpleNamespace(file_id=f"{i:064x}", name=name_of(i), size=i) for i in range(count)
    ]


def catalog_pages(peer):
    """
    Every page of the catalog, fetched as a requester does.
    """
    pages = []
    start = 0
    while True:
        header, body = peer.handle(wire.request("catalog", start=start))
        assert body == b""
        pages.append(header)
        start += len(header["files"])
        if start >= header["total"]:
            return pages


#: The longest legal name with the longest JSON: 2-byte UTF-8 characters,
#: each escaped to six bytes.
WIDE_NAME = "\u00e9" * 121


@pytest.mark.parametrize(
    "name_of",
    [
        pytest.param(lambda i: f"file {i:05}.bin", id="short names"),
        pytest.param(lambda i: f"{WIDE_NAME}{i:05}.bin", id="widest names"),
    ],
)
def test_catalog_in_pages_under_the_header_limit(name_of):
    assert CATALOG_PAGE_BYTES <= MAX_HEADER // 2
    shared = many_files(2000, name_of)
    assert len(shared[0].name.encode("utf-8")) <= 255
    pages = catalog_pages(Peer(shared))
    assert len(pages) > 1
    for page in pages:
        assert page["rev"] == REVISION and page["total"] == 2000
        assert page["files"]
        # Far under the limit, so a future field or two still fits.
        assert len(wire.encode_frame(page)) <= CATALOG_PAGE_BYTES + 256
    listed = [entry for page in pages for entry in page["files"]]
    assert [e["name"] for e in listed] == sorted(f.name for f in shared)
    assert [page["start"] for page in pages] == [
        sum(len(p["files"]) for p in pages[:i]) for i in range(len(pages))
    ]


@pytest.mark.parametrize(
    "name",
    [
        "plain.bin",
        "a folder/and a file.txt",
        'quote "d".txt',
        "back\\slash",
        "tab\there",
        "del\x7fhere",
        "caf\u00e9",
        "\u65e5\u672c\u8a9e.txt",
        "astral \U0001f600.png",
        "",
    ],
)
@pytest.mark.parametrize("partial", [False, True])
def test_a_catalog_entry_is_sized_as_it_is_encoded(name, partial):
    # As the page's JSON holds it, and a byte for the comma (the frame's
    # newline, in its place).
    entry = {"id": "ab" * 32, "name": name, "size": 1234567}
    if partial:
        entry["partial"] = True
    assert uploads_module.catalog_entry_bytes(entry) == len(wire.encode_frame(entry))


def test_every_character_is_sized_as_it_is_encoded():
    for code in [*range(0x300), 0x2028, 0xFFFD, 0x10000, 0x10FFFF]:
        entry = {"id": "cd" * 32, "name": f"a{chr(code)}b", "size": code}
        assert uploads_module.catalog_entry_bytes(entry) == len(wire.encode_frame(entry)), code


def test_catalog_page_holds_at_least_one_entry(monkeypatch):
    monkeypatch.setattr(uploads_module, "CATALOG_PAGE_BYTES", 1)
    assert [len(page["files"]) for page in catalog_pages(Peer(many_files(3)))] == [1, 1, 1]


def test_catalog_pages_run_on_into_partial_downloads(files, partial, monkeypatch):
    monkeypatch.setattr(uploads_module, "CATALOG_PAGE_BYTES", 1)
    peer = Peer(files[:2])
    peer.index._partials[partial.file_id] = partial
    pages = catalog_pages(peer)
    assert [(p["start"], p["total"]) for p in pages] == [(0, 3), (1, 3), (2, 3)]
    assert pages[2]["files"] == [
        {"id": partial.file_id, "name": "five.bin", "size": partial.size, "partial": True}
    ]


def test_catalog_page_at_the_end_is_empty(peer):
    header, _ = peer.handle(wire.request("catalog", start=3))
    assert (header["start"], header["total"], header["files"]) == (3, 3, [])


@pytest.mark.parametrize("start", [-1, 4, True, "0", None, 1.0])
def test_catalog_page_start_out_of_range(peer, start):
    with pytest.raises(wire.ProtocolError):
        peer.handle(wire.request("catalog", start=start))


def test_manifest_in_pages(peer, files, monkeypatch):
    monkeypatch.setattr(uploads_module, "MANIFEST_PAGE", 2)
    five = files[2]
    hashes = five.manifest.chunk_hashes
    assert len(hashes) == 5
    pages = [peer.handle(wire.request("manifest", id=five.file_id, start=s)) for s in (0, 2, 4, 5)]
    common = {"t": "manifest", "id": five.file_id, "size": 4 * CHUNK_SIZE + 1}
    assert pages == [
        (dict(common, start=0, count=2), hashes[0] + hashes[1]),
        (dict(common, start=2, count=2), hashes[2] + hashes[3]),
        (dict(common, start=4, count=1), hashes[4]),
        (dict(common, start=5, count=0), b""),
    ]


def test_manifest_of_an_empty_file(peer, files):
    empty = files[1]
    assert peer.handle(wire.request("manifest", id=empty.file_id, start=0)) == (
        {"t": "manifest", "id": empty.file_id, "size": 0, "start": 0, "count": 0},
        b"",
    )


@pytest.mark.parametrize("start", [-1, 6, True, "0", None, 2.0])
def test_manifest_start_out_of_range(peer, files, start):
    with pytest.raises(wire.ProtocolError):
        peer.handle(wire.request("manifest", id=files[2].file_id, start=start))


def test_manifest_of_an_unknown_file(peer):
    with pytest.raises(RequestRefused) as e:
        peer.handle(wire.request("manifest", id="f" * 64, start=0))
    assert e.value.code == "unknown-file"


@pytest.mark.parametrize("file_id", ["F" * 64, "f" * 63, "", 7, None])
def test_manifest_of_a_malformed_id(peer, file_id):
    with pytest.raises(wire.ProtocolError):
        peer.handle(wire.request("manifest", id=file_id, start=0))


@pytest.mark.parametrize("version", [2, 0, None, "1", True, 1.0])
def test_wrong_version_is_refused(peer, version):
    with pytest.raises(wire.WrongVersion):
        peer.handle({"t": "catalog", "v": version})


def test_unknown_request(peer):
    with pytest.raises(wire.ProtocolError) as e:
        peer.handle(wire.request("distribute"))
    assert "distribute" in str(e.value)


# -- partial downloads and the "have" request ------------------------------------


@pytest.fixture
def partial(files):
    """The file five.bin as a partial download holding chunks 1 and 3."""
    five = files[2]
    chunks = ChunkMap(five.manifest.chunk_count)
    chunks.set(1)
    chunks.set(3)
    return PartialLocal("five.bin", five.manifest, five.path, chunks)


@pytest.fixture
def partial_peer(partial):
    peer = Peer([])
    peer.index._partials[partial.file_id] = partial
    return peer


def test_have_of_a_whole_file(peer, files):
    reply, body = peer.handle(wire.request("have", id=files[0].file_id, start=0))
    assert reply == {"t": "have", "id": files[0].file_id, "all": True} and body == b""


def test_have_of_a_partial_download(partial_peer, partial):
    reply, body = partial_peer.handle(wire.request("have", id=partial.file_id, start=0))
    assert reply == {"t": "have", "id": partial.file_id, "start": 0, "count": 5}
    assert body == bytes([0b00001010])


@pytest.mark.parametrize("start", [3, 5, -8, "0", None])
def test_have_with_a_bad_start(partial_peer, partial, start):
    with pytest.raises(wire.ProtocolError):
        partial_peer.handle(wire.request("have", id=partial.file_id, start=start))


def test_have_of_an_unknown_file(peer):
    with pytest.raises(RequestRefused) as e:
        peer.handle(wire.request("have", id="ab" * 32, start=0))
    assert e.value.code == "unknown-file"


def test_catalog_lists_partial_downloads(partial_peer, partial):
    reply, _ = partial_peer.handle(wire.request("catalog"))
    assert reply["files"] == [
        {"id": partial.file_id, "name": "five.bin", "size": partial.size, "partial": True}
    ]


def test_get_serves_only_verified_chunks_of_a_partial(partial_peer, partial):
    with pytest.raises(RequestRefused) as e:
        partial_peer.handle(get(partial.file_id, [1, 2]))
    assert e.value.code == "missing-chunks"
    assert partial_peer.connect.calls == []
    transport = partial_peer.stream(partial, [3, 1])
    pull(transport)
    content = content_of(partial)
    assert sent_frames(transport)[1:] == [
        ({"t": "chunk", "i": 3}, content[3 * CHUNK_SIZE : 4 * CHUNK_SIZE]),
        ({"t": "chunk", "i": 1}, content[CHUNK_SIZE : 2 * CHUNK_SIZE]),
    ]
    # A later get on the stream is checked as well.
    with pytest.raises(RequestRefused) as e:
        partial_peer.handle(get(partial.file_id, [0]))
    assert e.value.code == "missing-chunks"


# -- get: the stream of a token ------------------------------------------------------


def test_get_connects_back_only_to_the_requester(peer, files):
    three = files[0]
    # An address or host in the request is never used.
    d = peer.handle(get(three.file_id, [2, 0], host="6.6.6.6", address="6.6.6.6"))
    assert len(peer.connect.calls) == 1
    call = peer.connect.calls[0]
    assert (call.host, call.port) == (REQUESTER, 5555)
    assert isinstance(call.protocol, StreamConnection)
    assert call.protocol.stream.token == TOKEN
    assert peer.uploads.active == 1
    assert not d.called  # "sending" once the data connection is open
    connect_back(peer.connect)
    assert result_of(d) == ({"t": "sending", "token": TOKEN}, b"")


def test_get_streams_the_chunks_and_the_stream_stays_open(peer, files):
    three = files[0]
    transport = peer.stream(three, [2, 0])
    pull(transport)
    content = content_of(three)
    assert sent_frames(transport) == [
        ({"t": "hello", "v": 1, "token": TOKEN}, b""),
        ({"t": "chunk", "i": 2}, content[2 * CHUNK_SIZE :]),
        ({"t": "chunk", "i": 0}, content[:CHUNK_SIZE]),
    ]
    # No "done": the stream waits for more gets until the requester is gone.
    assert not transport.disconnecting
    assert peer.uploads.active == 1
    assert peer.keepalives > 0
    assert [e["event"] for e in peer.events] == ["upload-started"]


def test_a_second_get_of_the_token_reuses_the_stream(peer, files):
    five = files[2]
    transport = peer.stream(five, [0])
    pull(transport)
    # Answered at once: the stream is there.
    assert peer.handle(get(five.file_id, [1, 2])) == ({"t": "sending", "token": TOKEN}, b"")
    assert peer.handle(get(five.file_id, [4])) == ({"t": "sending", "token": TOKEN}, b"")
    pull(transport)
    assert len(peer.connect.calls) == 1
    assert chunk_runs(transport) == [(0, 1), (1, 2), (4, 1)]
    assert peer.uploads.active == 1


def test_a_get_names_the_run_its_stream_sends(peer, files):
    five = files[2]
    transport = peer.stream(five, [0, 1, 2], run=2)
    assert peer.handle(get(five.file_id, [3, 4], run=2))[0]["t"] == "sending"
    pull(transport)
    assert chunk_runs(transport) == [(0, 2), (2, 2), (4, 1)]


def test_under_an_upload_cap_frames_are_what_the_cap_sends_in_an_eighth_of_a_second(files):
    peer = Peer(files, max_rate=8 * CHUNK_SIZE)  # a chunk an eighth of a second
    five = files[2]
    transport = peer.stream(five, [0, 1, 2, 3, 4], run=MAX_RUN)
    for _ in range(40):
        pull(transport)
        peer.clock.advance(0.1)
    assert chunk_runs(transport) == [(i, 1) for i in range(5)]


def test_a_get_without_a_run_is_sent_runs_of_the_default(peer, files):
    five = files[2]
    transport = peer.stream(five, [0, 1, 2, 3, 4])
    pull(transport)
    assert chunk_runs(transport) == [(0, DEFAULT_RUN), (DEFAULT_RUN, 1)]


@pytest.mark.parametrize("run", [0, -1, MAX_RUN + 1, True, "4", 2.0, None])
def test_a_get_with_a_bad_run_is_refused(peer, files, run):
    with pytest.raises(wire.ProtocolError):
        peer.handle(get(files[2].file_id, [0], run=run))
    assert peer.connect.calls == [] and peer.uploads.active == 0


def test_a_streams_run_does_not_change(peer, files):
    five = files[2]
    peer.stream(five, [0], run=8)
    with pytest.raises(wire.ProtocolError):
        peer.handle(get(five.file_id, [1], run=4))
    with pytest.raises(wire.ProtocolError):
        peer.handle(get(five.file_id, [1]))  # the default, then
    assert peer.handle(get(five.file_id, [1], run=8))[0]["t"] == "sending"


def test_a_second_get_is_served_even_at_the_upload_cap(files):
    peer = Peer(files, max_uploads=1)
    five = files[2]
    peer.stream(five, [0])
    with pytest.raises(RequestRefused) as e:
        peer.handle(get(five.file_id, [1], token=OTHER_TOKEN))
    assert e.value.code == "busy"
    assert peer.handle(get(five.file_id, [1]))[0]["t"] == "sending"


def test_each_token_has_its_own_stream(peer, files):
    three, _, five = files
    one = peer.stream(five, [0, 1])
    two = peer.stream(three, [0, 1], token=OTHER_TOKEN)
    pull(one)
    pull(two)
    assert len(peer.connect.calls) == 2
    assert [h.get("token") for h, _ in sent_frames(one)[:1] + sent_frames(two)[:1]] == [
        TOKEN, OTHER_TOKEN,
    ]
    assert chunk_runs(one) == chunk_runs(two) == [(0, 2)]


def test_a_token_belongs_to_its_request_connection(files):
    """
    The same token on another request connection is another stream: a
    requester cannot add chunks to (or cancel them from) another's stream.
    """
    peer = Peer(files)
    five = files[2]
    peer.stream(five, [0])
    other = peer.new_session()
    nothing = ({"t": "cancelled", "token": TOKEN, "chunks": []}, b"")
    assert peer.handle(cancel([0]), other) == nothing
    peer.stream(five, [0], session=other)
    assert len(peer.connect.calls) == 2


@pytest.mark.parametrize(
    "change",
    [{"port": 5556}, {"file": 0}],
    ids=["another port", "another file"],
)
def test_a_stream_carries_one_file_to_one_port(peer, files, change):
    five = files[2]
    peer.stream(five, [0])
    header = get(files[change.get("file", 2)].file_id, [1], port=change.get("port", 5555))
    with pytest.raises(wire.ProtocolError):
        peer.handle(header)


def test_at_most_a_few_streams_per_request_connection(files):
    peer = Peer(files, max_uploads=100)
    five = files[2]
    tokens = [f"{n:032x}" for n in range(MAX_STREAMS_PER_CONNECTION + 1)]
    for token in tokens[:-1]:
        peer.stream(five, [0], token=token)
    with pytest.raises(wire.ProtocolError):
        peer.handle(get(five.file_id, [0], token=tokens[-1]))
    assert len(peer.connect.calls) == MAX_STREAMS_PER_CONNECTION
    # Another connection may have its own.
    peer.stream(five, [0], token=tokens[-1], session=peer.new_session())


def test_streams_that_ended_do_not_count_against_the_connection(files):
    """
    A requester opens a new stream when one ends (stalled, closed early in
    the endgame, a changed file), on the same request connection: the cap
    is on streams open at once, and the ended ones are not kept for ever.
    """
    peer = Peer(files, max_uploads=100)
    five = files[2]
    for round in range(5):
        tokens = [f"{round:016x}{n:016x}" for n in range(MAX_STREAMS_PER_CONNECTION)]
        for token in tokens:
            peer.stream(five, [0], token=token)
        for call in peer.connect.calls[-MAX_STREAMS_PER_CONNECTION:]:
            call.protocol.connectionLost(Failure(ConnectionDone()))
        with pytest.raises(RequestRefused) as e:
            peer.handle(get(five.file_id, [1], token=tokens[0]))
        assert e.value.code == "stream-closed"
    assert len(peer.session.streams) <= 2 * MAX_STREAMS_PER_CONNECTION
    assert peer.uploads.active == 0


def test_at_most_max_stream_queue_chunks_wait_on_a_stream(tmp_path):
    """
    With a (sparse) file of more chunks than that: asks past the queue's
    limit are a protocol error; once chunks went out, more may be asked.
    """
    count = MAX_STREAM_QUEUE + MAX_CHUNKS_PER_REQUEST
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(count * CHUNK_SIZE)
    manifest = Manifest.build(count * CHUNK_SIZE, [bytes(32)] * count)
    local = LocalFile("sparse.bin", str(tmp_path), manifest, file_signature(os.stat(path)))
    peer = Peer([local])
    asks = [list(range(n, n + MAX_CHUNKS_PER_REQUEST))
            for n in range(0, MAX_STREAM_QUEUE, MAX_CHUNKS_PER_REQUEST)]
    transport = peer.stream(local, asks[0])
    for chunks in asks[1:]:
        peer.handle(get(local.file_id, chunks))
    with pytest.raises(wire.ProtocolError):
        peer.handle(get(local.file_id, [MAX_STREAM_QUEUE]))
    transport.producer.resumeProducing()  # a batch goes out
    assert peer.handle(get(local.file_id, [MAX_STREAM_QUEUE]))[0]["t"] == "sending"


def test_a_get_on_an_ended_stream_is_refused(peer, files):
    five = files[2]
    peer.stream(five, [0])
    peer.connect.calls[0].protocol.connectionLost(Failure(ConnectionDone()))
    assert peer.uploads.active == 0
    with pytest.raises(RequestRefused) as e:
        peer.handle(get(five.file_id, [1]))
    assert e.value.code == "stream-closed"


# -- the end of streams --------------------------------------------------------------


def test_streams_end_with_their_request_connection(peer, files):
    three, _, five = files
    one = peer.stream(five, [0, 1])
    two = peer.stream(three, [2], token=OTHER_TOKEN)
    pull(one)
    pull(two)
    assert peer.uploads.active == 2
    peer.session.close()
    assert one.disconnecting and two.disconnecting
    assert peer.uploads.active == 0
    assert peer.uploads.bytes_sent == 2 * CHUNK_SIZE + 100
    finished = [e for e in peer.events if e["event"] == "upload-finished"]
    assert sorted((e["file"], e["bytes"]) for e in finished) == [
        ("five.bin", 2 * CHUNK_SIZE), ("three.bin", 100),
    ]
    assert all(e["peer"] == f"{REQUESTER}:5555" for e in finished)


def test_a_request_connection_closed_while_its_stream_connects(peer, files):
    five = files[2]
    d = peer.handle(get(five.file_id, [0]))
    peer.session.close()
    transport = connect_back(peer.connect)
    assert transport.disconnecting
    assert transport.value() == b""
    assert peer.uploads.active == 0
    assert [e["event"] for e in peer.events] == ["upload-started", "upload-finished"]
    d.addErrback(lambda f: None)


def test_a_stream_ended_frees_its_upload_place(peer, files):
    five = files[2]
    peer.stream(five, [0])
    peer.stream(five, [1], token=OTHER_TOKEN)
    with pytest.raises(RequestRefused) as e:
        peer.handle(get(five.file_id, [2], token="ef" * 16))
    assert e.value.code == "busy"
    assert len(peer.connect.calls) == 2
    peer.connect.calls[0].protocol.connectionLost(Failure(ConnectionDone()))
    assert peer.uploads.active == 1
    peer.stream(five, [2], token="ef" * 16)
    assert len(peer.connect.calls) == 3


def test_a_stream_whose_requester_does_not_read_gives_its_slot_to_a_new_one(files):
    peer = Peer(files, max_uploads=1)
    five = files[2]
    stalled = peer.stream(five, [0, 1, 2])  # never read: nothing is pulled
    peer.clock.advance(UPLOAD_RECLAIM_AFTER - 1)
    with pytest.raises(RequestRefused) as e:
        peer.handle(get(five.file_id, [1], token=OTHER_TOKEN))
    assert e.value.code == "busy"  # not stalled long enough yet
    peer.clock.advance(1)
    fresh = peer.stream(five, [1], token=OTHER_TOKEN)
    assert stalled.disconnecting
    assert peer.uploads.reclaimed == 1
    assert peer.uploads.active == 1
    pull(fresh)
    assert chunk_runs(fresh) == [(1, 1)]


def test_one_address_holds_at_most_its_share_of_the_slots(files):
    peer = Peer(files, max_uploads=32)
    five = files[2]
    share = peer.uploads.max_per_host
    assert share == 8
    sessions = [peer.new_session() for _ in range(share // 4 + 1)]
    tokens = iter(f"{n:032x}" for n in range(1, 100))
    for n in range(share):
        peer.stream(five, [0], token=next(tokens), session=sessions[n // 4])
    with pytest.raises(RequestRefused) as e:
        peer.handle(get(five.file_id, [0], token=next(tokens)), sessions[-1])
    assert e.value.code == "busy" and "share" in e.value.message
    # Another address is served: most slots are left to the others.
    other = peer.uploads.session("192.0.2.99")
    peer.stream(five, [0], token=next(tokens), session=other)
    assert peer.uploads.active == share + 1


def test_a_stream_that_drains_keeps_its_slot(files):
    peer = Peer(files, max_uploads=1)
    five = files[2]
    reading = peer.stream(five, list(range(5)))
    for _ in range(3):
        peer.clock.advance(UPLOAD_RECLAIM_AFTER - 1)
        reading.producer.resumeProducing()  # a little goes out each time
        with pytest.raises(RequestRefused) as e:
            peer.handle(get(five.file_id, [1], token=OTHER_TOKEN))
        assert e.value.code == "busy"
    assert peer.uploads.reclaimed == 0


def test_a_stream_held_back_by_our_own_rate_keeps_its_slot(files):
    peer = Peer(files, max_uploads=1, max_rate=1024)
    five = files[2]
    transport = peer.stream(five, [0, 1, 2, 3])
    pull(transport)  # what the burst allows goes; the rest waits on our rate
    peer.clock.advance(UPLOAD_RECLAIM_AFTER * 2)
    with pytest.raises(RequestRefused) as e:
        peer.handle(get(five.file_id, [1], token=OTHER_TOKEN))
    assert e.value.code == "busy"


def test_get_unreachable_requester(peer, files):
    d = peer.handle(get(files[0].file_id, [0]))
    call = peer.connect.calls[0]
    call.d.errback(ConnectionRefusedError("refused"))
    with pytest.raises(RequestRefused) as e:
        result_of(d)
    assert e.value.code == "unreachable"
    assert f"{REQUESTER}:5555" in e.value.message
    assert peer.uploads.active == 0
    assert call.protocol.stream.ended  # its file is closed
    assert peer.events == []


# -- get: what is refused ---------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([], id="empty"),
        pytest.param([3], id="past the end"),
        pytest.param([-1], id="negative"),
        pytest.param([True], id="bool"),
        pytest.param([0, 1, 0], id="duplicate"),
        pytest.param([1.0], id="float"),
        pytest.param(["0"], id="string"),
        pytest.param([None], id="null"),
        pytest.param("0,1", id="not a list"),
        pytest.param(None, id="missing"),
        pytest.param(list(range(MAX_CHUNKS_PER_REQUEST + 1)), id="too many"),
    ],
)
def test_get_bad_chunk_list(peer, files, chunks):
    with pytest.raises(wire.ProtocolError):
        peer.handle(get(files[0].file_id, chunks))
    assert peer.connect.calls == []
    assert peer.uploads.active == 0


def test_get_too_many_chunks(peer, files, monkeypatch):
    monkeypatch.setattr(uploads_module, "MAX_CHUNKS_PER_REQUEST", 2)
    with pytest.raises(wire.ProtocolError) as e:
        peer.handle(get(files[0].file_id, [0, 1, 2]))
    assert "too many" in str(e.value)
    assert peer.connect.calls == []


def test_a_chunk_asked_again_on_its_stream_before_it_went(peer, files):
    five = files[2]
    peer.stream(five, [0, 1])  # not pulled: nothing sent yet
    with pytest.raises(wire.ProtocolError):
        peer.handle(get(five.file_id, [1, 2]))


def test_get_of_an_empty_file_is_out_of_range(peer, files):
    with pytest.raises(wire.ProtocolError):
        peer.handle(get(files[1].file_id, [0]))


@pytest.mark.parametrize(
    "fields",
    [
        {"port": 0},
        {"port": 65536},
        {"port": "5555"},
        {"port": True},
        {"token": "short"},
        {"token": "AB" * 16},
        {"token": None},
    ],
)
def test_get_bad_port_or_token(peer, files, fields):
    header = get(files[0].file_id, [0])
    header.update(fields)
    with pytest.raises(wire.ProtocolError):
        peer.handle(header)
    assert peer.connect.calls == []
    assert peer.uploads.active == 0


def test_get_unknown_file(peer):
    with pytest.raises(RequestRefused) as e:
        peer.handle(get("e" * 64, [0]))
    assert e.value.code == "unknown-file"
    assert peer.connect.calls == []


# -- cancel ---------------------------------------------------------------------------


def test_cancel_takes_queued_chunks_off_the_stream(peer, files):
    five = files[2]
    transport = peer.stream(five, [0, 1, 2, 4])
    assert peer.handle(cancel([4, 1, 3])) == (
        {"t": "cancelled", "token": TOKEN, "chunks": [4, 1]}, b"",
    )
    pull(transport)
    assert chunk_runs(transport) == [(0, 1), (2, 1)]
    assert peer.handle(cancel([0])) == ({"t": "cancelled", "token": TOKEN, "chunks": []}, b"")


def test_cancel_of_an_unknown_token_takes_nothing(peer):
    assert peer.handle(cancel([0], token=OTHER_TOKEN)) == (
        {"t": "cancelled", "token": OTHER_TOKEN, "chunks": []}, b"",
    )


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(cancel([1.0]), id="a float"),
        pytest.param(cancel([True]), id="a bool"),
        pytest.param(cancel(["1"]), id="a string"),
        pytest.param(cancel("1"), id="not a list"),
        pytest.param(cancel(list(range(MAX_STREAM_QUEUE + 1))), id="too many"),
        pytest.param(cancel([1], token="nope"), id="a bad token"),
        pytest.param(wire.request("cancel", token=TOKEN), id="no chunks"),
    ],
)
def test_a_bad_cancel_is_a_protocol_error(peer, files, header):
    peer.stream(files[2], [0, 1])
    with pytest.raises(wire.ProtocolError):
        peer.handle(header)


# -- files that change ------------------------------------------------------------------


def test_a_file_changed_before_it_is_served_is_indexed_again(peer, files):
    three = files[0]
    with open(three.path, "r+b") as f:
        f.write(b"changed")
    os.utime(three.path, ns=(1, 1))
    with pytest.raises(RequestRefused) as e:
        result_of(peer.handle(get(three.file_id, [0, 1])))
    assert e.value.code == "unknown-file"
    assert peer.index.rescans == 1
    assert peer.connect.calls == []
    assert peer.uploads.active == 0


def test_a_file_gone_before_it_is_served(peer, files):
    os.remove(files[0].path)
    with pytest.raises(RequestRefused) as e:
        result_of(peer.handle(get(files[0].file_id, [0])))
    assert e.value.code == "internal"
    assert peer.uploads.active == 0


def test_a_file_changed_mid_stream_is_indexed_again(tmp_path):
    forty, _ = shared_file(str(tmp_path), "forty.bin", 40 * CHUNK_SIZE, seed=40)
    peer = Peer([forty])
    transport = peer.stream(forty, list(range(40)))
    transport.producer.resumeProducing()  # one batch
    sent = chunk_bytes(transport)
    assert 0 < sent < forty.size
    with open(forty.path, "ab") as f:
        f.write(b"more")
    pull(transport)
    assert transport.disconnecting
    assert peer.index.rescans == 1
    assert peer.uploads.active == 0
    assert chunk_bytes(transport) == sent
    assert peer.events[-1]["event"] == "upload-finished"
    assert peer.events[-1]["bytes"] == sent
    with pytest.raises(RequestRefused) as e:
        peer.handle(get(forty.file_id, [39]))
    assert e.value.code == "stream-closed"


# -- the upload rate -----------------------------------------------------------------------


def test_every_stream_shares_one_upload_rate(files):
    clock = task.Clock()
    clock.advance(100)
    rate = 2 * CHUNK_SIZE  # bytes per second, for the whole peer
    peer = Peer(files, max_rate=rate, clock=clock)
    five = files[2]
    one = peer.stream(five, [0, 1, 2, 3, 4])
    two = peer.stream(five, [0, 1, 2, 3, 4], token=OTHER_TOKEN, session=peer.new_session())
    for transport in (one, two):
        transport.producer.resumeProducing()
    for second in range(12):
        sent = chunk_bytes(one) + chunk_bytes(two)
        # Never more than the rate allows (plus one burst), never far less.
        assert sent <= rate * second + UPLOAD_BURST
        assert sent >= min(rate * second - 4 * CHUNK_SIZE, 2 * five.size)
        clock.advance(1)
        pull(one)
        pull(two)
    assert chunk_bytes(one) == chunk_bytes(two) == five.size


def test_a_stream_stopped_while_waiting_for_the_rate_leaves_nothing_behind(files):
    peer = Peer(files, max_rate=1024)
    transport = peer.stream(files[2], [0, 1, 2])
    transport.producer.resumeProducing()
    assert peer.clock.getDelayedCalls()
    peer.connect.calls[-1].protocol.connectionLost(Failure(ConnectionDone()))
    assert peer.clock.getDelayedCalls() == []
    assert peer.uploads.active == 0


def test_a_stream_not_read_is_dropped(peer, files):
    transport = peer.stream(files[2], [0, 1, 2, 3, 4])
    peer.clock.advance(IDLE_TIMEOUT)
    assert transport.disconnected
    assert peer.uploads.active == 0


def fired_at(clock, d):
    times = []
    d.addCallback(lambda _: times.append(clock.seconds()))
    return times


def test_token_bucket_lets_a_burst_through_then_paces():
    clock = task.Clock()
    clock.advance(100)
    bucket = TokenBucket(1000, clock, burst=500)
    assert bucket.take(500).called
    second = fired_at(clock, bucket.take(500))
    third = fired_at(clock, bucket.take(1000))
    assert second == [] and third == []
    clock.advance(0.5)
    assert second == [100.5] and third == []
    clock.advance(1.0)
    assert third == [101.5]
    # After a quiet spell the burst is there again, but no more than it.
    clock.advance(10)
    assert bucket.take(500).called
    assert not bucket.take(1).called


def test_token_bucket_wait_can_be_cancelled():
    clock = task.Clock()
    bucket = TokenBucket(1000, clock, burst=0)
    d = bucket.take(100)
    d.addErrback(lambda f: None)
    d.cancel()
    assert clock.getDelayedCalls() == []


def test_token_bucket_needs_a_rate():
    with pytest.raises(ValueError):
        TokenBucket(0, task.Clock())


# -- end to end, on real loopback sockets -------------------------------------------------


class Owner:
    """
    A download as its L{SourceStream}s see it: it records what arrives and
    the cancels answered, and can keep its data connections from being read.
    """

    def __init__(self):
        self.buffers = BufferPool()
        self.arrived = []
        self.attached = []
        self.lost = []
        self.withdrawn = []
        self.refused = []
        self.hold = False

    def stream_attached(self, stream):
        self.attached.append(stream)
        if self.hold:
            # A small receive buffer (no autotuning): the sender's socket
            # fills at once.
            handle = stream.connection.transport.getHandle()
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            stream.connection.pause()

    def chunks_arrived(self, stream, first, arrived, buffer, opener=None):
        for index, _ in arrived:
            offset = (index - first) * CHUNK_SIZE
            self.arrived.append((index, bytes(buffer[offset : offset + CHUNK_SIZE])))
        self.buffers.give_back(buffer)

    def stream_lost(self, stream, reason):
        self.lost.append(reason)

    def get_refused(self, stream, request, failure):
        self.refused.append(failure)

    def cancel_answered(self, stream, withdrawn, coming=()):
        self.withdrawn.extend(index for _, index in withdrawn)


async def wait_for(reactor, condition, timeout=20.0):
    waited = 0.0
    while not condition():
        assert waited < timeout, "condition not met in time"
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


@pytest_twisted.ensureDeferred
async def test_end_to_end_on_loopback(tmp_path):
    """
    A requester asks a real sender port on 127.0.0.1 for chunks: they come
    on one data connection to its real receiver port, by sendfile and
    recv_into, for two gets; a cancel takes off chunks still queued; the
    data connection ends with the request connection.
    """
    from twisted.internet import reactor

    count = 128
    local, content = shared_file(str(tmp_path), "big.bin", count * CHUNK_SIZE, seed=128)
    workers = WorkerPool(reactor, 2, "test-uploads")

    def connect(host, port, protocol):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=5)
        return endpoint.connect(Factory.forProtocol(lambda: protocol))

    uploads = Uploads(FakeIndex([local]), connect, defer.maybeDeferred, workers, reactor)
    inbox = Inbox()
    receiver_factory = ReceiverFactory(inbox)
    built = []
    real_build = receiver_factory.buildProtocol
    receiver_factory.buildProtocol = lambda addr: built.append(addr) or real_build(addr)
    receiver_port = await ReceiverEndpoint(reactor, 0, interface="127.0.0.1").listen(
        receiver_factory
    )
    from twisted.internet.endpoints import TCP4ServerEndpoint

    sender_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        SenderFactory(uploads)
    )
    try:
        client = await connect("127.0.0.1", sender_port.getHost().port, SenderClient())
        owner = Owner()
        owner.hold = True  # the socket fills; the later chunks stay queued
        source = Source(SimpleNamespace(host="127.0.0.1", label="seeder", peer_id="s" * 32),
                        client)
        stream = SourceStream(owner, source, local.manifest, local.file_id,
                              receiver_port.getHost().port, reactor)
        inbox.expect(stream)
        first, second = list(range(64)), list(range(64, 128))
        stream.ask(GetRequest(stream, first))
        stream.ask(GetRequest(stream, second))
        await wait_for(reactor, lambda: owner.attached)
        stream.cancel([124, 125, 126, 127])
        await wait_for(reactor, lambda: owner.withdrawn)
        assert sorted(owner.withdrawn) == [124, 125, 126, 127]
        stream.connection.resume()
        await wait_for(reactor, lambda: len(owner.arrived) == 124)
        assert stream.outstanding == {}
        assert [index for index, _ in owner.arrived] == list(range(124))
        assert all(data == content[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
                   for i, data in owner.arrived)
        assert len(built) == 1  # one data connection for both gets
        assert owner.refused == []
        assert uploads.active == 1
        client.close()
        await wait_for(reactor, lambda: owner.lost)
        await wait_for(reactor, lambda: uploads.active == 0)
        assert uploads.bytes_sent == 124 * CHUNK_SIZE
    finally:
        await sender_port.stopListening()
        await receiver_port.stopListening()
        await workers.stop()
