"""
Distribution with real C{twistd p2ppeer} processes on 127.0.0.1: a file
copied onto three caches outlives its origin's SIGKILL and downloads from
them alone; the bytes distribution sends stay near the minimum; the caches
refuse what they must, never go over their size, and drop a chunk damaged
while they were down.

Distribution bytes are read from each peer's C{cache} answer
(C{p2ppeer-ctl --json cache}), which counts every chunk byte pushed.
"""

import hashlib
import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from . import fake
from .ctl import ctl_json
from .peers import HOST, Peer, free_transfer_port, free_udp_port
from .test_three_peers import LOG_ERRORS, poll, sha256_of, write_random

pytestmark = pytest.mark.e2e

MiB = 1 << 20
CHUNK = 256 * 1024
SIZE = 32 * MiB
CHUNKS = SIZE // CHUNK
NAME = "big.bin"
REPLICAS = 2
INTERVAL = "0.5"
#: An error line, but for the ones Peer.ask provokes to find its end.
_ERROR = r"^error: (?!unknown command '__e2e_sync_)"


def state_dir(peer):
    return peer.folder / ".p2ppeer"


def cache_of(peer):
    """The peer's C{cache} answer, as its fields."""
    events = ctl_json(state_dir(peer), "cache")
    return next(e for e in events if e.get("event") == "cache")


def list_rows(peer):
    """The peer's C{list} answer: its rows by name."""
    events = ctl_json(state_dir(peer), "list")
    files = next(e for e in events if e.get("event") == "list")["files"]
    return {f["name"]: f for f in files}


def call(port, header, body=b"", timeout=10):
    """
    One frame to 127.0.0.1:C{port} and the answer's C{(header, body)}, on a
    connection of its own.
    """
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        return exchange(sock, header, body)


def exchange(sock, header, body=b""):
    sock.sendall(fake.frame(header, body))
    return fake.read_frame(sock)


def held_chunks(peer, file_id, chunks=CHUNKS):
    """
    The chunks of C{file_id} (of C{chunks} chunks) C{peer} says (its
    C{have}) it holds.
    """
    header, body = call(peer.transfer_port + 1, {"t": "have", "v": 1, "id": file_id, "start": 0})
    if header.get("code") == "unknown-file":
        return set()  # not offered yet
    assert header["t"] == "have", header
    if header.get("all"):
        return set(range(chunks))
    return {i for i in range(header["count"]) if body[i // 8] >> (i % 8) & 1}


def cache_bytes_on_disk(peer):
    total = 0
    for root, _, files in os.walk(state_dir(peer) / "cache"):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


class Network:
    def __init__(self, base):
        self.base = Path(base)
        self.discovery = free_udp_port()
        self.peers = []

    def peer(self, name, *args, shared=None):
        folder = self.base / name
        (folder / "shared").mkdir(parents=True)
        (folder / "downloads").mkdir()
        digest = None
        if shared is not None:
            digest = write_random(folder / "shared" / shared[0], shared[1])
        peer = Peer(
            name, folder, free_transfer_port(), self.discovery,
            extra_args=["--replicas", str(REPLICAS), "--distribute-interval", INTERVAL, *args],
        )
        peer.digest = digest
        self.peers.append(peer)
        return peer

    def diagnostics(self):
        return "\n\n".join(p.diagnostics() for p in self.peers)

    def close(self):
        for p in self.peers:
            p.cleanup()


@pytest.fixture
def network(tmp_path):
    net = Network(tmp_path)
    try:
        yield net
    finally:
        net.close()


def test_a_file_outlives_its_origin(network):
    started = time.monotonic()
    a = network.peer("a", shared=(NAME, SIZE))
    caches = [network.peer(n, "--cache-size", "40M") for n in ("b", "c", "d")]
    for p in [*caches, a]:
        p.start()
    for p in [*caches, a]:
        p.ready()
    file_id = None

    def copied():
        """Every chunk held by at least REPLICAS peers besides A."""
        nonlocal file_id
        for p in caches:
            status = cache_of(p)
            assert status["used"] <= status["quota"], (p.name, status)
        row = list_rows(a).get(NAME)
        if row is None:
            return False
        file_id = row["id"]
        counts = [0] * CHUNKS
        for p in caches:
            for i in held_chunks(p, file_id):
                counts[i] += 1
        return min(counts) >= REPLICAS

    ok, waited = poll(copied, timeout=30, interval=0.5)
    assert ok, "not every chunk got 2 copies outside A within 30 s"
    print(f"\n{REPLICAS} copies of every chunk outside A {waited:.1f} s after the peers were up")
    # A's catalog shows it too: the fewest copies of any chunk, A's own
    # included.
    seen, _ = poll(lambda: list_rows(a)[NAME].get("copies", 0) >= REPLICAS + 1, 10, 0.3)
    assert seen, list_rows(a)[NAME]
    pushed_by_a = cache_of(a)["pushed_bytes"]
    text = a.log_path.read_text()
    assert not any(marker in text for marker in LOG_ERRORS), text[-3000:]

    assert a.kill() == -9
    # E only downloads: sharing what it downloads would make it a whole
    # holder, and its distributor would refill the gap the damaged chunk
    # below leaves, racing the check that it was dropped.
    e = network.peer("e", "--cache-size", "0", "--share-downloads", "no")
    e.start()
    e.ready()

    # E lists the file, whole from the caches' pieces, though A is gone.
    def listed_in_pieces():
        row = list_rows(e).get(NAME)
        return row is not None and row.get("whole") is False and row["available"] == 1 and row

    row, _ = poll(listed_in_pieces, timeout=15, interval=0.3)
    assert row, list_rows(e)
    assert row["copies"] >= REPLICAS
    lines = e.ask("list")
    assert lines[0].split() == ["NAME", "SIZE", "ID", "AVAILABLE", "WHERE"], lines
    assert any(line.startswith(NAME) and f"100% ({row['copies']} copies)" in line
               for line in lines), lines

    e.mark()
    e.send(f"download {NAME}")
    e.expect(rf"^downloaded {NAME}", timeout=30, fail=_ERROR)
    assert sha256_of(e.downloads / NAME) == a.digest

    # No flooding: what every peer pushed, A's included, is close to the
    # least that REPLICAS copies take.
    pushed = pushed_by_a + sum(cache_of(p)["pushed_bytes"] for p in [*caches, e])
    print(f"distribution pushed {pushed / MiB:.1f} MiB for {REPLICAS} copies of "
          f"{SIZE / MiB:.0f} MiB; {time.monotonic() - started:.1f} s in all")
    assert REPLICAS * SIZE <= pushed <= 1.1 * REPLICAS * SIZE
    for p in caches:
        status = cache_of(p)
        assert status["used"] <= status["quota"]
        assert cache_bytes_on_disk(p) <= status["quota"]

    # --cache-size 0 hosts nothing, and says so to a pusher.
    assert cache_of(e)["quota"] == 0 and cache_of(e)["files"] == []
    header, _ = call(e.transfer_port + 3, {"t": "offer", "v": 1, "id": file_id, "chunks": [0]})
    assert (header["t"], header["code"]) == ("error", "hosting-off"), header

    # The cache that holds the fewest chunks is pushed to by hand.
    b = min(caches, key=lambda p: len(held_chunks(p, file_id)))
    # A push for a file nobody serves has no manifest to be checked against.
    unknown = hashlib.sha256(b"nobody has this").hexdigest()
    header, _ = call(b.transfer_port + 3, {"t": "offer", "v": 1, "id": unknown, "chunks": [0]})
    assert (header["t"], header["code"]) == ("error", "unknown-file"), header
    # A chunk with the wrong bytes is refused, and not stored.
    missing = sorted(set(range(CHUNKS)) - held_chunks(b, file_id))
    assert missing, "b holds every chunk"
    index = missing[0]
    before = cache_of(b)
    with socket.create_connection((HOST, b.transfer_port + 3), timeout=10) as sock:
        header, _ = exchange(sock, {"t": "offer", "v": 1, "id": file_id, "chunks": [index]})
        assert header == {"t": "offered", "id": file_id, "accepted": [index], "refused": []}
        header, _ = exchange(sock, {"t": "push", "v": 1, "id": file_id, "i": index},
                             os.urandom(CHUNK))
        assert (header["t"], header["code"]) == ("error", "bad-hash"), header
        # Pushed without an offer: refused too.
        header, _ = exchange(sock, {"t": "push", "v": 1, "id": file_id, "i": index},
                             os.urandom(CHUNK))
        assert (header["t"], header["code"]) == ("error", "not-offered"), header
    # Nothing of it stays: a manifest fetched for that offer alone goes with
    # the connection.
    same, _ = poll(lambda: cache_of(b)["used"] == before["used"], timeout=5, interval=0.2)
    assert same, (before, cache_of(b))
    assert cache_of(b)["files"] == before["files"]
    assert index not in held_chunks(b, file_id)

    # A cache restarted with a damaged chunk drops it and does not serve it.
    b = max(caches, key=lambda p: len(held_chunks(p, file_id)))
    after = cache_of(b)
    held = sorted(held_chunks(b, file_id))
    damaged = held[0]
    chunks_before = after["files"][0]["chunks"]
    assert b.terminate() == 0
    path = state_dir(b) / "cache" / file_id / str(damaged)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    b2 = Peer("b-again", b.folder, b.transfer_port, b.discovery_port, extra_args=b.extra_args)
    network.peers.append(b2)
    b2.start()
    b2.ready()

    def rechecked():
        status = cache_of(b2)
        return status["files"] and status["files"][0]["chunks"] == chunks_before - 1

    ok, _ = poll(rechecked, timeout=15, interval=0.3)
    assert ok, cache_of(b2)
    assert damaged not in held_chunks(b2, file_id)
    assert set(held) - {damaged} == held_chunks(b2, file_id)
    log = b2.log_path.read_text()
    assert "dropped 1 damaged chunk(s)" in log
    with socket.create_connection((HOST, b2.transfer_port + 1), timeout=10) as sock:
        header, _ = exchange(sock, {"t": "get", "v": 1, "id": file_id, "chunks": [damaged],
                                    "port": e.transfer_port, "token": "0" * 32})
    assert (header["t"], header["code"]) == ("error", "missing-chunks"), header

    for p in network.peers:
        if p is a:
            continue
        text = p.log_path.read_text() if p.log_path.exists() else ""
        assert not any(marker in text for marker in LOG_ERRORS), (p.name, text[-3000:])


def test_a_cache_never_goes_over_its_size(network):
    """
    Two origins push to one small cache at the same moment: it takes what
    fits and refuses the rest, and is never over its size, on disk either.
    """
    size = 8 * MiB
    # At 1 MiB/s each, neither fills the cache before the other has begun,
    # however long each takes to start.
    origins = [network.peer(f"origin{n}", "--cache-size", "0", "--max-upload-rate", "1M",
                            shared=(f"file{n}.bin", size))
               for n in range(2)]
    cache = network.peer("cache", "--cache-size", "5M")
    for p in [cache, *origins]:
        p.start()
    for p in [cache, *origins]:
        p.ready()
    quota = 5 * MiB
    highest = 0

    def full():
        nonlocal highest
        status = cache_of(cache)
        on_disk = cache_bytes_on_disk(cache)
        highest = max(highest, status["used"], on_disk)
        assert status["used"] <= quota and on_disk <= quota, (status, on_disk)
        return status["free"] < CHUNK and len(status["files"]) == 2 and status

    status, _ = poll(full, timeout=30, interval=0.2)
    assert status, cache_of(cache)
    # Both pushed, and no more than fit: room is reserved before bytes go.
    pushed = [cache_of(p)["pushed_bytes"] for p in origins]
    assert all(pushed), pushed
    assert sum(pushed) <= quota
    refused = sum(cache_of(p)["refused_offers"] for p in origins)
    # Full, it refuses more (it evicts nothing: every chunk it holds has as
    # few copies as the one offered would).
    cached = status["files"][0]
    missing = min(set(range(size // CHUNK)) - held_chunks(cache, cached["id"]))
    header, _ = call(cache.transfer_port + 3,
                     {"t": "offer", "v": 1, "id": cached["id"], "chunks": [missing]})
    assert header == {"t": "offered", "id": cached["id"], "accepted": [],
                      "refused": [{"i": missing, "code": "over-quota"}]}, header
    assert cache_of(cache)["used"] <= quota
    print(f"\ncache held {highest / MiB:.2f} MiB at most of {quota / MiB:.0f} MiB; "
          f"origins pushed {[round(p / MiB, 2) for p in pushed]} MiB, {refused} refusals")


def test_distribution_in_a_private_group(network, tmp_path):
    """
    In a private group T+2 and T+3 are the group's TLS: a member's cache
    fills, and a stranger's plain connection to T+3 gets no frame.
    """
    from twisted_p2p.group import write_new_key

    key = tmp_path / "group.key"
    write_new_key(str(key))
    size = 4 * MiB
    origin = network.peer("origin", "--group-key-file", str(key), "--cache-size", "0",
                          shared=("small.bin", size))
    cache = network.peer("member", "--group-key-file", str(key), "--cache-size", "8M")
    for p in (cache, origin):
        p.start()
    for p in (cache, origin):
        p.ready()

    def filled():
        files = cache_of(cache)["files"]
        return files and files[0]["chunks"] == size // CHUNK

    ok, waited = poll(filled, timeout=20, interval=0.3)
    assert ok, cache_of(cache)
    assert cache_of(origin)["pushed_bytes"] == size
    # A plain connection, no TLS: the frame is not understood, and nothing
    # comes back but the end of the connection.
    with socket.create_connection((HOST, cache.transfer_port + 3), timeout=10) as sock:
        payload = json.dumps({"t": "offer", "v": 1, "id": "ab" * 32, "chunks": [0]}).encode()
        sock.sendall(struct.pack(">I", len(payload) + 1) + payload + b"\n")
        answer = b""
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                answer += piece
        except (ConnectionResetError, socket.timeout):
            pass
    assert b"offered" not in answer and b'"t"' not in answer
    # The cache serves a member after the origin left, on sealed streams.
    assert origin.kill() == -9
    fetcher = network.peer("fetcher", "--group-key-file", str(key), "--cache-size", "0")
    fetcher.start()
    fetcher.ready()
    listed, _ = poll(lambda: "small.bin" in list_rows(fetcher), timeout=10, interval=0.3)
    assert listed
    fetcher.mark()
    fetcher.send("download small.bin")
    fetcher.expect(r"^downloaded small\.bin", timeout=20, fail=_ERROR)
    assert sha256_of(fetcher.downloads / "small.bin") == origin.digest
    for p in (cache, fetcher):
        text = p.log_path.read_text()
        assert not any(marker in text for marker in LOG_ERRORS), (p.name, text[-3000:])
    print(f"\na private group's cache filled in {waited:.1f} s")


@pytest.mark.parametrize("share_downloads", ["yes", "no"])
def test_a_download_takes_what_its_own_cache_holds(network, share_downloads):
    """
    B's cache holds every chunk of A's file (distribution put them there);
    when B's user downloads the file, B copies them from its cache rather
    than fetching them again, and says so.  Then B offers the file whole
    from its downloads and its cache gives the copy back (and refuses it if
    pushed again); with C{--share-downloads no} the cache keeps it, as the
    only copy B offers.
    """
    size = 8 * MiB
    a = network.peer("a", shared=(NAME, size))
    b = network.peer("b", "--cache-size", "40M", "--share-downloads", share_downloads)
    for p in (a, b):
        p.start()
    for p in (a, b):
        p.ready()

    def cached_whole():
        row = list_rows(a).get(NAME)
        return row is not None and len(held_chunks(b, row["id"])) == size // CHUNK

    ok, waited = poll(cached_whole, timeout=30, interval=0.3)
    assert ok, network.diagnostics()
    print(f"\nB's cache held the whole file {waited:.1f} s after the peers were up")
    b.mark()
    b.send(f"download {NAME}")
    started = b.expect(rf"^download {NAME}: ", timeout=15, fail=_ERROR)
    assert started.endswith(", 8.0 MiB copied from this peer's cache"), started
    done = b.expect(rf"^downloaded {NAME}", timeout=15, fail=_ERROR)
    assert done.endswith("(all of it was already here)"), done
    assert sha256_of(b.downloads / NAME) == a.digest
    file_id = list_rows(a)[NAME]["id"]
    if share_downloads == "yes":
        ok, waited = poll(lambda: cache_of(b)["files"] == [], timeout=15, interval=0.2)
        assert ok, network.diagnostics()
        print(f"B's cache gave its copy back {waited:.1f} s after the download")
        assert f"Cache: gave back {size} B of {NAME}: this peer offers it whole now" in (
            b.log_path.read_text())
        # A's distribution rounds (every 0.5 s) find B holding the file
        # whole, and push nothing back.
        time.sleep(3)
        assert cache_of(b)["used"] == 0 and cache_bytes_on_disk(b) == 0, cache_of(b)
    else:
        time.sleep(2)
        [kept] = cache_of(b)["files"]
        assert kept["id"] == file_id and kept["bytes"] == size, kept
    # B serves every chunk either way: from downloads/, or from its cache.
    assert held_chunks(b, file_id, size // CHUNK) == set(range(size // CHUNK))
    text = b.log_path.read_text()
    assert not any(marker in text for marker in LOG_ERRORS), text[-3000:]
