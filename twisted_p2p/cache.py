"""
The distributee's chunk cache: chunks of other peers' files that this peer
holds for the network, under C{<state-dir>/cache/}, within C{--cache-size}.

Every method blocks (disk, hashing); the caller runs them in a thread.  They
may be called from several threads at once.

Layout::

    cache/<file id>/manifest   what the chunks are checked against
    cache/<file id>/<index>    one chunk's bytes, named by its decimal index
    cache/<file id>/.tmp-...   a chunk or manifest being written

One file per chunk, rather than one sparse file per cached file with a
bitmap beside it, because:

 - evicting a chunk frees its disk space at once (an unlink), where a
   sparse file would need hole punching, which Python's C{os} does not
   offer, and the quota would count bytes the disk still holds;
 - a chunk is there or not: it is written under a temporary name and
   renamed into place, so there is no bitmap that could disagree with the
   data after a crash, and dropping a damaged chunk is one unlink.

The cost is an inode per 256 KiB chunk.  Chunks are not fsynced: after a
power loss a chunk may be renamed into place with its data missing, and
L{ChunkCache.open} re-checks every stored chunk against its hash, dropping
(and deleting) the ones that fail, so a damaged chunk is never served.

The quota counts every chunk's bytes, every stored manifest's, and every
reservation's: a push first reserves the room for its chunk
(L{ChunkCache.reserve}), then writes and commits it (L{ChunkCache.put}) or
gives the room back, so that several pushes at once can never take the cache
over its quota.  Filesystem blocks beyond those bytes are not counted.

Untrusted disk.  File ids are checked to be hex before they touch the disk,
and chunk names to be canonical indexes; nothing is written outside the
cache folder.  Everything inside it is opened relative to a descriptor of
its folder and without following symlinks, must be a regular file with a
single link to be read, and is replaced rather than written through.  A
manifest, chunk or folder that does not check out is dropped, never a
crash.  (The cache folder itself is the caller's choice and may be a
symlink, like the state dir.)
"""

import errno
import json
import os
import re
import secrets
import stat
import threading
from collections import Counter
from dataclasses import dataclass

from twisted_p2p.limits import MAX_FILE_SIZE
from twisted_p2p.manifest import HASH_SIZE, Manifest, ManifestMismatch, chunk_count
from twisted_p2p.names import BadName, check_path
from twisted_p2p.replication import eviction_order

#: The name of the cache folder in the state dir.
CACHE_FOLDER = "cache"

_MANIFEST = "manifest"
_TEMPORARY = ".tmp-"
_MANIFEST_MAGIC = b"p2p-cache-manifest 1\n"

# Limits of this module, with their reasons (to move to limits.py).

#: Bytes of a stored manifest's JSON line (name and size): a path of
#: MAX_PATH_BYTES (1024) escaped to \uXXXX is at most three times as long,
#: so this is never met by a good one.
MAX_MANIFEST_HEADER = 8192

#: Bytes read from the disk at once when a manifest's hashes are loaded.
_READ_PIECE = 1 << 20

_FILE_ID = re.compile(r"\A[0-9a-f]{64}\Z")
_INDEX = re.compile(r"\A(0|[1-9][0-9]{0,15})\Z")

_HOSTING_OFF = "this peer hosts nothing (--cache-size 0)"

# Refusal codes, for the distributee to pass on to the pushing peer.
HOSTING_OFF = "hosting-off"
BAD_FILE_ID = "bad-file-id"
BAD_NAME = "bad-name"
UNKNOWN_FILE = "unknown-file"
BAD_INDEX = "bad-index"
ALREADY_HELD = "already-held"
BAD_HASH = "bad-hash"
OVER_QUOTA = "over-quota"
DISK_ERROR = "disk-error"


class CacheRefused(Exception):
    """
    The cache will not take a chunk or a manifest.

    @ivar code: one of the codes above, for the wire.
    @ivar reason: one sentence for the log or the other peer.
    """

    def __init__(self, code, reason):
        Exception.__init__(self, reason)
        self.code = code
        self.reason = reason


class CacheMiss(KeyError):
    """
    A chunk asked for that the cache does not hold (or no longer: evicted,
    or found damaged).
    """


@dataclass(frozen=True)
class CachedFile:
    """
    What the cache holds of one file, for the catalog.

    @ivar chunks: how many of its chunks are held.
    @ivar bytes: their bytes.
    """

    file_id: str
    name: str
    size: int
    chunks: int
    bytes: int


@dataclass(frozen=True)
class OpenReport:
    """
    What L{ChunkCache.open} found: the chunks kept, and what it dropped
    because it failed its checks (damaged chunks and manifests, planted
    entries) or would not fit a smaller quota.
    """

    chunks: int
    dropped_chunks: int
    dropped_files: int
    evicted: int


def check_file_id(file_id):
    """
    Return C{file_id} if it is 64 lowercase hex digits, else refuse it: only
    such a name ever reaches the disk.
    """
    if not isinstance(file_id, str) or not _FILE_ID.match(file_id):
        raise CacheRefused(BAD_FILE_ID, "a file id must be 64 lowercase hex digits")
    return file_id


def _verify(manifest, index, data):
    """
    Whether C{data} is chunk C{index}: the one place the cache checks a
    hash, so that a change of hash changes only the manifest module.
    """
    return manifest.verify_chunk(index, data)


class Reservation:
    """
    Room held in the cache for one chunk of one file while it is on its way:
    committed by L{ChunkCache.put}, or given back by L{release}.
    """

    def __init__(self, cache, file_id, index, length):
        self._cache = cache
        self.file_id = file_id
        self.index = index
        self.length = length
        self.active = True
        #: Whether the cache dropped the file meanwhile.
        self.dropped = False

    def release(self):
        """
        Give the room back (the push failed or was abandoned); harmless
        when already committed or released.
        """
        self._cache._release(self)


class _Entry:
    """
    One cached file in memory: its manifest and name, the chunks held, the
    bytes of its manifest file, and the reservations in flight for it.
    """

    def __init__(self, manifest, name, manifest_bytes):
        self.manifest = manifest
        self.name = name
        self.manifest_bytes = manifest_bytes
        self.held = set()
        self.reservations = {}

    def held_bytes(self):
        return sum(self.manifest.chunk_length(i) for i in self.held)


class ChunkCache:
    """
    Owns the cache folder and its quota: which chunks of which files this
    peer holds for others, the room they and the pushes in progress take,
    and eviction when room is wanted.  See the module docstring for the
    layout and the checks.

    @param folder: the cache folder (created if missing).
    @param quota: bytes it may hold, manifests included; 0 hosts nothing.
    @param salt: breaks ties between equally copied chunks when evicting
        (this peer's id), so that caches do not all drop the same ones.
    """

    def __init__(self, folder, quota, salt=""):
        if quota < 0:
            raise ValueError("a quota cannot be negative")
        self.folder = folder
        self.quota = quota
        self._salt = salt
        self._lock = threading.Lock()
        # Manifests are written one at a time, so two pushes of a new file
        # at once store its manifest once.
        self._manifest_lock = threading.Lock()
        self._root = None
        self._entries = {}
        self._used = 0
        self._reserved = 0

    # -- opening -------------------------------------------------------------

    def open(self):
        """
        Open the cache folder and load what it holds, checking every
        manifest against its file id and every chunk against its hash: what
        fails is deleted.  Leftovers of interrupted writes go too, and so
        does a file with no chunk left.  If what is kept is over the quota
        (it was lowered), chunks are evicted until it fits.

        @rtype: L{OpenReport}
        """
        if self._root is not None:
            raise RuntimeError("the cache is open already")
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        self._root = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        kept = dropped_chunks = dropped_files = 0
        with os.scandir(self._root) as entries:
            names = [entry.name for entry in entries]
        for name in sorted(names):
            if not _FILE_ID.match(name):
                # Not ours: left alone, and never followed.
                continue
            entry, bad = self._load_file(name)
            dropped_chunks += bad
            if entry is None:
                dropped_files += 1
                continue
            self._entries[name] = entry
            self._used += entry.manifest_bytes + entry.held_bytes()
            kept += len(entry.held)
        evicted = 0
        if self._used > self.quota:
            order = eviction_order(self._held_chunks(), lambda f, i: 0, self._salt)
            for file_id, index in order:
                if self._used <= self.quota:
                    break
                self._evict(file_id, index)
                evicted += 1
        return OpenReport(kept - evicted, dropped_chunks, dropped_files, evicted)

    def _load_file(self, file_id):
        """
        The L{_Entry} of the cached file C{file_id} on disk, after checking
        it, and how many chunks were dropped; C{None} (and the folder gone)
        if its manifest is missing or damaged, or it holds no good chunk.
        """
        try:
            fd = _open_folder(file_id, self._root)
        except OSError:
            # A symlink, a plain file or the like where a folder should be.
            _unlink(file_id, self._root)
            return None, 0
        try:
            try:
                manifest, name, size = _read_manifest(fd, file_id)
            except (OSError, ValueError):
                return self._remove_folder(file_id, fd), 0
            entry = _Entry(manifest, name, size)
            dropped = 0
            with os.scandir(fd) as found:
                names = [e.name for e in found]
            for child in names:
                if child == _MANIFEST:
                    continue
                match = _INDEX.match(child)
                index = int(child) if match else -1
                if 0 <= index < manifest.chunk_count and _chunk_is_good(fd, child, manifest, index):
                    entry.held.add(index)
                    continue
                if match:
                    dropped += 1
                # Damaged chunks, leftovers and anything planted go; a
                # planted folder cannot be unlinked and is left, unread.
                _unlink(child, fd)
            if not entry.held:
                return self._remove_folder(file_id, fd), dropped
            return entry, dropped
        finally:
            os.close(fd)

    def _remove_folder(self, file_id, fd):
        """
        Delete the folder of C{file_id} (open as C{fd}) and all in it.
        """
        try:
            with os.scandir(fd) as found:
                names = [e.name for e in found]
            for child in names:
                _unlink(child, fd)
            os.rmdir(file_id, dir_fd=self._root)
        except OSError:
            pass
        return None

    def close(self):
        """
        Let go of the cache folder.  What is held stays on disk.
        """
        with self._lock:
            if self._root is not None:
                os.close(self._root)
                self._root = None

    # -- what is held ----------------------------------------------------------

    @property
    def used(self):
        """
        Bytes of the chunks and manifests held.
        """
        return self._used

    @property
    def reserved(self):
        """
        Bytes held back for pushes in progress.
        """
        return self._reserved

    @property
    def free(self):
        """
        Bytes the cache may still take: what to tell the network.
        """
        with self._lock:
            return self._free()

    def _free(self):
        return max(0, self.quota - self._used - self._reserved)

    def manifest(self, file_id):
        """
        The stored manifest of C{file_id}, or C{None}.
        """
        with self._lock:
            entry = self._entries.get(file_id)
            return entry.manifest if entry is not None else None

    def held(self, file_id):
        """
        The indexes of the chunks of C{file_id} held (none for a file not
        cached).
        """
        with self._lock:
            entry = self._entries.get(file_id)
            return frozenset(entry.held) if entry is not None else frozenset()

    def holds(self, file_id, index):
        """
        Whether chunk C{index} of C{file_id} is held.
        """
        with self._lock:
            entry = self._entries.get(file_id)
            return entry is not None and index in entry.held

    def bitmap(self, file_id):
        """
        The chunks of C{file_id} held, as the C{have} answer's bitmap: chunk
        i is bit i % 8 of byte i // 8.
        """
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is None:
                return b""
            bits = bytearray((entry.manifest.chunk_count + 7) // 8)
            for index in entry.held:
                bits[index >> 3] |= 1 << (index & 7)
            return bytes(bits)

    def files(self):
        """
        A L{CachedFile} for every file of which a chunk is held, by id.
        """
        with self._lock:
            return [
                CachedFile(
                    file_id,
                    entry.name,
                    entry.manifest.size,
                    len(entry.held),
                    entry.held_bytes(),
                )
                for file_id, entry in sorted(self._entries.items())
                if entry.held
            ]

    def read(self, file_id, index, offset=0, length=None):
        """
        C{length} bytes (to its end if C{None}) of held chunk C{index} of
        C{file_id}, from C{offset} within the chunk: for an upload.  A
        chunk whose file turns out short or not ours is dropped.

        @raise CacheMiss: the chunk is not held.
        @raise ValueError: the range lies outside the chunk.
        """
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is None or index not in entry.held or self._root is None:
                raise CacheMiss((file_id, index))
            chunk_length = entry.manifest.chunk_length(index)
        if length is None:
            length = chunk_length - offset
        if not (0 <= offset and 0 <= length and offset + length <= chunk_length):
            raise ValueError("a range outside the chunk")
        fd = self.open_chunk(file_id, index)
        try:
            data = os.pread(fd, length, offset)
        except OSError:
            data = None
        finally:
            os.close(fd)
        if data is None or len(data) != length:
            with self._lock:
                if file_id in self._entries and index in self._entries[file_id].held:
                    self._evict(file_id, index)
            raise CacheMiss((file_id, index))
        return data

    def open_chunk(self, file_id, index):
        """
        A descriptor of held chunk C{index} of C{file_id}, for an upload
        that sends it straight from the disk; the caller closes it.  Opening
        does no reading: it may be called from the reactor's thread.

        @raise CacheMiss: the chunk is not held (or not ours on disk: then
            it is dropped).
        """
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is None or index not in entry.held or self._root is None:
                raise CacheMiss((file_id, index))
            length = entry.manifest.chunk_length(index)
            try:
                folder = _open_folder(file_id, self._root)
            except OSError:
                self._drop(file_id)
                raise CacheMiss((file_id, index))
            try:
                fd = _open_regular(str(index), folder)
            except OSError:
                self._evict(file_id, index)
                raise CacheMiss((file_id, index))
            finally:
                os.close(folder)
            if os.fstat(fd).st_size != length:
                os.close(fd)
                self._evict(file_id, index)
                raise CacheMiss((file_id, index))
            return fd

    # -- taking chunks ----------------------------------------------------------

    def add_manifest(self, manifest, name):
        """
        Keep C{manifest} (fetched from a peer that serves the file, checked
        against its id) and the file's C{name}, so that chunks of it may be
        taken.  Written atomically; its bytes count against the quota.
        Nothing happens if it is stored already.

        @raise CacheRefused: hosting is off, the name is not legal, there is
            no room, or the disk failed.
        """
        file_id = check_file_id(manifest.file_id)
        try:
            check_path(name)
        except BadName as e:
            raise CacheRefused(BAD_NAME, f"not a legal file path: {e}") from e
        data = _encode_manifest(manifest, name)
        with self._manifest_lock:
            with self._lock:
                self._check_open()
                if file_id in self._entries:
                    return
                if self.quota == 0:
                    raise CacheRefused(HOSTING_OFF, _HOSTING_OFF)
                if len(data) > self._free():
                    raise CacheRefused(OVER_QUOTA, "no room in the cache for this file's manifest")
                self._reserved += len(data)
            try:
                self._write_manifest(file_id, data)
            except OSError as e:
                with self._lock:
                    self._reserved -= len(data)
                raise CacheRefused(DISK_ERROR, f"could not store the manifest: {e}") from e
            with self._lock:
                self._reserved -= len(data)
                self._used += len(data)
                self._entries[file_id] = _Entry(manifest, name, len(data))

    def _write_manifest(self, file_id, data):
        try:
            os.mkdir(file_id, 0o700, dir_fd=self._root)
        except FileExistsError:
            pass
        try:
            folder = _open_folder(file_id, self._root)
        except OSError:
            # Something not ours under our name: replaced by our folder.
            _unlink(file_id, self._root)
            os.mkdir(file_id, 0o700, dir_fd=self._root)
            folder = _open_folder(file_id, self._root)
        try:
            temporary = _write_temporary(folder, "manifest", [data], durable=True)
            try:
                os.rename(temporary, _MANIFEST, src_dir_fd=folder, dst_dir_fd=folder)
            except OSError:
                _unlink(temporary, folder)
                raise
            os.fsync(folder)
        finally:
            os.close(folder)

    def reserve(self, file_id, index, copies=None):
        """
        Hold the room for chunk C{index} of C{file_id} while it is pushed.
        Without room, and given C{copies}, chunks with more copies than this
        one would then have are evicted for it, most copied first.

        @param copies: C{copies(file_id, index)}, a chunk's copies on the
            network, this cache's included.
        @rtype: L{Reservation}
        @raise CacheRefused: hosting is off, the file is unknown (its
            manifest was never stored), the index is out of range, the chunk
            is held or on its way already, or there is no room.
        """
        check_file_id(file_id)
        with self._lock:
            entry = self._check_can_take(file_id, index)
            length = entry.manifest.chunk_length(index)
            if length <= self._free():
                return self._reserve(entry, file_id, index, length)
        if copies is not None:
            floor = copies(file_id, index) + 1
            self.make_room(length, copies, floor=floor)
        with self._lock:
            entry = self._check_can_take(file_id, index)
            if length > self._free():
                raise CacheRefused(OVER_QUOTA, "the cache is full")
            return self._reserve(entry, file_id, index, length)

    def _check_can_take(self, file_id, index):
        self._check_open()
        if self.quota == 0:
            raise CacheRefused(HOSTING_OFF, _HOSTING_OFF)
        entry = self._entries.get(file_id)
        if entry is None:
            raise CacheRefused(UNKNOWN_FILE, "no manifest is known for this file")
        if type(index) is not int or not 0 <= index < entry.manifest.chunk_count:
            raise CacheRefused(BAD_INDEX, "no such chunk in this file")
        if index in entry.held or index in entry.reservations:
            raise CacheRefused(ALREADY_HELD, "this chunk is held or on its way already")
        return entry

    def _check_open(self):
        if self._root is None:
            raise CacheRefused(DISK_ERROR, "the cache is not open")

    def _reserve(self, entry, file_id, index, length):
        reservation = Reservation(self, file_id, index, length)
        entry.reservations[index] = reservation
        self._reserved += length
        return reservation

    def _release(self, reservation):
        with self._lock:
            self._end(reservation)

    def _end(self, reservation):
        """
        Give back C{reservation}'s room; the caller holds the lock.
        """
        if not reservation.active:
            return
        reservation.active = False
        self._reserved -= reservation.length
        entry = self._entries.get(reservation.file_id)
        if entry is not None:
            if entry.reservations.get(reservation.index) is reservation:
                del entry.reservations[reservation.index]

    def put(self, file_id, index, data_pieces, reservation=None):
        """
        Take chunk C{index} of C{file_id}, whose bytes are C{data_pieces}
        (bytes-like, as they arrived), into the cache: checked against the
        stored manifest's hash, written under a temporary name and renamed
        into place.  Without a C{reservation}, one is made first.

        @raise CacheRefused: as for L{reserve}; or a bad hash, or the disk
            failed.  The reservation is released either way.
        """
        if reservation is None:
            reservation = self.reserve(file_id, index)
        elif (reservation.file_id, reservation.index) != (file_id, index):
            raise ValueError("a reservation for another chunk")
        try:
            with self._lock:
                self._check_open()
                entry = self._entries.get(file_id)
                if reservation.dropped or entry is None:
                    raise CacheRefused(UNKNOWN_FILE, "the file left the cache meanwhile")
                if not reservation.active:
                    raise ValueError("a reservation already committed or released")
                manifest = entry.manifest
                folder = _open_folder(file_id, self._root)
            try:
                data = b"".join(data_pieces)
                if not _verify(manifest, index, data):
                    raise CacheRefused(BAD_HASH, "the chunk does not match its hash")
                temporary = _write_temporary(folder, str(index), [data])
                try:
                    with self._lock:
                        if not reservation.active or self._entries.get(file_id) is not entry:
                            raise CacheRefused(UNKNOWN_FILE, "the file left the cache meanwhile")
                        # Replaces whatever was planted under the name; never
                        # writes through it.
                        os.rename(temporary, str(index), src_dir_fd=folder, dst_dir_fd=folder)
                        self._end(reservation)
                        entry.held.add(index)
                        self._used += reservation.length
                except BaseException:
                    _unlink(temporary, folder)
                    raise
            finally:
                os.close(folder)
        except OSError as e:
            raise CacheRefused(DISK_ERROR, f"could not store the chunk: {e}") from e
        finally:
            reservation.release()

    # -- giving room back ------------------------------------------------------

    def make_room(self, needed, copies, floor=0):
        """
        Evict chunks until C{needed} bytes are free, most copied first, but
        never a chunk with C{floor} copies or fewer; evict nothing if that
        cannot free enough.  C{copies} is called without the cache's lock
        held, so it may look at the cache.

        @param copies: C{copies(file_id, index)}, a chunk's copies on the
            network, this cache's included.
        @return: the C{(file id, index)} evicted.
        """
        with self._lock:
            if self._free() >= needed:
                return []
            chunks = self._held_chunks()
        counts = {chunk: copies(*chunk) for chunk in chunks}
        order = eviction_order(
            [chunk for chunk in chunks if counts[chunk] > floor],
            lambda file_id, index: counts[file_id, index],
            self._salt,
        )
        with self._lock:
            short = needed - self._free()
            plan = []
            taken = Counter()
            for file_id, index in order:
                if short <= 0:
                    break
                entry = self._entries.get(file_id)
                if entry is None or index not in entry.held:
                    continue
                plan.append((file_id, index))
                short -= entry.manifest.chunk_length(index)
                taken[file_id] += 1
                if taken[file_id] == len(entry.held) and not entry.reservations:
                    # Its last chunk: its manifest goes with it.
                    short -= entry.manifest_bytes
            if short > 0:
                return []
            for file_id, index in plan:
                self._evict(file_id, index)
        return plan

    def forget_if_empty(self, file_id):
        """
        Drop the manifest of C{file_id} if no chunk of it is held or on its
        way: room taken by an offer that came to nothing is given back.
        """
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is not None and not entry.held and not entry.reservations:
                self._drop(file_id)

    def drop_file(self, file_id):
        """
        Forget every chunk of C{file_id} and its manifest, and delete them.
        Pushes in progress for it are refused when they finish.

        @return: the bytes of the chunks that were held (0: none).
        """
        check_file_id(file_id)
        with self._lock:
            entry = self._entries.get(file_id)
            freed = entry.held_bytes() if entry is not None else 0
            self._drop(file_id)
            return freed

    def _held_chunks(self):
        return [(f, i) for f, entry in self._entries.items() for i in entry.held]

    def _evict(self, file_id, index):
        """
        Delete held chunk C{index} of C{file_id}, and the file's manifest
        with its last chunk; the caller holds the lock.
        """
        entry = self._entries[file_id]
        entry.held.discard(index)
        self._used -= entry.manifest.chunk_length(index)
        try:
            folder = _open_folder(file_id, self._root)
        except OSError:
            folder = None
        if folder is not None:
            try:
                _unlink(str(index), folder)
            finally:
                os.close(folder)
        if not entry.held and not entry.reservations:
            self._drop(file_id)

    def _drop(self, file_id):
        entry = self._entries.pop(file_id, None)
        if entry is None:
            return
        for reservation in list(entry.reservations.values()):
            reservation.dropped = True
            self._end(reservation)
        self._used -= entry.manifest_bytes + entry.held_bytes()
        try:
            folder = _open_folder(file_id, self._root)
        except OSError:
            return
        try:
            self._remove_folder(file_id, folder)
        finally:
            os.close(folder)


# -- files on disk -----------------------------------------------------------


def _open_folder(name, dir_fd):
    """
    Open folder C{name} in C{dir_fd}, never through a symlink.
    """
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _open_regular(name, dir_fd):
    """
    Open C{name} in C{dir_fd} for reading, never through a symlink, and
    only if it is a regular file with no other link (a hard link planted to
    a file elsewhere is not ours to serve).  Non-blocking, so that a planted
    FIFO cannot hang the open.

    @raise OSError: it is missing or not ours.
    """
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise OSError(errno.EPERM, "not a regular file of ours", name)
    return fd


def _write_temporary(folder, what, pieces, durable=False):
    """
    Write C{pieces} to a new temporary file in C{folder}, fsynced if
    C{durable}; its name.
    """
    name = f"{_TEMPORARY}{what}-{secrets.token_hex(8)}"
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=folder,
    )
    try:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(name, folder)
        raise
    os.close(fd)
    return name


def _unlink(name, dir_fd):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        # A planted folder, or a vanished cache: nothing we can remove.
        pass


def _encode_manifest(manifest, name):
    header = json.dumps({"name": name, "size": manifest.size}).encode("utf-8") + b"\n"
    return _MANIFEST_MAGIC + header + bytes(manifest.chunk_hashes)


def _read_manifest(folder, file_id):
    """
    The manifest stored in C{folder}, checked against C{file_id}: its
    L{Manifest}, file name and bytes on disk.

    @raise ValueError: it is damaged.
    @raise OSError: it is missing or not ours.
    """
    fd = _open_regular(_MANIFEST, folder)
    try:
        disk_size = os.fstat(fd).st_size
        head = os.pread(fd, len(_MANIFEST_MAGIC) + MAX_MANIFEST_HEADER, 0)
        if not head.startswith(_MANIFEST_MAGIC):
            raise ValueError("not a manifest")
        end = head.find(b"\n", len(_MANIFEST_MAGIC))
        if end < 0:
            raise ValueError("a manifest header too long")
        header = json.loads(head[len(_MANIFEST_MAGIC) : end].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("a manifest header that is not an object")
        name, size = header.get("name"), header.get("size")
        if type(size) is not int:
            raise ValueError("a manifest without a size")
        check_path(name)
        offset = end + 1
        # Checked before the hashes are read, so that a huge planted file
        # is never loaded: a good manifest is at most 128 MiB (1 TiB file).
        if not 0 <= size <= MAX_FILE_SIZE or disk_size - offset != chunk_count(size) * HASH_SIZE:
            raise ValueError("a manifest of the wrong length")
        hashes = bytearray()
        while offset < disk_size:
            data = os.pread(fd, min(_READ_PIECE, disk_size - offset), offset)
            if not data or len(data) % HASH_SIZE:
                raise ValueError("a manifest that changed while it was read")
            hashes += data
            offset += len(data)
        manifest = Manifest.build(size, hashes, expected_id=file_id)
    except (ManifestMismatch, BadName, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(str(e)) from e
    finally:
        os.close(fd)
    return manifest, name, disk_size


def _chunk_is_good(folder, name, manifest, index):
    """
    Whether the file C{name} in C{folder} is ours and holds chunk C{index}
    of C{manifest}, read in one piece of one chunk (memory stays flat).
    """
    try:
        fd = _open_regular(name, folder)
    except OSError:
        return False
    try:
        length = manifest.chunk_length(index)
        if os.fstat(fd).st_size != length:
            return False
        data = os.pread(fd, length, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return _verify(manifest, index, data)
