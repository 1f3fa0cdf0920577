"""
L{Download} with fake peers and clients, a real L{Inbox} and a real
L{PartialFile}: chunks are handed in as the receiver port would, through
C{inbox.claim(token, host).deliver(index, data)}.
"""

import os
import random

import pytest
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure

from twisted_p2p.client import PeerRefused
from twisted_p2p.download import (
    MAX_STRIKES,
    PROGRESS_INTERVAL,
    Download,
    DownloadFailed,
    Downloads,
    human_size,
)
from twisted_p2p.limits import REQUEST_BATCH, REQUEST_TIMEOUT, SOURCE_WINDOW
from twisted_p2p.manifest import CHUNK_SIZE, hash_file
from twisted_p2p.storage import PartialFile
from twisted_p2p.transfer import Inbox

RECEIVER_PORT = 7100


def result_of(d):
    """
    The result of a Deferred that has already fired; a failure is raised.
    """
    results = []
    # A success is passed on, so the result can be asked for again.
    d.addBoth(lambda r: results.append(r) or (None if isinstance(r, Failure) else r))
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def run_now(f, *args, **kwargs):
    """
    A synchronous stand-in for deferToThread.
    """
    return defer.maybeDeferred(f, *args, **kwargs)


class FakePeer:
    def __init__(self, host, transfer_port=7000):
        self.host = host
        self.label = f"{host}:{transfer_port}"
        self.sender_port = transfer_port + 1


class FakeClient:
    """
    A sender connection: manifest requests are answered at once from
    C{manifest} (or refused); "get" requests are recorded with a Deferred the
    test fires, or refused with C{refuse_gets}.
    """

    def __init__(self, manifest=None, refuse_gets=None):
        self.manifest = manifest
        self.refuse_gets = refuse_gets
        self.gets = []
        self.closed = False
        self._closed = defer.Deferred()

    def call(self, header):
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
        assert header["t"] == "get"
        assert header["port"] == RECEIVER_PORT
        if self.refuse_gets is not None:
            d = defer.Deferred()
            self.gets.append((header, d))
            d.errback(self.refuse_gets)
            return d
        d = defer.Deferred()
        self.gets.append((header, d))
        return d

    def requested(self):
        return [i for header, _ in self.gets for i in header["chunks"]]

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

    def __init__(self, tmp_path, content, hosts=("10.0.0.2",), name="movie.bin", clients=None):
        source = tmp_path / "source"
        source.mkdir(exist_ok=True)
        (source / name).write_bytes(content)
        self.content = content
        self.manifest = hash_file(str(source / name))
        self.folder = tmp_path / "downloads"
        self.folder.mkdir(exist_ok=True)
        self.peers = [FakePeer(host) for host in hosts]
        self.clients = clients or {host: FakeClient(self.manifest) for host in hosts}
        self.clock = task.Clock()
        self.inbox = Inbox()
        self.lines = []
        self.events = []
        self.claimed = {}
        self.storage = PartialFile(str(self.folder), self.manifest.file_id)
        self.download = Download(
            name,
            self.manifest.file_id,
            self.peers,
            self.open_client,
            self.inbox,
            RECEIVER_PORT,
            self.storage,
            run_now,
            self.clock,
            self.report,
        )

    def report(self, event):
        self.events.append(event)
        self.lines.extend(event["text"].splitlines())

    def open_client(self, peer):
        client = self.clients[peer.host]
        if isinstance(client, Exception):
            return defer.fail(client)
        return defer.succeed(client)

    def start(self):
        return self.download.start()

    def chunk(self, index):
        return self.content[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]

    def expectation(self, host, header):
        """
        What the receiver port gets for a token: claimed once, kept.
        """
        token = header["token"]
        if token not in self.claimed:
            self.claimed[token] = self.inbox.claim(token, host)
        return self.claimed[token]

    def send(self, host, get_number, index, data=None, done=True):
        """
        Chunk C{index} of the C{get_number}th get to C{host}, arriving on
        the receiver port; C{done} sends "done" after the request's last chunk.
        Returns whether the receiver accepted it.
        """
        header, _ = self.clients[host].gets[get_number]
        expectation = self.expectation(host, header)
        assert expectation is not None, "the token was not (or no longer) expected"
        data = self.chunk(index) if data is None else data
        if not expectation.accepts(index, len(data)):
            return False
        expectation.deliver(index, data)
        if done and not expectation.pending:
            expectation.finished()
        return True

    def send_all(self, host, get_number):
        header, _ = self.clients[host].gets[get_number]
        for index in header["chunks"]:
            assert self.send(host, get_number, index)

    def downloaded(self, name):
        return (self.folder / name).read_bytes()


def content_of(size, seed=1):
    return random.Random(seed).randbytes(size)


def test_download_from_one_source(tmp_path):
    size = 2 * CHUNK_SIZE + 1000
    h = Harness(tmp_path, content_of(size))
    done = h.start()
    client = h.clients["10.0.0.2"]
    assert [header["chunks"] for header, _ in client.gets] == [[0, 1, 2]]
    header = client.gets[0][0]
    assert header["id"] == h.manifest.file_id
    assert header["v"] == 1
    assert h.lines == ["download movie.bin: 513.0 KiB in 3 chunks from 1 peer(s)"]
    client.gets[0][1].callback(({"t": "sending", "token": header["token"]}, b""))

    h.send_all("10.0.0.2", 0)
    final_name, signature = result_of(done)
    assert final_name == "movie.bin"
    assert signature[0] == size
    assert h.downloaded("movie.bin") == h.content
    assert os.listdir(h.folder) == ["movie.bin"]
    assert h.lines[-1].startswith(
        f"downloaded movie.bin to downloads{os.sep}movie.bin: {human_size(size)} in "
    )
    assert h.download.final_name == "movie.bin"
    assert client.closed
    assert len(h.inbox) == 0
    assert h.clock.getDelayedCalls() == []


def test_download_byte_identical_when_chunks_come_out_of_order(tmp_path):
    h = Harness(tmp_path, content_of(4 * CHUNK_SIZE - 1))
    done = h.start()
    for index in (3, 1, 0, 2):
        assert h.send("10.0.0.2", 0, index)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_download_from_two_sources(tmp_path):
    chunks = 20
    h = Harness(tmp_path, content_of(chunks * CHUNK_SIZE), hosts=("10.0.0.2", "10.0.0.3"))
    done = h.start()
    a, b = h.clients["10.0.0.2"], h.clients["10.0.0.3"]
    assert a.gets and b.gets
    assert len(a.requested()) <= SOURCE_WINDOW
    assert len(b.requested()) <= SOURCE_WINDOW
    assert sorted(a.requested() + b.requested()) == list(range(chunks))
    assert all(len(header["chunks"]) <= REQUEST_BATCH for header, _ in a.gets + b.gets)
    assert h.lines[0] == "download movie.bin: 5.0 MiB in 20 chunks from 2 peer(s)"
    # Each chunk only from the source it was asked of.
    first_of_a = a.gets[0][0]["chunks"][0]
    b_expectation = h.expectation("10.0.0.3", b.gets[0][0])
    assert not b_expectation.accepts(first_of_a, CHUNK_SIZE)
    for host, client in (("10.0.0.2", a), ("10.0.0.3", b)):
        for number in range(len(client.gets)):
            h.send_all(host, number)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content
    assert h.download.sources[0].received + h.download.sources[1].received == len(h.content)
    assert h.download.sources[1].received > 0


def test_never_more_than_the_window_in_flight(tmp_path):
    chunks = 40
    h = Harness(tmp_path, content_of(chunks * CHUNK_SIZE - 5))
    done = h.start()
    client = h.clients["10.0.0.2"]
    delivered = set()
    while not done.called:
        in_flight = [i for i in client.requested() if i not in delivered]
        assert 0 < len(in_flight) <= SOURCE_WINDOW
        assert all(len(header["chunks"]) <= REQUEST_BATCH for header, _ in client.gets)
        index = in_flight[0]
        number = next(n for n, (header, _) in enumerate(client.gets) if index in header["chunks"])
        assert h.send("10.0.0.2", number, index)
        delivered.add(index)
    assert sorted(client.requested()) == list(range(chunks))
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_corrupt_chunk_is_rejected_and_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    done = h.start()
    client = h.clients["10.0.0.2"]
    bad = bytes(CHUNK_SIZE)
    assert h.send("10.0.0.2", 0, 1, data=bad)
    assert [header["chunks"] for header, _ in client.gets] == [[0, 1, 2], [1]]
    assert h.download.have == 0
    assert h.send("10.0.0.2", 0, 0)
    assert h.send("10.0.0.2", 0, 2)
    assert h.send("10.0.0.2", 1, 1)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content
    assert h.download.sources[0].strikes == 1


def test_wrong_length_chunk_is_not_accepted(tmp_path):
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE))
    h.start()
    assert not h.send("10.0.0.2", 0, 0, data=b"short")
    assert not h.send("10.0.0.2", 0, 5, data=bytes(CHUNK_SIZE))


def test_a_source_that_keeps_sending_bad_data_is_dropped(tmp_path):
    good, bad = "10.0.0.2", "10.0.0.3"
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), hosts=(bad, good))
    done = h.start()
    bad_client, good_client = h.clients[bad], h.clients[good]
    assert [header["chunks"] for header, _ in bad_client.gets] == [[0, 1, 2]]
    assert good_client.gets == []

    garbage = b"\xee" * CHUNK_SIZE
    assert h.send(bad, 0, 0, data=garbage)
    for strike in range(2, MAX_STRIKES + 1):
        # Chunk 0 is asked again of the same source while it may still be used.
        assert bad_client.gets[-1][0]["chunks"] == [0]
        assert h.send(bad, len(bad_client.gets) - 1, 0, data=garbage)
    assert h.download.sources[0].strikes == MAX_STRIKES
    dropped = [line for line in h.lines if "bad data" in line]
    assert dropped == [
        f"download movie.bin: {bad}:7000 sent bad data {MAX_STRIKES} times and is no longer asked"
    ]
    # Now chunk 0 goes to the good source, and the bad one is asked nothing new.
    gets_of_bad = len(bad_client.gets)
    assert good_client.requested() == [0]

    # More bad data still on its way from the dropped source: rejected, said once.
    assert h.send(bad, 0, 1, data=garbage)
    assert [line for line in h.lines if "bad data" in line] == dropped
    assert good_client.requested() == [0, 1]
    # The dropped source says "done"; what it still owed goes to the good one.
    h.claimed[bad_client.gets[0][0]["token"]].finished()
    assert sorted(good_client.requested()) == [0, 1, 2]
    assert len(bad_client.gets) == gets_of_bad

    for number in range(len(good_client.gets)):
        h.send_all(good, number)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_a_request_that_times_out_is_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE))
    done = h.start()
    client = h.clients["10.0.0.2"]
    first_token = client.gets[0][0]["token"]
    assert h.send("10.0.0.2", 0, 0)
    h.clock.advance(REQUEST_TIMEOUT - 0.5)
    assert len(client.gets) == 1
    h.clock.advance(0.5)
    # Only the chunk that never came is asked again, under a new token.
    assert [header["chunks"] for header, _ in client.gets] == [[0, 1], [1]]
    assert client.gets[1][0]["token"] != first_token
    assert not h.claimed[first_token].accepts(1, CHUNK_SIZE)
    assert h.inbox.claim(first_token, "10.0.0.2") is None
    assert h.download.sources[0].strikes == 1
    assert h.send("10.0.0.2", 1, 1)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_a_source_that_times_out_too_often_is_dropped(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    done = h.start()
    for _ in range(MAX_STRIKES):
        h.clock.advance(REQUEST_TIMEOUT)
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == "no peer is left to download movie.bin from"
    assert len(h.clients["10.0.0.2"].gets) == MAX_STRIKES
    assert os.listdir(h.folder) == []


def test_unreachable_says_firewall_and_host(tmp_path):
    refused = PeerRefused("unreachable", "could not connect back to 10.0.0.9:7100")
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    h.clients["10.0.0.2"].refuse_gets = refused
    done = h.start()
    unreachable = [line for line in h.lines if "could not connect back" in line]
    assert len(unreachable) == 1
    assert "firewall" in unreachable[0]
    assert "--host" in unreachable[0]
    assert "10.0.0.2:7000" in unreachable[0]
    assert str(RECEIVER_PORT) in unreachable[0]
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert "no peer is left" in str(e.value)
    assert os.listdir(h.folder) == []


def test_unreachable_source_leaves_the_others(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=("10.0.0.2", "10.0.0.3"))
    h.clients["10.0.0.2"].refuse_gets = PeerRefused("unreachable", "no route")
    done = h.start()
    assert h.clients["10.0.0.3"].requested() == [0]
    assert h.send("10.0.0.3", 0, 0)
    assert result_of(done)[0] == "movie.bin"


def test_an_existing_file_is_not_overwritten(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE + 1))
    (h.folder / "movie.bin").write_bytes(b"my own movie")
    done = h.start()
    h.send_all("10.0.0.2", 0)
    final_name, _ = result_of(done)
    assert final_name == "movie (1).bin"
    assert h.downloaded("movie.bin") == b"my own movie"
    assert h.downloaded("movie (1).bin") == h.content
    assert "(movie.bin already existed)" in h.lines[-1]
    assert f"downloads{os.sep}movie (1).bin" in h.lines[-1]


def test_no_peer_gives_the_manifest(tmp_path):
    h = Harness(tmp_path, content_of(10), hosts=("10.0.0.2", "10.0.0.3", "10.0.0.4"))
    h.clients["10.0.0.2"] = ConnectionRefusedError("refused")
    h.clients["10.0.0.3"] = FakeClient(manifest=None)
    h.clients["10.0.0.4"] = FakeClient(manifest=None)
    done = h.start()
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value).startswith("no peer could give the manifest of movie.bin (10.0.0.2:7000: ")
    assert h.clients["10.0.0.3"].closed and h.clients["10.0.0.4"].closed
    assert os.listdir(h.folder) == []
    assert h.clock.getDelayedCalls() == []


def test_a_later_peer_gives_the_manifest(tmp_path):
    h = Harness(tmp_path, content_of(10), hosts=("10.0.0.2", "10.0.0.3"))
    h.clients["10.0.0.2"] = FakeClient(manifest=None)
    done = h.start()
    assert h.clients["10.0.0.2"].closed
    assert h.send("10.0.0.3", 0, 0)
    assert h.downloaded(result_of(done)[0]) == h.content


def test_an_empty_file(tmp_path):
    h = Harness(tmp_path, b"", name="empty.txt")
    done = h.start()
    assert h.clients["10.0.0.2"].gets == []
    assert result_of(done)[0] == "empty.txt"
    assert h.downloaded("empty.txt") == b""
    assert h.lines[0] == "download empty.txt: 0 B in 0 chunks from 1 peer(s)"
    assert h.lines[-1].startswith(f"downloaded empty.txt to downloads{os.sep}empty.txt: 0 B in ")
    assert h.clock.getDelayedCalls() == []


def test_progress_lines(tmp_path):
    h = Harness(tmp_path, content_of(4 * CHUNK_SIZE))
    done = h.start()
    h.clock.advance(PROGRESS_INTERVAL)
    assert h.lines[-1] == "download movie.bin: 0% of 1.0 MiB at 0 B/s from 1 peer(s)"
    assert h.send("10.0.0.2", 0, 0)
    h.clock.advance(PROGRESS_INTERVAL)
    assert h.lines[-1] == "download movie.bin: 25% of 1.0 MiB at 128.0 KiB/s from 1 peer(s)"
    for index in (1, 2, 3):
        assert h.send("10.0.0.2", 0, index)
    assert result_of(done)[0] == "movie.bin"
    # No progress line once it is over.
    lines = len(h.lines)
    h.clock.advance(10 * PROGRESS_INTERVAL)
    assert len(h.lines) == lines


def test_cancel_discards_the_partial(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    done = h.start()
    assert h.send("10.0.0.2", 0, 0)
    assert os.path.exists(h.storage.path)
    h.download.cancel()
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == "download movie.bin was cancelled"
    assert os.listdir(h.folder) == []
    assert len(h.inbox) == 0
    assert h.clock.getDelayedCalls() == []


def test_a_dropped_sender_connection_is_not_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), hosts=("10.0.0.2", "10.0.0.3"))
    done = h.start()
    a, b = h.clients["10.0.0.2"], h.clients["10.0.0.3"]
    assert a.requested() == [0, 1, 2] and b.gets == []
    a.drop()
    assert h.send("10.0.0.2", 0, 0, data=bytes(CHUNK_SIZE))
    # The rejected chunk goes to the other source, not the closed one.
    assert a.requested() == [0, 1, 2]
    assert b.requested() == [0]
    assert h.send("10.0.0.3", 0, 0)
    assert h.send("10.0.0.2", 0, 1)
    assert h.send("10.0.0.2", 0, 2)
    assert result_of(done)[0] == "movie.bin"


# -- Downloads -------------------------------------------------------------------


class FakeIndex:
    def __init__(self):
        self.added = []

    def add(self, folder, name, manifest, signature):
        self.added.append((folder, name, manifest))


def test_downloads_adds_the_finished_file_to_the_index(tmp_path):
    h = Harness(tmp_path, content_of(10))
    index = FakeIndex()
    downloads = Downloads(lambda name, file_id, peers, report: h.download, index)
    d = downloads.start("movie.bin", h.manifest.file_id, h.peers, h.lines.append)
    assert list(downloads.active) == [h.manifest.file_id]
    with pytest.raises(DownloadFailed) as e:
        downloads.start("movie.bin", h.manifest.file_id, h.peers, h.lines.append)
    assert str(e.value) == "movie.bin is already being downloaded"
    h.send("10.0.0.2", 0, 0)
    assert result_of(d) == "movie.bin"
    assert index.added == [(str(h.folder), "movie.bin", h.manifest)]
    assert downloads.active == {}


def test_downloads_cancel_all(tmp_path):
    h = Harness(tmp_path, content_of(10))
    index = FakeIndex()
    downloads = Downloads(lambda name, file_id, peers, report: h.download, index)
    d = downloads.start("movie.bin", h.manifest.file_id, h.peers, h.lines.append)
    downloads.cancel_all()
    with pytest.raises(DownloadFailed):
        result_of(d)
    assert downloads.active == {}
    assert index.added == []


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536 * 1024, "1.5 MiB"), (5 << 40, "5.0 TiB")],
)
def test_human_size(n, text):
    assert human_size(n) == text
