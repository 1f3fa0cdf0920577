"""
The index of what this peer offers: C{shared/} and finished downloads.

The folders are watched with inotify where the system has it
(L{FolderWatcher}): a file written, moved in or out, or removed starts a
re-scan within L{WATCH_DELAY} seconds.  They are also re-scanned every
L{RESCAN_INTERVAL} seconds, which is all there is where inotify is not (or
misses a change, on a network filesystem say).  A file whose size,
modification time or inode changed is hashed again; the others keep their
hashes, which are also kept on disk in the state dir so that a restart does
not hash everything again.  All disk work runs in a thread.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.filepath import FilePath

import bisect

from twisted_p2p import heap
from twisted_p2p.limits import MAX_PATH_BYTES, MAX_PATH_DEPTH, RESCAN_INTERVAL
from twisted_p2p.manifest import ByManifest, Manifest, ManifestMismatch, hash_file
from twisted_p2p.names import is_legal_name

log = Logger()

#: Seconds from a change in a watched folder to its re-scan: the changes of
#: one copy or move (several files, say) are taken in one scan.
WATCH_DELAY = 0.2

#: Subfolders given an inotify watch per turn of the reactor.
WATCH_BATCH = 200

# inotify's flags for "created" and "about a folder" (twisted.internet.inotify
# is imported only where there is inotify).
_IN_CREATE, _IN_ISDIR = 0x100, 0x40000000


@dataclass(frozen=True)
class LocalFile(ByManifest):
    """
    A file we offer: where it is, and its manifest.
    """

    name: str
    folder: str
    manifest: Manifest
    signature: tuple

    @property
    def path(self):
        return os.path.join(self.folder, self.name)


@dataclass(frozen=True, eq=False)
class PartialLocal(ByManifest):
    """
    A download in progress whose verified chunks we offer: where its bytes
    are, its manifest, and its chunk map (a L{twisted_p2p.storage.ChunkMap},
    which grows as chunks are verified).
    """

    name: str
    manifest: Manifest
    path: str
    chunks: object

    def holds(self, index):
        return index in self.chunks


def file_signature(stat):
    """
    What tells us a file changed without reading it.
    """
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def scan_folder(folder, subfolders=None, skip=()):
    """
    C{{path: signature}} of the regular files under C{folder} that may be
    shared, each by its path relative to C{folder} with C{/} between parts
    (C{photos/2026/a.jpg}).  Hidden files and folders (our partial
    downloads among them), symbolic links (to files or folders: they are
    never followed), illegal names and paths deeper or longer than the path
    rule allows are skipped.  Blocks.

    @param subfolders: a set the absolute paths of the folders walked below
        C{folder} are added to (for the watcher), or C{None}.
    @param skip: absolute paths of folders not to go into: the other
        offered folders (C{downloads/} inside C{shared/}), which are scanned
        on their own.
    """
    # Walked depth first, each folder's entries in the order their paths
    # sort in ("a b" < "a/x" < "a0": a folder sorts as its name and "/"),
    # so the paths come in sorted order: the index's one sort of 100,000
    # files (a single C call, which holds the GIL, and so the reactor, for
    # as long as it compares: 80-150 ms shuffled, on the test machine) then
    # goes through them in one pass.
    found = {}
    pending = [(iter(_listed(folder)), "", 1)]
    while pending:
        entries, prefix, depth = pending[-1]
        entry = next(entries, None)
        if entry is None:
            pending.pop()
            continue
        name = entry.name
        if not is_legal_name(name):
            continue
        path = prefix + name
        if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                if skip and os.path.abspath(entry.path) in skip:
                    continue
                if depth < MAX_PATH_DEPTH:
                    pending.append((iter(_listed(entry.path)), path + "/", depth + 1))
                    if subfolders is not None:
                        subfolders.add(entry.path)
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            found[path] = file_signature(entry.stat(follow_symlinks=False))
        except OSError:
            continue
    return found


def _listed(directory):
    """
    The entries of C{directory}, sorted as their paths sort (see
    L{scan_folder}); none if it cannot be read.
    """
    try:
        with os.scandir(directory) as listing:
            entries = list(listing)
    except OSError:
        return []
    return sorted(entries, key=_walk_key)


def _walk_key(entry):
    try:
        return entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name
    except OSError:
        return entry.name


def _entry_digest(file_id, name, size, partial=False):
    """
    One offered entry's share of the revision: 64 bits of its hash.
    """
    text = json.dumps([file_id, name, size, partial]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def _revision_text(total):
    return format(total % (1 << 64), "016x")


def revision_of(files, partials=()):
    """
    A short digest that changes whenever the offered files change (and the
    chunks cached for others: a partial with a C{held} count).

    It is the sum (mod 2**64) of one hash per entry, so that it does not
    depend on order, and so that one file added or removed changes it
    without hashing the whole list again (100,000 files are too many to
    go over on the reactor thread).
    """
    total = sum(_entry_digest(f.file_id, f.name, f.size) for f in files)
    total += sum(_entry_digest(p.file_id, p.name, p.size, getattr(p, "held", True)) for p in partials)
    return _revision_text(total)


def _sort_key(local_file):
    return (local_file.name, local_file.folder)


@dataclass
class _Snapshot:
    """
    The index as one scan leaves it, built in a thread: the files by path,
    in name order, by id, and the sum behind the revision.
    """

    files: dict
    ordered: list
    by_id: dict
    total: int
    subfolders: set
    warnings: list


def _snapshot(files, subfolders=(), warnings=()):
    ordered = sorted(files.values(), key=_sort_key)
    by_id = {}
    for f in ordered:
        by_id.setdefault(f.file_id, f)
    total = sum(_entry_digest(f.file_id, f.name, f.size) for f in ordered)
    return _Snapshot(files, ordered, by_id, total, set(subfolders), list(warnings))


class SharedIndex:
    """
    Owns the list of files this peer offers and the hash cache behind it.

    @param folders: the folders to offer, in order of preference.
    @param cache_path: where hashes are kept between runs.
    @param run_in_thread: C{deferToThread} or a synchronous stand-in for tests.
    """

    def __init__(self, folders, cache_path, run_in_thread):
        self.folders = list(folders)
        self._cache_path = cache_path
        self._run = run_in_thread
        self._state = _snapshot({})
        self._partials = {}
        self._cached = {}
        self._cache = None
        self.revision = revision_of([])
        self._scanning = None
        self._again = False
        self._added = {}
        self._listeners = []
        self._scan_listeners = []
        #: Files that could not be hashed: path -> (signature, when to try
        #: again, what went wrong); see L{_scan_all}.
        self._failed = {}

    def on_change(self, listener):
        """
        Call C{listener()} whenever the offered files change.
        """
        self._listeners.append(listener)

    def on_scan(self, listener):
        """
        Call C{listener(subfolders)} after every scan, with the absolute
        paths of the folders found below the offered ones (the watcher
        watches them).
        """
        self._scan_listeners.append(listener)

    @property
    def subfolders(self):
        return set(self._state.subfolders)

    def files(self):
        """
        The files offered, in name order.  The list is kept sorted, not
        sorted on each call: it is read for every catalog page.
        """
        return self._state.ordered

    def by_id(self, file_id):
        return self._state.by_id.get(file_id)

    # partial downloads

    def add_partial(self, name, manifest, path, chunks):
        """
        Offer the verified chunks of a download in progress.
        """
        self._partials[manifest.file_id] = PartialLocal(name, manifest, path, chunks)
        self._update_revision()

    def remove_partial(self, file_id):
        if self._partials.pop(file_id, None) is not None:
            self._update_revision()

    def partial_by_id(self, file_id):
        return self._partials.get(file_id) or self._cached.get(file_id)

    def partials(self):
        """
        The partial downloads we offer, and the files of which we cache
        chunks for others, but for files we also hold whole.
        """
        found = dict(self._cached)
        found.update(self._partials)
        return sorted(
            (p for p in found.values() if p.file_id not in self._state.by_id),
            key=lambda p: (p.name, p.file_id),
        )

    # chunks cached for others

    def set_cached(self, cached):
        """
        Offer the chunks this peer caches for others: C{cached} is a list of
        objects like L{PartialLocal} (a C{holds(index)}, a C{chunks} with a
        C{snapshot()}, and an C{open_chunks()}), and replaces the last list.
        """
        self._cached = {c.file_id: c for c in cached}
        self._update_revision()

    def rescan(self):
        """
        Bring the index up to date with the folders.

        @return: a Deferred that fires when this scan (or the one already
            running, followed by this one) is done.
        """
        if self._scanning is not None:
            self._again = True
            waiter = defer.Deferred()
            self._scanning.addBoth(lambda r: waiter.callback(None) or r)
            return waiter
        self._scanning = defer.ensureDeferred(self._scan())

        def done(result):
            self._scanning = None
            if self._again:
                self._again = False
                return self.rescan()
            return result

        self._scanning.addErrback(
            lambda f: log.failure("Scanning the shared folders failed", f)
        )
        return self._scanning.addBoth(done)

    async def _scan(self):
        # A first scan of 100,000 files builds a million objects: see heap.py.
        with heap.collector_paused():
            if self._cache is None:
                self._cache = await self._run(_load_cache, self._cache_path)
            self._added = {}
            snapshot = await self._run(
                _scan_all, self.folders, self._state.files, self._cache, self._cache_path,
                self._failed,
            )
            self._install_scanned(snapshot)
        for listener in list(self._scan_listeners):
            listener(set(snapshot.subfolders))

    def _install_scanned(self, snapshot):
        for path, error in snapshot.warnings:
            log.warn("Not sharing {path}: {error}", path=path, error=error)
        if self._added:
            # Finished downloads offered while the scan ran: keep them (the
            # next scan checks them against the disk).
            files = dict(snapshot.files)
            files.update(self._added)
            subfolders = snapshot.subfolders
            snapshot = _snapshot(files, subfolders)
            self._added = {}
        self._install(snapshot)

    def add(self, folder, name, manifest, signature):
        """
        Offer a file we already know the manifest of (a finished download)
        without hashing it again.  Quick whatever the size of the index: the
        sorted list takes it by bisection, the revision by one sum.
        """
        key = os.path.join(folder, name)
        new = LocalFile(name, folder, manifest, signature)
        if self._scanning is not None:
            self._added[key] = new
        state = self._state
        old = state.files.get(key)
        if old == new:
            return
        files = dict(state.files)
        files[key] = new
        ordered = list(state.ordered)
        total = state.total
        by_id = dict(state.by_id)
        if old is not None:
            ordered.remove(old)
            total -= _entry_digest(old.file_id, old.name, old.size)
            if by_id.get(old.file_id) is old:
                del by_id[old.file_id]
                for f in ordered:
                    if f.file_id == old.file_id:
                        by_id[f.file_id] = f
                        break
        bisect.insort(ordered, new, key=_sort_key)
        total += _entry_digest(new.file_id, new.name, new.size)
        current = by_id.get(new.file_id)
        if current is None or _sort_key(new) < _sort_key(current):
            by_id[new.file_id] = new
        # The next scan writes its hashes to the cache file.
        self._install(_Snapshot(files, ordered, by_id, total, state.subfolders, []))

    def _install(self, snapshot):
        self._state = snapshot
        heap.settled(f"index {id(self)}", len(snapshot.files))
        self._update_revision()

    def _update_revision(self):
        total = self._state.total
        total += sum(_entry_digest(p.file_id, p.name, p.size, getattr(p, "held", True)) for p in self.partials())
        revision = _revision_text(total)
        if revision != self.revision:
            self.revision = revision
            for listener in list(self._listeners):
                listener()


#: Seconds before a file that could not be hashed, and has not changed
#: since, is tried again anyway (its folder may have been made readable).
RETRY_FAILED_AFTER = 60.0


def _changed_at(path):
    """
    When C{path}'s inode last changed (a chmod changes it, and not the
    signature), or C{None}.
    """
    try:
        return os.stat(path).st_ctime_ns
    except OSError:
        return None


def _scan_all(folders, current, cache, cache_path, failed=None, now=None):
    """
    One scan of C{folders}, in a thread: walk them, keep the files that did
    not change (C{current}, by path), take the others' hashes from the
    C{cache} or hash them, bring the cache up to date (and save it if it
    changed).  Returns a L{_Snapshot}; never touches the index itself.

    C{failed} (updated in place) remembers the files that could not be
    hashed, so that one that stays unreadable, or too large, is neither
    read nor warned of again at every scan: it is tried again once it
    changes (its signature, or its inode: a chmod), or L{RETRY_FAILED_AFTER}
    seconds on, and warned of again only if it fails in another way.
    """
    failed = {} if failed is None else failed
    now = time.monotonic() if now is None else now
    listed = set()
    fresh = {}
    subfolders = set()
    warnings = []
    cache_dirty = False
    offered = {os.path.abspath(f) for f in folders}
    for folder in folders:
        listing = scan_folder(folder, subfolders, offered)
        for name, signature in listing.items():
            key = os.path.join(folder, name)
            listed.add(key)
            known = current.get(key)
            if known is not None and known.signature == signature:
                fresh[key] = known
                if not _cache_holds(cache.get(key), known):
                    # Offered by add() (a finished download): keep its
                    # hashes on disk too, so a restart does not re-hash it.
                    cache[key] = _cache_entry(signature, known.manifest)
                    cache_dirty = True
                continue
            manifest = _cached_manifest(cache.get(key), signature)
            if manifest is None:
                prior = failed.get(key)
                changed = _changed_at(key)
                if prior is not None and prior[0] == (signature, changed) and now < prior[1]:
                    continue
                try:
                    manifest = hash_file(key)
                except (OSError, ManifestMismatch) as e:
                    if prior is None or prior[0][0] != signature or prior[2] != str(e):
                        warnings.append((key, e))
                    failed[key] = ((signature, changed), now + RETRY_FAILED_AFTER, str(e))
                    continue
                failed.pop(key, None)
                cache[key] = _cache_entry(signature, manifest)
                cache_dirty = True
            fresh[key] = LocalFile(name, folder, manifest, signature)
    for key in set(cache) - set(fresh):
        del cache[key]
        cache_dirty = True
    for key in set(failed) - listed:
        del failed[key]
    if cache_dirty:
        _save_cache(cache_path, cache)
    return _snapshot(fresh, subfolders, warnings)


def _cached_manifest(entry, signature):
    try:
        # The cache is only JSON from disk: any part of it may be damaged.
        if tuple(entry.get("signature", ())) != signature:
            return None
        return Manifest.build(signature[0], bytes.fromhex(entry["hashes"]), entry["id"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _cache_entry(signature, manifest):
    return {
        "signature": list(signature),
        "id": manifest.file_id,
        "hashes": bytes(manifest.chunk_hashes).hex(),
    }


def _cache_holds(entry, local_file):
    """
    Whether the cache C{entry} is that of C{local_file} as it is now.
    """
    return (
        isinstance(entry, dict)
        and entry.get("signature") == list(local_file.signature)
        and entry.get("id") == local_file.file_id
    )


def _load_cache(path):
    """
    The hash cache at C{path}, or an empty one if it is missing or damaged.

    It is one JSON object, written one entry per line (L{_save_cache}), and
    read a line at a time: one C{json.load} of 100,000 entries would hold
    the GIL, and so the reactor, for a tenth of a second.  A file written
    otherwise is read whole.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError):
        return {}
    lines = text.split("\n")
    if len(lines) >= 2 and lines[0] == "{" and lines[-1] in ("}", ""):
        cache = {}
        try:
            for line in lines[1:]:
                if line in ("}", ""):
                    continue
                cache.update(json.loads("{" + line.rstrip(",") + "}"))
            return cache
        except (ValueError, RecursionError, TypeError):
            pass
    try:
        cache = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _save_cache(path, cache):
    """
    Write the hash cache atomically, one entry per line (see L{_load_cache}).
    Losing it costs only a re-hash.
    """
    temporary = path + ".tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write("{\n")
            last = len(cache) - 1
            for i, (key, entry) in enumerate(cache.items()):
                comma = "," if i < last else ""
                f.write(f"{json.dumps(key)}: {json.dumps(entry)}{comma}\n")
            f.write("}\n")
        os.replace(temporary, path)
    except OSError as e:
        log.warn("Could not save the hash cache {path}: {error}", path=path, error=e)


class FolderWatcher(Service):
    """
    Owns the inotify watches on the index's folders, and re-scans the index
    soon after a file in them is written (closed after writing), moved in or
    out, or removed.  Hidden files (partial downloads among them) are
    ignored.  Where inotify is not to be had, it does nothing but say so:
    the periodic re-scan goes on either way.

    @param index: the L{SharedIndex} whose C{folders} to watch.
    @param reactor: a reactor with C{IReactorFDSet} (inotify reads a file
        descriptor) and C{IReactorTime}.
    """

    def __init__(self, index, reactor, delay=WATCH_DELAY):
        self._index = index
        self._reactor = reactor
        self._delay = delay
        self._notifier = None
        self._pending = None
        self._mask = 0
        self._watched = set()
        self._adding = None
        index.on_scan(self._scanned)

    def startService(self):
        Service.startService(self)
        try:
            from twisted.internet import inotify
        except ImportError as e:
            self._unwatched(e)
            return
        # IN_CREATE: a new subfolder is scanned (and then watched) at once.
        self._mask = mask = (
            inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM
            | inotify.IN_DELETE | inotify.IN_CREATE
        )
        try:
            self._notifier = inotify.INotify(reactor=self._reactor)
            self._notifier.startReading()
            for folder in self._index.folders:
                if os.path.isdir(folder):
                    self._notifier.watch(FilePath(folder), mask=mask, callbacks=[self._changed])
        except (OSError, inotify.INotifyError) as e:
            self._stop_notifier()
            self._unwatched(e)
            return
        self._scanned(self._index.subfolders)

    def _scanned(self, subfolders):
        """
        Watch the subfolders the last scan found that are not watched yet,
        a few hundred per turn of the reactor (5,000 folders would hold it
        for too long in one go).
        """
        if self._notifier is None:
            return
        gone = self._watched - subfolders
        self._watched -= gone
        new = sorted(subfolders - self._watched)
        if not new:
            return
        self._watched.update(new)

        def add_all():
            for start in range(0, len(new), WATCH_BATCH):
                for folder in new[start : start + WATCH_BATCH]:
                    if self._notifier is None:
                        return
                    try:
                        self._notifier.watch(
                            FilePath(folder), mask=self._mask, callbacks=[self._changed]
                        )
                    except Exception as e:
                        # Out of watches (fs.inotify.max_user_watches), or
                        # the folder went: the periodic re-scan covers it.
                        self._watched.discard(folder)
                        log.info("Not watching {folder}: {error}", folder=folder, error=e)
                yield None

        self._adding = task.cooperate(add_all())

    def _unwatched(self, error):
        log.info(
            "Not watching the shared folders ({error}); they are re-scanned every "
            "{interval:.0f} s",
            error=error,
            interval=RESCAN_INTERVAL,
        )

    def _changed(self, watch, path, mask):
        if os.fsdecode(path.basename()).startswith("."):
            return
        if mask & _IN_CREATE and not mask & _IN_ISDIR:
            # A file created is scanned when it is closed after writing.
            return
        if self._pending is None or not self._pending.active():
            self._pending = self._reactor.callLater(self._delay, self._rescan)

    def _rescan(self):
        self._pending = None
        self._index.rescan()

    def _stop_notifier(self):
        if self._notifier is not None:
            notifier, self._notifier = self._notifier, None
            notifier.loseConnection()

    def stopService(self):
        Service.stopService(self)
        if self._adding is not None:
            try:
                self._adding.stop()
            except task.TaskDone:
                pass
            self._adding = None
        self._watched = set()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._stop_notifier()
