"""
A real peer's console in a pseudo-terminal, driven by keys and read off the
screen: peers joining and leaving are told as they happen, a download shows
its progress (bytes and time left) and a closing line, Tab completes a file
name, and a file added to shared/ is in another peer's list within a second.
"""

import os
import re
import time

import pytest

from .ctl import ctl
from .peers import Peer, free_transfer_port, free_udp_port
from .terminal import TerminalPeer, wait_for

pytestmark = pytest.mark.e2e

MiB = 1 << 20

#: The seeder's upload cap: the download below takes about 3 s, long
#: enough to see its progress.
RATE = "8M"
SIZE = 24 * MiB


def peer_line(peer, what):
    """
    A screen check for the line that says C{peer} C{what} ("joined"): the
    peer by its name and address, C{peer NAME (ADDRESS) joined}.
    """
    pattern = re.compile(rf"peer \S.* \({re.escape(peer.label)}\) {re.escape(what)}")
    return lambda lines: next((line for line in lines if pattern.search(line)), None)


def folder(base, name, files=()):
    path = base / name
    (path / "shared").mkdir(parents=True)
    for filename, content in files:
        (path / "shared" / filename).write_bytes(content)
    return path


@pytest.fixture
def pair(tmp_path):
    """
    C{(terminal peer, seeder)}: the terminal one up and showing its prompt;
    the seeder (on a pipe) not yet started.
    """
    discovery = free_udp_port()
    me = TerminalPeer("terminal", folder(tmp_path, "me"), free_transfer_port(), discovery)
    seeder = Peer(
        "seeder", folder(tmp_path, "seeder", [("big video.bin", os.urandom(SIZE)),
                                              ("notes.txt", b"notes\n")]),
        free_transfer_port(), discovery, extra_args=["--max-upload-rate", RATE],
    )
    peers = [me, seeder]

    class Pair(tuple):
        def diagnostics(self):
            return "\n\n".join(p.diagnostics() for p in peers)

    try:
        me.start()
        me.ready()
        yield Pair((me, seeder))
    finally:
        for p in peers:
            p.cleanup()


def test_join_download_leave(pair):
    me, seeder = pair
    seeder.start()
    seeder.ready()
    joined = me.see(peer_line(seeder, "joined"))
    print(f"\ne2e terminal: {joined}")

    # Tab completes the name (quoted: it has a space) once the catalog is in.
    wait_for(lambda: "big video.bin" in me.screen.lines()[-1] or _complete(me), 10,
             "Tab never completed the file name", me.diagnostics)
    me.keys("\r")

    progress = me.ever_saw(" left", timeout=20)
    print(f"e2e terminal: {progress}")
    assert re.search(r"\[#*-*\] \d+% [\d.]+ [KM]iB/24\.0 MiB [\d.]+ [KM]iB/s from 1 peer, \d+ s left",
                     progress), progress
    closing = me.see("downloaded big video.bin", timeout=30)
    print(f"e2e terminal: {closing}")
    assert re.match(r"downloaded big video\.bin to downloads/big video\.bin: 24\.0 MiB in [\d.]+ s "
                    r"\([\d.]+ MiB/s\)$", closing), closing
    assert (me.downloads / "big video.bin").stat().st_size == SIZE

    # A download asked for with p2ppeer-ctl is told on the console too.
    result = ctl(me.folder / ".p2ppeer", "download", "--wait", "notes.txt")
    assert result.returncode == 0, result
    told = me.see("(asked for by p2ppeer-ctl)")
    print(f"e2e terminal: {told}")
    assert told.startswith("download notes.txt: 6 B in 1 chunk from 1 peer")
    me.see("downloaded notes.txt to downloads/notes.txt")

    seeder.exit()
    left = me.see(peer_line(seeder, "left (said goodbye)"))
    print(f"e2e terminal: {left}")
    # The bar is gone, and the prompt is the last line.
    assert me.screen.lines()[-1].startswith("p2p>")
    assert not any("[#" in line for line in me.screen.lines()[-3:])


def _complete(me):
    """Type the start of the name and Tab; whether it completed."""
    me.keys("\x15download big")  # Ctrl-U clears what was there
    me.keys("\t")
    time.sleep(0.2)
    return "download 'big video.bin'" in me.screen.lines()[-1]


def test_a_file_added_to_shared_is_listed_elsewhere_within_a_second(pair):
    me, seeder = pair
    seeder.start()
    seeder.ready()
    me.see(peer_line(seeder, "joined"))
    (me.shared / "fresh.txt").write_bytes(b"just made\n")
    added = time.monotonic()
    listed_at = None
    while time.monotonic() - added < 5:
        if any(line.startswith("fresh.txt ") for line in seeder.ask("list")):
            listed_at = time.monotonic()
            break
        time.sleep(0.05)
    assert listed_at is not None, "the other peer never listed fresh.txt"
    latency = listed_at - added
    print(f"\ne2e terminal: fresh.txt listed on the other peer {latency:.3f} s after it was written")
    assert latency < 1.0


def test_ctrl_c_says_bye_and_exits_0(pair):
    me, _ = pair
    me.keys("sta")
    me.keys("\x03")
    me.see("bye")
    assert me.wait(10) == 0
