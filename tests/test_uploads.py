"""
L{Uploads}: what the sender port answers, against a fake index and a fake
connect.
"""

import os
import random
import struct
from types import SimpleNamespace

import pytest
from support import result_of
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p import uploads as uploads_module
from twisted_p2p import wire
from twisted_p2p.index import LocalFile, PartialLocal
from twisted_p2p.limits import CATALOG_PAGE_BYTES, MAX_HEADER
from twisted_p2p.manifest import CHUNK_SIZE, hash_file
from twisted_p2p.storage import ChunkMap
from twisted_p2p.transfer import ChunkPusher, RequestRefused
from twisted_p2p.uploads import FileChanged, TokenBucket, Uploads, read_range

REQUESTER = "192.0.2.2"
TOKEN = "ab" * 16
REVISION = "0123456789abcdef"


def make_file(folder, name, size, seed):
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(size))
    st = os.stat(path)
    return LocalFile(name, folder, hash_file(path), (st.st_size, st.st_mtime_ns, st.st_ino))


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
    Deferred the test fires.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, host, port, protocol):
        d = defer.Deferred()
        self.calls.append((host, port, protocol, d))
        return d


def sent_frames(transport):
    data = transport.value()
    frames = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        frames.append(wire.decode_frame(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


class FakeReader:
    """
    Reads for real, synchronously, and records what was read.
    """

    def __init__(self):
        self.reads = []

    def __call__(self, path, offset, length, signature=None):
        self.reads.append((path, offset, length))
        return read_range(path, offset, length, signature)


@pytest.fixture
def files(tmp_path):
    return [
        make_file(str(tmp_path), "three.bin", 2 * CHUNK_SIZE + 100, seed=3),
        make_file(str(tmp_path), "empty.txt", 0, seed=0),
        make_file(str(tmp_path), "five.bin", 4 * CHUNK_SIZE + 1, seed=5),
    ]


@pytest.fixture
def connect():
    return FakeConnect()


@pytest.fixture
def uploads(files, connect):
    return Uploads(FakeIndex(files), connect, FakeReader(), max_uploads=2)


def get(file_id, chunks, port=5555, token=TOKEN, **extra):
    return wire.request("get", id=file_id, chunks=chunks, port=port, token=token, **extra)


# -- catalog and manifest ----------------------------------------------------------


def test_catalog_lists_every_file(uploads, files):
    three, empty, five = files
    assert uploads.handle(wire.request("catalog"), REQUESTER) == (
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


def test_catalog_is_capped(uploads, monkeypatch):
    monkeypatch.setattr(uploads_module, "MAX_CATALOG_FILES", 2)
    header, _ = uploads.handle(wire.request("catalog"), REQUESTER)
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


def catalog_pages(uploads):
    """
    Every page of the catalog, fetched as a requester does.
    """
    pages = []
    start = 0
    while True:
        header, body = uploads.handle(wire.request("catalog", start=start), REQUESTER)
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
def test_catalog_in_pages_under_the_header_limit(connect, name_of):
    assert CATALOG_PAGE_BYTES <= MAX_HEADER // 2
    shared = many_files(2000, name_of)
    assert len(shared[0].name.encode("utf-8")) <= 255
    uploads = Uploads(FakeIndex(shared), connect, FakeReader())
    pages = catalog_pages(uploads)
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


def test_catalog_page_holds_at_least_one_entry(connect, monkeypatch):
    monkeypatch.setattr(uploads_module, "CATALOG_PAGE_BYTES", 1)
    uploads = Uploads(FakeIndex(many_files(3)), connect, FakeReader())
    assert [len(page["files"]) for page in catalog_pages(uploads)] == [1, 1, 1]


def test_catalog_pages_run_on_into_partial_downloads(files, partial, connect, monkeypatch):
    monkeypatch.setattr(uploads_module, "CATALOG_PAGE_BYTES", 1)
    index = FakeIndex(files[:2])
    index._partials[partial.file_id] = partial
    uploads = Uploads(index, connect, FakeReader())
    pages = catalog_pages(uploads)
    assert [(p["start"], p["total"]) for p in pages] == [(0, 3), (1, 3), (2, 3)]
    assert pages[2]["files"] == [
        {"id": partial.file_id, "name": "five.bin", "size": partial.size, "partial": True}
    ]


def test_catalog_page_at_the_end_is_empty(uploads):
    header, _ = uploads.handle(wire.request("catalog", start=3), REQUESTER)
    assert (header["start"], header["total"], header["files"]) == (3, 3, [])


@pytest.mark.parametrize("start", [-1, 4, True, "0", None, 1.0])
def test_catalog_page_start_out_of_range(uploads, start):
    with pytest.raises(wire.ProtocolError):
        uploads.handle(wire.request("catalog", start=start), REQUESTER)


def test_manifest_in_pages(uploads, files, monkeypatch):
    monkeypatch.setattr(uploads_module, "MANIFEST_PAGE", 2)
    five = files[2]
    hashes = five.manifest.chunk_hashes
    assert len(hashes) == 5
    pages = []
    for start in (0, 2, 4, 5):
        pages.append(uploads.handle(wire.request("manifest", id=five.file_id, start=start), REQUESTER))
    common = {"t": "manifest", "id": five.file_id, "size": 4 * CHUNK_SIZE + 1}
    assert pages == [
        (dict(common, start=0, count=2), hashes[0] + hashes[1]),
        (dict(common, start=2, count=2), hashes[2] + hashes[3]),
        (dict(common, start=4, count=1), hashes[4]),
        (dict(common, start=5, count=0), b""),
    ]


def test_manifest_of_an_empty_file(uploads, files):
    empty = files[1]
    assert uploads.handle(wire.request("manifest", id=empty.file_id, start=0), REQUESTER) == (
        {"t": "manifest", "id": empty.file_id, "size": 0, "start": 0, "count": 0},
        b"",
    )


@pytest.mark.parametrize("start", [-1, 6, True, "0", None, 2.0])
def test_manifest_start_out_of_range(uploads, files, start):
    with pytest.raises(wire.ProtocolError):
        uploads.handle(wire.request("manifest", id=files[2].file_id, start=start), REQUESTER)


def test_manifest_of_an_unknown_file(uploads):
    with pytest.raises(RequestRefused) as e:
        uploads.handle(wire.request("manifest", id="f" * 64, start=0), REQUESTER)
    assert e.value.code == "unknown-file"


@pytest.mark.parametrize("file_id", ["F" * 64, "f" * 63, "", 7, None])
def test_manifest_of_a_malformed_id(uploads, file_id):
    with pytest.raises(wire.ProtocolError):
        uploads.handle(wire.request("manifest", id=file_id, start=0), REQUESTER)


@pytest.mark.parametrize("version", [2, 0, None, "1", True, 1.0])
def test_wrong_version_is_refused(uploads, version):
    with pytest.raises(wire.WrongVersion):
        uploads.handle({"t": "catalog", "v": version}, REQUESTER)


def test_unknown_request(uploads):
    with pytest.raises(wire.ProtocolError) as e:
        uploads.handle(wire.request("distribute"), REQUESTER)
    assert "distribute" in str(e.value)


# -- get -------------------------------------------------------------------------


def test_get_connects_back_only_to_the_requester(uploads, files, connect):
    three = files[0]
    # An address or host in the request is never used.
    d = uploads.handle(get(three.file_id, [2, 0], host="6.6.6.6", address="6.6.6.6"), REQUESTER)
    assert len(connect.calls) == 1
    host, port, pusher, connected = connect.calls[0]
    assert (host, port) == (REQUESTER, 5555)
    assert isinstance(pusher, ChunkPusher)
    assert pusher.token == TOKEN
    assert uploads.active == 1
    assert not d.called
    connected.callback(pusher)
    assert result_of(d) == ({"t": "sending", "token": TOKEN}, b"")


def test_get_streams_the_chunks_and_ends(uploads, files, connect):
    three = files[0]
    d = uploads.handle(get(three.file_id, [2, 0]), REQUESTER)
    _, _, pusher, connected = connect.calls[0]
    transport = StringTransport()
    pusher.callLater = task.Clock().callLater
    pusher.makeConnection(transport)
    connected.callback(pusher)
    assert result_of(d)[0]["t"] == "sending"
    with open(three.path, "rb") as f:
        content = f.read()
    # Every read was synchronous: the stream is over.
    assert sent_frames(transport) == [
        ({"t": "hello", "v": 1, "token": TOKEN}, b""),
        ({"t": "chunk", "i": 2}, content[2 * CHUNK_SIZE :]),
        ({"t": "chunk", "i": 0}, content[:CHUNK_SIZE]),
        ({"t": "done"}, b""),
    ]
    assert uploads.bytes_sent == 100 + CHUNK_SIZE
    assert uploads.active == 0
    assert transport.disconnecting


def test_get_unreachable_requester(uploads, files, connect):
    d = uploads.handle(get(files[0].file_id, [0]), REQUESTER)
    connect.calls[0][3].errback(ConnectionRefusedError("refused"))
    with pytest.raises(RequestRefused) as e:
        result_of(d)
    assert e.value.code == "unreachable"
    assert f"{REQUESTER}:5555" in e.value.message
    assert uploads.active == 0


def test_get_busy_over_max_uploads(uploads, files, connect):
    uploads.handle(get(files[0].file_id, [0]), REQUESTER)
    uploads.handle(get(files[0].file_id, [1], token="cd" * 16), REQUESTER)
    with pytest.raises(RequestRefused) as e:
        uploads.handle(get(files[0].file_id, [2], token="ef" * 16), REQUESTER)
    assert e.value.code == "busy"
    assert len(connect.calls) == 2
    assert uploads.active == 2
    # An ended upload frees its place.
    _, _, pusher, connected = connect.calls[0]
    connected.callback(pusher)
    pusher.stream.done.callback(True)
    assert uploads.active == 1
    uploads.handle(get(files[0].file_id, [2], token="ef" * 16), REQUESTER)
    assert len(connect.calls) == 3


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
        pytest.param(list(range(65)), id="too many"),
    ],
)
def test_get_bad_chunk_list(uploads, files, connect, chunks):
    with pytest.raises(wire.ProtocolError):
        uploads.handle(get(files[0].file_id, chunks), REQUESTER)
    assert connect.calls == []
    assert uploads.active == 0


def test_get_too_many_chunks_in_range(uploads, files, connect, monkeypatch):
    monkeypatch.setattr(uploads_module, "MAX_CHUNKS_PER_REQUEST", 2)
    with pytest.raises(wire.ProtocolError) as e:
        uploads.handle(get(files[0].file_id, [0, 1, 2]), REQUESTER)
    assert "too many" in str(e.value)
    assert connect.calls == []


def test_get_of_an_empty_file_is_out_of_range(uploads, files, connect):
    with pytest.raises(wire.ProtocolError):
        uploads.handle(get(files[1].file_id, [0]), REQUESTER)


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
def test_get_bad_port_or_token(uploads, files, connect, fields):
    header = get(files[0].file_id, [0])
    header.update(fields)
    with pytest.raises(wire.ProtocolError):
        uploads.handle(header, REQUESTER)
    assert connect.calls == []
    assert uploads.active == 0


def test_get_unknown_file(uploads, connect):
    with pytest.raises(RequestRefused) as e:
        uploads.handle(get("e" * 64, [0]), REQUESTER)
    assert e.value.code == "unknown-file"
    assert connect.calls == []


# -- read_range --------------------------------------------------------------------


def test_read_range(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    assert read_range(str(path), 2, 3) == b"234"
    assert read_range(str(path), 0, 10) == b"0123456789"


def test_read_range_short_read(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    with pytest.raises(OSError) as e:
        read_range(str(path), 5, 10)
    assert "shorter" in str(e.value)


def test_read_range_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_range(str(tmp_path / "gone"), 0, 1)


# -- the token bucket ------------------------------------------------------------


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


def stream(uploads, connect, local, chunks, token):
    """A get served to its end on a StringTransport; the transport."""
    uploads.handle(get(local.file_id, chunks, token=token), REQUESTER)
    _, _, pusher, connected = connect.calls[-1]
    transport = StringTransport()
    pusher.makeConnection(transport)
    connected.callback(pusher)
    return transport


def chunk_bytes(transport):
    return sum(len(body) for header, body in sent_frames(transport) if header["t"] == "chunk")


def test_every_stream_shares_one_upload_rate(files, connect):
    clock = task.Clock()
    rate = 2 * CHUNK_SIZE  # bytes per second, for the whole peer
    uploads = Uploads(FakeIndex(files), connect, FakeReader(), max_rate=rate, clock=clock)
    five = files[2]
    one = stream(uploads, connect, five, [0, 1, 2, 3, 4], "ab" * 16)
    two = stream(uploads, connect, five, [0, 1, 2, 3, 4], "cd" * 16)
    burst = uploads.bucket._burst
    # 10 chunks in all, at 2 a second: 4 seconds after the first burst.
    for second in range(1, 4):
        clock.advance(1)
        sent = chunk_bytes(one) + chunk_bytes(two)
        # Never more than the rate allows (plus one burst), never far less.
        assert sent <= rate * second + burst
        assert sent >= rate * second - CHUNK_SIZE
    # Both streams got their turn.
    assert chunk_bytes(one) > 0 and chunk_bytes(two) > 0
    clock.advance(10)
    assert chunk_bytes(one) == chunk_bytes(two) == five.size
    assert uploads.active == 0


def test_a_stream_stopped_while_waiting_for_the_rate_leaves_nothing_behind(files, connect):
    clock = task.Clock()
    uploads = Uploads(FakeIndex(files), connect, FakeReader(), max_rate=1024, clock=clock)
    transport = stream(uploads, connect, files[2], [0, 1, 2], TOKEN)
    assert clock.getDelayedCalls()
    pusher = connect.calls[-1][2]
    pusher.connectionLost(Failure(ConnectionRefusedError()))
    assert clock.getDelayedCalls() == []
    assert uploads.active == 0
    assert transport.disconnecting


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
def partial_uploads(partial, connect):
    index = FakeIndex([])
    index._partials[partial.file_id] = partial
    return Uploads(index, connect, FakeReader(), max_uploads=2)


def test_have_of_a_whole_file(uploads, files):
    reply, body = uploads.handle(wire.request("have", id=files[0].file_id, start=0), REQUESTER)
    assert reply == {"t": "have", "id": files[0].file_id, "all": True} and body == b""


def test_have_of_a_partial_download(partial_uploads, partial):
    reply, body = partial_uploads.handle(
        wire.request("have", id=partial.file_id, start=0), REQUESTER
    )
    assert reply == {"t": "have", "id": partial.file_id, "start": 0, "count": 5}
    assert body == bytes([0b00001010])


@pytest.mark.parametrize("start", [3, 5, -8, "0", None])
def test_have_with_a_bad_start(partial_uploads, partial, start):
    with pytest.raises(wire.ProtocolError):
        partial_uploads.handle(wire.request("have", id=partial.file_id, start=start), REQUESTER)


def test_have_of_an_unknown_file(uploads):
    with pytest.raises(RequestRefused) as e:
        uploads.handle(wire.request("have", id="ab" * 32, start=0), REQUESTER)
    assert e.value.code == "unknown-file"


def test_catalog_lists_partial_downloads(partial_uploads, partial):
    reply, _ = partial_uploads.handle(wire.request("catalog"), REQUESTER)
    assert reply["files"] == [
        {"id": partial.file_id, "name": "five.bin", "size": partial.size, "partial": True}
    ]


def test_get_serves_only_verified_chunks_of_a_partial(partial_uploads, partial, connect):
    with pytest.raises(RequestRefused) as e:
        partial_uploads.handle(get(partial.file_id, [1, 2]), REQUESTER)
    assert e.value.code == "missing-chunks"
    assert connect.calls == []
    transport = stream(partial_uploads, connect, partial, [3, 1], TOKEN)
    with open(partial.path, "rb") as f:
        content = f.read()
    assert [(h["t"], h.get("i")) for h, _ in sent_frames(transport)] == [
        ("hello", None), ("chunk", 3), ("chunk", 1), ("done", None)
    ]
    assert sent_frames(transport)[1][1] == content[3 * CHUNK_SIZE : 4 * CHUNK_SIZE]


def test_a_file_changed_while_served_is_indexed_again(files, connect):
    index = FakeIndex(files)
    uploads = Uploads(index, connect, FakeReader())
    three = files[0]
    with open(three.path, "r+b") as f:
        f.write(b"changed")
    os.utime(three.path, ns=(1, 1))
    transport = stream(uploads, connect, three, [0, 1], TOKEN)
    assert [h["t"] for h, _ in sent_frames(transport)] == ["hello"]
    assert transport.disconnecting
    assert index.rescans == 1
    assert uploads.active == 0


def test_read_range_checks_the_signature(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    from twisted_p2p.index import file_signature

    signature = file_signature(os.stat(path))
    assert read_range(str(path), 2, 3, signature) == b"234"
    path.write_bytes(b"01234567890")
    with pytest.raises(FileChanged):
        read_range(str(path), 2, 3, signature)
