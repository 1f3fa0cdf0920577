"""
Tests for L{twisted_p2p.index}: the index of what this peer offers, and its
hash cache.  Disk work runs through a synchronous stand-in for
C{deferToThread}, so every scan finishes before C{rescan} returns.
"""

import json
import os

import pytest
import pytest_twisted
from support import result_of
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from twisted_p2p import index as index_module
from twisted_p2p.index import FolderWatcher, SharedIndex, file_signature, revision_of, scan_folder
from twisted_p2p.limits import CHUNK_SIZE
from twisted_p2p.manifest import hash_file


def run_now(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


class ManualThreads:
    """
    A C{run_in_thread} whose calls wait until the test runs them.
    """

    def __init__(self):
        self.pending = []

    def __call__(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.pending.append((f, args, kwargs, d))
        return d

    def run_one(self):
        f, args, kwargs, d = self.pending.pop(0)
        defer.maybeDeferred(f, *args, **kwargs).chainDeferred(d)

    def run_all(self):
        while self.pending:
            self.run_one()


@pytest.fixture(autouse=True)
def no_logged_failures():
    """
    rescan logs and swallows a failed scan: make that fail the test instead.
    """
    failures = []

    def observe(event):
        if "log_failure" in event:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)
    assert failures == []


@pytest.fixture
def folders(tmp_path):
    shared = tmp_path / "shared"
    downloads = tmp_path / "downloads"
    state = tmp_path / "state"
    for d in (shared, downloads, state):
        d.mkdir()
    return shared, downloads, str(state / "hashes.json")


@pytest.fixture
def hash_calls(monkeypatch):
    """
    The paths L{hash_file} is asked to hash, through the index.
    """
    calls = []

    def counting(path):
        calls.append(os.path.basename(path))
        return hash_file(path)

    monkeypatch.setattr(index_module, "hash_file", counting)
    return calls


def make_index(folders, run=run_now):
    shared, downloads, cache = folders
    return SharedIndex([str(shared), str(downloads)], cache, run)


def scanned(folders, run=run_now):
    index = make_index(folders, run)
    result_of(index.rescan())
    return index


def write(path, data, mtime_ns=None):
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def names(index):
    return [(f.name, os.path.basename(f.folder)) for f in index.files()]


class TestScan:
    def test_empty(self, folders):
        index = scanned(folders)
        assert index.files() == []
        assert index.revision == revision_of([])

    def test_files_found(self, folders):
        shared, downloads, _ = folders
        write(shared / "a.txt", b"alpha")
        write(shared / "big.bin", b"\x01" * (CHUNK_SIZE + 1))
        write(downloads / "c.txt", b"")
        index = scanned(folders)
        assert names(index) == [("a.txt", "shared"), ("big.bin", "shared"), ("c.txt", "downloads")]
        big = index.files()[1]
        assert big.manifest == hash_file(str(shared / "big.bin"))
        assert big.path == str(shared / "big.bin")
        assert big.size == CHUNK_SIZE + 1
        assert index.by_id(big.file_id) is big
        assert index.by_id("0" * 64) is None

    def test_skipped_entries(self, folders):
        shared, _, _ = folders
        write(shared / "ok.txt", b"ok")
        write(shared / ".hidden", b"h")
        write(shared / ".abc.partial", b"p")
        write(shared / "ends with dot.", b"d")
        write(shared / "tab\tname", b"t")
        (shared / "subdir").mkdir()
        write(shared / "subdir" / "inner.txt", b"i")
        os.symlink(str(shared / "ok.txt"), str(shared / "link.txt"))
        os.symlink(str(shared / "subdir"), str(shared / "linkdir"))
        os.symlink(str(shared / "gone"), str(shared / "dangling.txt"))
        (shared / ".hidden dir").mkdir()
        write(shared / ".hidden dir" / "x.txt", b"x")
        index = scanned(folders)
        # The subfolder is offered as paths; the link to it is not followed.
        assert names(index) == [("ok.txt", "shared"), ("subdir/inner.txt", "shared")]

    def test_subfolders_are_offered_as_paths(self, folders):
        shared, _, _ = folders
        (shared / "photos" / "2026").mkdir(parents=True)
        write(shared / "photos" / "2026" / "a b.jpg", b"a")
        write(shared / "photos" / "é.jpg", b"e")
        (shared / "photos" / "bad\tname").mkdir()
        write(shared / "photos" / "bad\tname" / "x", b"x")
        index = scanned(folders)
        assert names(index) == [("photos/2026/a b.jpg", "shared"), ("photos/é.jpg", "shared")]
        local = index.files()[0]
        assert local.path == str(shared / "photos" / "2026" / "a b.jpg")
        assert str(shared / "photos" / "2026") in index.subfolders

    def test_too_deep_is_not_offered(self, folders):
        from twisted_p2p.limits import MAX_PATH_DEPTH

        shared, _, _ = folders
        deep = shared.joinpath(*["d"] * (MAX_PATH_DEPTH - 1))
        deep.mkdir(parents=True)
        write(deep / "ok.txt", b"1")
        (deep / "d").mkdir()
        write(deep / "d" / "too deep.txt", b"2")
        index = scanned(folders)
        assert [f.name.count("/") + 1 for f in index.files()] == [MAX_PATH_DEPTH]

    def test_a_link_loop_is_not_followed(self, folders):
        shared, _, _ = folders
        (shared / "a").mkdir()
        os.symlink(str(shared), str(shared / "a" / "up"))
        write(shared / "a" / "f.txt", b"f")
        assert names(scanned(folders)) == [("a/f.txt", "shared")]

    def test_add_keeps_the_order_and_the_revision_true(self, folders):
        shared, downloads, _ = folders
        for n in ("b.txt", "d.txt"):
            write(shared / n, n.encode())
        index = scanned(folders)
        write(downloads / "c.txt", b"c")
        manifest = hash_file(str(downloads / "c.txt"))
        index.add(str(downloads), "c.txt", manifest, file_signature(os.stat(downloads / "c.txt")))
        assert [f.name for f in index.files()] == ["b.txt", "c.txt", "d.txt"]
        assert index.revision == revision_of(index.files())
        # A fresh scan of the same files agrees.
        assert scanned(folders).revision == index.revision

    def test_missing_folder(self, tmp_path):
        index = SharedIndex([str(tmp_path / "nope")], str(tmp_path / "cache.json"), run_now)
        result_of(index.rescan())
        assert index.files() == []

    def test_same_content_twice_has_one_id(self, folders):
        shared, downloads, _ = folders
        write(shared / "a.txt", b"same")
        write(downloads / "a copy.txt", b"same")
        index = scanned(folders)
        first, second = index.files()
        assert first.file_id == second.file_id
        # by_id prefers the first in name order.
        assert index.by_id(first.file_id).name == "a copy.txt"

    def test_unhashable_file_is_skipped(self, folders, monkeypatch):
        shared, _, _ = folders
        write(shared / "good.txt", b"good")
        write(shared / "bad.txt", b"bad")

        def failing(path):
            if path.endswith("bad.txt"):
                raise OSError("Permission denied")
            return hash_file(path)

        monkeypatch.setattr(index_module, "hash_file", failing)
        index = scanned(folders)
        assert names(index) == [("good.txt", "shared")]

    def test_an_unhashable_file_is_warned_of_and_read_once_until_it_changes(
            self, folders, monkeypatch):
        shared, _, cache_dir = folders
        write(shared / "good.txt", b"good")
        write(shared / "bad.txt", b"bad")
        tries = []

        def failing(path):
            if path.endswith("bad.txt"):
                tries.append(path)
                raise OSError(13, "Permission denied")
            return hash_file(path)

        monkeypatch.setattr(index_module, "hash_file", failing)
        cache_path = str(cache_dir)
        failed, current, cache = {}, {}, {}

        def scan(now):
            snapshot = index_module._scan_all([str(shared)], current, cache, cache_path,
                                              failed, now)
            current.clear()
            current.update(snapshot.files)
            return [os.path.basename(path) for path, _ in snapshot.warnings]

        assert scan(0.0) == ["bad.txt"]
        assert scan(10.0) == [] and scan(20.0) == []  # neither read nor warned of again
        assert len(tries) == 1
        # A minute on it is tried again, still quietly while it fails the
        # same way; and so it is at once after a chmod (which changes its
        # inode, not its signature).
        assert scan(index_module.RETRY_FAILED_AFTER + 1) == []
        assert len(tries) == 2
        os.chmod(shared / "bad.txt", 0o600)
        assert scan(62.0) == []
        assert len(tries) == 3
        assert scan(63.0) == []
        assert len(tries) == 3
        # Changed, it is tried (and said) at once.
        write(shared / "bad.txt", b"bad, longer")
        assert scan(70.0) == ["bad.txt"]
        assert len(tries) == 4
        # Readable again: offered, and forgotten as a failure.
        monkeypatch.setattr(index_module, "hash_file", hash_file)
        write(shared / "bad.txt", b"fine now")
        assert scan(80.0) == []
        assert sorted(os.path.basename(k) for k in current) == ["bad.txt", "good.txt"]
        assert failed == {}
        # A failed file that goes away is forgotten too.
        failed[str(shared / "gone.txt")] = ((1, 0, 0), 1e9, "x")
        scan(90.0)
        assert failed == {}

    def test_scan_folder_signatures(self, folders):
        shared, _, _ = folders
        write(shared / "a.txt", b"12345", mtime_ns=1_000_000_000)
        listing = scan_folder(str(shared))
        assert listing == {"a.txt": file_signature(os.stat(shared / "a.txt"))}
        assert listing["a.txt"][:2] == (5, 1_000_000_000)


class TestRevision:
    def test_scan_without_change_keeps_revision(self, folders, hash_calls):
        shared, _, _ = folders
        write(shared / "a.txt", b"a")
        index = scanned(folders)
        revision = index.revision
        calls = []
        index.on_change(lambda: calls.append(index.revision))
        for _ in range(3):
            result_of(index.rescan())
        assert index.revision == revision
        assert calls == []
        assert hash_calls == ["a.txt"]

    def test_added_changed_removed(self, folders):
        shared, downloads, _ = folders
        write(shared / "a.txt", b"a", mtime_ns=1_000_000_000)
        index = scanned(folders)
        seen = [index.revision]
        calls = []
        index.on_change(lambda: calls.append(index.revision))

        write(downloads / "b.txt", b"b")
        result_of(index.rescan())
        assert index.revision not in seen
        seen.append(index.revision)

        write(shared / "a.txt", b"A", mtime_ns=2_000_000_000)
        result_of(index.rescan())
        assert index.revision not in seen
        seen.append(index.revision)
        assert index.files()[0].manifest == hash_file(str(shared / "a.txt"))

        os.remove(downloads / "b.txt")
        result_of(index.rescan())
        assert index.revision not in seen
        seen.append(index.revision)
        assert names(index) == [("a.txt", "shared")]

        assert calls == seen[1:]

    def test_renamed_file_changes_revision(self, folders):
        shared, _, _ = folders
        write(shared / "a.txt", b"a")
        index = scanned(folders)
        before = index.revision
        os.rename(shared / "a.txt", shared / "b.txt")
        result_of(index.rescan())
        assert index.revision != before

    def test_touched_file_is_rehashed_but_revision_stays(self, folders, hash_calls):
        shared, _, _ = folders
        write(shared / "a.txt", b"a", mtime_ns=1_000_000_000)
        index = scanned(folders)
        revision = index.revision
        calls = []
        index.on_change(lambda: calls.append(1))
        os.utime(shared / "a.txt", ns=(3_000_000_000, 3_000_000_000))
        result_of(index.rescan())
        assert hash_calls == ["a.txt", "a.txt"]
        assert index.revision == revision
        assert calls == []

    def test_moving_between_folders_keeps_revision(self, folders):
        shared, downloads, _ = folders
        write(shared / "a.txt", b"a")
        index = scanned(folders)
        revision = index.revision
        os.rename(shared / "a.txt", downloads / "a.txt")
        result_of(index.rescan())
        assert names(index) == [("a.txt", "downloads")]
        assert index.revision == revision

    def test_revision_of_ignores_order(self, folders):
        shared, _, _ = folders
        write(shared / "a.txt", b"a")
        write(shared / "b.txt", b"b")
        files = scanned(folders).files()
        assert revision_of(files) == revision_of(files[::-1])
        assert len(revision_of(files)) == 16

    def test_every_listener_is_called(self, folders):
        shared, _, _ = folders
        index = make_index(folders)
        calls = []
        index.on_change(lambda: calls.append("first"))
        index.on_change(lambda: calls.append("second"))
        write(shared / "a.txt", b"a")
        result_of(index.rescan())
        assert calls == ["first", "second"]


class TestCache:
    def test_second_index_uses_the_cache(self, folders, hash_calls):
        shared, downloads, cache = folders
        write(shared / "a.txt", b"a")
        write(downloads / "b.bin", b"b" * (CHUNK_SIZE * 2 + 5))
        first = scanned(folders)
        assert sorted(hash_calls) == ["a.txt", "b.bin"]
        assert os.path.exists(cache)
        del hash_calls[:]
        second = scanned(folders)
        assert hash_calls == []
        assert second.files() == first.files()
        assert second.revision == first.revision

    def test_cache_contents(self, folders):
        shared, _, cache = folders
        write(shared / "a.txt", b"a")
        index = scanned(folders)
        (local,) = index.files()
        with open(cache) as f:
            saved = json.load(f)
        assert saved == {
            local.path: {
                "signature": list(local.signature),
                "id": local.file_id,
                "hashes": b"".join(local.manifest.chunk_hashes).hex(),
            }
        }

    def test_removed_file_leaves_the_cache(self, folders):
        shared, _, cache = folders
        write(shared / "a.txt", b"a")
        write(shared / "b.txt", b"b")
        index = scanned(folders)
        os.remove(shared / "b.txt")
        result_of(index.rescan())
        with open(cache) as f:
            assert list(json.load(f)) == [str(shared / "a.txt")]

    def test_changed_file_is_not_taken_from_the_cache(self, folders, hash_calls):
        shared, _, _ = folders
        write(shared / "a.txt", b"a", mtime_ns=1_000_000_000)
        scanned(folders)
        write(shared / "a.txt", b"bb", mtime_ns=2_000_000_000)
        del hash_calls[:]
        second = scanned(folders)
        assert hash_calls == ["a.txt"]
        assert second.files()[0].manifest == hash_file(str(shared / "a.txt"))

    @pytest.mark.parametrize(
        "damage",
        [
            b"{not json",
            b"\xff\xfe garbage",
            b"[1, 2, 3]",
            b"null",
            b"",
            b"[" * 100000,
        ],
    )
    def test_damaged_cache_file_is_ignored(self, folders, hash_calls, damage):
        shared, _, cache = folders
        write(shared / "a.txt", b"a")
        with open(cache, "wb") as f:
            f.write(damage)
        index = scanned(folders)
        assert hash_calls == ["a.txt"]
        assert index.files()[0].manifest == hash_file(str(shared / "a.txt"))
        # and it is written again, whole.
        with open(cache) as f:
            assert list(json.load(f)) == [str(shared / "a.txt")]

    @pytest.mark.parametrize(
        "entry",
        [
            [1, 2],
            "text",
            7,
            None,
            {},
            {"signature": 5},
            {"signature": "abc"},
            {"signature": "SIGNATURE", "id": "x"},
            {"signature": "SIGNATURE", "id": "ID", "hashes": "zz"},
            {"signature": "SIGNATURE", "id": "ID", "hashes": 12},
            {"signature": "SIGNATURE", "id": "ID", "hashes": "00" * 32},
            {"signature": "SIGNATURE", "id": "0" * 64, "hashes": "HASHES"},
        ],
    )
    def test_damaged_cache_entry_is_ignored(self, folders, hash_calls, entry):
        """
        A cache file that is JSON but whose entries are wrong costs a re-hash,
        never the scan.
        """
        shared, _, cache = folders
        write(shared / "a.txt", b"a")
        expected = scanned(folders).files()[0]
        del hash_calls[:]
        if isinstance(entry, dict):
            entry = dict(entry)
            if entry.get("signature") == "SIGNATURE":
                entry["signature"] = list(expected.signature)
            if entry.get("id") == "ID":
                entry["id"] = expected.file_id
            if entry.get("hashes") == "HASHES":
                entry["hashes"] = b"".join(expected.manifest.chunk_hashes).hex()
        with open(cache, "w") as f:
            json.dump({expected.path: entry}, f)
        index = scanned(folders)
        assert hash_calls == ["a.txt"]
        assert index.files() == [expected]

    def test_unwritable_cache_is_survived(self, folders, tmp_path):
        shared, downloads, _ = folders
        write(shared / "a.txt", b"a")
        index = SharedIndex(
            [str(shared)], str(tmp_path / "no such dir" / "hashes.json"), run_now
        )
        result_of(index.rescan())
        assert names(index) == [("a.txt", "shared")]


class TestAdd:
    def test_add_offers_without_hashing(self, folders, hash_calls):
        shared, downloads, cache = folders
        write(shared / "a.txt", b"a")
        index = scanned(folders)
        del hash_calls[:]
        calls = []
        index.on_change(lambda: calls.append(index.revision))
        before = index.revision

        write(downloads / "new.bin", b"n" * 1000)
        manifest = hash_file(str(downloads / "new.bin"))
        signature = file_signature(os.stat(downloads / "new.bin"))
        index.add(str(downloads), "new.bin", manifest, signature)

        assert names(index) == [("a.txt", "shared"), ("new.bin", "downloads")]
        assert index.by_id(manifest.file_id).name == "new.bin"
        assert index.revision != before
        assert calls == [index.revision]
        assert hash_calls == []

        # The next scan finds it as it was added: no hash, no change.
        result_of(index.rescan())
        assert hash_calls == []
        assert calls == [index.revision]

    def test_added_file_survives_a_restart_without_hashing(self, folders, hash_calls):
        """
        A finished download's hashes reach the cache file, so a restarted
        peer does not hash it again.
        """
        _, downloads, _ = folders
        index = scanned(folders)
        write(downloads / "new.bin", b"n" * (CHUNK_SIZE + 1))
        manifest = hash_file(str(downloads / "new.bin"))
        index.add(
            str(downloads), "new.bin", manifest, file_signature(os.stat(downloads / "new.bin"))
        )
        result_of(index.rescan())
        restarted = scanned(folders)
        assert hash_calls == []
        assert restarted.files() == index.files()

    def test_add_before_first_scan(self, folders, hash_calls):
        _, downloads, _ = folders
        index = make_index(folders)
        write(downloads / "new.bin", b"n")
        manifest = hash_file(str(downloads / "new.bin"))
        index.add(
            str(downloads), "new.bin", manifest, file_signature(os.stat(downloads / "new.bin"))
        )
        assert index.by_id(manifest.file_id) is not None
        result_of(index.rescan())
        assert hash_calls == []
        assert names(index) == [("new.bin", "downloads")]

    def test_add_same_content_twice_does_not_signal(self, folders):
        shared, downloads, _ = folders
        write(shared / "a.txt", b"a")
        index = scanned(folders)
        calls = []
        index.on_change(lambda: calls.append(1))
        (local,) = index.files()
        index.add(local.folder, local.name, local.manifest, local.signature)
        assert calls == []


class TestOverlappingScans:
    def test_rescan_during_a_scan_runs_once_more(self, folders):
        shared, _, _ = folders
        threads = ManualThreads()
        index = make_index(folders, threads)
        write(shared / "a.txt", b"a")
        first = index.rescan()
        # While the first scan waits on its thread, b.txt appears.
        write(shared / "b.txt", b"b")
        second = index.rescan()
        third = index.rescan()
        fired = []
        first.addCallback(lambda _: fired.append("first"))
        second.addCallback(lambda _: fired.append("second"))
        third.addCallback(lambda _: fired.append("third"))
        assert fired == []
        threads.run_all()
        assert sorted(fired) == ["first", "second", "third"]
        assert names(index) == [("a.txt", "shared"), ("b.txt", "shared")]
        assert threads.pending == []

    def test_waiter_fires_only_after_the_follow_up_scan(self, folders):
        shared, _, _ = folders
        threads = ManualThreads()
        index = make_index(folders, threads)
        index.rescan()
        waiter = index.rescan()
        fired = []
        waiter.addCallback(fired.append)
        # Load the cache, list the folders: the first scan is done ...
        threads.run_one()
        threads.run_one()
        # ... but the follow-up scan has started and waits for its listing.
        assert fired == []
        assert len(threads.pending) == 1
        write(shared / "late.txt", b"late")
        threads.run_all()
        assert fired == [None]
        assert names(index) == [("late.txt", "shared")]


# -- partial downloads ------------------------------------------------------------


def test_partial_downloads_change_the_revision(folders):
    from twisted_p2p.manifest import Manifest
    from twisted_p2p.storage import ChunkMap

    index = scanned(folders)
    calls = []
    index.on_change(lambda: calls.append(index.revision))
    manifest = Manifest.build(10, [b"\1" * 32])
    before = index.revision
    index.add_partial("part.bin", manifest, "/d/.p2ppeer-x.part", ChunkMap(1))
    assert calls == [index.revision] and index.revision != before
    assert [p.name for p in index.partials()] == ["part.bin"]
    assert index.partial_by_id(manifest.file_id).path == "/d/.p2ppeer-x.part"
    assert index.by_id(manifest.file_id) is None
    index.remove_partial(manifest.file_id)
    index.remove_partial(manifest.file_id)
    assert calls[-1] == before and len(calls) == 2
    assert index.partials() == []


class TestWatch:
    """
    L{FolderWatcher} on a real reactor and real inotify: a file copied or
    moved into a folder is offered within a second, without waiting for the
    periodic re-scan.
    """

    @pytest_twisted.ensureDeferred
    async def test_a_new_file_is_offered_at_once(self, tmp_path):
        from twisted.internet import reactor

        folder = tmp_path / "shared"
        folder.mkdir()
        index = SharedIndex([str(folder)], str(tmp_path / "hashes.json"), run_now)
        await index.rescan()
        watcher = FolderWatcher(index, reactor)
        watcher.startService()
        try:
            (folder / "new.txt").write_bytes(b"new\n")
            (tmp_path / "moved.txt").write_bytes(b"moved\n")
            os.rename(tmp_path / "moved.txt", folder / "moved.txt")
            (folder / ".hidden.part").write_bytes(b"x")
            for _ in range(50):
                if len(index.files()) == 2:
                    break
                await deferLater(reactor, 0.02)
            assert sorted(f.name for f in index.files()) == ["moved.txt", "new.txt"]
            (folder / "new.txt").unlink()
            for _ in range(50):
                if len(index.files()) == 1:
                    break
                await deferLater(reactor, 0.02)
            assert [f.name for f in index.files()] == ["moved.txt"]
        finally:
            watcher.stopService()

    def test_hidden_files_start_no_scan(self, tmp_path):
        from twisted.internet import task
        from twisted.python.filepath import FilePath

        clock = task.Clock()
        index = SharedIndex([str(tmp_path)], str(tmp_path / "h.json"), run_now)
        watcher = FolderWatcher(index, clock)
        watcher._changed(None, FilePath(str(tmp_path / ".p2ppeer-ab.part")), 0)
        assert clock.getDelayedCalls() == []
        watcher._changed(None, FilePath(str(tmp_path / "a.txt")), 0)
        watcher._changed(None, FilePath(str(tmp_path / "b.txt")), 0)
        assert len(clock.getDelayedCalls()) == 1  # one scan for both

    def test_without_inotify_it_says_so_and_the_scans_go_on(self, tmp_path, monkeypatch):
        from twisted.internet import inotify, task

        def unavailable(reactor=None):
            raise inotify.INotifyError("INotify initialization error.")

        monkeypatch.setattr(inotify, "INotify", unavailable)
        said = []
        globalLogPublisher.addObserver(said.append)
        try:
            watcher = FolderWatcher(SharedIndex([str(tmp_path)], "h", run_now), task.Clock())
            watcher.startService()
            watcher.stopService()
        finally:
            globalLogPublisher.removeObserver(said.append)
        assert any("Not watching the shared folders" in e.get("log_format", "") for e in said)


class TestWatchSubfolders:
    @pytest_twisted.ensureDeferred
    async def test_a_file_in_a_new_subfolder_is_offered_at_once(self, tmp_path):
        from twisted.internet import reactor

        folder = tmp_path / "shared"
        (folder / "old").mkdir(parents=True)
        index = SharedIndex([str(folder)], str(tmp_path / "hashes.json"), run_now)
        await index.rescan()
        watcher = FolderWatcher(index, reactor)
        watcher.startService()
        try:
            await deferLater(reactor, 0.05)
            (folder / "old" / "in old.txt").write_bytes(b"1")
            (folder / "new" / "deeper").mkdir(parents=True)
            await deferLater(reactor, 0.5)
            (folder / "new" / "deeper" / "in new.txt").write_bytes(b"2")
            wanted = ["new/deeper/in new.txt", "old/in old.txt"]
            for _ in range(100):
                if sorted(f.name for f in index.files()) == wanted:
                    break
                await deferLater(reactor, 0.02)
            assert sorted(f.name for f in index.files()) == wanted
        finally:
            watcher.stopService()


def test_downloads_inside_shared_is_offered_once(tmp_path):
    shared = tmp_path / "shared"
    downloads = shared / "downloads"
    downloads.mkdir(parents=True)
    write(shared / "a.txt", b"a")
    write(downloads / "b.txt", b"b")
    index = SharedIndex([str(shared), str(downloads)], str(tmp_path / "h.json"), run_now)
    result_of(index.rescan())
    assert names(index) == [("a.txt", "shared"), ("b.txt", "downloads")]


def test_scan_folder_gives_the_paths_in_sorted_order(tmp_path):
    # Folders sort as their name and "/": "a b" < "a/x" < "a-b/" < "a0", so
    # the walk must not go by names alone, nor folders after files.
    paths = ["a", "a b", "a/x", "a/y z", "a/y/z", "a-b/c", "a0", "b/a/b/c", "b/a b",
             "é", "Z", "a/x0", "a/x/é", "m/n/o/p"]
    for path in paths:
        if path in ("a", "a/x"):
            continue  # folders here (with files below)
        target = tmp_path.joinpath(*path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    listed = list(scan_folder(str(tmp_path)))
    assert listed == sorted(listed)
    assert set(listed) == {p for p in paths if p not in ("a", "a/x")}
