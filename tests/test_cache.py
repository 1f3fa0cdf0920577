"""
L{ChunkCache}: the chunks this peer holds for others, on a real folder.
"""

import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted_p2p import cache as cache_module
from twisted_p2p.cache import (
    ALREADY_HELD,
    BAD_FILE_ID,
    BAD_HASH,
    BAD_INDEX,
    BAD_NAME,
    HOSTING_OFF,
    OVER_QUOTA,
    UNKNOWN_FILE,
    CachedFile,
    CacheMiss,
    CacheRefused,
    ChunkCache,
    check_file_id,
)
from twisted_p2p.manifest import CHUNK_SIZE, hash_file

ME = "0" * 32


class Sample:
    """
    A file's bytes and its manifest, as the project hashes them.
    """

    def __init__(self, folder, size, seed):
        self.data = bytes((seed * 31 + i * 7) % 251 for i in range(size))
        path = os.path.join(folder, f"sample-{seed}")
        with open(path, "wb") as f:
            f.write(self.data)
        self.manifest = hash_file(path)
        os.unlink(path)
        self.file_id = self.manifest.file_id

    def chunk(self, index):
        offset = self.manifest.chunk_offset(index)
        return self.data[offset : offset + self.manifest.chunk_length(index)]


@pytest.fixture
def samples(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    # Three chunks (the last short), two chunks, one small chunk.
    return [
        Sample(str(folder), 2 * CHUNK_SIZE + 100, 1),
        Sample(str(folder), 2 * CHUNK_SIZE, 2),
        Sample(str(folder), 300, 3),
    ]


def manifest_bytes(sample, name="file.bin"):
    return len(cache_module._encode_manifest(sample.manifest, name))


def open_cache(tmp_path, quota=1 << 30):
    cache = ChunkCache(str(tmp_path / "cache"), quota, salt=ME)
    cache.open()
    return cache


def refused(code, call, *args, **kwargs):
    with pytest.raises(CacheRefused) as info:
        call(*args, **kwargs)
    assert info.value.code == code, info.value.reason
    return info.value


# -- taking and serving chunks -------------------------------------------------


def test_a_chunk_put_is_served_and_listed(tmp_path, samples):
    sample = samples[0]
    cache = open_cache(tmp_path)
    cache.add_manifest(sample.manifest, "file.bin")
    chunk = sample.chunk(1)
    cache.put(sample.file_id, 1, [chunk[:1000], memoryview(chunk)[1000:]])
    cache.put(sample.file_id, 2, [sample.chunk(2)])
    assert cache.read(sample.file_id, 1) == chunk
    assert cache.read(sample.file_id, 1, 10, 5) == chunk[10:15]
    assert cache.held(sample.file_id) == {1, 2}
    assert cache.bitmap(sample.file_id) == b"\x06"
    assert cache.files() == [
        CachedFile(sample.file_id, "file.bin", sample.manifest.size, 2, CHUNK_SIZE + 100)
    ]
    assert cache.used == manifest_bytes(sample) + CHUNK_SIZE + 100
    assert cache.free == (1 << 30) - cache.used
    assert cache.reserved == 0
    with pytest.raises(CacheMiss):
        cache.read(sample.file_id, 0)
    with pytest.raises(ValueError):
        cache.read(sample.file_id, 2, 50, 51)


def test_a_chunk_of_a_file_with_no_manifest_is_refused(tmp_path, samples):
    cache = open_cache(tmp_path)
    refused(UNKNOWN_FILE, cache.put, samples[0].file_id, 0, [samples[0].chunk(0)])
    assert os.listdir(cache.folder) == []


def test_a_chunk_with_a_bad_hash_is_refused(tmp_path, samples):
    sample = samples[0]
    cache = open_cache(tmp_path)
    cache.add_manifest(sample.manifest, "file.bin")
    free = cache.free
    bad = bytearray(sample.chunk(0))
    bad[12345] ^= 1
    refused(BAD_HASH, cache.put, sample.file_id, 0, [bytes(bad)])
    refused(BAD_HASH, cache.put, sample.file_id, 0, [sample.chunk(0)[:-1]])
    refused(BAD_HASH, cache.put, sample.file_id, 0, [sample.chunk(1)])
    assert cache.free == free
    assert cache.held(sample.file_id) == frozenset()
    assert os.listdir(os.path.join(cache.folder, sample.file_id)) == ["manifest"]


def test_a_chunk_beyond_the_quota_is_refused(tmp_path, samples):
    sample = samples[0]
    cache = open_cache(tmp_path, quota=manifest_bytes(sample) + CHUNK_SIZE + 99)
    cache.add_manifest(sample.manifest, "file.bin")
    cache.put(sample.file_id, 0, [sample.chunk(0)])
    refused(OVER_QUOTA, cache.put, sample.file_id, 1, [sample.chunk(1)])
    # The short last chunk fits no better: 100 bytes, 99 free.
    refused(OVER_QUOTA, cache.reserve, sample.file_id, 2)
    assert cache.used == manifest_bytes(sample) + CHUNK_SIZE
    assert cache.free == 99


def test_a_manifest_beyond_the_quota_is_refused(tmp_path, samples):
    cache = open_cache(tmp_path, quota=manifest_bytes(samples[0]) - 1)
    refused(OVER_QUOTA, cache.add_manifest, samples[0].manifest, "file.bin")
    assert os.listdir(cache.folder) == []


def test_a_zero_quota_hosts_nothing(tmp_path, samples):
    cache = open_cache(tmp_path, quota=0)
    refused(HOSTING_OFF, cache.add_manifest, samples[0].manifest, "file.bin")
    assert cache.free == 0
    assert os.listdir(cache.folder) == []


def test_a_zero_quota_refuses_pushes_with_its_reason(tmp_path, samples):
    cache = open_cache(tmp_path, quota=0)
    refused(HOSTING_OFF, cache.reserve, samples[0].file_id, 0)
    refused(HOSTING_OFF, cache.put, samples[0].file_id, 0, [samples[0].chunk(0)])


def test_a_chunk_held_or_on_its_way_is_refused(tmp_path, samples):
    sample = samples[0]
    cache = open_cache(tmp_path)
    cache.add_manifest(sample.manifest, "file.bin")
    cache.put(sample.file_id, 0, [sample.chunk(0)])
    refused(ALREADY_HELD, cache.put, sample.file_id, 0, [sample.chunk(0)])
    reservation = cache.reserve(sample.file_id, 1)
    refused(ALREADY_HELD, cache.reserve, sample.file_id, 1)
    reservation.release()
    reservation.release()
    cache.put(sample.file_id, 1, [sample.chunk(1)], cache.reserve(sample.file_id, 1))
    assert cache.held(sample.file_id) == {0, 1}


@pytest.mark.parametrize("index", [-1, 3, 10**20, True, "1", 1.0, None])
def test_an_index_out_of_the_file_is_refused(tmp_path, samples, index):
    cache = open_cache(tmp_path)
    cache.add_manifest(samples[0].manifest, "file.bin")
    refused(BAD_INDEX, cache.reserve, samples[0].file_id, index)


@pytest.mark.parametrize("name", ["", ".hidden", "a/../b", "../up", "/etc/x", "a//b", "x\n", 7])
def test_a_manifest_with_an_illegal_name_is_refused(tmp_path, samples, name):
    cache = open_cache(tmp_path)
    refused(BAD_NAME, cache.add_manifest, samples[0].manifest, name)
    assert os.listdir(cache.folder) == []


def test_a_file_in_a_shared_subfolder_is_cached_under_its_path(tmp_path, samples):
    """Files are offered by path (photos/2026/a.jpg); the cache keeps it."""
    path = "/".join(["\U0001f4f7 \u00e9t\u00e9" * 20] * 3) + ".jpg"
    cache = open_cache(tmp_path)
    cache.add_manifest(samples[0].manifest, path)
    cache.put(samples[0].file_id, 1, [samples[0].chunk(1)])
    cache.close()
    again = ChunkCache(cache.folder, 1 << 30, salt=ME)
    again.open()
    assert [f.name for f in again.files()] == [path]


def test_adding_a_manifest_twice_stores_it_once(tmp_path, samples):
    cache = open_cache(tmp_path)
    cache.add_manifest(samples[0].manifest, "file.bin")
    used = cache.used
    cache.add_manifest(samples[0].manifest, "other name.bin")
    assert cache.used == used
    assert cache.manifest(samples[0].file_id) == samples[0].manifest
    assert cache.manifest(samples[1].file_id) is None


# -- hostile ids -----------------------------------------------------------------


HOSTILE_IDS = [
    "",
    "..",
    "../" + "a" * 61,
    "/etc/passwd",
    "A" * 64,
    "a" * 63,
    "a" * 65,
    "a" * 63 + "\n",
    "a" * 63 + "/",
    "a" * 63 + "\x00",
    "ａ" * 64,
    "٠" * 64,
    b"a" * 64,
    None,
    64,
]


@pytest.mark.parametrize("file_id", HOSTILE_IDS)
def test_a_hostile_file_id_never_reaches_the_disk(tmp_path, file_id):
    cache = open_cache(tmp_path)
    refused(BAD_FILE_ID, check_file_id, file_id)
    refused(BAD_FILE_ID, cache.reserve, file_id, 0)
    refused(BAD_FILE_ID, cache.put, file_id, 0, [b"x"])
    refused(BAD_FILE_ID, cache.drop_file, file_id)
    with pytest.raises(CacheMiss):
        cache.read(file_id, 0)
    assert cache.held(file_id) == frozenset()
    assert os.listdir(cache.folder) == []
    assert sorted(os.listdir(tmp_path)) == ["cache"]


@given(st.text(max_size=70))
def test_only_lowercase_hex_ids_pass(file_id):
    valid = len(file_id) == 64 and all(c in "0123456789abcdef" for c in file_id)
    try:
        check_file_id(file_id)
    except CacheRefused:
        assert not valid
    else:
        assert valid


# -- several pushes at once ------------------------------------------------------


def test_concurrent_reservations_never_exceed_the_quota(tmp_path, samples):
    files = samples[:2]
    quota = sum(manifest_bytes(s) for s in files) + 3 * CHUNK_SIZE
    cache = open_cache(tmp_path, quota)
    for sample in files:
        cache.add_manifest(sample.manifest, "file.bin")
    wanted = [(s, i) for s in files for i in range(s.manifest.chunk_count)] * 4
    barrier = threading.Barrier(len(wanted))
    outcomes = []
    over = []

    def push(sample, index):
        barrier.wait()
        try:
            cache.put(sample.file_id, index, [sample.chunk(index)])
            outcomes.append("stored")
        except CacheRefused as e:
            outcomes.append(e.code)
        if cache.used + cache.reserved > quota:
            over.append(cache.used + cache.reserved)

    threads = [threading.Thread(target=push, args=pair) for pair in wanted]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not over
    assert cache.used <= quota
    assert cache.reserved == 0
    # Room for three full chunks: three chunks are stored, whichever came
    # first (after the 100-byte last one, two full ones leave too little).
    stored = sum(len(cache.held(s.file_id)) for s in files)
    assert outcomes.count("stored") == stored == 3
    assert set(outcomes) <= {"stored", OVER_QUOTA, ALREADY_HELD}
    reopened = open_cache(tmp_path, quota)
    assert reopened.used == cache.used


def test_reservations_hold_room_until_released(tmp_path, samples):
    sample = samples[0]
    quota = manifest_bytes(sample) + 2 * CHUNK_SIZE
    cache = open_cache(tmp_path, quota)
    cache.add_manifest(sample.manifest, "file.bin")
    first = cache.reserve(sample.file_id, 0)
    second = cache.reserve(sample.file_id, 1)
    assert cache.free == 0
    refused(OVER_QUOTA, cache.reserve, sample.file_id, 2)
    second.release()
    third = cache.reserve(sample.file_id, 2)
    assert cache.reserved == CHUNK_SIZE + 100
    with pytest.raises(ValueError):
        cache.put(sample.file_id, 1, [sample.chunk(1)], second)
    with pytest.raises(ValueError):
        cache.put(sample.file_id, 2, [sample.chunk(2)], first)
    cache.put(sample.file_id, 0, [sample.chunk(0)], first)
    cache.put(sample.file_id, 2, [sample.chunk(2)], third)
    assert cache.reserved == 0
    assert cache.held(sample.file_id) == {0, 2}


def test_a_dropped_file_refuses_the_push_in_progress(tmp_path, samples):
    sample = samples[0]
    cache = open_cache(tmp_path)
    cache.add_manifest(sample.manifest, "file.bin")
    cache.put(sample.file_id, 0, [sample.chunk(0)])
    reservation = cache.reserve(sample.file_id, 1)
    assert cache.drop_file(sample.file_id) == len(sample.chunk(0))  # what was held
    assert cache.drop_file(sample.file_id) == 0
    assert cache.used == cache.reserved == 0
    refused(UNKNOWN_FILE, cache.put, sample.file_id, 1, [sample.chunk(1)], reservation)
    assert os.listdir(cache.folder) == []


# -- eviction ----------------------------------------------------------------------


def filled(tmp_path, samples):
    cache = open_cache(tmp_path)
    for sample in samples:
        cache.add_manifest(sample.manifest, "file.bin")
        for index in range(sample.manifest.chunk_count):
            cache.put(sample.file_id, index, [sample.chunk(index)])
    return cache


def test_eviction_takes_the_most_copied_first(tmp_path, samples):
    cache = filled(tmp_path, samples)
    a, b, c = samples
    copies = {(a.file_id, 0): 2, (a.file_id, 1): 5, (a.file_id, 2): 4,
              (b.file_id, 0): 1, (b.file_id, 1): 3, (c.file_id, 0): 6}
    count = lambda f, i: copies[f, i]  # noqa: E731
    cache.quota = cache.used
    # The most copied chunk is c's only one, of 300 bytes: with its manifest,
    # which goes with it, that is enough.
    assert cache.make_room(300 + manifest_bytes(c), count) == [(c.file_id, 0)]
    assert c.file_id not in os.listdir(cache.folder)
    assert cache.free == 300 + manifest_bytes(c)
    # A whole chunk more: a's chunk 1 (5 copies).
    assert cache.make_room(cache.free + CHUNK_SIZE, count) == [(a.file_id, 1)]
    # Never a chunk with copies at or under the floor; nothing if that is
    # not enough.
    assert cache.make_room(cache.free + CHUNK_SIZE, count, floor=4) == []
    assert cache.make_room(cache.free + CHUNK_SIZE + 1, count, floor=2) == [
        (a.file_id, 2),
        (b.file_id, 1),
    ]
    assert cache.held(a.file_id) == {0}
    assert cache.held(b.file_id) == {0}
    assert cache.used == sum(manifest_bytes(s) for s in samples[:2]) + 2 * CHUNK_SIZE


def test_a_rare_chunk_displaces_a_well_copied_one(tmp_path, samples):
    a, b, _ = samples
    quota = manifest_bytes(a) + manifest_bytes(b) + 2 * CHUNK_SIZE
    cache = open_cache(tmp_path, quota)
    cache.add_manifest(a.manifest, "a.bin")
    cache.add_manifest(b.manifest, "b.bin")
    cache.put(a.file_id, 0, [a.chunk(0)])
    cache.put(a.file_id, 1, [a.chunk(1)])
    copies = {(a.file_id, 0): 2, (a.file_id, 1): 4, (b.file_id, 0): 1, (b.file_id, 1): 3}
    count = lambda f, i: copies[f, i]  # noqa: E731
    # b's chunk 0 has 1 copy: a's chunk 1 (4 copies, 3 once gone) makes way.
    cache.put(b.file_id, 0, [b.chunk(0)], cache.reserve(b.file_id, 0, copies=count))
    assert cache.held(a.file_id) == {0}
    # b's chunk 1 has 3 copies: a's chunk 0 (2 copies) is rarer and stays.
    refused(OVER_QUOTA, cache.reserve, b.file_id, 1, copies=count)
    assert cache.held(a.file_id) == {0}


# -- restarts and untrusted disk -------------------------------------------------------


def test_the_cache_survives_a_restart(tmp_path, samples):
    cache = filled(tmp_path, samples)
    used, files = cache.used, cache.files()
    cache.close()
    again = ChunkCache(cache.folder, 1 << 30, salt=ME)
    report = again.open()
    assert (report.chunks, report.dropped_chunks, report.dropped_files) == (6, 0, 0)
    assert again.used == used
    assert again.files() == files
    assert again.read(samples[0].file_id, 2) == samples[0].chunk(2)


def test_a_corrupted_chunk_is_dropped_at_restart_and_never_served(tmp_path, samples):
    cache = filled(tmp_path, samples)
    a = samples[0]
    cache.close()
    path = os.path.join(cache.folder, a.file_id, "1")
    with open(path, "r+b") as f:
        f.seek(777)
        byte = f.read(1)
        f.seek(777)
        f.write(bytes([byte[0] ^ 0x40]))
    again = ChunkCache(cache.folder, 1 << 30, salt=ME)
    report = again.open()
    assert (report.chunks, report.dropped_chunks) == (5, 1)
    assert again.held(a.file_id) == {0, 2}
    assert not os.path.exists(path)
    with pytest.raises(CacheMiss):
        again.read(a.file_id, 1)
    # It can be pushed again.
    again.put(a.file_id, 1, [a.chunk(1)])


@pytest.mark.parametrize(
    "damage",
    ["truncated", "emptied", "grown", "non-canonical name", "out of range", "leftover"],
)
def test_damaged_chunk_files_are_dropped(tmp_path, samples, damage):
    cache = filled(tmp_path, samples[:1])
    a = samples[0]
    cache.close()
    folder = os.path.join(cache.folder, a.file_id)
    path = os.path.join(folder, "0")
    if damage == "truncated":
        os.truncate(path, 1000)
    elif damage == "emptied":
        os.truncate(path, 0)
    elif damage == "grown":
        with open(path, "ab") as f:
            f.write(b"x")
    elif damage == "non-canonical name":
        os.rename(path, os.path.join(folder, "00"))
    elif damage == "out of range":
        os.rename(path, os.path.join(folder, "3"))
    elif damage == "leftover":
        os.rename(path, os.path.join(folder, ".tmp-0-0123456789abcdef"))
    again = ChunkCache(cache.folder, 1 << 30, salt=ME)
    again.open()
    assert again.held(a.file_id) == {1, 2}
    assert sorted(os.listdir(folder)) == ["1", "2", "manifest"]


def damage_manifest(path, how):
    data = open(path, "rb").read()
    if how == "missing":
        os.unlink(path)
        return
    if how == "garbage":
        data = b"\x00\xff" * 50
    elif how == "truncated":
        data = data[:-1]
    elif how == "one hash flipped":
        data = data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
    elif how == "bad json":
        data = data.replace(b'{"name"', b'{"name', 1)
    elif how == "json not an object":
        magic, _, rest = data.partition(b"\n")
        data = magic + b"\n[1, 2]\n" + rest.partition(b"\n")[2]
    elif how == "bad name":
        data = data.replace(b'"file.bin"', b'"../etc"', 1)
    elif how == "size as text":
        data = data.replace(b'"size": ', b'"size": "', 1).replace(b"}\n", b'"}\n', 1)
    elif how == "header never ends":
        magic, _, rest = data.partition(b"\n")
        data = magic + b"\n" + b"x" * 10000
    open(path, "wb").write(data)


@pytest.mark.parametrize(
    "how",
    [
        "missing", "garbage", "truncated", "one hash flipped", "bad json",
        "json not an object", "bad name", "size as text", "header never ends",
    ],
)
def test_a_damaged_manifest_drops_its_file(tmp_path, samples, how):
    cache = filled(tmp_path, samples[:2])
    a, b = samples[:2]
    cache.close()
    damage_manifest(os.path.join(cache.folder, a.file_id, "manifest"), how)
    again = ChunkCache(cache.folder, 1 << 30, salt=ME)
    report = again.open()
    assert report.dropped_files == 1
    assert os.listdir(again.folder) == [b.file_id]
    assert again.held(a.file_id) == frozenset()
    assert again.held(b.file_id) == {0, 1}


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200), st.integers(0, 300))
def test_any_bytes_as_a_manifest_never_crash_the_open(tmp_path, samples, junk, cut):
    cache = filled(tmp_path / str(cut) / str(len(junk)), samples[2:])
    c = samples[2]
    cache.close()
    path = os.path.join(cache.folder, c.file_id, "manifest")
    good = open(path, "rb").read()
    open(path, "wb").write(good[:cut] + junk)
    again = ChunkCache(cache.folder, 1 << 30, salt=ME)
    again.open()
    if again.held(c.file_id):
        assert again.manifest(c.file_id) == c.manifest
    else:
        assert os.listdir(cache.folder) == []


def test_a_lowered_quota_evicts_at_restart(tmp_path, samples):
    cache = filled(tmp_path, samples)
    cache.close()
    quota = cache.used - 1
    again = ChunkCache(cache.folder, quota, salt=ME)
    report = again.open()
    assert report.evicted >= 1
    assert again.used <= quota
    assert report.chunks == sum(len(again.held(s.file_id)) for s in samples)


def test_a_chunk_removed_behind_the_caches_back_is_forgotten(tmp_path, samples):
    cache = filled(tmp_path, samples[:1])
    a = samples[0]
    used = cache.used
    os.unlink(os.path.join(cache.folder, a.file_id, "1"))
    with pytest.raises(CacheMiss):
        cache.read(a.file_id, 1)
    assert cache.held(a.file_id) == {0, 2}
    assert cache.used == used - CHUNK_SIZE


# -- planted files -------------------------------------------------------------------


def test_symlinks_planted_in_the_cache_are_never_followed(tmp_path, samples):
    a, b, c = samples
    cache = filled(tmp_path, [a])
    cache.close()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(a.chunk(1))
    # A file id's folder that is a symlink to a folder outside, holding a
    # good manifest and chunk; a chunk that is a symlink to a good chunk
    # outside; a manifest that is a symlink.
    decoy = outside / "decoy"
    decoy.mkdir()
    (decoy / "manifest").write_bytes(cache_module._encode_manifest(b.manifest, "b.bin"))
    (decoy / "0").write_bytes(b.chunk(0))
    os.symlink(decoy, os.path.join(cache.folder, b.file_id))
    chunk = os.path.join(cache.folder, a.file_id, "1")
    os.unlink(chunk)
    os.symlink(secret, chunk)
    c_folder = os.path.join(cache.folder, c.file_id)
    os.mkdir(c_folder)
    os.symlink(decoy / "manifest", os.path.join(c_folder, "manifest"))
    again = ChunkCache(cache.folder, 1 << 30, salt=ME)
    again.open()
    assert again.held(a.file_id) == {0, 2}
    assert again.held(b.file_id) == frozenset()
    assert again.held(c.file_id) == frozenset()
    assert sorted(os.listdir(again.folder)) == [a.file_id]
    # Nothing outside was touched.
    assert secret.read_bytes() == a.chunk(1)
    assert sorted(os.listdir(decoy)) == ["0", "manifest"]
    # A symlink planted where a chunk is about to be written is replaced,
    # not written through.
    os.symlink(secret, chunk)
    again.put(a.file_id, 1, [a.chunk(1)])
    assert not os.path.islink(chunk)
    assert secret.read_bytes() == a.chunk(1)
    assert again.read(a.file_id, 1) == a.chunk(1)


def test_a_symlinked_file_folder_is_replaced_when_a_manifest_is_added(tmp_path, samples):
    a = samples[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = open_cache(tmp_path)
    os.symlink(outside, os.path.join(cache.folder, a.file_id))
    cache.add_manifest(a.manifest, "a.bin")
    cache.put(a.file_id, 0, [a.chunk(0)])
    assert os.listdir(outside) == []
    assert not os.path.islink(os.path.join(cache.folder, a.file_id))


def test_hard_links_and_fifos_planted_as_chunks_are_not_served(tmp_path, samples):
    a = samples[0]
    cache = filled(tmp_path, [a])
    cache.close()
    outside = tmp_path / "outside"
    outside.write_bytes(a.chunk(1))
    chunk = os.path.join(cache.folder, a.file_id, "1")
    os.unlink(chunk)
    os.link(outside, chunk)
    os.unlink(os.path.join(cache.folder, a.file_id, "2"))
    os.mkfifo(os.path.join(cache.folder, a.file_id, "2"))
    again = ChunkCache(cache.folder, 1 << 30, salt=ME)
    again.open()
    assert again.held(a.file_id) == {0}
    assert outside.read_bytes() == a.chunk(1)
    assert sorted(os.listdir(os.path.join(cache.folder, a.file_id))) == ["0", "manifest"]


def test_foreign_entries_at_the_top_are_left_alone(tmp_path, samples):
    cache = open_cache(tmp_path)
    cache.close()
    notes = os.path.join(cache.folder, "notes.txt")
    open(notes, "w").write("mine")
    os.symlink("/", os.path.join(cache.folder, "root"))
    again = ChunkCache(cache.folder, 1 << 30, salt=ME)
    report = again.open()
    assert report.chunks == 0
    assert open(notes).read() == "mine"
    assert again.files() == []


def test_a_chunk_put_after_close_is_refused_and_written_nowhere(tmp_path, monkeypatch):
    from twisted_p2p.manifest import Manifest, chunk_hash

    data = b"x" * 1000
    manifest = Manifest.build(len(data), [chunk_hash(data)])
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 20)
    cache.open()
    cache.add_manifest(manifest, "x.bin")
    reservation = cache.reserve(manifest.file_id, 0)
    cache.close()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CacheRefused) as e:
        cache.put(manifest.file_id, 0, [data], reservation)
    assert e.value.code == "disk-error"
    assert not (tmp_path / manifest.file_id).exists()
