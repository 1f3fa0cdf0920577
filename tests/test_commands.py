"""
L{Commands} against a fake peer: what each command says.
"""

import types
from collections import Counter

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from twisted_p2p.catalog import Offer
from twisted_p2p.commands import HELP, Commands
from twisted_p2p.download import DownloadFailed
from twisted_p2p.index import LocalFile
from twisted_p2p.manifest import Manifest
from twisted_p2p.peers import Peer

ALICE = Peer("a1" * 16, "0" * 16, "192.0.2.2", 27000, 7000, "0" * 16, last_seen=97.0)
BOB = Peer("b2" * 16, "1" * 16, "192.0.2.3", 27000, 7100, "1" * 16, last_seen=40.0)


def manifest_of(size, seed):
    count = (size + 256 * 1024 - 1) // (256 * 1024)
    return Manifest.build(size, [bytes([seed, i]) * 16 for i in range(count)])


NOTES = manifest_of(1234, 1)
MOVIE = manifest_of(5 * 1024 * 1024, 2)
DUP_A = manifest_of(1024, 3)
DUP_B = manifest_of(2048, 4)


class FakeIndex:
    def __init__(self, files):
        self._files = files

    def files(self):
        return list(self._files)

    def by_id(self, file_id):
        return next((f for f in self._files if f.file_id == file_id), None)


class FakeTable:
    def __init__(self, peers):
        self._peers = peers

    def peers(self):
        return list(self._peers)

    def __len__(self):
        return len(self._peers)


class FakeCatalog:
    def __init__(self, offers, files_of=None):
        self._offers = offers
        self._files_of = files_of or {}

    def offers(self):
        return list(self._offers)

    def files_of(self, peer_id):
        return self._files_of.get(peer_id, [])


class FakeDownloads:
    def __init__(self):
        self.started = []

    def start(self, name, file_id, peers, report):
        d = defer.Deferred()
        self.started.append((name, file_id, peers, report, d))
        return d


class FakePeer:
    """
    The parts of a L{PeerService} the commands use.
    """

    def __init__(self, local=(), offers=(), peers=(), files_of=None):
        self.index = FakeIndex(list(local))
        self.table = FakeTable(list(peers))
        self.catalog = FakeCatalog(list(offers), files_of)
        self.downloads = FakeDownloads()
        self.discovery = types.SimpleNamespace(dropped=Counter())
        self.clock = task.Clock()
        self.clock.advance(100)
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1


def local(name, manifest, folder="/home/me/shared"):
    return LocalFile(name, folder, manifest, (manifest.size, 0, 0))


def offer(name, manifest, *peers):
    return Offer(manifest.file_id, name, manifest.size, tuple(peers))


def run(peer, line):
    """
    The lines a command says, and its Deferred.
    """
    said = []
    d = Commands(peer).run(line, lambda event: said.extend(event["text"].splitlines()))
    return said, d


def test_unknown_command_is_one_error_line():
    said, d = run(FakePeer(), "frobnicate now")
    assert said == ["error: unknown command 'frobnicate'; type 'help' for the list"]
    assert d.called


def test_empty_line_says_nothing():
    assert run(FakePeer(), "   ")[0] == []


@pytest.mark.parametrize("line", ["download", "get", "download   "])
def test_missing_argument(line):
    name = line.split()[0]
    assert run(FakePeer(), line)[0] == [f"error: {name} needs an argument: {name} <file>"]


@pytest.mark.parametrize("line", ["list all", "peers x", "exit now", "help me"])
def test_unexpected_argument(line):
    name = line.split()[0]
    assert run(FakePeer(), line)[0] == [f"error: {name} takes no argument"]


def test_help():
    assert run(FakePeer(), "help")[0] == HELP
    assert run(FakePeer(), "?")[0] == HELP
    assert run(FakePeer(), "HELP")[0] == HELP


def test_list_local_and_remote():
    peer = FakePeer(
        local=[local("notes.txt", NOTES)],
        offers=[offer("notes.txt", NOTES, ALICE), offer("movie.bin", MOVIE, ALICE, BOB)],
        peers=[ALICE, BOB],
    )
    said, _ = run(peer, "list")
    assert said == [
        "NAME       SIZE     ID        WHERE",
        f"movie.bin  5.0 MiB  {MOVIE.file_id[:8]}  192.0.2.2:7000, 192.0.2.3:7100",
        f"notes.txt  1.2 KiB  {NOTES.file_id[:8]}  here, 192.0.2.2:7000",
    ]
    assert run(peer, "ls")[0] == said


def test_list_nothing():
    said, _ = run(FakePeer(peers=[ALICE]), "list")
    assert said == ["no files here or on 1 known peer(s)"]


def test_peers():
    peer = FakePeer(peers=[ALICE, BOB], files_of={ALICE.peer_id: [("x", "a", 1), ("y", "b", 2)]})
    said, _ = run(peer, "peers")
    assert said == [
        "PEER            ID        FILES  LAST HEARD",
        f"192.0.2.2:7000  {ALICE.peer_id[:8]}  2      3 s ago",
        f"192.0.2.3:7100  {BOB.peer_id[:8]}  0      60 s ago",
    ]


def test_no_peers():
    assert run(FakePeer(), "peers")[0] == ["no peers known yet"]


def test_peers_says_what_discovery_dropped():
    peer = FakePeer(peers=[ALICE])
    peer.discovery.dropped.update({"malformed": 3, "unmatched goodbye": 1})
    events = []
    Commands(peer).run("peers", events.append)
    assert events[0]["text"].splitlines()[-1] == (
        "discovery datagrams dropped: 3 malformed, 1 unmatched goodbye"
    )
    assert events[0]["dropped"] == {"malformed": 3, "unmatched goodbye": 1}


def test_download_by_name():
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE, BOB)])
    said, d = run(peer, "download movie.bin")
    [(name, file_id, peers, report, started)] = peer.downloads.started
    assert (name, file_id, peers) == ("movie.bin", MOVIE.file_id, (ALICE, BOB))
    assert said == []
    # The download reports through the same say().
    report({"event": "download-progress", "text": "download movie.bin: 10%"})
    assert said == ["download movie.bin: 10%"]
    assert not d.called
    started.callback("movie.bin")
    assert d.called


def test_download_a_name_with_spaces():
    peer = FakePeer(offers=[offer("my movie.bin", MOVIE, ALICE)])
    run(peer, "get   my movie.bin  ")
    assert [s[0] for s in peer.downloads.started] == ["my movie.bin"]


@pytest.mark.parametrize("prefix", [MOVIE.file_id[:4], MOVIE.file_id[:8].upper(), MOVIE.file_id])
def test_download_by_id_prefix(prefix):
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE), offer("notes.txt", NOTES, BOB)])
    said, _ = run(peer, f"download {prefix}")
    assert said == []
    assert [(s[0], s[1]) for s in peer.downloads.started] == [("movie.bin", MOVIE.file_id)]


def test_download_by_too_short_a_prefix():
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)])
    said, _ = run(peer, f"download {MOVIE.file_id[:3]}")
    assert said == [f"error: no known peer offers {MOVIE.file_id[:3]!r}; 'list' shows what they do"]
    assert peer.downloads.started == []


def test_download_an_ambiguous_name_lists_ids():
    peer = FakePeer(offers=[offer("dup.txt", DUP_A, ALICE), offer("dup.txt", DUP_B, BOB)])
    said, _ = run(peer, "download dup.txt")
    # In the catalog's order.
    assert said == [
        "error: 2 different files match 'dup.txt': "
        f"{DUP_A.file_id[:8]} (1.0 KiB), {DUP_B.file_id[:8]} (2.0 KiB); "
        "download one by its id"
    ]
    assert peer.downloads.started == []
    # By id, either is fine.
    run(peer, f"download {DUP_B.file_id[:8]}")
    assert [s[1] for s in peer.downloads.started] == [DUP_B.file_id]


def test_download_a_file_already_here_by_id():
    peer = FakePeer(local=[local("notes.txt", NOTES)], offers=[offer("notes.txt", NOTES, ALICE)])
    said, _ = run(peer, "download notes.txt")
    assert said == ["error: notes.txt is already here"]
    assert peer.downloads.started == []


def test_download_a_file_already_here_by_name_only():
    peer = FakePeer(local=[local("notes.txt", NOTES)])
    said, _ = run(peer, "download notes.txt")
    assert said == ["error: notes.txt is already here, in /home/me/shared"]


def test_download_nobody_offers():
    said, _ = run(FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)]), "download nope.txt")
    assert said == ["error: no known peer offers 'nope.txt'; 'list' shows what they do"]


def test_download_that_fails_is_said():
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)])
    said, d = run(peer, "download movie.bin")
    peer.downloads.started[0][4].errback(DownloadFailed("no peer is left to download movie.bin from"))
    assert said == ["error: no peer is left to download movie.bin from"]
    failures = []
    d.addErrback(failures.append)
    assert failures == []


def test_download_already_in_progress():
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)])

    def refuse(*args):
        raise DownloadFailed("movie.bin is already being downloaded")

    peer.downloads.start = refuse
    said, d = run(peer, "download movie.bin")
    assert said == ["error: movie.bin is already being downloaded"]
    assert d.called


def test_unexpected_failure_is_not_swallowed():
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)])
    said, d = run(peer, "download movie.bin")
    peer.downloads.started[0][4].errback(RuntimeError("bug"))
    assert said == []
    failures = []
    d.addErrback(failures.append)
    assert [f.type for f in failures] == [RuntimeError]
    assert isinstance(failures[0], Failure)


@pytest.mark.parametrize("line", ["exit", "quit", "EXIT"])
def test_exit(line):
    peer = FakePeer()
    said, _ = run(peer, line)
    assert said == ["bye"]
    assert peer.shutdowns == 1
