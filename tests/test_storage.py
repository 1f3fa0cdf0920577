"""
L{PartialFile}: a download's bytes on disk until they are complete.
"""

import errno
import os

import pytest

from twisted_p2p.index import file_signature
from twisted_p2p.manifest import CHUNK_SIZE, Manifest
from twisted_p2p.storage import (
    PARTIAL_PREFIX,
    PARTIAL_SUFFIX,
    ChunkMap,
    PartialFile,
    StorageError,
    describe_os_error,
)

FILE_ID = "0123456789abcdef" * 4


def listing(folder):
    return sorted(os.listdir(folder))


def test_partial_file_is_hidden_and_sized(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(1000)
    name = os.path.basename(partial.path)
    assert name == f"{PARTIAL_PREFIX}{FILE_ID[:32]}{PARTIAL_SUFFIX}"
    assert name.startswith(".")
    assert os.path.dirname(partial.path) == str(tmp_path)
    assert os.path.getsize(partial.path) == 1000
    partial.discard()


def test_write_at_offsets(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(10)
    partial.write(6, b"6789")
    partial.write(0, memoryview(b"012"))
    partial.write(3, b"345")
    final, signature = partial.complete("digits.txt")
    assert final == "digits.txt"
    path = tmp_path / "digits.txt"
    assert path.read_bytes() == b"0123456789"
    assert signature == file_signature(os.stat(path))
    assert listing(tmp_path) == ["digits.txt"]


def test_unwritten_ranges_are_zero(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(6)
    partial.write(2, b"ab")
    partial.complete("holes")
    assert (tmp_path / "holes").read_bytes() == b"\0\0ab\0\0"


def test_reopen_keeps_what_was_written(tmp_path):
    first = PartialFile(str(tmp_path), FILE_ID)
    first.open(4)
    first.write(0, b"ab")
    again = PartialFile(str(tmp_path), FILE_ID)
    again.open(4)
    again.write(2, b"cd")
    again.complete("resumed")
    first.discard()  # its fd only; the partial file was already renamed
    assert (tmp_path / "resumed").read_bytes() == b"abcd"


def test_complete_never_overwrites(tmp_path):
    (tmp_path / "report.pdf").write_bytes(b"mine")
    (tmp_path / "report (1).pdf").write_bytes(b"mine too")
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(3)
    partial.write(0, b"new")
    final, _ = partial.complete("report.pdf")
    assert final == "report (2).pdf"
    assert (tmp_path / "report.pdf").read_bytes() == b"mine"
    assert (tmp_path / "report (1).pdf").read_bytes() == b"mine too"
    assert (tmp_path / "report (2).pdf").read_bytes() == b"new"
    assert listing(tmp_path) == ["report (1).pdf", "report (2).pdf", "report.pdf"]


def test_complete_an_empty_file(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(0)
    final, signature = partial.complete("empty")
    assert final == "empty"
    assert (tmp_path / "empty").read_bytes() == b""
    assert signature[0] == 0


def test_discard_removes_the_partial(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(100)
    partial.write(0, b"x" * 100)
    assert listing(tmp_path) == [os.path.basename(partial.path)]
    partial.discard()
    assert listing(tmp_path) == []
    # Twice, or never opened: nothing to do, no error.
    partial.discard()
    PartialFile(str(tmp_path), "f" * 64).discard()
    assert listing(tmp_path) == []


# -- the chunk map: resume after a crash ----------------------------------------


def manifest_of(content):
    from twisted_p2p.manifest import chunk_hash

    hashes = [
        chunk_hash(content[i : i + CHUNK_SIZE])
        for i in range(0, len(content), CHUNK_SIZE)
    ]
    return Manifest.build(len(content), hashes)


CONTENT = bytes(range(256)) * (5 * CHUNK_SIZE // 256) + b"tail"


def chunk(index):
    return CONTENT[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]


def test_stored_chunks_survive_a_crash(tmp_path):
    manifest = manifest_of(CONTENT)
    partial = PartialFile(str(tmp_path), manifest.file_id)
    assert partial.open(manifest.size, manifest) == []
    for index in (0, 3, 5):
        partial.store(index, index * CHUNK_SIZE, [chunk(index)])
    assert list(partial.chunks.indexes()) == [0, 3, 5]
    # No close: as after SIGKILL, only what the kernel got is there.
    again = PartialFile(str(tmp_path), manifest.file_id)
    assert again.open(manifest.size, manifest) == [0, 3, 5]
    assert again.chunks.verified == 3
    again.close()
    partial.close()


def test_a_chunk_is_written_before_it_is_marked(tmp_path, monkeypatch):
    manifest = manifest_of(CONTENT)
    partial = PartialFile(str(tmp_path), manifest.file_id)
    partial.open(manifest.size, manifest)
    writes = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def recording_pwrite(fd, data, offset):
        writes.append("map" if fd == partial.chunks._fd else "data")
        return real_pwrite(fd, data, offset)

    def recording_pwritev(fd, buffers, offset):
        writes.append("map" if fd == partial.chunks._fd else "data")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    monkeypatch.setattr(os, "pwritev", recording_pwritev)
    partial.store(2, 2 * CHUNK_SIZE, [chunk(2)])
    assert writes == ["data", "map"]
    partial.discard()


def test_a_run_of_chunks_is_written_once_then_marked_at_once(tmp_path, monkeypatch):
    manifest = manifest_of(CONTENT)
    partial = PartialFile(str(tmp_path), manifest.file_id)
    partial.open(manifest.size, manifest)
    writes = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: writes.append(
        "map" if fd == partial.chunks._fd else "data") or real_pwrite(fd, data, offset))
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: writes.append(
        "map" if fd == partial.chunks._fd else "data") or real_pwritev(fd, buffers, offset))
    run = CONTENT[CHUNK_SIZE : 4 * CHUNK_SIZE]
    partial.store_run(1, 3, CHUNK_SIZE, memoryview(run))
    assert writes == ["data", "map"]
    assert list(partial.chunks.indexes()) == [1, 2, 3]
    assert partial.chunks.verified == 3
    partial.store_run(2, 2, 2 * CHUNK_SIZE, memoryview(run)[CHUNK_SIZE:])
    assert partial.chunks.verified == 3  # marked already: counted once
    partial.close()
    again = PartialFile(str(tmp_path), manifest.file_id)
    assert again.open(manifest.size, manifest) == [1, 2, 3]
    again.discard()


def test_writeback_is_started_every_so_many_bytes(tmp_path, monkeypatch):
    from twisted_p2p import storage

    started = []
    monkeypatch.setattr(storage, "start_writeback", started.append)
    monkeypatch.setattr(storage, "WRITEBACK_EVERY", 2 * CHUNK_SIZE)
    manifest = manifest_of(CONTENT)
    partial = PartialFile(str(tmp_path), manifest.file_id)
    partial.open(manifest.size, manifest)
    for index in range(5):
        partial.store(index, index * CHUNK_SIZE, [chunk(index)])
    assert len(started) == 2
    partial.discard()


def test_start_writeback_is_harmless_on_any_file(tmp_path):
    from twisted_p2p.storage import start_writeback

    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 100000)
        start_writeback(f.fileno())


def test_a_marked_chunk_that_does_not_verify_is_unmarked(tmp_path):
    manifest = manifest_of(CONTENT)
    partial = PartialFile(str(tmp_path), manifest.file_id)
    partial.open(manifest.size, manifest)
    partial.store(1, CHUNK_SIZE, [chunk(1)])
    partial.store(4, 4 * CHUNK_SIZE, [chunk(4)])
    partial.write(CHUNK_SIZE, b"\xff")  # as after a power loss
    partial.close()
    again = PartialFile(str(tmp_path), manifest.file_id)
    assert again.open(manifest.size, manifest) == [4]
    again.close()
    # The map on disk says so too.
    third = PartialFile(str(tmp_path), manifest.file_id)
    assert third.open(manifest.size, manifest) == [4]
    third.discard()


@pytest.mark.parametrize("damage", ["foreign id", "short", "garbage", "empty"])
def test_a_damaged_or_foreign_map_counts_as_empty(tmp_path, damage):
    manifest = manifest_of(CONTENT)
    partial = PartialFile(str(tmp_path), manifest.file_id)
    partial.open(manifest.size, manifest)
    partial.store(0, 0, [chunk(0)])
    partial.close()
    with open(partial.map_path, "r+b") as f:
        data = bytearray(f.read())
        if damage == "foreign id":
            data[8] ^= 1
        elif damage == "short":
            data = data[:-1]
        elif damage == "garbage":
            data = bytearray(os.urandom(len(data)))
        else:
            data = bytearray()
        f.seek(0)
        f.truncate()
        f.write(data)
    again = PartialFile(str(tmp_path), manifest.file_id)
    assert again.open(manifest.size, manifest) == []
    again.discard()


def test_bits_past_the_last_chunk_are_ignored(tmp_path):
    manifest = manifest_of(CONTENT)  # 6 chunks: two spare bits
    partial = PartialFile(str(tmp_path), manifest.file_id)
    partial.open(manifest.size, manifest)
    partial.close()
    with open(partial.map_path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\xc0")
    again = PartialFile(str(tmp_path), manifest.file_id)
    assert again.open(manifest.size, manifest) == []
    assert again.chunks.verified == 0
    again.discard()


def test_complete_and_discard_remove_the_map(tmp_path):
    manifest = manifest_of(CONTENT)
    partial = PartialFile(str(tmp_path), manifest.file_id)
    partial.open(manifest.size, manifest)
    for index in range(manifest.chunk_count):
        partial.store(index, index * CHUNK_SIZE, [chunk(index)])
    final, _ = partial.complete("whole.bin")
    assert listing(tmp_path) == ["whole.bin"]
    assert (tmp_path / final).read_bytes() == CONTENT
    other = PartialFile(str(tmp_path), manifest.file_id)
    other.open(manifest.size, manifest)
    other.discard()
    assert listing(tmp_path) == ["whole.bin"]


def test_chunk_map_snapshot_is_the_wire_bitmap():
    chunks = ChunkMap(10)
    for index in (0, 3, 9):
        chunks.set(index)
    assert chunks.snapshot() == bytes([0b00001001, 0b00000010])
    assert 3 in chunks and 4 not in chunks
    chunks.set(3, False)
    assert list(chunks.indexes()) == [0, 9] and chunks.verified == 2


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.ENOSPC, "no space left in the downloads folder /d; free some space"),
        (errno.EDQUOT, "no space left in the downloads folder /d"),
        (errno.EACCES, "the downloads folder /d is not writable"),
        (errno.EROFS, "the downloads folder /d is not writable"),
        (errno.ENOENT, "the downloads folder /d is gone"),
        (errno.EIO, "cannot write in the downloads folder /d"),
    ],
)
def test_os_errors_in_words(code, says):
    assert says in describe_os_error(OSError(code, os.strerror(code)), "/d")


def test_a_vanished_folder_is_a_storage_error(tmp_path):
    folder = tmp_path / "downloads"
    partial = PartialFile(str(folder), FILE_ID)
    with pytest.raises(StorageError) as e:
        partial.open(10)
    assert str(e.value) == (
        f"the downloads folder {folder} is gone; create it again, then download again"
    )


def test_a_full_disk_is_a_storage_error(tmp_path, monkeypatch):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(10)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(StorageError) as e:
        partial.write(0, b"x")
    assert "no space left" in str(e.value)
    monkeypatch.undo()
    partial.discard()


# -- planted files: never write through a symlink or into another file's inode --


@pytest.fixture
def outside(tmp_path):
    """
    A folder beside downloads/ with a file that must stay untouched.
    """
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious").write_bytes(b"keep me")
    return folder


@pytest.fixture
def downloads(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


def plant(path, target, how):
    if how == "symlink":
        os.symlink(target, path)
    else:
        os.link(target, path)


@pytest.mark.parametrize("how", ["symlink", "hard link"])
@pytest.mark.parametrize("which", ["part", "map"])
def test_a_planted_link_is_replaced_not_followed(downloads, outside, how, which):
    manifest = manifest_of(CONTENT)
    partial = PartialFile(str(downloads), manifest.file_id)
    precious = outside / "precious"
    plant(partial.path if which == "part" else partial.map_path, precious, how)
    assert partial.open(manifest.size, manifest) == []
    for index in range(manifest.chunk_count):
        partial.store(index, index * CHUNK_SIZE, [chunk(index)])
    final, _ = partial.complete("whole.bin")
    assert precious.read_bytes() == b"keep me"
    assert os.stat(precious).st_nlink == 1
    assert listing(downloads) == ["whole.bin"]
    assert not os.path.islink(downloads / final)
    assert (downloads / final).read_bytes() == CONTENT
    assert os.stat(downloads / final).st_nlink == 1


def test_a_dangling_symlink_creates_nothing_outside(downloads, outside):
    partial = PartialFile(str(downloads), FILE_ID)
    os.symlink(outside / "created", partial.path)
    partial.open(10)
    partial.write(0, b"x" * 10)
    assert listing(outside) == ["precious"]
    assert not os.path.islink(partial.path)
    partial.discard()
    assert listing(downloads) == []


def test_a_symlink_planted_before_completion_is_not_linked_into_place(downloads, outside):
    partial = PartialFile(str(downloads), FILE_ID)
    partial.open(3)
    partial.write(0, b"new")
    os.unlink(partial.path)
    os.symlink(outside / "precious", partial.path)
    with pytest.raises(StorageError) as e:
        partial.complete("report.pdf")
    assert "replaced" in str(e.value)
    assert not os.path.lexists(downloads / "report.pdf")
    assert (outside / "precious").read_bytes() == b"keep me"
    assert os.stat(outside / "precious").st_nlink == 1


def test_a_swap_between_check_and_link_is_undone(downloads, outside, monkeypatch):
    partial = PartialFile(str(downloads), FILE_ID)
    partial.open(3)
    partial.write(0, b"new")
    real_link = os.link

    def swapping_link(src, dst, **kwargs):
        os.unlink(src)
        os.symlink(outside / "precious", src)
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", swapping_link)
    with pytest.raises(StorageError):
        partial.complete("report.pdf")
    assert not os.path.lexists(downloads / "report.pdf")
    assert (outside / "precious").read_bytes() == b"keep me"


def test_a_leftover_partial_linked_to_a_finished_download_is_not_reused(downloads):
    # A crash between link() and unlink() in complete(): the partial name is
    # a second link to the finished file, which must not be written again.
    partial = PartialFile(str(downloads), FILE_ID)
    partial.open(3)
    partial.write(0, b"abc")
    partial.complete("done.txt")
    os.link(downloads / "done.txt", partial.path)
    again = PartialFile(str(downloads), FILE_ID)
    again.open(3)
    again.write(0, b"xyz")
    assert (downloads / "done.txt").read_bytes() == b"abc"
    again.discard()


# -- paths ---------------------------------------------------------------------


def tree(folder):
    """Every path under C{folder}, links shown as such, relative."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            found.append(os.path.relpath(path, folder) + ("@" if os.path.islink(path) else ""))
    return sorted(found)


def completed(downloads, name, content=b"abc"):
    partial = PartialFile(str(downloads), FILE_ID)
    partial.open(len(content))
    partial.write(0, content)
    return partial, partial.complete(name)


def test_complete_into_a_path_makes_its_folders(downloads):
    _, (final, signature) = completed(downloads, "photos/2026/a b é.jpg")
    assert final == "photos/2026/a b é.jpg"
    assert (downloads / "photos" / "2026" / "a b é.jpg").read_bytes() == b"abc"
    assert signature == file_signature(os.stat(downloads / final))
    assert tree(downloads) == ["photos", "photos/2026", "photos/2026/a b é.jpg"]


def test_complete_into_a_path_never_overwrites_the_file(downloads):
    (downloads / "photos").mkdir()
    (downloads / "photos" / "a.jpg").write_bytes(b"old")
    _, (final, _) = completed(downloads, "photos/a.jpg")
    assert final == "photos/a (1).jpg"
    assert (downloads / "photos" / "a.jpg").read_bytes() == b"old"


@pytest.mark.parametrize("depth", [0, 1])
def test_a_symlinked_folder_is_not_followed(downloads, outside, depth):
    parent = downloads
    if depth:
        parent = downloads / "photos"
        parent.mkdir()
    os.symlink(outside, parent / ("2026" if depth else "photos"))
    partial = PartialFile(str(downloads), FILE_ID)
    partial.open(3)
    partial.write(0, b"bad")
    with pytest.raises(StorageError) as e:
        partial.complete("photos/2026/a.jpg")
    assert "not a folder" in str(e.value)
    assert tree(outside) == ["precious"]
    # The partial data stays, for a later try.
    assert os.path.exists(partial.path)


def test_a_file_in_the_way_of_a_folder(downloads):
    (downloads / "photos").write_bytes(b"a file")
    partial = PartialFile(str(downloads), FILE_ID)
    partial.open(3)
    partial.write(0, b"abc")
    with pytest.raises(StorageError):
        partial.complete("photos/a.jpg")
    assert (downloads / "photos").read_bytes() == b"a file"


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "a/../../escaped", "a//b", ".x/y"])
def test_an_illegal_path_is_never_written(downloads, outside, name):
    partial = PartialFile(str(downloads), FILE_ID)
    partial.open(3)
    partial.write(0, b"abc")
    with pytest.raises(StorageError):
        partial.complete(name)
    assert tree(outside) == ["precious"]
    assert [n for n in listing(downloads) if not n.startswith(".")] == []


# -- what a resumed folder download finds already there ------------------------------


def test_already_here_is_the_same_content_in_a_regular_file(tmp_path):
    from twisted_p2p.index import file_signature
    from twisted_p2p.manifest import hash_file
    from twisted_p2p.storage import already_here, is_folder_here

    (tmp_path / "photos" / "2026").mkdir(parents=True)
    good = tmp_path / "photos" / "2026" / "a.jpg"
    good.write_bytes(b"a" * 5000)
    other = tmp_path / "photos" / "b.jpg"
    other.write_bytes(b"b" * 5000)
    (tmp_path / "photos" / "link.jpg").symlink_to(good)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jpg"
    outside.write_bytes(b"a" * 5000)
    a_id = hash_file(str(good)).file_id
    entries = [
        ("photos/2026/a.jpg", a_id, 5000),  # there
        ("photos/b.jpg", a_id, 5000),  # another content, same size
        ("photos/2026/a.jpg", a_id, 4999),  # another size
        ("photos/link.jpg", a_id, 5000),  # a symlink to the right content
        ("photos/missing.jpg", a_id, 5000),
        (f"../{outside.name}", a_id, 5000),  # not a path below the folder
    ]
    assert already_here(str(tmp_path), entries) == [True, False, False, False, False, False]
    # What the index hashed, at the signature it has now, is not read again.
    known = {str(other): (file_signature(os.stat(other)), a_id)}
    assert already_here(str(tmp_path), [("photos/b.jpg", a_id, 5000)], known) == [True]
    # A file changed since (another signature) is.
    known = {str(other): ((5000, 0, 0), a_id)}
    assert already_here(str(tmp_path), [("photos/b.jpg", a_id, 5000)], known) == [False]
    assert is_folder_here(str(tmp_path), "photos")
    assert not is_folder_here(str(tmp_path), "photos/b.jpg")
    (tmp_path / "elsewhere").symlink_to(tmp_path / "photos")
    assert not is_folder_here(str(tmp_path), "elsewhere")
    assert not is_folder_here(str(tmp_path), "..")

