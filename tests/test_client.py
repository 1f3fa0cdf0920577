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
    CatalogChanged,
    PeerRefused,
    SenderClient,
    clean_text,
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
    [".hidden", "../etc/passwd", "a/../b", "/etc/passwd", "a//b", "a/", "a/./b", "a/.git/x",
     "a\\b", "", "bell\x07", "trailing ", "dot.", "x" * 256, "d/" * 16 + "f",
     "x/" * 400 + "x", "/".join(["é" * 120] * 5)],
)
def test_parse_catalog_leaves_out_illegal_names(name):
    header = catalog(
        {"id": ID_A, "name": name, "size": 1},
        {"id": ID_B, "name": "fine.txt", "size": 2},
    )
    assert parse_catalog(header) == ("0123456789abcdef", [(ID_B, "fine.txt", 2)])


def test_parse_catalog_keeps_paths():
    header = catalog({"id": ID_A, "name": "photos/2026/a b é.jpg", "size": 1})
    assert parse_catalog(header)[1] == [(ID_A, "photos/2026/a b é.jpg", 1)]


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
        pytest.param({"t": "catalog", "rev": "\x1b[2J" + "0" * 12, "files": []}, id="escape in revision"),
        pytest.param({"t": "catalog", "rev": "0" * 16, "files": [], "total": 1}, id="total, no start"),
        pytest.param({"t": "catalog", "rev": "0" * 16, "files": [], "start": 0, "total": -1}, id="negative total"),
        pytest.param(
            {"t": "catalog", "rev": "0" * 16, "start": 0, "total": 0,
             "files": [{"id": ID_A, "name": "a", "size": 1}]},
            id="more files than total",
        ),
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
    assert client.calls == [{"t": "catalog", "v": 1, "start": 0}]


REV_1 = "1" * 16
REV_2 = "2" * 16


def entry(i, name=None):
    return {"id": f"{i:064x}", "name": name or f"f{i}", "size": i}


def paged(entries, page, rev=lambda call: REV_1, total=None):
    """
    An answer function serving C{entries} C{page} at a time; C{rev(n)} is
    the revision of the n-th call.
    """
    calls = []

    def answer(header):
        assert header["t"] == "catalog" and header["v"] == 1
        start = header["start"]
        calls.append(start)
        return {
            "t": "catalog",
            "rev": rev(len(calls) - 1),
            "start": start,
            "total": len(entries) if total is None else total(len(calls) - 1),
            "files": entries[start : start + page],
        }, b""

    return answer


def fetch_all(client):
    return result_of(defer.ensureDeferred(fetch_catalog(client)))


def test_fetch_catalog_in_pages():
    entries = [entry(i) for i in range(7)]
    entries[3] = entry(3, name="../bad")  # left out, but counted for paging
    entries[5] = dict(entry(5), partial=True)
    client = CannedClient(paged(entries, 3))
    revision, files = fetch_all(client)
    assert revision == REV_1
    assert files == [(e["id"], e["name"], e["size"]) for e in entries if e["name"] != "../bad"]
    assert [c["start"] for c in client.calls] == [0, 3, 6]


def test_fetch_catalog_of_an_old_peer():
    """
    A peer from before paging ignores "start" and answers the whole
    catalog, without "start" and "total".
    """
    client = CannedClient(lambda h: (catalog(entry(1), entry(2)), b""))
    assert fetch_all(client) == ("0123456789abcdef", [(entry(1)["id"], "f1", 1), (entry(2)["id"], "f2", 2)])
    assert len(client.calls) == 1


def test_fetch_catalog_empty():
    client = CannedClient(paged([], 3))
    assert fetch_all(client) == (REV_1, [])
    assert len(client.calls) == 1


def test_fetch_catalog_starts_over_once_when_the_revision_changes():
    entries = [entry(i) for i in range(5)]
    client = CannedClient(paged(entries, 2, rev=lambda n: REV_1 if n < 2 else REV_2))
    revision, files = fetch_all(client)
    assert revision == REV_2 and len(files) == 5
    assert [c["start"] for c in client.calls] == [0, 2, 4, 0, 2, 4]


def test_fetch_catalog_gives_up_when_the_revision_keeps_changing():
    entries = [entry(i) for i in range(5)]
    client = CannedClient(paged(entries, 2, rev=lambda n: f"{n:016x}"))
    with pytest.raises(CatalogChanged):
        fetch_all(client)
    assert [c["start"] for c in client.calls] == [0, 2, 0, 2]


def test_fetch_catalog_keeps_at_most_the_cap(monkeypatch):
    monkeypatch.setattr("twisted_p2p.client.MAX_CATALOG_FILES", 4)
    entries = [entry(i) for i in range(100)]
    client = CannedClient(paged(entries, 3))
    revision, files = fetch_all(client)
    assert [f[2] for f in files] == [0, 1, 2, 3]
    assert [c["start"] for c in client.calls] == [0, 3]


@pytest.mark.parametrize("cap, partial", [(4, {1}), (100, {1, 5})])
def test_the_partial_files_cut_off_by_the_cap_are_left_out(monkeypatch, cap, partial):
    from twisted_p2p.client import fetch_catalog_view

    monkeypatch.setattr("twisted_p2p.client.MAX_CATALOG_FILES", cap)
    # Pages of 3: the second brings entry 5, which a cap of 4 cuts off.
    entries = [dict(entry(i), partial=True) if i in (1, 5) else entry(i) for i in range(10)]
    view = result_of(defer.ensureDeferred(fetch_catalog_view(CannedClient(paged(entries, 3)))))
    assert len(view.files) == min(cap, 10)
    assert view.partial == {entries[i]["id"] for i in partial}


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(paged([entry(i) for i in range(5)], 2, total=lambda n: 5 + n), id="total changes"),
        pytest.param(
            lambda h: ({"t": "catalog", "rev": REV_1, "start": 0, "total": 5, "files": []}, b""),
            id="empty page before the end",
        ),
        pytest.param(
            lambda h: ({"t": "catalog", "rev": REV_1, "start": 1, "total": 5, "files": [entry(1)]}, b""),
            id="a page not asked for",
        ),
    ],
)
def test_fetch_catalog_rejects_broken_pages(answer):
    client = CannedClient(answer)
    with pytest.raises(wire.ProtocolError):
        fetch_all(client)
    assert len(client.calls) <= 3


def test_fetch_catalog_of_2000_files_over_the_wire(feed):
    """
    A real sender port, serving 2,000 files with long non-ASCII names (over
    600 KB of catalog: far more than one frame holds), to a real client.
    """
    from types import SimpleNamespace

    from twisted.internet.address import IPv4Address

    from twisted_p2p.transfer import SenderFactory
    from twisted_p2p.uploads import Uploads

    shared = [
        SimpleNamespace(file_id=f"{i:064x}", name="\u00e9" * 120 + f" {i:05}", size=i)
        for i in range(2000)
    ]

    class Index:
        revision = REV_1

        def files(self):
            return shared

        def partials(self):
            return []

    clock = task.Clock()
    uploads = Uploads(Index(), connect=None, run_in_thread=None, workers=None, clock=clock)
    server = SenderFactory(uploads).buildProtocol(None)
    server.callLater = clock.callLater
    server_transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 4000))
    server.makeConnection(server_transport)
    client = SenderClient()
    client.callLater = clock.callLater
    client_transport = StringTransport()
    client.makeConnection(client_transport)

    d = defer.ensureDeferred(fetch_catalog(client))
    for _ in range(100):  # one round trip per page
        if d.called:
            break
        data = client_transport.value()
        client_transport.clear()
        feed(server, data)
        data = server_transport.value()
        server_transport.clear()
        feed(client, data)
    revision, files = result_of(d)
    assert revision == REV_1
    assert files == [(f.file_id, f.name, f.size) for f in shared]
    assert not client_transport.disconnecting and not server_transport.disconnecting


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


def test_fetch_have_rejects_short_pages(monkeypatch):
    """
    A peer answering one chunk per page (to stall a download with slow
    round trips) fails the call: every page but the last is full.
    """
    monkeypatch.setattr("twisted_p2p.client.HAVE_PAGE", 8)

    def answer(header):
        return {"t": "have", "id": ID_A, "start": header["start"], "count": 1}, b"\x01"

    client = CannedClient(answer)
    with pytest.raises(wire.ProtocolError):
        result_of(defer.ensureDeferred(fetch_have(client, ID_A, 20)))
    assert len(client.calls) == 1


# -- remote text --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("try later", "try later"),
        ("\x1b[2J\x1b[31mowned", "?[2J?[31mowned"),
        ("line\nforged: peer said hi\r", "line?forged: peer said hi?"),
        ("evil\u202etxt.exe", "evil?txt.exe"),
        ("zero\u200bwidth\u2028sep", "zero?width?sep"),
        ("private\ue000 \U0010ffff", "private? ?"),
        ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),
    ],
)
def test_clean_text(text, shown):
    assert clean_text(text) == shown


def test_clean_text_cuts_long_text():
    assert clean_text("x" * 1000) == "x" * 199 + "\u2026"
    assert clean_text("x" * 200) == "x" * 200


def test_error_answer_text_is_cleaned(connected, feed):
    client, transport = connected
    refused = client.call(wire.request("get"))
    message = "\x1b[2J\x1b[Hdone\n2099-01-01 [p2p] forged log line" + "!" * 900
    feed(client, frame({"t": "error", "code": "busy\x07", "message": message}))
    with pytest.raises(PeerRefused) as e:
        result_of(refused)
    assert e.value.code == "busy?"
    assert e.value.message.startswith("?[2J?[Hdone?2099-01-01 [p2p] forged log line!!")
    assert len(e.value.message) == 200
    assert str(e.value) == e.value.message
    assert not any(ord(ch) < 32 for ch in e.value.message)


def test_a_catalog_view_has_the_partial_files_and_the_free_space():
    from twisted_p2p.client import fetch_catalog_view

    pages = [
        {"t": "catalog", "rev": "0123456789abcdef", "start": 0, "total": 2, "free": 5000,
         "files": [{"id": ID_A, "name": "a.txt", "size": 3, "partial": True}]},
        {"t": "catalog", "rev": "0123456789abcdef", "start": 1, "total": 2,
         "files": [{"id": ID_B, "name": "b.txt", "size": 4}]},
    ]
    client = CannedClient(lambda h: (pages[h["start"]], b""))
    view = result_of(defer.ensureDeferred(fetch_catalog_view(client)))
    assert view.files == [(ID_A, "a.txt", 3), (ID_B, "b.txt", 4)]
    assert view.partial == {ID_A}
    assert view.free == 5000
    # No "free": the peer hosts nothing.
    bare = CannedClient(lambda h: (catalog({"id": ID_A, "name": "a.txt", "size": 3}), b""))
    assert result_of(defer.ensureDeferred(fetch_catalog_view(bare))).free is None


@pytest.mark.parametrize("free", [-1, "5", 1.5, True])
def test_a_bad_free_space_is_malformed(free):
    with pytest.raises(wire.ProtocolError):
        parse_catalog(dict(catalog(), free=free))


def test_fetch_manifest_of_another_size_than_offered_stops_at_its_first_page():
    """
    A liar whose catalog offered a small file answers with the manifest of
    a 1 TiB one: refused at its first page, before the 128 MiB of hashes
    it claims are asked for.
    """
    manifest = synthetic_manifest(5 * CHUNK_SIZE)
    client = CannedClient(pages_of(manifest, 2, size=lambda start: MAX_FILE_SIZE))
    with pytest.raises(ManifestMismatch) as e:
        result_of(defer.ensureDeferred(
            fetch_manifest(client, manifest.file_id, size_offered=manifest.size)))
    assert "catalog offered" in str(e.value)
    assert len(client.calls) == 1
    # The size offered is the manifest's: fetched as ever.
    honest = CannedClient(pages_of(manifest, 2))
    assert result_of(defer.ensureDeferred(
        fetch_manifest(honest, manifest.file_id, size_offered=manifest.size))) == manifest
