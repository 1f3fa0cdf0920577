"""
A shared folder between two real peers: a tree of 3 levels and 200 files,
with spaces and non-ASCII names, offered as paths, listed collapsed, and
downloaded with one command; the tree that arrives is the tree that was
shared, byte for byte (one hash over every path and content).
"""

import hashlib
import os
import random
import time

import pytest

from .peers import Peer, free_transfer_port, free_udp_port

pytestmark = pytest.mark.e2e

#: Folder names at each level: spaces, accents, CJK, an emoji.
LEVEL_1 = ["Photos 2026", "été"]
LEVEL_2 = ["holiday in Kyōto", "日本", "misc"]
LEVEL_3 = ["day 1", "🌊 sea"]


def make_tree(root, count=200, seed=42):
    """
    C{count} files spread over 3 levels of folders under C{root/album/};
    C{{relative path: content}}.
    """
    rng = random.Random(seed)
    folders = [
        os.path.join("album", a, b, c) for a in LEVEL_1 for b in LEVEL_2 for c in LEVEL_3
    ] + [os.path.join("album", a) for a in LEVEL_1] + ["album"]
    tree = {}
    for i in range(count):
        folder = folders[i % len(folders)]
        name = f"file {i:03d} ñ.bin" if i % 3 else f"写真 {i:03d}.jpg"
        data = rng.randbytes(rng.choice([0, 1, 1000, 40_000, 300_000]))
        path = os.path.join(folder, name)
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        with open(os.path.join(root, path), "wb") as f:
            f.write(data)
        tree[path] = data
    return tree


def tree_hash(root):
    """One SHA-256 over every file's path (relative, sorted) and content under C{root}."""
    digest = hashlib.sha256()
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                paths.append(os.path.relpath(os.path.join(folder, name), root))
    for path in sorted(paths):
        digest.update(path.encode("utf-8") + b"\0")
        with open(os.path.join(root, path), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest(), len(paths)


@pytest.fixture
def pair(tmp_path):
    discovery = free_udp_port()
    peers = []
    for name in ("sharer", "fetcher"):
        folder = tmp_path / name
        (folder / "shared").mkdir(parents=True)
        peers.append(Peer(name, folder, free_transfer_port(), discovery))
    pair = tuple(peers)
    pair_diagnostics = lambda: "\n\n".join(p.diagnostics() for p in peers)  # noqa: E731
    try:
        yield pair, pair_diagnostics
    finally:
        for peer in peers:
            peer.cleanup()


def test_a_tree_of_200_files_in_one_command(pair):
    (sharer, fetcher), _ = pair
    tree = make_tree(sharer.shared)
    expected, count = tree_hash(sharer.shared / "album")
    assert count == 200
    sharer.start()
    fetcher.start()
    sharer.ready()
    fetcher.ready()

    # The fetcher sees one collapsed row for the whole album.
    deadline = time.monotonic() + 30
    while True:
        rows = [line for line in fetcher.ask("list") if line.startswith("album/")]
        if rows and " 200 files " in rows[0]:
            break
        assert time.monotonic() < deadline, rows or fetcher.diagnostics()
        time.sleep(0.2)
    expanded = fetcher.ask("list album/")
    names = [line.split("  ")[0] for line in expanded[1:]]
    assert [n for n in names if n.endswith("/")] == ["album/Photos 2026/", "album/été/"]
    assert "album/file 014 ñ.bin" in names

    started = time.monotonic()
    fetcher.command(
        "download album/", r"^downloading folder album/ \(200 files, .*\) into album/$",
        fail=r"^error:",
    )
    line = fetcher.expect(r"^downloaded folder album/ to album/: ", timeout=50, fail=r"^error:")
    seconds = time.monotonic() - started
    print(f"\n200 files, {sum(map(len, tree.values())) / 1e6:.1f} MB, in {seconds:.1f} s: {line}")
    assert "200 files" in line and "failed" not in line
    assert tree_hash(fetcher.downloads / "album") == (expected, 200)
    # No partial file is left behind.
    assert not [n for n in os.listdir(fetcher.downloads) if n.startswith(".")]


def wait_for_album(peer, timeout=30):
    """Wait until C{peer} lists the album's collapsed row of 200 files."""
    deadline = time.monotonic() + timeout
    while not any(" 200 files " in line for line in peer.ask("list")
                  if line.startswith("album/")):
        assert time.monotonic() < deadline, peer.diagnostics()
        time.sleep(0.2)


def test_a_folder_download_killed_part_way_resumes_in_its_folder(tmp_path):
    """
    The fetcher is SIGKILLed part way through a folder download, started
    again, and told 'resume album/': it keeps the files already there,
    resumes the one it was in the middle of, fetches the rest into album/
    itself (no 'album (1)/'), and the tree comes out whole.
    """
    discovery = free_udp_port()
    sharer_folder, fetcher_folder = tmp_path / "sharer", tmp_path / "fetcher"
    for folder in (sharer_folder, fetcher_folder):
        (folder / "shared").mkdir(parents=True)
    # Slow enough that the kill lands in the middle: ~14 MB at 4 MB/s.
    sharer = Peer("sharer", sharer_folder, free_transfer_port(), discovery,
                  extra_args=["--max-upload-rate", "4M"])
    port = free_transfer_port()
    fetcher = Peer("fetcher", fetcher_folder, port, discovery)
    peers = [sharer, fetcher]
    try:
        make_tree(sharer.shared)
        expected, count = tree_hash(sharer.shared / "album")
        for p in peers:
            p.start()
        for p in peers:
            p.ready()
        wait_for_album(fetcher)
        fetcher.send("download album/")

        def files_in(root):
            return sum(len(files) for _, _, files in os.walk(root))

        deadline = time.monotonic() + 30
        while files_in(fetcher.downloads / "album") < 40:
            assert time.monotonic() < deadline, fetcher.diagnostics()
            time.sleep(0.05)
        assert fetcher.kill() == -9
        had = files_in(fetcher.downloads / "album")
        assert had < count

        again = Peer("fetcher", fetcher_folder, port, discovery)
        peers.append(again)
        again.start()
        again.ready()
        wait_for_album(again)
        line = again.command("resume album/", r"^resuming folder album/ in album/: ",
                             fail=r"^error:")
        print(f"\n{had} files there at the kill; {line}")
        kept = int(line.split(" to fetch, ")[1].split(" file")[0])
        assert kept >= had - 4  # the few files being renamed at the kill may be fetched again
        done = again.expect(r"^downloaded folder album/ to album/: ", timeout=60, fail=r"^error:")
        assert "failed" not in done and f"{kept} files already there" in done, done
        assert tree_hash(again.downloads / "album") == (expected, count)
        assert sorted(os.listdir(again.downloads)) == ["album"]  # no album (1), no partials
    finally:
        for p in peers:
            p.cleanup()
