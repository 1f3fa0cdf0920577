"""
Benchmarks of swarm downloads with real C{twistd p2ppeer} processes on
127.0.0.1 (not part of C{make test}; C{make bench} runs them and prints the
figures).

 - Scaling: seeders capped at R = 25 MB/s each (C{--max-upload-rate 25M});
   one download with 1, 2, 4 and 8 of them.  The rate achieved is printed
   against k·R and against k times the one-seeder rate measured in the same
   run; the target is at least 0.85·k·R up to k = 4.
 - Memory: the peak RSS (VmHWM) of the downloading peer for a 256 MiB and a
   2 GiB file, from two unlimited seeders; the target is flat, under 100 MiB.

Files are made in a temporary folder and deleted afterwards.  The seeders
share one copy through hard links, and their hash caches are written
beforehand, so that no seeder spends the benchmark hashing.
"""

import json
import os
import re
import time

import pytest

from e2e.peers import Peer, free_transfer_port, free_udp_port
from e2e.test_three_peers import listing, poll, sha256_of, write_random
from twisted_p2p.index import file_signature
from twisted_p2p.manifest import hash_file

MiB = 1 << 20
NAME = "big.bin"
RATE = 25_000_000

_CLOSING = re.compile(r"^downloaded big\.bin to \S+: [\d.]+ \w+ in ([\d.]+) s")


def _seeder(base, number, original, manifest, discovery, rate=None):
    folder = base / f"seeder{number}"
    (folder / "shared").mkdir(parents=True)
    (folder / ".p2ppeer").mkdir()
    path = folder / "shared" / NAME
    os.link(original, path)
    cache = {
        str(path): {
            "signature": list(file_signature(os.stat(path))),
            "id": manifest.file_id,
            "hashes": b"".join(manifest.chunk_hashes).hex(),
        }
    }
    (folder / ".p2ppeer" / "hashes.json").write_text(json.dumps(cache))
    args = ["--max-upload-rate", str(rate)] if rate else []
    return Peer(f"seeder{number}", folder, free_transfer_port(), discovery, extra_args=args)


def _download(base, name, discovery, seeders):
    """
    A fresh downloader that downloads big.bin from C{seeders}; C{(seconds
    the peer took, VmHWM in KiB, the peer)}.
    """
    folder = base / name
    (folder / "shared").mkdir(parents=True)
    peer = Peer(name, folder, free_transfer_port(), discovery,
                extra_args=["--share-downloads", "no"])
    peer.start()
    peer.ready()
    labels = {s.label for s in seeders}
    ok, _ = poll(lambda: labels <= {w.strip() for w in listing(peer).get(NAME, "").split(",")},
                 20, interval=0.2)
    assert ok, peer.diagnostics()
    closing = peer.command(f"download {NAME}", until=r"^downloaded big\.bin\b",
                           timeout=600, fail=r"^error:")
    seconds = float(_CLOSING.match(closing).group(1))
    with open(f"/proc/{peer.proc.pid}/status") as f:
        hwm = int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1))
    return seconds, hwm, peer


@pytest.fixture
def bench_dir(tmp_path):
    yield tmp_path
    for path in sorted(tmp_path.rglob("*"), reverse=True):
        if path.is_file() and path.stat().st_size > MiB:
            path.unlink()


def test_multi_source_scaling(bench_dir):
    size = 256 * MiB
    original = bench_dir / "original.bin"
    digest = write_random(original, size)
    manifest = hash_file(str(original))
    discovery = free_udp_port()
    seeders, peers = [], []
    results = {}
    try:
        for k in (1, 2, 4, 8):
            while len(seeders) < k:
                seeder = _seeder(bench_dir, len(seeders), original, manifest, discovery, RATE)
                seeder.start()
                seeders.append(seeder)
            for seeder in seeders:
                seeder.ready()
            seconds, _, peer = _download(bench_dir, f"downloader{k}", discovery, seeders)
            peers.append(peer)
            assert sha256_of(peer.downloads / NAME) == digest
            results[k] = size / seconds
            (peer.downloads / NAME).unlink()
            peer.cleanup()
    finally:
        for p in seeders + peers:
            p.cleanup()
    baseline = results[1]
    print()
    print(f"bench scaling: R = {RATE / 1e6:.0f} MB/s per seeder, file {size // MiB} MiB")
    print(f"bench scaling: measured one-seeder baseline {baseline / 1e6:.1f} MB/s")
    for k, rate in results.items():
        print(
            f"bench scaling: k={k}: {rate / 1e6:6.1f} MB/s = {rate / (k * RATE):.2f} x k*R, "
            f"{rate / (k * baseline):.2f} x k*baseline"
        )
    for k in (1, 2, 4):
        assert results[k] >= 0.85 * k * RATE, f"k={k}: {results[k] / 1e6:.1f} MB/s"


@pytest.mark.parametrize("size_mib", [256, 2048])
def test_memory_of_the_downloader(bench_dir, size_mib):
    size = size_mib * MiB
    original = bench_dir / "original.bin"
    write_random(original, size)
    manifest = hash_file(str(original))
    discovery = free_udp_port()
    seeders = [_seeder(bench_dir, n, original, manifest, discovery) for n in range(2)]
    peer = None
    try:
        for seeder in seeders:
            seeder.start()
        for seeder in seeders:
            seeder.ready()
        started = time.monotonic()
        seconds, hwm, peer = _download(bench_dir, "downloader", discovery, seeders)
        assert (peer.downloads / NAME).stat().st_size == size
    finally:
        for p in seeders + ([peer] if peer else []):
            p.cleanup()
    print()
    print(
        f"bench memory: {size_mib} MiB in {seconds:.1f} s ({size / seconds / 1e6:.0f} MB/s), "
        f"downloader peak RSS (VmHWM) {hwm / 1024:.1f} MiB "
        f"(whole run {time.monotonic() - started:.1f} s)"
    )
    assert hwm < 100 * 1024
