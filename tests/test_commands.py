"""
L{Commands} against fakes of the parts it is given: what each command
reports (structured events), and how the faces render it (L{render}).
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import CommandParts, FakeCatalog, FakeDownload
from twisted.python.failure import Failure

from twisted_p2p import events
from twisted_p2p.catalog import Offer
from twisted_p2p.download import DownloadFailed
from twisted_p2p.partials import PartialDownloads
from twisted_p2p.render import fit, render, width_of
from twisted_p2p.index import LocalFile
from twisted_p2p.manifest import Manifest
from twisted_p2p.peers import Peer

REPO = Path(__file__).resolve().parent.parent

ALICE = Peer("a1" * 16, "0" * 16, "192.0.2.2", 27000, 7000, "0" * 16, last_seen=97.0)
BOB = Peer("b2" * 16, "1" * 16, "192.0.2.3", 27000, 7100, "1" * 16, last_seen=40.0)


def manifest_of(size, seed):
    count = (size + 256 * 1024 - 1) // (256 * 1024)
    return Manifest.build(size, [bytes([seed, i]) * 16 for i in range(count)])


NOTES = manifest_of(1234, 1)
MOVIE = manifest_of(5 * 1024 * 1024, 2)
DUP_A = manifest_of(1024, 3)
DUP_B = manifest_of(2048, 4)


def FakePeer(local=(), offers=(), peers=(), files_of=None, **kwargs):
    """
    The parts the commands are given, with fakes.
    """
    return CommandParts(local, offers, peers, files_of, **kwargs)


def local(name, manifest, folder="/home/me/shared"):
    return LocalFile(name, folder, manifest, (manifest.size, 0, 0))


def offer(name, manifest, *peers):
    return Offer(manifest.file_id, name, manifest.size, tuple(peers))


def run(peer, line, origin=None, keep=None):
    """
    The lines a command says (rendered as the faces do), and its Deferred;
    the events themselves go to C{keep}, a list, if given.
    """
    said = []

    def emit(event):
        if keep is not None:
            keep.append(event)
        if event["event"] != "download-requested":
            said.extend(render(event))

    d = peer.commands.run(line, emit, origin)
    return said, d


def test_unknown_command_is_one_error_line():
    said, d = run(FakePeer(), "frobnicate now")
    assert said == ["error: unknown command 'frobnicate'; type 'help' for the list"]
    assert d.called


def test_empty_line_says_nothing():
    assert run(FakePeer(), "   ")[0] == []


@pytest.mark.parametrize("line, usage", [
    ("download", "download FILE... [--folder] [--from PEER]"),
    ("get", "get FILE... [--folder] [--from PEER]"),
    ("download   ", "download FILE... [--folder] [--from PEER]"),
    ("resume", "resume FILE | FOLDER/"),
    ("cancel", "cancel FILE"),
])
def test_missing_argument(line, usage):
    name = line.split()[0]
    assert run(FakePeer(), line)[0] == [f"error: {name} needs an argument: {usage}"]


@pytest.mark.parametrize("line", ["peers x", "exit now", "help me", "status x", "version 2"])
def test_unexpected_argument(line):
    name = line.split()[0]
    assert run(FakePeer(), line)[0] == [f"error: {name} takes no argument"]


def test_two_names_where_one_is_taken_says_to_quote():
    assert run(FakePeer(), "cancel my movie.bin")[0] == [
        "error: cancel takes one argument; quote a name with spaces: cancel FILE"
    ]


def test_unbalanced_quotes():
    said, d = run(FakePeer(), 'download "my movie.bin')
    assert said == ["error: cannot read that command: No closing quotation; quote names with \" or '"]
    assert d.called


def test_help_names_every_command_and_alias():
    said, _ = run(FakePeer(), "help")
    text = "\n".join(said)
    assert said[0] == "commands:"
    for word in ("list [PATTERN]", "peers", "download FILE... [--folder] [--from PEER]", "status",
                 "resume FILE", "cancel FILE", "version", "help", "exit", "exit!"):
        assert f"  {word}" in text
    for alias in ("(also: ls)", "(also: get)", "(also: ?)", "(also: quit)", "(also: stop)"):
        assert alias in text
    assert run(FakePeer(), "?")[0] == said
    assert run(FakePeer(), "HELP")[0] == said


def test_every_alias_in_help_works():
    from twisted_p2p.commands import COMMANDS

    names = FakePeer().commands.names()
    for name, _, _, aliases in COMMANDS:
        assert name in names
        assert all(alias in names for alias in aliases)


def test_version():
    from twisted_p2p.version import version

    kept = []
    said, _ = run(FakePeer(), "version", keep=kept)
    assert said == [f"twisted-p2p {version()}"]
    assert kept == [{"event": "version", "version": version()}]


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
    assert said == ["no files here or on 1 known peer"]
    said, _ = run(FakePeer(peers=[ALICE, BOB]), "list '*.jpg'")
    assert said == ["no file matches '*.jpg' here or on 2 known peers"]


def test_peers():
    peer = FakePeer(peers=[ALICE, BOB], files_of={ALICE.peer_id: [("x", "a", 1), ("y", "b", 2)]})
    said, _ = run(peer, "peers")
    assert said == [
        "PEER            ID        FILES  LAST HEARD",
        f"192.0.2.2:7000  {ALICE.peer_id[:8]}  2      3 s ago",
        f"192.0.2.3:7100  {BOB.peer_id[:8]}  0      1 min ago",
    ]


def test_no_peers():
    assert run(FakePeer(), "peers")[0] == ["no peers known yet"]


def test_peers_says_what_discovery_dropped():
    peer = FakePeer(peers=[ALICE])
    peer.dropped.update({"malformed": 3, "unmatched goodbye": 1})
    kept = []
    said, _ = run(peer, "peers", keep=kept)
    assert said[-1] == "discovery datagrams dropped: 3 malformed, 1 unmatched goodbye"
    assert kept[0]["dropped"] == {"malformed": 3, "unmatched goodbye": 1}


def test_download_by_name():
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE, BOB)])
    said, d = run(peer, "download movie.bin")
    [(name, file_id, peers, report, started)] = peer.downloads.started
    assert (name, file_id, peers) == ("movie.bin", MOVIE.file_id, (ALICE, BOB))
    assert said == []
    # The download reports through the same emit().
    report({"event": "something-new", "text": "download movie.bin: 10%"})
    assert said == ["download movie.bin: 10%"]
    assert not d.called
    started.callback("movie.bin")
    assert d.called


def test_download_a_name_with_spaces():
    peer = FakePeer(offers=[offer("my movie.bin", MOVIE, ALICE)])
    run(peer, 'get   "my movie.bin"  ')
    run(peer, "download 'my movie.bin'")
    run(peer, "download my\\ movie.bin")
    assert [s[0] for s in peer.downloads.started] == ["my movie.bin"] * 3


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


@pytest.mark.parametrize("line", ["exit", "quit", "EXIT", "exit!", "stop"])
def test_exit(line):
    peer = FakePeer()
    said, _ = run(peer, line)
    assert said == ["bye"]
    assert peer.shutdowns == 1


# -- patterns, several files, --from ------------------------------------------

JPG_A = manifest_of(3000, 5)
JPG_B = manifest_of(4000, 6)
NAMED_ALICE = dataclasses.replace(ALICE)
NAMED_ALICE.name = "alice"


def photo_peer():
    return FakePeer(
        local=[local("notes.txt", NOTES)],
        offers=[
            offer("holiday 1.jpg", JPG_A, ALICE),
            offer("holiday 2.jpg", JPG_B, ALICE, BOB),
            offer("movie.bin", MOVIE, BOB),
            offer("notes.txt", NOTES, BOB),
        ],
        peers=[ALICE, BOB],
    )


def names_listed(said):
    return [line.split("  ")[0] for line in said[1:]]


@pytest.mark.parametrize("pattern, names", [
    ("*.jpg", ["holiday 1.jpg", "holiday 2.jpg"]),
    ("'holiday ?.jpg'", ["holiday 1.jpg", "holiday 2.jpg"]),
    ("MOVIE", ["movie.bin"]),
    ("ote", ["notes.txt"]),
    ("*.JPG", ["holiday 1.jpg", "holiday 2.jpg"]),
])
def test_list_pattern(pattern, names):
    said, _ = run(photo_peer(), f"list {pattern}")
    assert said[0].startswith("NAME")
    assert names_listed(said) == names


def test_download_a_pattern_starts_every_match_not_here():
    peer = photo_peer()
    kept = []
    said, d = run(peer, "download *.jpg *.txt", keep=kept)
    assert [s[0] for s in peer.downloads.started] == ["holiday 1.jpg", "holiday 2.jpg"]
    # What one name or pattern cannot give is said; the others go on.
    assert said == ["error: every file that matches '*.txt' is here already"]
    assert kept[1]["event"] == "download-requested"
    assert [f["file"] for f in kept[1]["files"]] == ["holiday 1.jpg", "holiday 2.jpg"]
    assert render(kept[1]) == ["downloading 2 files: holiday 1.jpg, holiday 2.jpg"]
    assert not d.called
    for started in peer.downloads.started:
        started[4].callback(started[0])
    assert d.called


def test_download_several_names():
    peer = photo_peer()
    run(peer, 'download "holiday 2.jpg" movie.bin')
    assert [s[0] for s in peer.downloads.started] == ["holiday 2.jpg", "movie.bin"]


def test_download_a_pattern_of_files_all_here():
    said, _ = run(photo_peer(), "download notes.*")
    assert said == ["error: every file that matches 'notes.*' is here already"]


def test_download_a_pattern_that_matches_nothing():
    said, _ = run(photo_peer(), "download *.png")
    assert said == ["error: no known peer offers a file that matches '*.png'; 'list' shows what they do"]


@pytest.mark.parametrize("source", ["192.0.2.3:7100", BOB.peer_id[:6], BOB.peer_id])
def test_download_from_a_peer(source):
    peer = photo_peer()
    run(peer, f"download 'holiday 2.jpg' --from {source}")
    [(name, _, peers, _, _)] = peer.downloads.started
    assert (name, peers) == ("holiday 2.jpg", (BOB,))


def test_download_from_a_peer_by_name():
    bob = dataclasses.replace(BOB)
    bob.name = "Bob-Laptop"
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE, bob)], peers=[ALICE, bob])
    run(peer, "download movie.bin --from bob-laptop")
    assert peer.downloads.started[0][2] == (bob,)
    assert peer.commands.peer_names() == ["192.0.2.2:7000", "192.0.2.3:7100", "Bob-Laptop"]


def test_download_from_a_peer_that_does_not_have_it():
    said, _ = run(photo_peer(), "download 'holiday 1.jpg' --from 192.0.2.3:7100")
    assert said == ["error: 192.0.2.3:7100 does not offer holiday 1.jpg; 'list' shows who does"]


def test_download_from_an_unknown_peer():
    said, _ = run(photo_peer(), "download movie.bin --from carol")
    assert said == ["error: no known peer is called 'carol'; 'peers' lists them"]


def test_download_from_without_a_peer():
    said, _ = run(photo_peer(), "download movie.bin --from")
    assert said == ["error: --from needs a peer: download FILE --from PEER"]


# -- names of peers -------------------------------------------------------------


def test_list_and_peers_show_names_next_to_addresses():
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, NAMED_ALICE, BOB)], peers=[NAMED_ALICE, BOB])
    said, _ = run(peer, "list")
    assert said[1].endswith("alice (192.0.2.2:7000), 192.0.2.3:7100")
    said, _ = run(peer, "peers")
    assert said[0].split() == ["PEER", "NAME", "ID", "FILES", "LAST", "HEARD"]
    assert said[1].split()[:2] == ["192.0.2.2:7000", "alice"]
    assert said[2].split()[:2] == ["192.0.2.3:7100", "-"]


def test_wide_names_keep_the_columns_in_line():
    from wcwidth import wcswidth

    peer = FakePeer(offers=[offer("日本語の写真.jpg", JPG_A, ALICE), offer("a.jpg", JPG_B, ALICE)])
    said, _ = run(peer, "list")
    # The SIZE column starts at the same cell on every line.
    starts = {wcswidth(line[: line.index(size)]) for line, size in zip(said, ["SIZE", "3.9 KiB", "2.9 KiB"])}
    assert len(starts) == 1, said


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F)),
       cells=st.integers(0, 30))
def test_ascii_is_measured_and_cut_as_wcwidth_says(text, cells):
    """
    Printable ASCII is measured without C{wcwidth}, control characters with
    it: the same cells either way.
    """
    from wcwidth import wcswidth, wcwidth

    expected = wcswidth(text)
    if expected < 0:
        expected = sum(max(wcwidth(c), 1) if wcwidth(c) != 0 else 0 for c in text)
    assert width_of(text) == expected
    if not text.isprintable():
        return
    cut = fit(text, cells)
    if expected <= cells:
        assert cut == text
    else:
        assert cut.endswith("…") and text.startswith(cut[:-1])
        assert width_of(cut[:-1]) == max(cells - 1, 0)


def test_ascii_names_are_rendered_without_loading_wcwidth():
    code = (
        "import sys; from twisted_p2p.render import fit, width_of; "
        "assert width_of('movie.bin') == 9 and fit('movie.bin', 6) == 'movie' + chr(0x2026); "
        "assert 'wcwidth' not in sys.modules; "
        "assert width_of(chr(0x65e5)) == 2 and 'wcwidth' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_long_list_is_cut_with_a_count():
    many = [offer(f"file{i:03}.bin", manifest_of(100 + i, i), ALICE) for i in range(30)]
    peer = FakePeer(offers=many, peers=[ALICE])
    kept = []
    run(peer, "list", keep=kept)
    lines = render(kept[0], max_rows=10)
    assert len(lines) == 12
    assert lines[-1] == "... and 20 more (30 in all); 'list PATTERN' shows fewer, p2ppeer-ctl list shows all"
    assert len(render(kept[0])) == 31


# -- status, resume ---------------------------------------------------------------


def stopped_record(tmp_path, name="movie.bin", manifest=MOVIE, percent=48):
    record = PartialDownloads(str(tmp_path / "partials.json"))
    record.observe(events.event("download-started", file=name, id=manifest.file_id,
                                size=manifest.size, chunks=20, sources=1, resumed=0))
    record.observe(events.event("download-progress", file=name, id=manifest.file_id,
                                percent=percent))
    record.observe(events.event("download-stopped", file=name, id=manifest.file_id,
                                reason="prose"))
    return record


def test_status_lists_running_and_stopped_downloads(tmp_path):
    peer = FakePeer(partials=stopped_record(tmp_path))
    peer.downloads.active[JPG_A.file_id] = FakeDownload("holiday 1.jpg", JPG_A.file_id, 25)
    said, _ = run(peer, "status")
    assert said == [
        "FILE           DONE                        RATE         SOURCES  ETA",
        "holiday 1.jpg  25% (256.0 KiB of 1.0 MiB)  512.0 KiB/s  1        1 min 30 s",
        "stopped or partial ('resume FILE' continues one):",
        "  FILE       DONE            WHY",
        "  movie.bin  48% of 5.0 MiB  the peer stopped",
        "partial downloads are kept, hidden, as /dl/.p2ppeer-<id>.part",
    ]


def test_status_with_nothing():
    assert run(FakePeer(partials=PartialDownloads()), "status")[0] == ["no downloads in progress"]


def test_the_record_survives_a_restart(tmp_path):
    stopped_record(tmp_path)
    again = PartialDownloads(str(tmp_path / "partials.json"))
    assert again.stopped() == [{"file": "movie.bin", "id": MOVIE.file_id, "size": MOVIE.size,
                                "percent": 48, "reason": "the peer stopped"}]


def test_a_damaged_record_is_an_empty_one(tmp_path):
    (tmp_path / "partials.json").write_text('[{"file": 3}, "x", {"file": "a", "id": "b", "size": "big"}')
    assert PartialDownloads(str(tmp_path / "partials.json")).stopped() == []
    (tmp_path / "partials.json").write_text('[{"file": 3}, "x", {"file": "a", "id": "b", "size": "big"}]')
    assert PartialDownloads(str(tmp_path / "partials.json")).stopped() == []


def test_resume_starts_the_stopped_download(tmp_path):
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)], partials=stopped_record(tmp_path))
    said, _ = run(peer, "resume movie.bin")
    assert said == []
    assert [(s[0], s[1]) for s in peer.downloads.started] == [("movie.bin", MOVIE.file_id)]


def test_resume_by_id_prefix(tmp_path):
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)], partials=stopped_record(tmp_path))
    run(peer, f"resume {MOVIE.file_id[:6]}")
    assert [s[1] for s in peer.downloads.started] == [MOVIE.file_id]


def test_resume_when_nobody_offers_it(tmp_path):
    said, _ = run(FakePeer(partials=stopped_record(tmp_path)), "resume movie.bin")
    assert said == ["error: no known peer offers movie.bin now; resume it when one that has it is back"]


def test_resume_of_nothing_stopped(tmp_path):
    said, _ = run(FakePeer(partials=PartialDownloads()), "resume movie.bin")
    assert said == ["error: no stopped download of 'movie.bin'; 'status' lists them, and "
                    "'download' starts a new one"]


def test_a_finished_download_leaves_the_record(tmp_path):
    record = stopped_record(tmp_path)
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)], partials=record)
    run(peer, "resume movie.bin")
    report = peer.downloads.started[0][3]
    report(events.event("download-finished", file="movie.bin", id=MOVIE.file_id,
                        path="downloads/movie.bin", size=MOVIE.size, seconds=1.0, rate=5 << 20))
    assert record.stopped() == []
    assert PartialDownloads(str(tmp_path / "partials.json")).stopped() == []


def test_a_stop_event_is_given_the_percent_it_stopped_at(tmp_path):
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)], partials=PartialDownloads())
    said, _ = run(peer, "download movie.bin")
    report = peer.downloads.started[0][3]
    report(events.event("download-started", file="movie.bin", id=MOVIE.file_id,
                        size=MOVIE.size, chunks=20, sources=1, resumed=0))
    report(events.event("download-progress", file="movie.bin", id=MOVIE.file_id, percent=31,
                        bytes=MOVIE.size * 31 // 100, size=MOVIE.size, rate=1 << 20,
                        sources=1, eta=4))
    report(events.event("download-stopped", "download movie.bin stopped at 31%; ...",
                        file="movie.bin", id=MOVIE.file_id, reason="..."))
    assert said[-1] == "download movie.bin stopped at 31%; 'resume movie.bin' continues it"


# -- exit asks while files move, other faces hear of downloads ----------------------


class Terminal:
    """A face that asks before leaving."""

    face = "console"
    interactive = True


def test_exit_asks_once_while_files_move():
    peer = FakePeer()
    peer.downloads.active[MOVIE.file_id] = FakeDownload("movie.bin", MOVIE.file_id, 48)
    peer.uploads = 2
    face = Terminal()
    said, _ = run(peer, "exit", origin=face)
    assert said == [
        "leaving now interrupts the download of movie.bin at 48% and 2 uploads to other peers; "
        "downloads resume later. Type exit again, or exit!, to leave"
    ]
    assert peer.shutdowns == 0
    assert run(peer, "exit", origin=face)[0] == ["bye"]
    assert peer.shutdowns == 1


def test_exit_asks_again_after_another_command():
    peer = FakePeer()
    peer.uploads = 1
    face = Terminal()
    run(peer, "exit", origin=face)
    run(peer, "status", origin=face)
    assert run(peer, "exit", origin=face)[0][0].startswith("leaving now interrupts 1 upload")
    assert peer.shutdowns == 0


def test_exit_bang_and_scripts_leave_at_once():
    peer = FakePeer()
    peer.uploads = 1
    assert run(peer, "exit!", origin=Terminal())[0] == ["bye"]
    assert run(peer, "exit")[0] == ["bye"]  # a pipe or p2ppeer-ctl: nobody to ask
    assert peer.shutdowns == 2


def test_download_events_reach_the_other_faces():
    hub = events.EventHub()
    heard, mine = [], []
    asker = Terminal()
    asker.face = "p2ppeer-ctl"
    hub.subscribe(heard.append, owner=object())
    hub.subscribe(mine.append, owner=asker)
    peer = FakePeer(offers=[offer("movie.bin", MOVIE, ALICE)], hub=hub)
    said, _ = run(peer, "download movie.bin", origin=asker)
    peer.downloads.started[0][3](events.event(
        "download-started", file="movie.bin", id=MOVIE.file_id, size=MOVIE.size, chunks=20,
        sources=1, resumed=0))
    assert [e["event"] for e in heard] == ["download-started"]
    assert render(heard[0]) == [
        "download movie.bin: 5.0 MiB in 20 chunks from 1 peer (asked for by p2ppeer-ctl)"
    ]
    # The face that asked has it as its answer, not twice, and knows who asked.
    assert mine == []
    assert said == ["download movie.bin: 5.0 MiB in 20 chunks from 1 peer"]


# -- folders ---------------------------------------------------------------------

A = manifest_of(1000, 21)
B = manifest_of(2000, 22)
C = manifest_of(3000, 23)


def tree_peer(**kwargs):
    return FakePeer(
        offers=[offer("photos/2026/a.jpg", A, ALICE), offer("photos/2026/b b.jpg", B, ALICE, BOB),
                offer("photos/c.jpg", C, BOB), offer("notes.txt", NOTES, ALICE)],
        peers=[ALICE, BOB], **kwargs,
    )


def test_list_collapses_folders():
    said, _ = run(tree_peer(), "list")
    assert said == [
        "NAME       SIZE     ID        WHERE",
        f"notes.txt  1.2 KiB  {NOTES.file_id[:8]}  192.0.2.2:7000",
        "photos/    5.9 KiB  3 files   192.0.2.2:7000, 192.0.2.3:7100",
        "'list FOLDER/' shows what a folder holds; 'download FOLDER/' fetches it",
    ]


def test_list_a_folder_expands_it():
    said, _ = run(tree_peer(), "list photos/")
    assert said[1:3] == [
        "photos/2026/  2.9 KiB  2 files   192.0.2.2:7000, 192.0.2.3:7100",
        f"photos/c.jpg  2.9 KiB  {C.file_id[:8]}  192.0.2.3:7100",
    ]
    said, _ = run(tree_peer(), "list photos/2026/")
    assert [line.split()[0] for line in said[1:]] == ["photos/2026/a.jpg", "photos/2026/b"]
    assert run(tree_peer(), "list nope/")[0] == ["no folder nope/ here or on 2 known peers"]
    assert run(tree_peer(), "list ../")[0][0].startswith("error: ../ is not a folder path")


def test_list_a_pattern_is_flat():
    said, _ = run(tree_peer(), "list *.jpg")
    assert [line.split()[0] for line in said[1:]] == [
        "photos/2026/a.jpg", "photos/2026/b", "photos/c.jpg"]


@pytest.mark.parametrize("line", ["download photos/", "download --folder photos",
                                  "download photos --folder"])
def test_download_a_folder_keeps_the_tree(line):
    peer = tree_peer()
    said, _ = run(peer, line)
    assert said == ["downloading folder photos/ (3 files, 5.9 KiB) into photos/"]
    assert sorted(s[0] for s in peer.downloads.started) == [
        "photos/2026/a.jpg", "photos/2026/b b.jpg", "photos/c.jpg"]


def test_download_a_subfolder_lands_under_its_own_name():
    peer = tree_peer()
    run(peer, "download photos/2026/")
    assert sorted(s[0] for s in peer.downloads.started) == ["2026/a.jpg", "2026/b b.jpg"]


def test_a_folder_that_exists_is_decided_once():
    peer = tree_peer()
    peer.downloads.taken = {"photos", "photos (1)"}
    keep = []
    said, d = run(peer, "download photos/", keep=keep)
    assert said == [
        "downloading folder photos/ (3 files, 5.9 KiB) into photos (2)/ (photos/ already "
        "existed; 'resume photos/' goes on with it there)"]
    assert sorted(s[0] for s in peer.downloads.started) == [
        "photos (2)/2026/a.jpg", "photos (2)/2026/b b.jpg", "photos (2)/c.jpg"]
    # Each file's events name the folder; the end is summed up.
    for name, file_id, _, report, waiting in peer.downloads.started:
        report(events.event("download-finished", file=name, id=file_id, path="x/" + name,
                            size=1, seconds=1, rate=1))
        waiting.callback(name)
    assert all(e.get("folder") == "photos/" for e in keep if e["event"] == "download-finished")
    assert d.called
    assert said[-1].startswith(
        "downloaded folder photos/ to photos (2)/: 3 files, 5.9 KiB in ")


def test_resume_a_folder_keeps_what_is_there_and_fetches_the_rest():
    peer = tree_peer()
    peer.downloads.taken = {"photos"}
    peer.downloads.here = {"photos/2026/a.jpg": A.file_id}
    said, d = run(peer, "resume photos/")
    assert said == [
        "resuming folder photos/ in photos/: 2 files (4.9 KiB) to fetch, 1 file (1000 B) "
        "already there"]
    entries, _ = peer.downloads.checked
    assert sorted(name for name, _, _ in entries) == [
        "photos/2026/a.jpg", "photos/2026/b b.jpg", "photos/c.jpg"]
    # Into photos/ itself, not photos (1)/.
    assert sorted(s[0] for s in peer.downloads.started) == ["photos/2026/b b.jpg", "photos/c.jpg"]
    first, second = peer.downloads.started
    first[4].callback(first[0])
    second[4].errback(DownloadFailed("it broke"))
    assert d.called
    assert said[-1].startswith("downloaded folder photos/ to photos/: 1 file, ")
    assert said[-1].endswith(
        "; 1 file already there; 1 file failed (see above), 'resume photos/' retries")


def test_resume_a_folder_that_is_all_there_fetches_nothing():
    peer = tree_peer()
    peer.downloads.taken = {"photos"}
    peer.downloads.here = {"photos/2026/a.jpg": A.file_id, "photos/2026/b b.jpg": B.file_id,
                           "photos/c.jpg": C.file_id}
    said, d = run(peer, "resume photos/")
    assert peer.downloads.started == []
    assert d.called
    assert said[-1].startswith("downloaded folder photos/ to photos/: 0 files, 0 B in ")
    assert said[-1].endswith("; 3 files already there")


def test_resume_a_folder_hands_over_what_the_index_knows_of_downloads(tmp_path):
    peer = tree_peer(local=[local("photos/c.jpg", C, folder="/home/me/downloads")])
    peer.downloads.taken = {"photos"}
    run(peer, "resume photos/")
    _, known = peer.downloads.checked
    assert known == {"/home/me/downloads/photos/c.jpg": (
        peer.index.files()[0].signature, C.file_id)}


def test_resume_a_folder_that_is_not_in_downloads():
    said, _ = run(tree_peer(), "resume photos/")
    assert said == [
        "error: there is no folder photos/ in downloads/ to resume; 'download photos/' fetches it"]
    said, _ = run(tree_peer(), "resume ../")
    assert said[0].startswith("error: ") and "not a folder path" in said[0]


def test_resume_completes_the_folders_a_folder_download_made():
    peer = tree_peer()
    assert "photos/" not in peer.commands.file_names("resume")
    peer.downloads.taken = {"photos"}
    assert "photos/" in peer.commands.file_names("resume")


def test_a_failed_file_of_a_folder_is_counted():
    peer = tree_peer()
    said, d = run(peer, "download photos/")
    first, *others = peer.downloads.started
    first[4].errback(DownloadFailed("it broke"))
    for s in others:
        s[4].callback(s[0])
    assert "error: it broke" in said
    assert said[-1].endswith("; 1 file failed (see above), 'download' again retries")


@pytest.mark.parametrize("line", ["download ../", "download /etc/", "download --folder ..",
                                  "download a//b/"])
def test_download_a_hostile_folder_is_refused(line):
    peer = tree_peer()
    said, _ = run(peer, line)
    assert said[0].startswith("error: ") and "not a folder path" in said[0]
    assert peer.downloads.started == []


def test_download_a_folder_nobody_offers():
    said, _ = run(tree_peer(), "download nope/")
    assert said == ["error: no known peer offers a folder nope/; 'list' shows what they do"]


def test_a_file_in_a_folder_asked_alone_lands_by_its_name():
    peer = tree_peer()
    run(peer, "download photos/c.jpg")
    assert [s[0] for s in peer.downloads.started] == ["c.jpg"]


def test_status_says_what_waits_its_turn():
    peer = FakePeer()
    peer.downloads.waiting = ["photos/a.jpg", "photos/b.jpg", "photos/c.jpg", "photos/d.jpg"]
    said, _ = run(peer, "status")
    assert said == [
        "no downloads in progress",
        "4 files waiting their turn: photos/a.jpg, photos/b.jpg, photos/c.jpg, ...",
    ]


def recording_threads(peer):
    """
    Make C{peer}'s commands run their thread work at once, and return the
    list of the names of the functions given to a thread.
    """
    from twisted.internet import defer

    ran = []

    def in_thread(f, *args):
        ran.append(f.__name__)
        return defer.maybeDeferred(f, *args)

    peer.commands._run = in_thread
    return ran


def test_a_large_list_is_worked_out_in_a_thread():
    from twisted_p2p import commands as commands_module

    peer = tree_peer()
    ran = recording_threads(peer)
    small, _ = run(peer, "list")
    assert ran == []
    peer.catalog.size = commands_module.LIST_IN_THREAD
    large, d = run(peer, "list")
    assert ran == ["_list_rows"] and large == small and d.called


@pytest.mark.parametrize("line, walks", [
    ("download photos/", True),
    ("download --folder photos", True),
    ("download '*.jpg'", True),
    ("download nope.txt '*.jpg'", True),
    ("download photos/c.jpg", False),
    ("download nope.txt", False),
])
def test_a_download_that_walks_a_large_catalog_works_it_out_in_a_thread(line, walks):
    from twisted_p2p import commands as commands_module

    def said_by(size):
        peer = tree_peer()
        ran = recording_threads(peer)
        peer.catalog.size = size
        said, d = run(peer, line)
        started = [(s[0], s[1]) for s in peer.downloads.started]
        return ran, said, started, d.called

    ran, said, started, _ = said_by(commands_module.LIST_IN_THREAD - 1)
    assert ran == []
    # The same answer and downloads over a large catalog, worked out in a
    # thread only when a folder or a pattern asks for every offer.
    ran, said_large, started_large, _ = said_by(commands_module.LIST_IN_THREAD)
    assert ran == (["_resolve_all"] if walks else [])
    assert (said_large, started_large) == (said, started)
    assert said or started


def test_resume_a_folder_works_out_what_is_there_in_a_thread():
    # The offers below the folder and the index (100,000 files, maybe) are
    # read in one thread job, with the files found there already.
    peer = tree_peer()
    peer.downloads.taken = {"photos"}
    ran = recording_threads(peer)
    said, _ = run(peer, "resume photos/")
    assert ran == ["_resume_plan"]
    assert sorted(s[0] for s in peer.downloads.started) == [
        "photos/2026/a.jpg", "photos/2026/b b.jpg", "photos/c.jpg"]
    # Its mistakes are said as they were.
    peer.downloads.taken = frozenset()
    said, _ = run(peer, "resume photos/")
    assert said == ["error: there is no folder photos/ in downloads/ to resume; "
                    "'download photos/' fetches it"]


def test_cancel_a_folder():
    peer = FakePeer()
    inside = FakeDownload("photos (1)/a.jpg", "a" * 64)
    outside = FakeDownload("photos.txt", "b" * 64)
    peer.downloads.active = {d.file_id: d for d in (inside, outside)}
    peer.downloads.unqueue = lambda which: [n for n in ("photos (1)/b.jpg", "x/c") if which(n)]
    said, _ = run(peer, "cancel 'photos (1)/'")
    assert said == ["cancelling photos (1)/a.jpg",
                    "dropped 1 file of photos (1)/ that had not started"]
    assert inside.cancelled and not outside.cancelled
    assert run(peer, "cancel nope/")[0] == [
        "error: no download below nope/ is in progress; 'status' lists them"]


def test_download_a_folder_from_one_peer_takes_what_it_has():
    peer = tree_peer()
    said, _ = run(peer, "download photos/ --from 192.0.2.3:7100")
    assert said == ["downloading folder photos/ (2 files, 4.9 KiB) into photos/"]
    assert sorted((s[0], [p.label for p in s[2]]) for s in peer.downloads.started) == [
        ("photos/2026/b b.jpg", ["192.0.2.3:7100"]), ("photos/c.jpg", ["192.0.2.3:7100"])]
    assert run(tree_peer(), "download photos/2026/ --from 192.0.2.3:7100")[0] == [
        "downloading folder photos/2026/ (1 file, 2.0 KiB) into 2026/"]


class PiecesCatalog(FakeCatalog):
    """A catalog in which caches hold MOVIE in pieces, and ALICE NOTES whole."""

    def __init__(self, offers, availability):
        FakeCatalog.__init__(self, offers)
        self._availability = availability

    def holdings_of(self, peer_id):
        return {NOTES.file_id: None} if peer_id == ALICE.peer_id else {MOVIE.file_id: b"\x01"}

    def holds_whole(self, peer_id, file_id):
        return self.holdings_of(peer_id).get(file_id, b"") is None

    def availability(self, file_id, chunks):
        return self._availability[file_id]


def test_list_shows_availability_when_only_pieces_are_left():
    peer = FakePeer(peers=[ALICE, BOB])
    peer.commands._catalog = PiecesCatalog(
        [offer("movie.bin", MOVIE, BOB), offer("notes.txt", NOTES, ALICE)],
        {MOVIE.file_id: (1.0, 2), NOTES.file_id: (1.0, 1)},
    )
    kept = []
    said, _ = run(peer, "list", keep=kept)
    assert said == [
        "NAME       SIZE     ID        AVAILABLE        WHERE",
        f"movie.bin  5.0 MiB  {MOVIE.file_id[:8]}  100% (2 copies)  192.0.2.3:7100",
        f"notes.txt  1.2 KiB  {NOTES.file_id[:8]}  100% (1 copy)    192.0.2.2:7000",
    ]
    movie = kept[0]["files"][0]
    assert (movie["available"], movie["copies"], movie["whole"]) == (1.0, 2, False)
    # Chunks no known peer holds: the share of those still to be had.
    peer.commands._catalog._availability[MOVIE.file_id] = (0.75, 0)
    said, _ = run(peer, "list movie")
    assert said[1].split("  ")[3] == "75% of chunks"


def test_list_shows_no_availability_when_every_file_is_whole_somewhere():
    peer = FakePeer(peers=[ALICE])
    peer.commands._catalog = PiecesCatalog(
        [offer("notes.txt", NOTES, ALICE)], {NOTES.file_id: (1.0, 1)}
    )
    said, _ = run(peer, "list")
    assert said[0] == "NAME       SIZE     ID        WHERE"


def test_cache_shows_what_is_held_and_what_was_pushed():
    status = {
        "quota": 40 << 20, "used": 10 << 20, "free": 30 << 20, "replicas": 2,
        "files": [{"id": MOVIE.file_id, "name": "movie.bin", "size": MOVIE.size,
                   "chunks": 8, "bytes": 2 << 20}],
        "pushed_chunks": 3, "pushed_bytes": 3 << 18, "refused_offers": 1,
        "stored_chunks": 8, "stored_bytes": 2 << 20, "refused_pushes": 0, "rounds": 4,
    }
    peer = FakePeer()
    peer.commands._distribution = lambda: status
    kept = []
    said, _ = run(peer, "cache", keep=kept)
    assert kept == [dict(status, event="cache")]
    assert said == [
        "cache: 10.0 MiB of 40.0 MiB used, 30.0 MiB free",
        "NAME       SIZE     ID        CHUNKS  HELD",
        f"movie.bin  5.0 MiB  {MOVIE.file_id[:8]}  8/20    2.0 MiB",
        "distribution (replicas 2): pushed 3 chunks (768.0 KiB), stored 8 chunks (2.0 MiB) "
        "for others; refused 0 push(es), 1 offer(s) were refused in part or whole",
    ]
    status["banned_pushers"] = 2
    said, _ = run(peer, "cache")
    assert said[-1].endswith(
        "1 offer(s) were refused in part or whole; 2 address(es) banned for bad chunks")
    said, _ = run(peer, "cache", keep=[])
    status.update(quota=0, used=0, free=0, files=[])
    said, _ = run(peer, "cache")
    assert said[0] == "cache: this peer hosts nothing for others (--cache-size 0)"


def test_cache_without_distribution_is_an_error():
    said, _ = run(FakePeer(), "cache")
    assert said == ["error: this peer does not distribute"]


class TestOverTheNetworkCatalog:
    """
    Over the real L{NetworkCatalog}, C{download NAME}, C{download ID} and
    C{resume} look their file up: none builds every offer of the catalog
    (over 100,000 entries that held the reactor 0.4-1.1 s, the first time
    after each change of the catalog).
    """

    @pytest.fixture
    def parts(self, monkeypatch, tmp_path):
        from twisted.internet import defer, task

        from twisted_p2p.catalog import NetworkCatalog
        from twisted_p2p.peers import PeerTable
        from twisted_p2p.wire import Announce

        clock = task.Clock()
        table = PeerTable(clock, 30.0)
        listed = {
            ALICE.peer_id: [(MOVIE.file_id, "films/movie.bin", MOVIE.size),
                            (NOTES.file_id, "notes.txt", NOTES.size)],
            BOB.peer_id: [(MOVIE.file_id, "bob's movie.bin", MOVIE.size)],
        }
        catalog = NetworkCatalog(
            table, lambda peer: defer.succeed(("1" * 16, listed[peer.peer_id])), clock
        )
        for peer in (ALICE, BOB):
            table.heard(Announce(peer.peer_id, peer.instance_id, peer.transfer_port, "1" * 16),
                        peer.host, peer.udp_port)

        def walked(self):
            raise AssertionError("the command walked every offer of the catalog")

        monkeypatch.setattr(NetworkCatalog, "offers", walked)
        monkeypatch.setattr(NetworkCatalog, "paths", walked)
        return FakePeer(catalog=catalog, table=table, partials=stopped_record(tmp_path))

    def sources(self, started):
        return [p.peer_id for p in started[2]]

    def test_by_name(self, parts):
        said, _ = run(parts, "download films/movie.bin")
        assert said == []
        (started,) = parts.downloads.started
        assert started[:2] == ("movie.bin", MOVIE.file_id)
        assert self.sources(started) == [ALICE.peer_id, BOB.peer_id]

    def test_by_a_name_that_only_one_peer_uses(self, parts):
        # Alice's name is the one list shows; Bob's finds the same content.
        run(parts, "download \"bob's movie.bin\"")
        (started,) = parts.downloads.started
        assert started[:2] == ("bob's movie.bin", MOVIE.file_id)
        assert self.sources(started) == [ALICE.peer_id, BOB.peer_id]

    def test_by_id_prefix(self, parts):
        run(parts, f"download {NOTES.file_id[:8]}")
        (started,) = parts.downloads.started
        assert started[:2] == ("notes.txt", NOTES.file_id)
        assert self.sources(started) == [ALICE.peer_id]

    def test_nobody_offers_it(self, parts):
        said, _ = run(parts, "download nope.txt")
        assert said == ["error: no known peer offers 'nope.txt'; 'list' shows what they do"]

    def test_resume(self, parts):
        said, _ = run(parts, "resume movie.bin")
        assert said == []
        (started,) = parts.downloads.started
        assert started[:2] == ("movie.bin", MOVIE.file_id)
        assert self.sources(started) == [ALICE.peer_id, BOB.peer_id]

    def test_completion(self, parts):
        # The sorted paths the catalog keeps, not a walk of its offers.
        assert parts.commands.file_names("download") == [
            "bob's movie.bin", "films/movie.bin", "notes.txt"]
        assert parts.commands.file_names("list") == [
            "bob's movie.bin", "films/movie.bin", "notes.txt"]
        parts.downloads.taken = {"films"}
        assert "films/" in parts.commands.file_names("resume")
