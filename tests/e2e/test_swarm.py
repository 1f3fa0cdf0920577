"""
Swarm downloads with real C{twistd p2ppeer} processes on 127.0.0.1: many
rate-limited seeders at once, a seeder killed mid-download (one of three,
and the only one), a lying seeder,
a downloader killed and restarted, and a full downloads folder.

Every scenario has its own peers, ports and discovery port.  The seeders of
one scenario share one random file through hard links (one copy on disk).
Timings are printed (run with C{-s} to see them).
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .peers import Peer, free_transfer_port, free_udp_port
from .test_three_peers import LOG_ERRORS, listing, poll, sha256_of, write_random

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SIZE = 64 * MiB
NAME = "big.bin"
LIAR = str(Path(__file__).with_name("liar.py"))

_SOURCES = re.compile(r"Bytes of big\.bin by source: (.*?); received (\d+) B")
#: An error line, but for the ones L{Peer.ask} provokes to find its end.
_ERROR = r"^error: (?!unknown command '__e2e_sync_)"
_SENT = re.compile(r"Sent (\d+) chunk\(s\), (\d+) B of big\.bin to ")


class LiarPeer(Peer):
    """A peer run through tests/e2e/liar.py: it corrupts half its chunks."""

    def argv(self):
        return [sys.executable, LIAR] + Peer.argv(self)[1:]


class Swarm:
    """
    Seeders that each share the same C{big.bin}, and one downloader that
    shares nothing; all started, and the downloader's C{list} showing every
    seeder as a source.
    """

    def __init__(self, base, seeders, rate="10M", liars=0, downloader_args=()):
        self.base = Path(base)
        self.discovery = free_udp_port()
        self.original = self.base / "original.bin"
        self.digest = write_random(self.original, SIZE)
        self.seeders = []
        for number in range(seeders + liars):
            folder = self.base / f"seeder{number}"
            (folder / "shared").mkdir(parents=True)
            os.link(self.original, folder / "shared" / NAME)
            kind = LiarPeer if number >= seeders else Peer
            self.seeders.append(
                kind(f"seeder{number}", folder, free_transfer_port(), self.discovery,
                     extra_args=["--max-upload-rate", rate])
            )
        folder = self.base / "downloader"
        (folder / "shared").mkdir(parents=True)
        (folder / "downloads").mkdir()
        self.downloader_args = list(downloader_args)
        self.downloader = self._downloader(folder, free_transfer_port())
        self.timings = {}

    def _downloader(self, folder, port):
        return Peer("downloader", folder, port, self.discovery,
                    extra_args=self.downloader_args)

    @property
    def peers(self):
        return self.seeders + [self.downloader]

    def start(self):
        started = time.monotonic()
        for p in self.peers:
            p.start()
        for p in self.peers:
            p.ready()
        self.wait_for_sources()
        self.timings["start to every source listed"] = time.monotonic() - started

    def wait_for_sources(self, timeout=15):
        labels = {p.label for p in self.seeders if p.alive()}

        def all_listed():
            where = listing(self.downloader).get(NAME, "")
            return labels <= set(w.strip() for w in where.split(","))

        ok, _ = poll(all_listed, timeout, interval=0.2)
        assert ok, f"the downloader never listed {NAME} from {sorted(labels)}"

    def restart_downloader(self):
        old = self.downloader
        old.cleanup()
        self.downloader = self._downloader(old.folder, old.transfer_port)
        self.downloader.start()
        self.downloader.ready()
        self.wait_for_sources()

    def start_download(self, command="download"):
        """Send C{download big.bin}; the console line index it starts from."""
        start = self.downloader.mark()
        self.downloader.send(f"{command} {NAME}")
        return start

    def check_resumed(self, start):
        """The download sent at C{start} resumed and finished right."""
        started = self.wait_line(start, r"^download big\.bin: ")
        assert "resuming with" in started, started
        closing = self.wait_line(start, r"^downloaded big\.bin\b")
        print(f"e2e: {closing}")
        self.check_file()
        self.check_logs()

    def wait_line(self, start, pattern, timeout=30, fail=_ERROR):
        self.downloader.cursor = start
        return self.downloader.expect(pattern, timeout, fail=fail)

    def percent(self):
        """The download's % in C{status}, or None when none runs."""
        for line in self.downloader.ask("status"):
            match = re.match(rf"^{re.escape(NAME)}\s+(\d+)%", line)
            if match:
                return int(match.group(1))
        return None

    def wait_percent(self, at_least, timeout=30):
        result, _ = poll(lambda: (self.percent() or 0) >= at_least, timeout, interval=0.05)
        assert result, f"the download never reached {at_least}%"

    def by_source(self):
        """Verified bytes per source label, from the downloader's log."""
        match = _SOURCES.search(self.downloader.log_path.read_text())
        assert match, "the downloader logged no bytes by source"
        counts = {}
        for item in match.group(1).split(", "):
            label, _, count = item.rpartition("=")
            counts[label] = int(count)
        return counts

    def bytes_sent(self):
        """Chunk bytes every seeder put on the network, from their logs."""
        total = 0
        for p in self.seeders:
            for match in _SENT.finditer(p.log_path.read_text()):
                total += int(match.group(2))
        return total

    def check_file(self):
        downloaded = self.downloader.downloads / NAME
        assert downloaded.stat().st_size == SIZE
        assert sha256_of(downloaded) == self.digest
        leftovers = [n for n in os.listdir(self.downloader.downloads) if n.startswith(".")]
        assert leftovers == []

    def check_logs(self):
        for p in self.peers:
            if p.log_path.exists():
                log = p.log_path.read_text()
                found = [marker for marker in LOG_ERRORS if marker in log]
                assert not found, f"{p.name}'s log has {found}"

    def diagnostics(self):
        return "\n\n".join(p.diagnostics() for p in self.peers)

    def cleanup(self):
        for p in self.peers:
            p.cleanup()
        for name, seconds in self.timings.items():
            print(f"e2e swarm timing: {name}: {seconds:.2f} s")
        self.original.unlink(missing_ok=True)
        for p in self.seeders:
            (p.shared / NAME).unlink(missing_ok=True)
        downloads = self.downloader.downloads
        if downloads.exists() and not os.path.ismount(downloads):
            for leftover in downloads.iterdir():
                leftover.unlink()


@pytest.fixture
def swarm_factory(tmp_path):
    made = []

    def make(*args, **kwargs):
        swarm = Swarm(tmp_path, *args, **kwargs)
        made.append(swarm)
        return swarm

    make.diagnostics = lambda: "\n\n".join(s.diagnostics() for s in made)
    yield make
    for swarm in made:
        swarm.cleanup()


def test_four_rate_limited_seeders_all_contribute(swarm_factory):
    swarm = swarm_factory(seeders=4, rate="8M")
    swarm.start()
    started = time.monotonic()
    closing = swarm.wait_line(swarm.start_download(), r"^downloaded big\.bin\b")
    elapsed = time.monotonic() - started
    swarm.timings["64 MiB from 4 seeders at 8 MB/s each"] = elapsed
    print(f"\ne2e: {closing}")
    swarm.check_file()
    counts = swarm.by_source()
    print(f"e2e: bytes by source: {counts}")
    assert set(counts) == {p.label for p in swarm.seeders}
    assert sum(counts.values()) == SIZE
    # Each is capped at 8 MB/s: none can have sent much more than its share.
    for label, count in counts.items():
        assert count >= SIZE // 10, f"{label} sent only {count} B"
    # Together they beat any one of them alone (64 MiB at 8 MB/s is 8.4 s).
    assert elapsed < SIZE / 8e6 * 0.6, f"{elapsed:.1f} s is no faster than one seeder"
    swarm.check_logs()


def _kill_a_seeder_at_25_percent(swarm):
    """Start the download, SIGKILL the first seeder at 25%: C{(start, it)}."""
    swarm.start()
    start = swarm.start_download()
    swarm.wait_percent(25)
    victim = swarm.seeders[0]
    victim.kill()
    return start, victim


def test_a_seeder_killed_mid_download(swarm_factory):
    swarm = swarm_factory(seeders=3, rate="10M")
    start, _ = _kill_a_seeder_at_25_percent(swarm)
    closing = swarm.wait_line(start, r"^downloaded big\.bin\b")
    print(f"\ne2e: {closing}")
    swarm.check_file()
    counts = swarm.by_source()
    print(f"e2e: bytes by source: {counts}")
    assert all(counts[p.label] > 0 for p in swarm.seeders[1:])
    swarm.check_logs()


def test_the_only_seeder_killed_fails_clearly_then_resumes(swarm_factory):
    swarm = swarm_factory(seeders=1, rate="10M")
    start, victim = _kill_a_seeder_at_25_percent(swarm)
    # Said at once, not a progress bar that stops for good.
    error = swarm.wait_line(start, _ERROR, timeout=10, fail=r"^downloaded ")
    print(f"\ne2e: {error}")
    assert error == ("error: no peer is left to download big.bin from; "
                     "what came is kept: 'resume big.bin' goes on once one is back"), error
    assert swarm.downloader.alive()
    assert swarm.percent() is None
    partials = os.listdir(swarm.downloader.downloads)
    assert any(n.endswith(".part") for n in partials), partials

    # The seeder comes back at the same address: first let the downloader
    # forget it, so that what is listed next is the new one.
    gone, _ = poll(lambda: NAME not in listing(swarm.downloader), 15, interval=0.2)
    assert gone, "the killed seeder was never forgotten"
    swarm.seeders[0] = Peer(victim.name, victim.folder, victim.transfer_port,
                            swarm.discovery, extra_args=["--max-upload-rate", "10M"])
    swarm.seeders[0].start()
    swarm.seeders[0].ready()
    swarm.wait_for_sources()
    swarm.check_resumed(swarm.start_download("resume"))


def test_a_lying_seeder_is_banned(swarm_factory):
    swarm = swarm_factory(seeders=2, liars=1, rate="10M")
    swarm.start()
    liar = swarm.seeders[-1]
    start = swarm.start_download()
    closing = swarm.wait_line(start, r"^downloaded big\.bin\b")
    print(f"\ne2e: {closing}")
    swarm.check_file()
    with swarm.downloader._cond:
        said = [line for line in swarm.downloader.lines[start:] if "banned" in line]
    # Said once, naming the peer by its name and address.
    assert len(said) == 1, said
    assert re.fullmatch(
        rf"\S.* \({re.escape(liar.label)}\) sent bad data 3 times and is banned for this session",
        said[0],
    ), said
    log = swarm.downloader.log_path.read_text()
    assert "failed verification" in log
    counts = swarm.by_source()
    print(f"e2e: bytes by source: {counts}")
    # The liar's honest (odd) chunks may count, but never most of the file.
    assert counts.get(liar.label, 0) < SIZE // 4
    swarm.check_logs()


def test_the_downloader_killed_half_way_resumes(swarm_factory):
    swarm = swarm_factory(seeders=2, rate="10M")
    swarm.start()
    swarm.start_download()
    swarm.wait_percent(50)
    swarm.downloader.kill()
    partials = sorted(n for n in os.listdir(swarm.downloader.downloads))
    assert any(n.endswith(".part") for n in partials), partials
    assert any(n.endswith(".map") for n in partials), partials

    swarm.restart_downloader()
    start = swarm.start_download()
    started = swarm.wait_line(start, r"^download big\.bin: ")
    print(f"\ne2e: {started}")
    resumed = re.search(r"resuming with ([\d.]+) MiB already here", started)
    assert resumed, started
    assert float(resumed.group(1)) >= 30
    closing = swarm.wait_line(start, r"^downloaded big\.bin\b")
    print(f"e2e: {closing}")
    swarm.check_file()
    # Let the seeders log the streams the kill cut short.
    time.sleep(0.5)
    sent = swarm.bytes_sent()
    print(f"e2e: {sent} B sent for a {SIZE} B file ({100 * (sent / SIZE - 1):.1f}% more)")
    assert SIZE <= sent <= SIZE * 1.10
    swarm.check_logs()


def _mount_tmpfs(folder, size):
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {e}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {result.stderr.strip()}")


def test_a_full_disk_fails_clearly_then_resumes(swarm_factory):
    swarm = swarm_factory(seeders=2, rate="25M")
    downloads = swarm.downloader.downloads
    _mount_tmpfs(downloads, "40m")
    try:
        swarm.start()
        start = swarm.start_download()
        error = swarm.wait_line(start, r"^error:", fail=r"^downloaded ")
        print(f"\ne2e: {error}")
        assert re.fullmatch(
            r"error: could not write big\.bin: no space left in the downloads folder \S+; "
            r"free some space, then download again to resume",
            error,
        ), error
        # The peer keeps running and answering.
        assert swarm.downloader.alive()
        assert swarm.percent() is None
        assert any(p.label in " ".join(swarm.downloader.ask("peers")) for p in swarm.seeders)

        subprocess.run(["mount", "-o", "remount,size=200m", str(downloads)], check=True)
        swarm.check_resumed(swarm.start_download())
    finally:
        swarm.downloader.cleanup()
        subprocess.run(["umount", "-l", str(downloads)], capture_output=True)
