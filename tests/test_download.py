"""
L{Download} with fake peers and clients, a real L{Inbox} and a real
L{PartialFile}: chunks are handed in as the receiver port would, through
C{inbox.claim(token, host).deliver(index, data)}.
"""

import errno
import os
import random

import pytest
from support import result_of
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError

from twisted_p2p import wire
from twisted_p2p.client import PeerRefused
from twisted_p2p.download import (
    ANSWER_TIMEOUT,
    MAX_STRIKES,
    PROGRESS_INTERVAL,
    Bans,
    Download,
    DownloadFailed,
    Downloads,
    human_size,
)
from twisted_p2p.limits import (
    BUSY_BACKOFF_MAX,
    BUSY_BACKOFF_MIN,
    ENDGAME_STALL,
    HAVE_REFRESH,
    MAX_TIMEOUTS,
    REQUEST_BATCH,
    REQUEST_TIMEOUT,
    SOURCE_WINDOW,
    TIMEOUT_REST,
)
from twisted_p2p.manifest import CHUNK_SIZE, hash_file
from twisted_p2p.storage import PartialFile
from twisted_p2p.transfer import Inbox

RECEIVER_PORT = 7100


def run_now(f, *args, **kwargs):
    """
    A synchronous stand-in for deferToThread.
    """
    return defer.maybeDeferred(f, *args, **kwargs)


class Threads:
    """
    A stand-in for deferToThread whose calls wait until the test runs them,
    so that it can see what runs "at once" in other threads.
    """

    def __init__(self):
        self.queue = []

    def __call__(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.queue.append((f, args, kwargs, d))
        return d

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
        self.label = f"{host}:{transfer_port}"
        self.sender_port = transfer_port + 1


class FakeClient:
    """
    A sender connection: manifest requests are answered at once from
    C{manifest} (or refused); "get" requests are recorded with a Deferred the
    test fires, or refused with C{refuse_gets}.  A C{silent} one never
    answers a manifest or "have" call; a C{holding} one answers them when
    the test calls L{release}.
    """

    def __init__(self, manifest=None, refuse_gets=None, have=None, silent=False,
                 holding=False):
        self.manifest = manifest
        self.refuse_gets = refuse_gets
        #: None: the whole file; else the set of chunks held (a partial).
        self.have = have
        self.have_asked = 0
        self.gets = []
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

    def __init__(self, tmp_path, content, hosts=("192.0.2.2",), name="movie.bin", clients=None,
                 bans=None, storage=None, have=None, index=None, run_in_thread=run_now):
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
        self.lines = []
        self.events = []
        self.claimed = {}
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
            self.clock,
            self.report,
            bans=bans,
            index=index,
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
    client = h.clients["192.0.2.2"]
    assert [header["chunks"] for header, _ in client.gets] == [[0, 1, 2]]
    header = client.gets[0][0]
    assert header["id"] == h.manifest.file_id
    assert header["v"] == 1
    assert h.lines == ["download movie.bin: 513.0 KiB in 3 chunks from 1 peer(s)"]
    client.gets[0][1].callback(({"t": "sending", "token": header["token"]}, b""))

    h.send_all("192.0.2.2", 0)
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
        assert h.send("192.0.2.2", 0, index)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_download_from_two_sources(tmp_path):
    chunks = 20
    h = Harness(tmp_path, content_of(chunks * CHUNK_SIZE), hosts=("192.0.2.2", "192.0.2.3"))
    done = h.start()
    a, b = h.clients["192.0.2.2"], h.clients["192.0.2.3"]
    assert a.gets and b.gets
    assert len(a.requested()) <= SOURCE_WINDOW
    assert len(b.requested()) <= SOURCE_WINDOW
    assert sorted(a.requested() + b.requested()) == list(range(chunks))
    assert all(len(header["chunks"]) <= REQUEST_BATCH for header, _ in a.gets + b.gets)
    assert h.lines[0] == "download movie.bin: 5.0 MiB in 20 chunks from 2 peer(s)"
    # Each chunk only from the source it was asked of.
    first_of_a = a.gets[0][0]["chunks"][0]
    b_expectation = h.expectation("192.0.2.3", b.gets[0][0])
    assert not b_expectation.accepts(first_of_a, CHUNK_SIZE)
    for host, client in (("192.0.2.2", a), ("192.0.2.3", b)):
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
    client = h.clients["192.0.2.2"]
    delivered = set()
    while not done.called:
        in_flight = [i for i in client.requested() if i not in delivered]
        assert 0 < len(in_flight) <= SOURCE_WINDOW
        assert all(len(header["chunks"]) <= REQUEST_BATCH for header, _ in client.gets)
        index = in_flight[0]
        number = next(n for n, (header, _) in enumerate(client.gets) if index in header["chunks"])
        assert h.send("192.0.2.2", number, index)
        delivered.add(index)
    assert sorted(client.requested()) == list(range(chunks))
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_corrupt_chunk_is_rejected_and_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    done = h.start()
    client = h.clients["192.0.2.2"]
    bad = bytes(CHUNK_SIZE)
    assert h.send("192.0.2.2", 0, 1, data=bad)
    assert [header["chunks"] for header, _ in client.gets] == [[0, 1, 2], [1]]
    assert h.download.have == 0
    assert h.send("192.0.2.2", 0, 0)
    assert h.send("192.0.2.2", 0, 2)
    assert h.send("192.0.2.2", 1, 1)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content
    assert h.download.sources[0].strikes == 1


def test_wrong_length_chunk_is_not_accepted(tmp_path):
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE))
    h.start()
    assert not h.send("192.0.2.2", 0, 0, data=b"short")
    assert not h.send("192.0.2.2", 0, 5, data=bytes(CHUNK_SIZE))


def test_a_source_that_keeps_sending_bad_data_is_dropped(tmp_path):
    good, bad = "192.0.2.2", "192.0.2.3"
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
        f"{bad}:7000 sent bad data {MAX_STRIKES} times and is banned for this session"
    ]
    assert h.download.bans.is_banned(bad)
    # Now everything it still owed goes to the good source at once, and the
    # bad one is asked nothing new.
    gets_of_bad = len(bad_client.gets)
    assert sorted(good_client.requested()) == [0, 1, 2]
    assert all(h.inbox.claim(header["token"], bad) is None for header, _ in bad_client.gets)

    # More bad data still on its way from the banned source: dropped, said once.
    assert h.send(bad, 0, 1, data=garbage)
    assert [line for line in h.lines if "bad data" in line] == dropped
    assert h.download.bans.strikes(bad) == MAX_STRIKES
    assert len(bad_client.gets) == gets_of_bad

    for number in range(len(good_client.gets)):
        h.send_all(good, number)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_a_request_that_times_out_is_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE))
    done = h.start()
    client = h.clients["192.0.2.2"]
    first_token = client.gets[0][0]["token"]
    assert h.send("192.0.2.2", 0, 0)
    h.clock.advance(REQUEST_TIMEOUT - 0.5)
    assert len(client.gets) == 1
    h.clock.advance(0.5)
    # The source rests first (there is no other to ask), then only the
    # chunk that never came is asked again, under a new token.
    assert len(client.gets) == 1
    h.clock.advance(TIMEOUT_REST)
    assert [header["chunks"] for header, _ in client.gets] == [[0, 1], [1]]
    assert client.gets[1][0]["token"] != first_token
    assert h.inbox.claim(first_token, "192.0.2.2") is None
    assert h.download.sources[0].timeouts == 1
    assert h.send("192.0.2.2", 1, 1)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_every_chunk_that_arrives_restarts_the_timeout(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    h.start()
    client = h.clients["192.0.2.2"]
    h.clock.advance(REQUEST_TIMEOUT - 1)
    assert h.send("192.0.2.2", 0, 0)
    h.clock.advance(REQUEST_TIMEOUT - 1)
    assert h.send("192.0.2.2", 0, 1)
    h.clock.advance(REQUEST_TIMEOUT - 1)
    assert len(client.gets) == 1
    assert h.download.sources[0].timeouts == 0


def test_a_timed_out_request_goes_to_another_source(tmp_path):
    slow, fast = "192.0.2.2", "192.0.2.3"
    h = Harness(tmp_path, content_of(20 * CHUNK_SIZE), hosts=(slow, fast))
    done = h.start()
    slow_chunks = set(h.clients[slow].requested())
    # The fast source delivers everything it is asked, as it is asked.
    def serve_fast():
        for number, (header, _) in enumerate(h.clients[fast].gets):
            expectation = h.expectation(fast, header)
            for index in header["chunks"]:
                if index not in expectation.arrived:
                    h.send(fast, number, index)
    serve_fast()
    assert not done.called
    h.clock.advance(REQUEST_TIMEOUT)
    serve_fast()
    assert result_of(done)[0] == "movie.bin"
    # What the slow one was asked was fetched from the fast one.
    assert slow_chunks <= set(h.clients[fast].requested())
    assert h.downloaded("movie.bin") == h.content


def test_a_source_that_times_out_too_often_is_dropped(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    done = h.start()
    for _ in range(MAX_TIMEOUTS):
        h.clock.advance(REQUEST_TIMEOUT)
        h.clock.advance(TIMEOUT_REST)
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == "no peer is left to download movie.bin from"
    assert len(h.clients["192.0.2.2"].gets) == MAX_TIMEOUTS
    assert os.listdir(h.folder) == []


def test_unreachable_says_firewall_and_host(tmp_path):
    refused = PeerRefused("unreachable", "could not connect back to 192.0.2.9:7100")
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    h.clients["192.0.2.2"].refuse_gets = refused
    done = h.start()
    unreachable = [line for line in h.lines if "could not connect back" in line]
    assert len(unreachable) == 1
    assert "firewall" in unreachable[0]
    assert "--host" in unreachable[0]
    assert "192.0.2.2:7000" in unreachable[0]
    assert str(RECEIVER_PORT) in unreachable[0]
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert "no peer is left" in str(e.value)
    assert os.listdir(h.folder) == []


def test_unreachable_source_leaves_the_others(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=("192.0.2.2", "192.0.2.3"))
    h.clients["192.0.2.2"].refuse_gets = PeerRefused("unreachable", "no route")
    done = h.start()
    assert h.clients["192.0.2.3"].requested() == [0]
    assert h.send("192.0.2.3", 0, 0)
    assert result_of(done)[0] == "movie.bin"


def test_an_existing_file_is_not_overwritten(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE + 1))
    (h.folder / "movie.bin").write_bytes(b"my own movie")
    done = h.start()
    h.send_all("192.0.2.2", 0)
    final_name, _ = result_of(done)
    assert final_name == "movie (1).bin"
    assert h.downloaded("movie.bin") == b"my own movie"
    assert h.downloaded("movie (1).bin") == h.content
    assert "(movie.bin already existed)" in h.lines[-1]
    assert f"downloads{os.sep}movie (1).bin" in h.lines[-1]


def test_no_peer_gives_the_manifest(tmp_path):
    h = Harness(tmp_path, content_of(10), hosts=("192.0.2.2", "192.0.2.3", "192.0.2.4"))
    h.clients["192.0.2.2"] = ConnectionRefusedError("refused")
    h.clients["192.0.2.3"] = FakeClient(manifest=None)
    h.clients["192.0.2.4"] = FakeClient(manifest=None)
    done = h.start()
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value).startswith("no peer could give the manifest of movie.bin (192.0.2.2:7000: ")
    assert h.clients["192.0.2.3"].closed and h.clients["192.0.2.4"].closed
    assert os.listdir(h.folder) == []
    assert h.clock.getDelayedCalls() == []


def test_a_later_peer_gives_the_manifest(tmp_path):
    h = Harness(tmp_path, content_of(10), hosts=("192.0.2.2", "192.0.2.3"))
    h.clients["192.0.2.2"] = FakeClient(manifest=None)
    done = h.start()
    assert h.clients["192.0.2.2"].closed
    assert h.send("192.0.2.3", 0, 0)
    assert h.downloaded(result_of(done)[0]) == h.content


def test_an_empty_file(tmp_path):
    h = Harness(tmp_path, b"", name="empty.txt")
    done = h.start()
    assert h.clients["192.0.2.2"].gets == []
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
    assert h.send("192.0.2.2", 0, 0)
    h.clock.advance(PROGRESS_INTERVAL)
    # The rate is over the last seconds: 256 KiB in the last one.
    assert h.lines[-1] == (
        "download movie.bin: 25% of 1.0 MiB at 256.0 KiB/s from 1 peer(s), 3 s left"
    )
    progress = h.events[-1]
    assert progress["event"] == "download-progress"
    assert (progress["percent"], progress["bytes"], progress["eta"]) == (25, CHUNK_SIZE, 3)
    for index in (1, 2, 3):
        assert h.send("192.0.2.2", 0, index)
    assert result_of(done)[0] == "movie.bin"
    # No progress line once it is over.
    lines = len(h.lines)
    h.clock.advance(10 * PROGRESS_INTERVAL)
    assert len(h.lines) == lines


def test_cancel_discards_the_partial(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE))
    done = h.start()
    assert h.send("192.0.2.2", 0, 0)
    assert os.path.exists(h.storage.path)
    h.download.cancel()
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == "download movie.bin was cancelled"
    assert os.listdir(h.folder) == []
    assert len(h.inbox) == 0
    assert h.clock.getDelayedCalls() == []


def test_a_dropped_sender_connection_is_not_asked_again(tmp_path):
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), hosts=("192.0.2.2", "192.0.2.3"))
    done = h.start()
    a, b = h.clients["192.0.2.2"], h.clients["192.0.2.3"]
    assert a.requested() == [0, 1, 2] and b.gets == []
    a.drop()
    assert h.send("192.0.2.2", 0, 0, data=bytes(CHUNK_SIZE))
    # The rejected chunk goes to the other source, not the closed one.
    assert a.requested() == [0, 1, 2]
    assert b.requested() == [0]
    assert h.send("192.0.2.3", 0, 0)
    assert h.send("192.0.2.2", 0, 1)
    assert h.send("192.0.2.2", 0, 2)
    assert result_of(done)[0] == "movie.bin"


# -- Downloads -------------------------------------------------------------------


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


def test_downloads_adds_the_finished_file_to_the_index(tmp_path):
    h = Harness(tmp_path, content_of(10))
    index = FakeIndex()
    downloads = Downloads(lambda name, file_id, peers, report, bans, index: h.download, index)
    d = downloads.start("movie.bin", h.manifest.file_id, h.peers, h.lines.append)
    assert list(downloads.active) == [h.manifest.file_id]
    with pytest.raises(DownloadFailed) as e:
        downloads.start("movie.bin", h.manifest.file_id, h.peers, h.lines.append)
    assert str(e.value) == "movie.bin is already being downloaded"
    h.send("192.0.2.2", 0, 0)
    assert result_of(d) == "movie.bin"
    assert index.added == [(str(h.folder), "movie.bin", h.manifest)]
    assert downloads.active == {}


def test_downloads_cancel_all(tmp_path):
    h = Harness(tmp_path, content_of(10))
    index = FakeIndex()
    downloads = Downloads(lambda name, file_id, peers, report, bans, index: h.download, index)
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


# -- the swarm scheduler -------------------------------------------------------


def serve(h, host, skip=()):
    """
    Everything asked of C{host} so far and not yet sent, sent (but C{skip}).
    """
    client = h.clients[host]
    for number, (header, _) in enumerate(client.gets):
        expectation = h.expectation(host, header)
        if expectation is None:
            continue
        for index in header["chunks"]:
            if index not in expectation.arrived and index not in skip:
                h.send(host, number, index)


def test_rarest_chunks_go_first(tmp_path):
    full, a, b = "192.0.2.2", "192.0.2.3", "192.0.2.4"
    # Availability: 0-4 on a and full (2), 5-9 on all three (3), 10-14 on b
    # and full (2), 15-19 on full only (1).
    h = Harness(tmp_path, content_of(20 * CHUNK_SIZE), hosts=(full, a, b),
                have={a: set(range(10)), b: set(range(5, 15))})
    h.start()
    assert h.clients[full].gets[0][0]["chunks"] == [15, 16, 17, 18, 19, 0, 1, 2]
    assert h.clients[full].gets[1][0]["chunks"] == [3, 4, 10, 11, 12, 13, 14, 5]
    # The partial holders are asked only for what they hold.
    assert set(h.clients[a].requested()) <= set(range(10))
    assert set(h.clients[b].requested()) <= set(range(5, 15))
    assert sorted(h.clients[full].requested() + h.clients[a].requested()
                  + h.clients[b].requested()) == list(range(20))


def test_a_partial_holder_is_asked_again_what_it_has(tmp_path):
    partial = "192.0.2.3"
    h = Harness(tmp_path, content_of(4 * CHUNK_SIZE), hosts=(partial,),
                have={partial: {0, 1}})
    done = h.start()
    client = h.clients[partial]
    assert client.requested() == [0, 1]
    serve(h, partial)
    # Nothing else is held yet: the download waits rather than fails.
    h.clock.advance(PROGRESS_INTERVAL)
    assert not done.called
    client.have = {0, 1, 2, 3}
    h.clock.advance(HAVE_REFRESH)
    assert client.requested() == [0, 1, 2, 3]
    serve(h, partial)
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content


def test_a_partial_holder_missing_chunks_is_asked_again_later(tmp_path):
    partial = "192.0.2.3"
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE), hosts=(partial,),
                have={partial: {0, 1}})
    client = h.clients[partial]
    client.refuse_gets = PeerRefused("missing-chunks", "not yet")
    done = h.start()
    assert len(client.gets) == 1
    asked = client.have_asked
    assert asked == 2  # at the start, and again at once after the refusal
    client.refuse_gets = None
    h.clock.advance(BUSY_BACKOFF_MIN)
    assert len(client.gets) == 2
    serve(h, partial)
    assert result_of(done)[0] == "movie.bin"


class FakeTransport:
    disconnecting = False

    def loseConnection(self):
        self.disconnecting = True


def test_endgame_asks_a_second_source_and_cancels_the_loser(tmp_path):
    slow, fast = "192.0.2.2", "192.0.2.3"
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE), hosts=(slow, fast))
    done = h.start()
    assert h.clients[slow].requested() == [0, 1]
    assert h.clients[fast].gets == []
    slow_request = h.expectation(slow, h.clients[slow].gets[0][0])
    slow_transport = FakeTransport()
    slow_request.attach(slow_transport)
    # Not stalled long enough yet: no second copy.
    h.clock.advance(ENDGAME_STALL - PROGRESS_INTERVAL)
    assert h.clients[fast].gets == []
    h.clock.advance(PROGRESS_INTERVAL)
    assert h.clients[fast].requested() == [0, 1]
    # Each chunk at most twice in flight: nobody else is asked.
    h.clock.advance(ENDGAME_STALL)
    assert len(h.clients[fast].gets) == 1 and len(h.clients[slow].gets) == 1

    assert h.send(fast, 0, 0, done=False)
    assert slow_request.pending == {1} and not slow_transport.disconnecting
    assert h.send(fast, 0, 1)
    # Both chunks came from the fast source: the slow copy is cancelled.
    assert slow_transport.disconnecting
    assert h.inbox.claim(h.clients[slow].gets[0][0]["token"], slow) is None
    assert result_of(done)[0] == "movie.bin"
    assert h.downloaded("movie.bin") == h.content
    assert h.download.by_source() == {f"{slow}:7000": 0, f"{fast}:7000": 2 * CHUNK_SIZE}
    # A late copy from the loser is dropped quietly.
    assert slow_request.accepts(0, CHUNK_SIZE)
    result_of(slow_request.deliver(0, h.chunk(0)))
    assert h.download.bytes_wasted == CHUNK_SIZE


def test_a_busy_source_rests_longer_each_time(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    client = h.clients["192.0.2.2"]
    client.refuse_gets = PeerRefused("busy", "too many")
    done = h.start()
    assert len(client.gets) == 1
    rest = BUSY_BACKOFF_MIN
    for asked in range(2, 6):
        # Not asked again at once: only once the rest is over.
        h.clock.advance(rest * 0.99)
        assert len(client.gets) == asked - 1
        h.clock.advance(rest * 0.01)
        assert len(client.gets) == asked
        rest = min(2 * rest, BUSY_BACKOFF_MAX)
    client.refuse_gets = None
    h.clock.advance(rest)
    assert h.send("192.0.2.2", len(client.gets) - 1, 0)
    assert result_of(done)[0] == "movie.bin"


def test_strikes_count_for_the_session_and_the_ban_is_said_once(tmp_path):
    liar, honest = "192.0.2.9", "192.0.2.2"
    bans = Bans()
    garbage = b"\xee" * CHUNK_SIZE
    for folder in ("one", "two", "three"):
        (tmp_path / folder).mkdir()
    first = Harness(tmp_path / "one", content_of(3 * CHUNK_SIZE, seed=1),
                    hosts=(liar, honest), bans=bans)
    first.start()
    assert first.send(liar, 0, 0, data=garbage)
    assert first.send(liar, 0, 1, data=garbage)
    assert bans.strikes(liar) == 2 and not bans.is_banned(liar)

    second = Harness(tmp_path / "two", content_of(2 * CHUNK_SIZE, seed=2),
                     hosts=(liar, honest), bans=bans)
    done = second.start()
    assert second.send(liar, 0, 0, data=garbage)
    assert bans.is_banned(liar)
    said = [line for line in first.lines + second.lines if "banned" in line]
    assert said == [f"{liar}:7000 sent bad data 3 times and is banned for this session"]
    # The other download stops asking it too.
    first.clock.advance(PROGRESS_INTERVAL)
    gets_of_liar = len(first.clients[liar].gets)
    serve(first, honest)
    assert len(first.clients[liar].gets) == gets_of_liar
    serve(second, honest)
    assert result_of(done)[0] == "movie.bin"

    # A later download does not even connect to it.
    third = Harness(tmp_path / "three", content_of(CHUNK_SIZE, seed=3),
                    hosts=(liar, honest), bans=bans)
    third.start()
    assert third.clients[liar].gets == [] and third.clients[liar].have_asked == 0
    assert [s.peer.host for s in third.download.sources] == [honest]


def test_resume_after_a_crash_fetches_only_what_is_missing(tmp_path):
    content = content_of(4 * CHUNK_SIZE + 7)
    h = Harness(tmp_path, content)
    h.start()
    assert h.send("192.0.2.2", 0, 0)
    assert h.send("192.0.2.2", 0, 3)
    # The process dies here: nothing is closed or flushed by us.
    again = Harness(tmp_path, content)
    done = again.start()
    assert again.lines[0] == (
        "download movie.bin: 1.0 MiB in 5 chunks from 1 peer(s), "
        "resuming with 512.0 KiB already here"
    )
    assert again.clients["192.0.2.2"].requested() == [1, 2, 4]
    assert again.download.status()["percent"] == 2 * CHUNK_SIZE * 100 // len(content)
    serve(again, "192.0.2.2")
    assert result_of(done)[0] == "movie.bin"
    assert again.downloaded("movie.bin") == content
    assert os.listdir(again.folder) == ["movie.bin"]
    assert again.events[-1]["resumed"] == 2 * CHUNK_SIZE
    assert again.events[-1]["received"] == len(content) - 2 * CHUNK_SIZE


def test_resume_fetches_again_a_marked_chunk_whose_bytes_are_wrong(tmp_path):
    content = content_of(3 * CHUNK_SIZE)
    h = Harness(tmp_path, content)
    h.start()
    assert h.send("192.0.2.2", 0, 0)
    assert h.send("192.0.2.2", 0, 1)
    # As after a power loss: the map says chunk 1 is here, the bytes are not.
    with open(h.storage.path, "r+b") as f:
        f.seek(CHUNK_SIZE + 10)
        f.write(b"\0\0\0")
    again = Harness(tmp_path, content)
    done = again.start()
    assert again.clients["192.0.2.2"].requested() == [1, 2]
    serve(again, "192.0.2.2")
    assert again.downloaded(result_of(done)[0]) == content


class FullDisk(PartialFile):
    """
    A partial file on a disk with room for C{room} chunks.
    """

    room = 1

    def write(self, offset, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= 1
        PartialFile.write(self, offset, data)


def test_a_full_disk_fails_clearly_and_keeps_the_partial(tmp_path):
    content = content_of(3 * CHUNK_SIZE)
    h = Harness(tmp_path, content, storage=FullDisk)
    done = h.start()
    assert h.send("192.0.2.2", 0, 0)
    assert h.send("192.0.2.2", 0, 1)
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == (
        f"could not write movie.bin: no space left in the downloads folder {h.folder}; "
        "free some space, then download again to resume"
    )
    assert h.lines[-1] == f"error: {e.value}"
    assert h.events[-1]["event"] == "download-failed"
    # What was verified stays, for the resume.
    assert sorted(os.listdir(h.folder)) == [
        os.path.basename(h.storage.map_path), os.path.basename(h.storage.path)
    ]
    assert len(h.inbox) == 0 and h.clock.getDelayedCalls() == []
    again = Harness(tmp_path, content)
    done = again.start()
    assert again.clients["192.0.2.2"].requested() == [1, 2]
    serve(again, "192.0.2.2")
    assert again.downloaded(result_of(done)[0]) == content


def test_a_vanished_downloads_folder_fails_clearly(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE))
    h.folder.rmdir()
    done = h.start()
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == (
        f"could not start movie.bin: the downloads folder {h.folder} is gone; "
        "create it again, then download again"
    )


def test_pause_keeps_the_partial_for_a_resume(tmp_path):
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE))
    done = h.start()
    assert h.send("192.0.2.2", 0, 0)
    h.download.pause()
    with pytest.raises(DownloadFailed):
        result_of(done)
    assert h.events[-1]["event"] == "download-stopped"
    assert h.lines[-1] == "download movie.bin stopped at 50%; download it again to resume"
    assert os.path.exists(h.storage.path) and os.path.exists(h.storage.map_path)
    assert h.clock.getDelayedCalls() == []


def test_downloads_offer_the_verified_chunks_while_they_run(tmp_path):
    index = FakeIndex()
    h = Harness(tmp_path, content_of(2 * CHUNK_SIZE), index=index)
    downloads = Downloads(lambda name, file_id, peers, report, bans, index: h.download, index)
    d = downloads.start("movie.bin", h.manifest.file_id, h.peers, h.lines.append)
    name, path, chunks = index.partials[h.manifest.file_id]
    assert (name, path) == ("movie.bin", h.storage.path)
    assert 0 not in chunks
    assert h.send("192.0.2.2", 0, 0, done=False)
    assert 0 in chunks and 1 not in chunks
    assert h.send("192.0.2.2", 0, 1)
    assert result_of(d) == "movie.bin"
    # Whole now: offered as a file, no longer as a partial.
    assert index.partials == {}
    assert [added[1] for added in index.added] == ["movie.bin"]


def test_status_has_sources_rate_and_eta(tmp_path):
    a, b = "192.0.2.2", "192.0.2.3"
    h = Harness(tmp_path, content_of(2 * SOURCE_WINDOW * CHUNK_SIZE), hosts=(a, b))
    h.start()
    h.clock.advance(1)
    serve(h, a, skip=range(SOURCE_WINDOW, 2 * SOURCE_WINDOW))
    h.clock.advance(1)
    status = h.download.status()
    assert status["sources"] == 2
    assert status["percent"] == 50
    assert status["by_source"] == {f"{a}:7000": SOURCE_WINDOW * CHUNK_SIZE, f"{b}:7000": 0}
    assert status["rate"] == SOURCE_WINDOW * CHUNK_SIZE
    assert status["eta"] == 1


# -- peers that are silent, slow or late ---------------------------------------


def test_a_silent_peer_does_not_hold_up_the_others(tmp_path):
    # It accepts the connection and never answers (listed first, it used to
    # hold the download up for the idle timeout).
    silent, good = "192.0.2.2", "192.0.2.3"
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), hosts=(silent, good))
    h.clients[silent].silent = True
    done = h.start()
    assert h.clients[good].requested() == [0, 1, 2]
    assert h.lines[0] == "download movie.bin: 768.0 KiB in 3 chunks from 1 peer(s)"
    serve(h, good, skip={2})
    # Given up on once it has had its time: its connection is closed.
    h.clock.advance(ANSWER_TIMEOUT - 1)
    assert not h.clients[silent].closed
    h.clock.advance(1)
    assert h.clients[silent].closed
    assert h.clients[silent].gets == []
    h.clock.advance(TIMEOUT_REST)  # the good one's last chunk was not sent either
    serve(h, good)
    assert h.downloaded(result_of(done)[0]) == h.content
    assert h.clock.getDelayedCalls() == []


def test_a_download_from_silent_peers_only_fails_after_the_answer_timeout(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=("192.0.2.2", "192.0.2.3"))
    h.clients["192.0.2.2"].silent = True
    h.clients["192.0.2.3"].silent = True
    done = h.start()
    h.clock.advance(ANSWER_TIMEOUT - 1)
    assert not done.called
    h.clock.advance(1)
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == (
        f"no peer could give the manifest of movie.bin "
        f"(192.0.2.2:7000: no answer in {ANSWER_TIMEOUT:.0f} s)"
    )
    assert h.clients["192.0.2.2"].closed and h.clients["192.0.2.3"].closed
    assert os.listdir(h.folder) == []
    assert h.clock.getDelayedCalls() == []


def test_a_peer_that_answers_later_joins_the_download(tmp_path):
    late, first = "192.0.2.2", "192.0.2.3"
    chunks = 2 * SOURCE_WINDOW
    h = Harness(tmp_path, content_of(chunks * CHUNK_SIZE), hosts=(late, first))
    h.clients[late].holding = True
    done = h.start()
    # The first manifest in starts the download; the late peer's fetch of
    # it is given up, and it is asked what it holds instead.
    assert len(h.clients[first].requested()) == SOURCE_WINDOW
    assert [header["t"] for d, header in h.clients[late].held] == ["manifest", "have"]
    h.clients[late].release()
    assert len(h.clients[late].requested()) == SOURCE_WINDOW
    assert h.download.status()["sources"] == 2
    serve(h, late)
    serve(h, first)
    assert h.downloaded(result_of(done)[0]) == h.content
    assert h.download.sources[1].received > 0


def test_a_peer_refused_at_once_does_not_end_the_wait_for_the_others(tmp_path):
    h = Harness(tmp_path, content_of(10), hosts=("192.0.2.2", "192.0.2.3"))
    h.clients["192.0.2.2"] = ConnectionRefusedError("refused")
    h.clients["192.0.2.3"].holding = True
    done = h.start()
    assert not done.called
    h.clients["192.0.2.3"].release()  # the manifest
    h.clients["192.0.2.3"].release()  # what it holds
    assert h.send("192.0.2.3", 0, 0)
    assert h.downloaded(result_of(done)[0]) == h.content


def test_a_download_stopped_while_peers_connect_closes_them(tmp_path):
    h = Harness(tmp_path, content_of(CHUNK_SIZE), hosts=("192.0.2.2", "192.0.2.3"))
    h.clients["192.0.2.2"].silent = True
    h.clients["192.0.2.3"].silent = True
    done = h.start()
    h.download.cancel()
    with pytest.raises(DownloadFailed):
        result_of(done)
    assert h.clients["192.0.2.2"].closed and h.clients["192.0.2.3"].closed
    assert h.clock.getDelayedCalls() == []


def test_a_partial_holder_that_stops_answering_is_left_out(tmp_path):
    quiet, other = "192.0.2.2", "192.0.2.3"
    h = Harness(tmp_path, content_of(4 * CHUNK_SIZE), hosts=(quiet, other),
                have={quiet: {0, 1}, other: {0, 1}})
    done = h.start()
    serve(h, quiet)
    serve(h, other)
    h.clients[quiet].silent = True
    h.clock.advance(HAVE_REFRESH)
    assert not h.clients[quiet].closed
    h.clock.advance(ANSWER_TIMEOUT)
    assert h.clients[quiet].closed
    assert h.download.status()["sources"] == 1
    # The other one gets the rest, and gives it.
    h.clients[other].have = {0, 1, 2, 3}
    h.clock.advance(HAVE_REFRESH)
    assert sorted(h.clients[other].requested())[-2:] == [2, 3]
    serve(h, other)
    assert h.downloaded(result_of(done)[0]) == h.content
    assert h.clients[quiet].requested() == [0, 1]


def test_a_slow_but_steady_source_completes_the_download(tmp_path):
    # A sender whose upload limit lets out one chunk every `period` seconds,
    # taken in turn by the streams we opened: with two requests in flight,
    # each stream has a chunk only every 2 * period, over the timeout.
    period = 6.0
    assert period < REQUEST_TIMEOUT < 2 * period
    host = "192.0.2.2"
    chunks = 3 * SOURCE_WINDOW
    h = Harness(tmp_path, content_of(chunks * CHUNK_SIZE))
    done = h.start()
    client = h.clients[host]
    assert len(client.gets) == SOURCE_WINDOW // REQUEST_BATCH == 2
    turn = -1
    most_in_flight = []
    for _ in range(2 * chunks):
        if done.called:
            break
        h.clock.advance(period)
        live = []
        for number, (header, _) in enumerate(client.gets):
            expectation = h.expectation(host, header)
            if expectation is not None and expectation.pending:
                live.append(number)
        if not live:
            continue
        most_in_flight.append(sum(len(h.expectation(host, client.gets[n][0]).pending)
                                  for n in live))
        turn = next((n for n in live if n > turn), live[0])
        pending = h.expectation(host, client.gets[turn][0]).pending
        assert h.send(host, turn, min(pending))
    assert h.downloaded(result_of(done)[0]) == h.content
    source = h.download.sources[0]
    assert source.timeouts == 0
    assert h.download.bytes_wasted == 0
    # It was asked for less at once once found slow.
    assert min(most_in_flight[2:]) <= REQUEST_BATCH


def test_a_window_shrunk_by_slowness_grows_back(tmp_path):
    a, b = "192.0.2.2", "192.0.2.3"
    h = Harness(tmp_path, content_of(8 * SOURCE_WINDOW * CHUNK_SIZE), hosts=(a, b))
    h.start()
    client = h.clients[a]
    first, second = (header["chunks"] for header, _ in client.gets)
    # The first request of `a` is late while its second delivers.
    h.clock.advance(REQUEST_TIMEOUT / 2)
    assert h.send(a, 1, second[0], done=False)
    h.clock.advance(REQUEST_TIMEOUT / 2)
    source = h.download.sources[0]
    assert source.window == SOURCE_WINDOW // 2 and source.timeouts == 0
    # Not given up: it may still come, but it is no reason to ask for more.
    for index in first:
        assert h.send(a, 0, index)
    assert source.window == SOURCE_WINDOW // 2
    # A request answered in time is.
    for index in second[1:]:
        assert h.send(a, 1, index)
    assert source.window == SOURCE_WINDOW // 2 + 1


def test_a_source_silent_on_every_request_still_times_out(tmp_path):
    # Delivering on one request keeps the others alive only while it lasts.
    h = Harness(tmp_path, content_of(2 * SOURCE_WINDOW * CHUNK_SIZE))
    done = h.start()
    client = h.clients["192.0.2.2"]
    h.clock.advance(1)
    assert h.send("192.0.2.2", 1, client.gets[1][0]["chunks"][0], done=False)
    source = h.download.sources[0]
    h.clock.advance(REQUEST_TIMEOUT - 1)
    assert source.timeouts == 0  # the first request: late, kept
    h.clock.advance(1)
    # The second request (and the one asked after that chunk) sent nothing
    # since, nor did the source on any other.
    assert source.timeouts == 2
    h.clock.advance(REQUEST_TIMEOUT - 1)
    # Nor on the first one since it was found late.
    assert source.timeouts == MAX_TIMEOUTS == 3
    with pytest.raises(DownloadFailed) as e:
        result_of(done)
    assert str(e.value) == "no peer is left to download movie.bin from"


# -- storage work in other threads ------------------------------------------------


def test_the_partial_is_released_only_after_the_stores_in_flight(tmp_path):
    threads = Threads()
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), run_in_thread=threads)
    done = h.start()
    assert threads.names() == ["open"]
    threads.run_all()
    assert h.send("192.0.2.2", 0, 0, done=False)
    assert threads.names() == ["verify_and_store"]
    h.download.cancel()
    # The discard would close the file under the write: it waits.
    assert threads.names() == ["verify_and_store"]
    threads.run_next()
    assert threads.names() == ["discard"]
    threads.run_all()
    with pytest.raises(DownloadFailed):
        result_of(done)
    assert os.listdir(h.folder) == []


def test_a_download_stopped_while_the_partial_opens_releases_it_after(tmp_path):
    threads = Threads()
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), run_in_thread=threads)
    done = h.start()
    h.download.pause()
    with pytest.raises(DownloadFailed):
        result_of(done)
    assert threads.names() == ["open"]
    threads.run_next()
    assert threads.names() == ["discard"]
    threads.run_all()
    assert os.listdir(h.folder) == []
    assert h.clients["192.0.2.2"].gets == []


def test_a_source_lost_while_the_partial_opens_leaves_the_others(tmp_path):
    a, b = "192.0.2.2", "192.0.2.3"
    threads = Threads()
    h = Harness(tmp_path, content_of(3 * CHUNK_SIZE), hosts=(a, b), run_in_thread=threads)
    done = h.start()
    assert threads.names() == ["open"]
    h.clients[a].drop()
    threads.run_all()
    assert not done.called
    assert h.clients[a].gets == []
    assert h.clients[b].requested() == [0, 1, 2]
    serve(h, b)
    threads.run_all()
    assert h.downloaded(result_of(done)[0]) == h.content
