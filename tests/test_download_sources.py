"""
A download whose sources cannot be reached, with real L{Peer} entries (the
peer table's, which are not hashable): the user gets the sentence that names
the likely cause, and nothing critical is logged.

Kept apart from C{test_download.py}, whose fakes are hashable and so never
met this.
"""

import pytest
from support import SyncWorkers, log_events, result_of
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import LogLevel

from twisted_p2p.download import Download, DownloadFailed
from twisted_p2p.manifest import CHUNK_SIZE, hash_file
from twisted_p2p.peers import Peer
from twisted_p2p.storage import PartialFile
from twisted_p2p.transfer import Inbox

DEAD = Peer("d" * 32, "0" * 16, "192.0.2.7", 27000, 7000, "0" * 16, last_seen=0.0)
LIVE = Peer("a" * 32, "1" * 16, "192.0.2.8", 27000, 7100, "1" * 16, last_seen=0.0)


class LiveClient:
    """
    A sender connection that answers the manifest and "have" (the whole
    file) at once, and leaves every "get" unanswered.
    """

    def __init__(self, manifest):
        self.manifest = manifest
        self.gets = []

    def call(self, header):
        if header["t"] == "manifest":
            m = self.manifest
            reply = {"t": "manifest", "id": m.file_id, "size": m.size,
                     "start": header["start"], "count": m.chunk_count}
            return defer.succeed((reply, b"".join(m.chunk_hashes)))
        if header["t"] == "have":
            return defer.succeed(({"t": "have", "id": header["id"], "all": True}, b""))
        self.gets.append(header)
        return defer.Deferred()

    def when_closed(self):
        return defer.Deferred()

    def close(self):
        pass


@pytest.fixture
def logged():
    """
    The log events at warning level or above while the test runs.
    """
    with log_events(LogLevel.warn) as events:
        yield events


def make_download(tmp_path, peers, open_client):
    source = tmp_path / "movie.bin"
    source.write_bytes(b"m" * (CHUNK_SIZE + 10))
    manifest = hash_file(str(source))
    folder = tmp_path / "downloads"
    folder.mkdir()
    reported = []
    download = Download(
        "movie.bin", manifest.file_id, peers, open_client, Inbox(), 7200,
        PartialFile(str(folder), manifest.file_id), defer.maybeDeferred, SyncWorkers(),
        task.Clock(), reported.append,
    )
    return download, manifest, reported


def test_a_source_that_refuses_the_connection_is_named_with_the_likely_cause(tmp_path, logged):
    download, _, reported = make_download(
        tmp_path, [DEAD], lambda peer: defer.fail(ConnectionRefusedError())
    )
    with pytest.raises(DownloadFailed) as e:
        result_of(download.start())
    message = str(e.value)
    assert "192.0.2.7:7000: could not connect" in message
    assert "firewall" in message and "--host" in message
    assert [r["event"] for r in reported] == ["download-failed"]
    assert logged == []


def test_a_dead_source_beside_a_live_one_logs_nothing_critical(tmp_path, logged):
    clients = {}

    def open_client(peer):
        if peer is DEAD:
            return defer.fail(ConnectionRefusedError())
        return defer.succeed(clients[peer.host])

    download, manifest, reported = make_download(tmp_path, [DEAD, LIVE], open_client)
    clients[LIVE.host] = LiveClient(manifest)
    d = download.start()
    download._clock.advance(0)  # chunks are asked on the next turn of the reactor
    assert not d.called
    assert [r["event"] for r in reported] == ["download-started"]
    assert clients[LIVE.host].gets, "the live source was not asked for chunks"
    assert logged == []
    download.cancel()
    with pytest.raises(DownloadFailed):
        result_of(d)


def test_cancelled_while_connecting_logs_nothing_critical(tmp_path, logged):
    download, _, reported = make_download(tmp_path, [DEAD, LIVE], lambda peer: defer.Deferred())
    d = download.start()
    download.cancel()
    with pytest.raises(DownloadFailed):
        result_of(d)
    assert [r["event"] for r in reported] == ["download-cancelled"]
    assert logged == []


class CreepingClock(task.Clock):
    """
    A clock that moves on a little at each reading, as the real one does.
    """

    def seconds(self):
        self.rightNow += 1e-6
        return self.rightNow


def test_the_first_progress_has_a_rate(tmp_path):
    from twisted_p2p.download.download import PROGRESS_INTERVAL

    clock = CreepingClock()
    clients = {}
    source = tmp_path / "movie.bin"
    source.write_bytes(b"m" * (CHUNK_SIZE + 10))
    manifest = hash_file(str(source))
    clients[LIVE.host] = LiveClient(manifest)
    (tmp_path / "downloads").mkdir()
    reported = []
    download = Download(
        "movie.bin", manifest.file_id, [LIVE], lambda peer: defer.succeed(clients[peer.host]),
        Inbox(), 7200, PartialFile(str(tmp_path / "downloads"), manifest.file_id),
        defer.maybeDeferred, SyncWorkers(), clock, reported.append,
    )
    done = download.start()
    download.progress.verified = CHUNK_SIZE  # a chunk came in the first second
    clock.advance(PROGRESS_INTERVAL)
    [progress] = [e for e in reported if e["event"] == "download-progress"]
    download.cancel()
    done.addErrback(lambda failure: failure.trap(DownloadFailed))
    assert progress["rate"] > 0


class HugeManifestClient(LiveClient):
    """
    A liar: its manifest pages claim a file of 1 TiB, 8192 random hashes a
    page, as many pages as it is asked for.
    """

    def call(self, header):
        if header["t"] == "manifest":
            self.gets.append(header)
            reply = {"t": "manifest", "id": self.manifest.file_id, "size": 1 << 40,
                     "start": header["start"], "count": 8192}
            return defer.succeed((reply, bytes(8192 * 32)))
        return LiveClient.call(self, header)


def test_a_manifest_of_another_size_than_the_catalog_offered_is_refused_at_once(tmp_path):
    """
    The download takes the honest source's manifest; the liar, whose
    catalog offered the file at its real size, was asked one page only.
    """
    _, manifest, reported = make_download(tmp_path, [DEAD], None)  # for its file
    folder = tmp_path / "downloads2"
    folder.mkdir()
    liar, honest = HugeManifestClient(manifest), LiveClient(manifest)
    clients = {DEAD.peer_id: liar, LIVE.peer_id: honest}
    offered = {DEAD.peer_id: manifest.size, LIVE.peer_id: manifest.size}
    download = Download(
        "movie.bin", manifest.file_id, [DEAD, LIVE],
        lambda peer: defer.succeed(clients[peer.peer_id]), Inbox(), 7200,
        PartialFile(str(folder), manifest.file_id), defer.maybeDeferred, SyncWorkers(),
        task.Clock(), reported.append, size_offered=lambda peer: offered[peer.peer_id],
    )
    download.start()
    assert download.manifest == manifest
    assert len(liar.gets) == 1
    assert any("catalog offered" in error for error in download._finder.errors)
