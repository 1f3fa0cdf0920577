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
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from twisted_p2p.limits import RESCAN_INTERVAL
from twisted_p2p.manifest import HASH_SIZE, Manifest, ManifestMismatch, hash_file
from twisted_p2p.names import is_legal_name

log = Logger()

#: Seconds from a change in a watched folder to its re-scan: the changes of
#: one copy or move (several files, say) are taken in one scan.
WATCH_DELAY = 0.2


@dataclass(frozen=True)
class LocalFile:
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

    @property
    def file_id(self):
        return self.manifest.file_id

    @property
    def size(self):
        return self.manifest.size


@dataclass(frozen=True, eq=False)
class PartialLocal:
    """
    A download in progress whose verified chunks we offer: where its bytes
    are, its manifest, and its chunk map (a L{twisted_p2p.storage.ChunkMap},
    which grows as chunks are verified).
    """

    name: str
    manifest: Manifest
    path: str
    chunks: object

    @property
    def file_id(self):
        return self.manifest.file_id

    @property
    def size(self):
        return self.manifest.size

    def holds(self, index):
        return index in self.chunks


def file_signature(stat):
    """
    What tells us a file changed without reading it.
    """
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def scan_folder(folder):
    """
    C{{name: signature}} of the regular files in C{folder} that may be
    shared.  Hidden files (our partial downloads among them), symbolic links
    and illegal names are skipped.  Blocks.
    """
    found = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return found
    for entry in entries:
        if not is_legal_name(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            found[entry.name] = file_signature(entry.stat(follow_symlinks=False))
        except OSError:
            continue
    return found


def revision_of(files, partials=()):
    """
    A short digest that changes whenever the offered files change (and the
    chunks cached for others: a partial with a C{held} count).
    """
    listing = sorted((f.file_id, f.name, f.size) for f in files)
    if partials:
        listing.append(sorted(
            ("partial", p.file_id, p.name, p.size, getattr(p, "held", 0)) for p in partials
        ))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


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
        self._files = {}
        self._by_id = {}
        self._partials = {}
        self._cached = {}
        self._cache = None
        self.revision = revision_of([])
        self._scanning = None
        self._again = False
        self._listeners = []

    def on_change(self, listener):
        """
        Call C{listener()} whenever the offered files change.
        """
        self._listeners.append(listener)

    def files(self):
        return sorted(self._files.values(), key=lambda f: (f.name, f.folder))

    def by_id(self, file_id):
        return self._by_id.get(file_id)

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
            (p for p in found.values() if p.file_id not in self._by_id),
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
        if self._cache is None:
            self._cache = await self._run(_load_cache, self._cache_path)
        listings = await self._run(lambda: [(d, scan_folder(d)) for d in self.folders])
        fresh = {}
        cache_dirty = False
        for folder, listing in listings:
            for name, signature in listing.items():
                key = os.path.join(folder, name)
                current = self._files.get(key)
                if current is not None and current.signature == signature:
                    fresh[key] = current
                    if not _cache_holds(self._cache.get(key), current):
                        # Offered by add() (a finished download): keep its
                        # hashes on disk too, so a restart does not re-hash it.
                        self._cache[key] = _cache_entry(signature, current.manifest)
                        cache_dirty = True
                    continue
                manifest = self._cached_manifest(key, signature)
                if manifest is None:
                    try:
                        manifest = await self._run(hash_file, key)
                    except (OSError, ManifestMismatch) as e:
                        log.warn("Not sharing {path}: {error}", path=key, error=e)
                        continue
                    self._cache[key] = _cache_entry(signature, manifest)
                    cache_dirty = True
                fresh[key] = LocalFile(name, folder, manifest, signature)
        for key in set(self._cache) - set(fresh):
            del self._cache[key]
            cache_dirty = True
        if cache_dirty:
            await self._run(_save_cache, self._cache_path, dict(self._cache))
        self._install(fresh)

    def add(self, folder, name, manifest, signature):
        """
        Offer a file we already know the manifest of (a finished download)
        without hashing it again.
        """
        key = os.path.join(folder, name)
        files = dict(self._files)
        files[key] = LocalFile(name, folder, manifest, signature)
        # The next scan writes its hashes to the cache file.
        self._install(files)

    def _install(self, files):
        changed = set(files) != set(self._files) or any(
            files[k] is not self._files.get(k) for k in files
        )
        self._files = files
        by_id = {}
        for f in self.files():
            by_id.setdefault(f.file_id, f)
        self._by_id = by_id
        if changed:
            self._update_revision()

    def _update_revision(self):
        revision = revision_of(self._files.values(), self.partials())
        if revision != self.revision:
            self.revision = revision
            for listener in list(self._listeners):
                listener()

    def _cached_manifest(self, key, signature):
        entry = self._cache.get(key)
        try:
            # The cache is only JSON from disk: any part of it may be damaged.
            if tuple(entry.get("signature", ())) != signature:
                return None
            hashes = bytes.fromhex(entry["hashes"])
            chunk_hashes = [
                hashes[i : i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)
            ]
            return Manifest.build(signature[0], chunk_hashes, entry["id"])
        except (AttributeError, KeyError, TypeError, ValueError):
            return None


def _cache_entry(signature, manifest):
    return {
        "signature": list(signature),
        "id": manifest.file_id,
        "hashes": b"".join(manifest.chunk_hashes).hex(),
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
    """
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _save_cache(path, cache):
    """
    Write the hash cache atomically.  Losing it costs only a re-hash.
    """
    temporary = path + ".tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(cache, f)
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

    def startService(self):
        Service.startService(self)
        try:
            from twisted.internet import inotify
        except ImportError as e:
            self._unwatched(e)
            return
        mask = (
            inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM
            | inotify.IN_DELETE
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
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._stop_notifier()
