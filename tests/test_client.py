"""
L{SenderClient} on a StringTransport, and the catalog and manifest parsers
over a fake client.
"""

import struct

import pytest
from support import frame, result_of, sent_headers
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p import wire
from twisted_p2p.client import (
    PeerRefused,
    SenderClient,
    fetch_catalog,
    fetch_have,
    fetch_manifest,
    parse_catalog,
)
from twisted_p2p.limits import HAVE_PAGE, MAX_CATALOG_FILES, MAX_FILE_SIZE
from twisted_p2p.manifest import CHUNK_SIZE, Manifest, ManifestMismatch

ID_A = "a" * 64
ID_B = "b" * 64


@pytest.fixture
def connected():
    client = SenderClient()
    client.callLater = task.Clock().callLater
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport


# -- SenderClient -----------------------------------------------------------------


def test_call_sends_the_request(connected):
    client, transport = connected
    client.call(wire.request("catalog"))
    client.call(wire.request("manifest", id=ID_A, start=0))
    assert sent_headers(transport) == [
        {"t": "catalog", "v": 1},
        {"t": "manifest", "v": 1, "id": ID_A, "start": 0},
    ]


def test_answers_match_calls_in_order(connected, feed):
    client, transport = connected
    first = client.call(wire.request("catalog"))
    second = client.call(wire.request("manifest", id=ID_A, start=0))
    feed(client, frame({"t": "catalog", "n": 1}) + frame({"t": "manifest", "n": 2}, b"hashes"))
    assert result_of(first) == ({"t": "catalog", "n": 1}, b"")
    assert result_of(second) == ({"t": "manifest", "n": 2}, b"hashes")
    assert not transport.disconnecting


def test_error_answer_is_peer_refused(connected, feed):
    client, transport = connected
    refused = client.call(wire.request("get"))
    after = client.call(wire.request("catalog"))
    feed(
        client,
        frame({"t": "error", "code": "busy", "message": "try later"})
        + frame({"t": "catalog"}),
    )
    with pytest.raises(PeerRefused) as e:
        result_of(refused)
    assert (e.value.code, e.value.message) == ("busy", "try later")
    assert result_of(after) == ({"t": "catalog"}, b"")
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "header",
    [
        {"t": "error", "code": "busy"},
        {"t": "error", "message": "no code"},
        {"t": "error", "code": "x" * 65, "message": "long code"},
        {"t": "error", "code": 7, "message": "numeric code"},
    ],
)
def test_malformed_error_answer_drops_and_fails_the_call(connected, feed, header):
    client, transport = connected
    d = client.call(wire.request("get"))
    feed(client, frame(header))
    assert transport.disconnecting
    client.connectionLost(Failure(ConnectionDone()))
    with pytest.raises(ConnectionLost):
        result_of(d)


def test_connection_lost_fails_every_waiting_call(connected):
    client, transport = connected
    closed = client.when_closed()
    calls = [client.call(wire.request("catalog")) for _ in range(3)]
    assert not closed.called
    client.connectionLost(Failure(ConnectionDone()))
    for d in calls:
        with pytest.raises(ConnectionLost):
            result_of(d)
    assert result_of(closed) is None
    # And a call after that fails at once.
    with pytest.raises(ConnectionLost):
        result_of(client.call(wire.request("catalog")))


def test_when_closed_after_the_close(connected):
    client, _ = connected
    client.connectionLost(Failure(ConnectionDone()))
    assert result_of(client.when_closed()) is None


def test_unasked_answer_drops_the_connection(connected, feed):
    client, transport = connected
    feed(client, frame({"t": "catalog"}))
    assert transport.disconnecting
    with pytest.raises(ConnectionLost):
        result_of(client.call(wire.request("catalog")))


def test_extra_answer_drops_the_connection(connected, feed):
    client, transport = connected
    d = client.call(wire.request("catalog"))
    feed(client, frame({"t": "catalog"}) + frame({"t": "catalog", "extra": True}))
    assert result_of(d) == ({"t": "catalog"}, b"")
    assert transport.disconnecting


def test_garbage_answer_drops_the_connection(connected, feed):
    client, transport = connected
    d = client.call(wire.request("catalog"))
    feed(client, struct.pack("!I", 5) + b"hello")
    assert transport.disconnecting
    assert not d.called


def test_close(connected):
    client, transport = connected
    client.close()
    assert transport.disconnecting


# -- parse_catalog ------------------------------------------------------------------


def catalog(*files, rev="0123456789abcdef"):
    return {"t": "catalog", "rev": rev, "files": list(files)}


def test_parse_catalog():
    header = catalog(
        {"id": ID_A, "name": "report.pdf", "size": 1234},
        {"id": ID_B, "name": "empty", "size": 0},
    )
    assert parse_catalog(header) == (
        "0123456789abcdef",
        [(ID_A, "report.pdf", 1234), (ID_B, "empty", 0)],
    )


@pytest.mark.parametrize(
    "name",
    [".hidden", "../etc/passwd", "a/b", "a\\b", "", "bell\x07", "trailing ", "dot.", "x" * 256],
)
def test_parse_catalog_leaves_out_illegal_names(name):
    header = catalog(
        {"id": ID_A, "name": name, "size": 1},
        {"id": ID_B, "name": "fine.txt", "size": 2},
    )
    assert parse_catalog(header) == ("0123456789abcdef", [(ID_B, "fine.txt", 2)])


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param("not an object", id="string entry"),
        pytest.param([ID_A, "a", 1], id="list entry"),
        pytest.param({"id": "A" * 64, "name": "a", "size": 1}, id="uppercase id"),
        pytest.param({"id": ID_A[:-1], "name": "a", "size": 1}, id="short id"),
        pytest.param({"name": "a", "size": 1}, id="no id"),
        pytest.param({"id": ID_A, "name": 5, "size": 1}, id="numeric name"),
        pytest.param({"id": ID_A, "size": 1}, id="no name"),
        pytest.param({"id": ID_A, "name": "a", "size": -1}, id="negative size"),
        pytest.param({"id": ID_A, "name": "a", "size": MAX_FILE_SIZE + 1}, id="huge size"),
        pytest.param({"id": ID_A, "name": "a", "size": True}, id="bool size"),
        pytest.param({"id": ID_A, "name": "a", "size": 1.5}, id="float size"),
        pytest.param({"id": ID_A, "name": "a"}, id="no size"),
    ],
)
def test_parse_catalog_rejects_a_malformed_entry(entry):
    with pytest.raises(wire.ProtocolError):
        parse_catalog(catalog({"id": ID_B, "name": "fine", "size": 1}, entry))


@pytest.mark.parametrize(
    "header",
    [
        pytest.param({"t": "manifest", "rev": "0" * 16, "files": []}, id="not a catalog"),
        pytest.param({"t": "catalog", "files": []}, id="no revision"),
        pytest.param({"t": "catalog", "rev": "0" * 17, "files": []}, id="long revision"),
        pytest.param({"t": "catalog", "rev": "0" * 16}, id="no files"),
        pytest.param({"t": "catalog", "rev": "0" * 16, "files": {}}, id="files not a list"),
        pytest.param(
            {"t": "catalog", "rev": "0" * 16, "files": [{"id": ID_A, "name": "a", "size": 1}]
             * (MAX_CATALOG_FILES + 1)},
            id="too many files",
        ),
    ],
)
def test_parse_catalog_rejects_a_malformed_catalog(header):
    with pytest.raises(wire.ProtocolError):
        parse_catalog(header)


def test_fetch_catalog():
    answer = catalog({"id": ID_A, "name": "a.txt", "size": 3})
    client = CannedClient(lambda header: (answer, b""))
    d = defer.ensureDeferred(fetch_catalog(client))
    assert result_of(d) == ("0123456789abcdef", [(ID_A, "a.txt", 3)])
    assert client.calls == [{"t": "catalog", "v": 1}]


# -- fetch_manifest -----------------------------------------------------------------


class CannedClient:
    """
    A client whose C{call()} answers at once with C{answer(header)}: a
    C{(header, body)} or an exception.
    """

    def __init__(self, answer):
        self._answer = answer
        self.calls = []

    def call(self, header):
        self.calls.append(header)
        try:
            return defer.succeed(self._answer(header))
        except Exception as e:
            return defer.fail(e)


def synthetic_manifest(size):
    count = (size + CHUNK_SIZE - 1) // CHUNK_SIZE
    return Manifest.build(size, [bytes([i % 256, i // 256]) * 16 for i in range(count)])


def pages_of(manifest, page, file_id=None, size=None):
    """
    An answer function serving C{manifest} C{page} hashes at a time.
    """

    def answer(header):
        assert header["t"] == "manifest" and header["v"] == 1
        start = header["start"]
        hashes = manifest.chunk_hashes[start : start + page]
        reply = {
            "t": "manifest",
            "id": file_id or manifest.file_id,
            "size": manifest.size if size is None else size(start),
            "start": start,
            "count": len(hashes),
        }
        return reply, b"".join(hashes)

    return answer


def fetch(client, file_id):
    return result_of(defer.ensureDeferred(fetch_manifest(client, file_id)))


def test_fetch_manifest_over_several_pages():
    manifest = synthetic_manifest(5 * CHUNK_SIZE - 7)
    client = CannedClient(pages_of(manifest, 2))
    assert fetch(client, manifest.file_id) == manifest
    assert [(c["id"], c["start"]) for c in client.calls] == [
        (manifest.file_id, 0),
        (manifest.file_id, 2),
        (manifest.file_id, 4),
    ]


def test_fetch_manifest_of_an_empty_file():
    manifest = synthetic_manifest(0)
    client = CannedClient(pages_of(manifest, 2))
    assert fetch(client, manifest.file_id) == manifest
    assert len(client.calls) == 1


def test_fetch_manifest_that_does_not_match_the_id():
    manifest = synthetic_manifest(3 * CHUNK_SIZE)
    forged = Manifest.build(manifest.size, [b"\x00" * 32] * 3)
    client = CannedClient(pages_of(forged, 2, file_id=manifest.file_id))
    with pytest.raises(ManifestMismatch):
        fetch(client, manifest.file_id)


def test_fetch_manifest_that_stops_short():
    manifest = synthetic_manifest(5 * CHUNK_SIZE)

    def answer(header):
        reply, body = pages_of(manifest, 2)(header)
        if header["start"] >= 2:
            reply["count"], body = 0, b""
        return reply, body

    client = CannedClient(answer)
    with pytest.raises(ManifestMismatch):
        fetch(client, manifest.file_id)
    assert len(client.calls) == 2


def test_fetch_manifest_of_another_file():
    manifest = synthetic_manifest(CHUNK_SIZE)
    client = CannedClient(pages_of(manifest, 2, file_id=ID_B))
    with pytest.raises(wire.ProtocolError):
        fetch(client, manifest.file_id)


def test_fetch_manifest_that_changes_size():
    manifest = synthetic_manifest(5 * CHUNK_SIZE)
    client = CannedClient(
        pages_of(manifest, 2, size=lambda start: manifest.size + (start > 0))
    )
    with pytest.raises(wire.ProtocolError) as e:
        fetch(client, manifest.file_id)
    assert "changed size" in str(e.value)


def test_fetch_manifest_page_of_the_wrong_length():
    manifest = synthetic_manifest(3 * CHUNK_SIZE)

    def answer(header):
        reply, body = pages_of(manifest, 2)(header)
        return reply, body[:-1]

    with pytest.raises(wire.ProtocolError):
        fetch(CannedClient(answer), manifest.file_id)


def test_fetch_manifest_refused():
    def answer(header):
        raise PeerRefused("unknown-file", "this peer does not have that file")

    with pytest.raises(PeerRefused) as e:
        fetch(CannedClient(answer), ID_A)
    assert e.value.code == "unknown-file"


def test_fetch_manifest_wrong_answer_type():
    client = CannedClient(lambda header: ({"t": "catalog", "id": ID_A}, b""))
    with pytest.raises(wire.ProtocolError):
        fetch(client, ID_A)


# -- fetch_have -------------------------------------------------------------------


def test_fetch_have_of_a_whole_file():
    client = CannedClient(lambda h: ({"t": "have", "id": ID_A, "all": True}, b""))
    assert result_of(defer.ensureDeferred(fetch_have(client, ID_A, 10))) is None
    assert client.calls == [{"t": "have", "v": 1, "id": ID_A, "start": 0}]


def test_fetch_have_in_pages(monkeypatch):
    monkeypatch.setattr("twisted_p2p.client.HAVE_PAGE", 8)

    def answer(header):
        start = header["start"]
        count = min(8, 11 - start)
        bits = bytes([0b10000001]) if start == 0 else bytes([0b100])
        return {"t": "have", "id": ID_A, "start": start, "count": count}, bits

    client = CannedClient(answer)
    held = result_of(defer.ensureDeferred(fetch_have(client, ID_A, 11)))
    assert held == bytearray([1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1])
    assert [c["start"] for c in client.calls] == [0, 8]


@pytest.mark.parametrize(
    "reply, body",
    [
        ({"t": "have", "id": ID_A, "start": 0, "count": 10}, b"\x00"),
        ({"t": "have", "id": ID_A, "start": 0, "count": 11}, b"\x00\x00"),
        ({"t": "have", "id": ID_A, "start": 8, "count": 2}, b"\x00"),
        ({"t": "have", "id": ID_A, "start": 0, "count": 0}, b""),
        ({"t": "have", "id": ID_A, "start": 0}, b"\x00\x00"),
        ({"t": "have", "id": ID_B, "all": True}, b""),
        ({"t": "manifest", "id": ID_A, "all": True}, b""),
    ],
)
def test_fetch_have_rejects_a_malformed_answer(reply, body):
    client = CannedClient(lambda h: (reply, body))
    with pytest.raises(wire.ProtocolError):
        result_of(defer.ensureDeferred(fetch_have(client, ID_A, 10)))


def test_have_page_fits_a_frame():
    from twisted_p2p.limits import MAX_FRAME

    assert HAVE_PAGE % 8 == 0 and HAVE_PAGE // 8 + 1024 < MAX_FRAME


def test_parse_catalog_accepts_partial_entries():
    answer = catalog({"id": ID_A, "name": "a.txt", "size": 3, "partial": True})
    assert parse_catalog(answer) == ("0123456789abcdef", [(ID_A, "a.txt", 3)])
    with pytest.raises(wire.ProtocolError):
        parse_catalog(catalog({"id": ID_A, "name": "a.txt", "size": 3, "partial": "yes"}))
