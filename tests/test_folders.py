"""
Shared folders between two peers in this process, on loopback: a folder
downloaded with one command, and a lying peer whose catalog offers hostile
paths (C{../..}, absolute ones, hidden parts), which must land nowhere
outside the downloader's C{downloads/} -- even with the first check (the
catalog's) switched off, the later ones (the download, the storage) hold.
"""

import dataclasses
import hashlib
import os
import random

import pytest
import pytest_twisted
from support import running
from test_integration import free_ports, make_peer, wait_for

from twisted_p2p import client
from twisted_p2p.render import render

#: Names a lying peer puts in its catalog.
HOSTILE = [
    "../escaped.txt",
    "../../escaped.txt",
    "/tmp/p2p-escaped.txt",
    "good/../../escaped.txt",
    "good/./x.txt",
    "good//x.txt",
    ".hidden/x.txt",
    "good/.p2ppeer-x.part",
    "good\\..\\..\\escaped.txt",
    "good/ ../x.txt",
    "good/x.txt\n",
    "/".join(["deep"] * 17),
]


def snapshot(root, skip):
    """Every file, folder and link under C{root} but those under C{skip}, with content."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[path] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
            else:
                found[path] = "folder"
    return found


@pytest.fixture
def pair(tmp_path):
    base = free_ports(9)
    a = make_peer(str(tmp_path / "a"), base, base + 8)
    b = make_peer(str(tmp_path / "b"), base + 4, base + 8)
    rng = random.Random(13)
    shared = tmp_path / "b" / "shared"
    tree = {}
    for path in ("good/fine.txt", "good/sub/déjà vu.txt", "good/sub/a b/c.bin", "top.txt"):
        (shared / path).parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randrange(1, 300_000))
        (shared / path).write_bytes(data)
        tree[path] = data
    with running(a, b):
        yield a, b, tree


def run(peer, line):
    said = []
    d = peer.commands.run(line, lambda e: said.extend(render(e)))
    return said, d


def lie(peer, names):
    """
    Make C{peer}'s catalog offer its files under C{names} (one each, in
    turn) besides their own; the files themselves are still served by id.
    """
    real_files = peer.index.files

    def files():
        real = real_files()
        fake = [dataclasses.replace(f, name=n) for f, n in zip(real * len(names), names)]
        return sorted(real + fake, key=lambda f: (f.name, f.folder))

    peer.index.files = files
    peer.index._update_revision()
    # A new revision: announce it so that the other peer fetches again.
    peer.index.revision = "f" * 16
    peer.discovery.revision_changed()


@pytest_twisted.ensureDeferred
async def test_a_folder_in_one_command(pair, tmp_path):
    a, b, tree = pair
    await wait_for(lambda: len(a.catalog.paths()) == len(tree), timeout=10)
    said, d = run(a, "download good/")
    await d
    assert said[0] == "downloading folder good/ (3 files, " + said[0].split(", ", 1)[1]
    assert said[-1].startswith("downloaded folder good/ to good/: 3 files, ")
    downloads = tmp_path / "a" / "downloads"
    for path, data in tree.items():
        if path.startswith("good/"):
            assert (downloads / path).read_bytes() == data
    assert not (downloads / "top.txt").exists()
    # The same again: good/ exists, so the whole folder goes to good (1)/,
    # decided once: every file of it lands there, none next to the first.
    await wait_for(lambda: len([f for f in a.index.files() if f.name.startswith("good/")]) == 3)
    said, d = run(a, "download good/")
    await d
    assert said[-1].startswith("downloaded folder good/ to good (1)/: 3 files")
    for path, data in tree.items():
        if path.startswith("good/"):
            assert (downloads / "good (1)" / path[len("good/"):]).read_bytes() == data
    assert sorted(os.listdir(downloads)) == ["good", "good (1)"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("checked", [True, False], ids=["catalog checked", "catalog unchecked"])
async def test_hostile_paths_land_nowhere_outside_downloads(pair, tmp_path, monkeypatch, checked):
    a, b, tree = pair
    if not checked:
        # As if the catalog's check had a hole: the download and the
        # storage must still refuse.
        monkeypatch.setattr(client, "is_legal_path", lambda name: True)
    downloads = tmp_path / "a" / "downloads"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    downloads.mkdir(exist_ok=True)
    # A symlink planted where a folder download would go.
    os.symlink(outside, downloads / "good")
    await wait_for(lambda: len(a.catalog.paths()) == len(tree), timeout=10)
    skip = {str(downloads), str(tmp_path / "a" / "state"), str(tmp_path / "b" / "state")}
    before = snapshot(str(tmp_path), skip)
    lie(b, HOSTILE)
    wanted = len(tree) + (0 if checked else len(HOSTILE))
    await wait_for(lambda: len(a.catalog.paths()) >= wanted, timeout=10)
    offered = {o.name for o in a.catalog.paths()}
    assert offered.isdisjoint(HOSTILE) if checked else set(HOSTILE) <= offered
    said = []
    for line in ["download *", "download --folder good", "download ../", "download /tmp/",
                 "download good/../../", "download '*/*'"] + [f"download '{n}'" for n in HOSTILE]:
        lines, d = run(a, line)
        said.extend(lines)
        await d
    assert snapshot(str(tmp_path), skip) == before
    assert (outside / "precious").read_bytes() == b"keep me"
    assert os.listdir(outside) == ["precious"]
    # What landed is below downloads/, and no link in it was followed.
    for folder, dirs, files in os.walk(downloads):
        for name in dirs + files:
            real = os.path.realpath(os.path.join(folder, name))
            if not os.path.islink(os.path.join(folder, name)):
                assert real.startswith(str(downloads) + os.sep)
    assert (downloads / "good (1)" / "fine.txt").read_bytes() == tree["good/fine.txt"]
    assert os.path.islink(downloads / "good")
