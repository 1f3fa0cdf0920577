"""
Tests for L{twisted_p2p.manifest}: chunks, hashes and file identity.
"""

import random

import pytest
from blake3 import blake3

from twisted_p2p.limits import CHUNK_SIZE, MAX_FILE_SIZE
from twisted_p2p.manifest import (
    HASH_SIZE,
    ChunkHashes,
    Manifest,
    ManifestMismatch,
    chunk_count,
    chunk_hash,
    compute_file_id,
    hash_file,
)


def _content(size, seed=0):
    return random.Random(seed).randbytes(size)


def _write(tmp_path, data, name="f.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _expected_hashes(data):
    return tuple(
        blake3(data[i : i + CHUNK_SIZE]).digest() for i in range(0, len(data), CHUNK_SIZE)
    )


@pytest.mark.parametrize(
    "size, chunks",
    [
        (0, 0),
        (1, 1),
        (CHUNK_SIZE - 1, 1),
        (CHUNK_SIZE, 1),
        (CHUNK_SIZE + 1, 2),
        (CHUNK_SIZE * 7 // 2, 4),
    ],
)
def test_hash_file(tmp_path, size, chunks):
    data = _content(size)
    manifest = hash_file(_write(tmp_path, data))
    assert manifest.size == size
    assert manifest.chunk_count == chunks == chunk_count(size)
    assert manifest.chunk_hashes == _expected_hashes(data)
    assert manifest.file_id == compute_file_id(size, _expected_hashes(data))
    assert len(manifest.file_id) == 64
    int(manifest.file_id, 16)


def test_empty_file(tmp_path):
    manifest = hash_file(_write(tmp_path, b""))
    assert manifest.chunk_hashes == ()
    assert manifest.file_id == blake3(b"twisted-p2p file v2\n" + bytes(8)).hexdigest()


def test_the_hashes_are_blake3_as_protocol_md_defines_them():
    """
    Known answers, written out: BLAKE3's own test vector for the empty
    input (so the hash is plain BLAKE3, not a keyed or derived mode), and
    the id of an empty file as PROTOCOL.md defines it.  A change of either
    definition splits the network in two, and must fail here first.
    """
    assert chunk_hash(b"").hex() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    assert compute_file_id(0, ()) == (
        "b433ff913885c5484d161fdfb8850138cf311fce97607eb87be63834672a96df"
    )
    assert len(chunk_hash(memoryview(bytearray(CHUNK_SIZE)))) == HASH_SIZE


def test_same_content_same_id(tmp_path):
    data = _content(CHUNK_SIZE + 10)
    first = hash_file(_write(tmp_path, data, "a"))
    second = hash_file(_write(tmp_path, data, "b"))
    assert first == second


def test_file_id_changes_with_any_byte(tmp_path):
    size = CHUNK_SIZE * 2 + 100
    data = _content(size)
    original = hash_file(_write(tmp_path, data)).file_id
    for position in (0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 5, size - 1):
        changed = bytearray(data)
        changed[position] ^= 0x01
        assert hash_file(_write(tmp_path, bytes(changed))).file_id != original, position


def test_file_id_depends_on_size(tmp_path):
    # A zero byte appended changes the size even though it is "nothing".
    assert hash_file(_write(tmp_path, b"abc")).file_id != hash_file(
        _write(tmp_path, b"abc\x00")
    ).file_id
    assert compute_file_id(0, []) != compute_file_id(1, [])


def test_missing_file(tmp_path):
    with pytest.raises(OSError):
        hash_file(str(tmp_path / "nope"))


# -- Manifest.build --------------------------------------------------------


def _pieces(size):
    data = _content(size)
    hashes = _expected_hashes(data)
    return data, hashes, compute_file_id(size, hashes)


def test_build_with_right_id():
    _, hashes, file_id = _pieces(CHUNK_SIZE + 3)
    manifest = Manifest.build(CHUNK_SIZE + 3, list(hashes), file_id)
    assert manifest.file_id == file_id
    assert manifest.chunk_hashes == hashes
    assert isinstance(manifest.chunk_hashes, ChunkHashes)
    # Joined or one by one, the same manifest.
    assert Manifest.build(CHUNK_SIZE + 3, b"".join(hashes), file_id) == manifest


def test_build_rejects_wrong_id():
    _, hashes, file_id = _pieces(CHUNK_SIZE + 3)
    wrong = ("0" if file_id[0] != "0" else "1") + file_id[1:]
    with pytest.raises(ManifestMismatch):
        Manifest.build(CHUNK_SIZE + 3, hashes, wrong)


def test_build_rejects_swapped_chunks():
    _, hashes, file_id = _pieces(CHUNK_SIZE * 2)
    with pytest.raises(ManifestMismatch):
        Manifest.build(CHUNK_SIZE * 2, hashes[::-1], file_id)


def test_build_rejects_other_size_same_hashes():
    _, hashes, file_id = _pieces(CHUNK_SIZE + 3)
    with pytest.raises(ManifestMismatch):
        Manifest.build(CHUNK_SIZE + 4, hashes, file_id)


@pytest.mark.parametrize("count", [0, 1, 3])
def test_build_rejects_wrong_count(count):
    hashes = [bytes(HASH_SIZE)] * count
    with pytest.raises(ManifestMismatch):
        Manifest.build(CHUNK_SIZE + 1, hashes)


def test_build_rejects_hashes_for_empty_file():
    with pytest.raises(ManifestMismatch):
        Manifest.build(0, [bytes(HASH_SIZE)])


@pytest.mark.parametrize("length", [0, 1, HASH_SIZE - 1, HASH_SIZE + 1, 64])
def test_build_rejects_wrong_hash_length(length):
    hashes = [bytes(HASH_SIZE), bytes(length)]
    with pytest.raises(ManifestMismatch):
        Manifest.build(CHUNK_SIZE + 1, hashes)


@pytest.mark.parametrize("size", [-1, MAX_FILE_SIZE + 1])
def test_build_rejects_size_out_of_range(size):
    with pytest.raises(ManifestMismatch):
        Manifest.build(size, [])


# -- chunks ----------------------------------------------------------------


def test_chunk_length_and_offset():
    size = CHUNK_SIZE * 3 + CHUNK_SIZE // 2
    _, hashes, _ = _pieces(size)
    manifest = Manifest.build(size, hashes)
    assert [manifest.chunk_length(i) for i in range(4)] == [
        CHUNK_SIZE,
        CHUNK_SIZE,
        CHUNK_SIZE,
        CHUNK_SIZE // 2,
    ]
    assert [manifest.chunk_offset(i) for i in range(4)] == [
        0,
        CHUNK_SIZE,
        2 * CHUNK_SIZE,
        3 * CHUNK_SIZE,
    ]


def test_chunk_length_exact_multiple():
    _, hashes, _ = _pieces(CHUNK_SIZE * 2)
    manifest = Manifest.build(CHUNK_SIZE * 2, hashes)
    assert manifest.chunk_length(1) == CHUNK_SIZE


def test_chunk_length_one_byte_file():
    _, hashes, _ = _pieces(1)
    assert Manifest.build(1, hashes).chunk_length(0) == 1


@pytest.mark.parametrize("index", [-1, 4, 100])
def test_chunk_length_out_of_range(index):
    size = CHUNK_SIZE * 3 + 1
    _, hashes, _ = _pieces(size)
    with pytest.raises(IndexError):
        Manifest.build(size, hashes).chunk_length(index)


def test_verify_chunk():
    size = CHUNK_SIZE * 2 + 1000
    data, hashes, _ = _pieces(size)
    manifest = Manifest.build(size, hashes)
    chunks = [data[manifest.chunk_offset(i) :][: manifest.chunk_length(i)] for i in range(3)]
    for i, chunk in enumerate(chunks):
        assert manifest.verify_chunk(i, chunk) is True
    # The right bytes at the wrong index.
    assert manifest.verify_chunk(0, chunks[1]) is False
    assert manifest.verify_chunk(2, chunks[1]) is False


def test_verify_chunk_wrong_length():
    size = CHUNK_SIZE + 10
    data, hashes, _ = _pieces(size)
    manifest = Manifest.build(size, hashes)
    last = data[CHUNK_SIZE:]
    assert manifest.verify_chunk(1, last) is True
    assert manifest.verify_chunk(1, last[:-1]) is False
    assert manifest.verify_chunk(1, last + b"\x00") is False
    assert manifest.verify_chunk(1, b"") is False


def test_verify_chunk_detects_each_flipped_byte():
    """
    In the manner of Tahoe-LAFS's test_each_byte: flip one byte at a time, at
    the edges and at sampled places, and check the chunk no longer verifies.
    """
    size = CHUNK_SIZE + 777
    data, hashes, _ = _pieces(size)
    manifest = Manifest.build(size, hashes)
    for index in range(manifest.chunk_count):
        chunk = data[manifest.chunk_offset(index) :][: manifest.chunk_length(index)]
        assert manifest.verify_chunk(index, chunk)
        length = len(chunk)
        positions = {0, 1, length // 2, length - 2, length - 1}
        positions |= set(random.Random(index).sample(range(length), 40))
        for position in sorted(positions):
            for mask in (0x01, 0x80, 0xFF):
                corrupt = bytearray(chunk)
                corrupt[position] ^= mask
                assert not manifest.verify_chunk(index, bytes(corrupt)), (index, position, mask)


def test_hash_file_refuses_file_that_grows(tmp_path, monkeypatch):
    """
    A short read followed by more data means the file changed underneath.
    """
    path = _write(tmp_path, b"x" * 10)
    real_open = open

    class Growing:
        def __init__(self, f):
            self._f = f
            self._reads = 0

        def read(self, n):
            self._reads += 1
            if self._reads == 2:
                return b"more"
            return self._f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    # A module global shadows the builtin for hash_file only.
    monkeypatch.setattr(
        "twisted_p2p.manifest.open",
        lambda p, mode="r": Growing(real_open(p, mode)),
        raising=False,
    )
    with pytest.raises(ManifestMismatch):
        hash_file(path)


class TestChunkHashes:
    HASHES = [bytes([n]) * HASH_SIZE for n in range(5)]

    def test_a_sequence_of_its_hashes(self):
        hashes = ChunkHashes.of(self.HASHES)
        assert len(hashes) == 5
        assert list(hashes) == self.HASHES
        assert hashes[0] == self.HASHES[0] and hashes[-1] == self.HASHES[-1]
        assert bytes(hashes) == b"".join(self.HASHES)
        assert self.HASHES[2] in hashes and hashes.index(self.HASHES[3]) == 3
        with pytest.raises(IndexError):
            hashes[5]
        with pytest.raises(IndexError):
            hashes[-6]

    @pytest.mark.parametrize("cut", [slice(1, 3), slice(0, 9), slice(4, 2), slice(None, None, 2),
                                     slice(-2, None), slice(3, 3)])
    def test_a_slice_is_the_slice_of_a_list(self, cut):
        hashes = ChunkHashes.of(self.HASHES)
        assert list(hashes[cut]) == self.HASHES[cut]
        assert bytes(hashes[cut]) == b"".join(self.HASHES[cut])
        assert isinstance(hashes[cut], ChunkHashes)

    def test_equal_by_content(self):
        hashes = ChunkHashes.of(self.HASHES)
        assert hashes == ChunkHashes(b"".join(self.HASHES))
        assert hashes == self.HASHES and hashes == tuple(self.HASHES)
        assert hash(hashes) == hash(ChunkHashes(b"".join(self.HASHES)))
        assert hashes != self.HASHES[:4] and hashes != ChunkHashes.of(self.HASHES[:4])

    @pytest.mark.parametrize("bad", [b"x" * (HASH_SIZE + 1), [b"x" * HASH_SIZE, b"short"]])
    def test_a_hash_of_the_wrong_length_is_refused(self, bad):
        with pytest.raises(ManifestMismatch):
            ChunkHashes.of(bad)

    def test_the_file_id_is_the_same_joined_or_not(self):
        joined = b"".join(self.HASHES)
        expected = compute_file_id(5, self.HASHES)
        assert compute_file_id(5, ChunkHashes(joined)) == expected
        assert compute_file_id(5, (joined,)) == expected
