"""
Storage of downloads: a hidden partial file written at chunk offsets, a small
chunk map beside it that says which chunks are verified (so that a download
resumes after a crash), and the partial file made durable and renamed into
place only once every chunk is verified.

All methods of L{PartialFile} block; the download runs them in a thread.

Resume and ordering.  A chunk's bytes are written to the partial file
I{before} its bit is set in the map file, each with C{pwrite}, and neither is
fsynced per chunk.  A process that dies (C{exit}, SIGTERM, SIGKILL) loses
nothing the kernel has: both writes are in the page cache, in that order, so
a bit is never set for bytes that were not written.  After a power loss the
two files may disagree, so on reopening every chunk the map marks is
verified again against the manifest; one that fails is fetched again.

Planted files.  Anyone who can write in the downloads folder could put a
symlink (or a hard link to a file elsewhere) where the partial file or its
map will be.  Both are opened without following symlinks and must be regular
files with one link; anything else is removed and the file made afresh, and
the name linked into place on completion is checked to be our own file.
"""

import ctypes
import ctypes.util
import errno
import os
import stat
import threading

from twisted_p2p.index import file_signature
from twisted_p2p.manifest import ManifestMismatch, hash_file
from twisted_p2p.names import BadName, check_path, free_name, local_path

PARTIAL_PREFIX = ".p2ppeer-"
PARTIAL_SUFFIX = ".part"
MAP_SUFFIX = ".map"

#: Buffers one pwritev call takes at most (POSIX's IOV_MAX is at least 16;
#: Linux's is 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16

#: The chunk map file: this magic, the 32-byte file id, the size as 8 bytes
#: big-endian, then one bit per chunk (chunk i is bit i % 8 of byte i // 8).
MAP_MAGIC = b"p2pmap1\n"
_MAP_HEADER = len(MAP_MAGIC) + 32 + 8


#: Bytes written to a partial file after which the kernel is asked to start
#: writing them to disk (L{start_writeback}), so that the fsync at the end
#: finds little left to do: an fsync of a whole GiB took 1.5-2 s here.
WRITEBACK_EVERY = 16 * 1024 * 1024


def _load_sync_file_range():
    """
    Linux's C{sync_file_range}, which Python's C{os} does not offer, through
    ctypes; C{None} elsewhere.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()

#: SYNC_FILE_RANGE_WRITE: start writing the dirty pages, without waiting.
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd):
    """
    Ask the kernel to start writing C{fd}'s dirty pages to disk, without
    waiting for it (a hint: nothing happens where it cannot be asked).
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class StorageError(Exception):
    """
    The downloads folder cannot take the download; the message is one
    sentence for the user (what failed, where, and the likely fix).
    """


def describe_os_error(error, folder):
    """
    One sentence about an C{OSError} met while writing into C{folder}.
    """
    where = f"the downloads folder {folder}"
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left in {where}; free some space, then download again to resume"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where} is not writable ({error.strerror}); fix its permissions, then download again"
    if code == errno.ENOENT:
        return f"{where} is gone; create it again, then download again"
    return f"cannot write in {where}: {error.strerror or error}"


def _storage_errors(method):
    """
    Turn an C{OSError} of C{method} into a L{StorageError} that says what to do.
    """

    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            raise StorageError(describe_os_error(e, self.folder)) from e

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class ChunkMap:
    """
    Which chunks of one file are verified: a bitmap in memory, mirrored to a
    small file.  Safe to use from several threads.
    """

    def __init__(self, count):
        self.count = count
        self._bits = bytearray((count + 7) // 8)
        self._lock = threading.Lock()
        self._fd = None
        self.verified = 0

    def __contains__(self, index):
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def indexes(self):
        """
        The verified chunk indexes, in order.
        """
        bits = bytes(self._bits)
        for byte_index, byte in enumerate(bits):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        yield byte_index * 8 + bit

    def snapshot(self):
        """
        The bitmap as bytes (for the wire: see the C{have} answer).
        """
        with self._lock:
            return bytes(self._bits)

    def set(self, index, value=True):
        with self._lock:
            byte = self._bits[index >> 3]
            mask = 1 << (index & 7)
            new = (byte | mask) if value else (byte & ~mask)
            if new == byte:
                return
            self._bits[index >> 3] = new
            self.verified += 1 if value else -1
            if self._fd is not None:
                os.pwrite(self._fd, bytes([new]), _MAP_HEADER + (index >> 3))

    def set_range(self, first, count):
        """
        Mark chunks C{first} to C{first + count - 1}, with one write to the
        map file.
        """
        with self._lock:
            low, high = first >> 3, (first + count - 1) >> 3
            before = bytes(self._bits[low : high + 1])
            for index in range(first, first + count):
                self._bits[index >> 3] |= 1 << (index & 7)
            after = bytes(self._bits[low : high + 1])
            if after == before:
                return
            self.verified += sum(bin(b).count("1") for b in after) - sum(
                bin(b).count("1") for b in before
            )
            if self._fd is not None:
                os.pwrite(self._fd, after, _MAP_HEADER + low)

    def load(self, fd, file_id, size):
        """
        Read the map from C{fd}; an unreadable or foreign one counts as empty
        (and is rewritten).  Then keep writing changes to C{fd}.
        """
        header = MAP_MAGIC + bytes.fromhex(file_id) + size.to_bytes(8, "big")
        stored = os.pread(fd, _MAP_HEADER + len(self._bits), 0)
        if stored[:_MAP_HEADER] == header and len(stored) == _MAP_HEADER + len(self._bits):
            bits = bytearray(stored[_MAP_HEADER:])
            # Bits past the last chunk are damage, not chunks.
            if self.count % 8:
                bits[-1] &= (1 << (self.count % 8)) - 1
            self._bits = bits
        else:
            self._bits = bytearray(len(self._bits))
        self.verified = sum(bin(b).count("1") for b in self._bits)
        # Written in full now, so that setting a bit later never needs a new
        # block (a full disk fails here, at the start, not in the middle).
        os.ftruncate(fd, 0)
        data = header + bytes(self._bits)
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        self._fd = fd

    def detach(self):
        fd, self._fd = self._fd, None
        return fd


class PartialFile:
    """
    Owns one download's bytes on disk until they are complete: the partial
    file and its chunk map.

    The partial file lives in the downloads folder itself (hidden, so it is
    never offered or listed), so that the final rename stays on one
    filesystem and is atomic.

    Every method may raise L{StorageError} for a full, unwritable or vanished
    folder; the partial data is then kept, for a later resume.
    """

    def __init__(self, folder, file_id):
        self.folder = folder
        self.file_id = file_id
        base = os.path.join(folder, f"{PARTIAL_PREFIX}{file_id[:32]}")
        self.path = base + PARTIAL_SUFFIX
        self.map_path = base + MAP_SUFFIX
        self._fd = None
        self._unflushed = 0
        self.chunks = None

    @_storage_errors
    def open(self, size, manifest=None):
        """
        Create (or reopen) the partial file at its full C{size}; unwritten
        ranges are holes.  With a C{manifest}, the chunk map is loaded too,
        and every chunk it marks is verified again (see the module
        docstring).

        @return: the indexes of the chunks already verified.
        """
        fd = _open_own(self.path)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            if manifest is not None:
                self.chunks = ChunkMap(manifest.chunk_count)
                map_fd = _open_own(self.map_path)
                try:
                    self.chunks.load(map_fd, manifest.file_id, size)
                except BaseException:
                    os.close(map_fd)
                    raise
                for index in list(self.chunks.indexes()):
                    data = os.pread(fd, manifest.chunk_length(index), manifest.chunk_offset(index))
                    if not manifest.verify_chunk(index, data):
                        self.chunks.set(index, False)
        except BaseException:
            self._close_map()
            os.close(fd)
            raise
        self._fd = fd
        return list(self.chunks.indexes()) if self.chunks is not None else []

    @_storage_errors
    def write(self, offset, data):
        self._write(offset, (data,))

    @_storage_errors
    def store(self, index, offset, pieces):
        """
        Write verified chunk C{index}, the buffers C{pieces} one after the
        other, at C{offset}; then mark it in the map.
        """
        self._write(offset, pieces)
        if self.chunks is not None:
            self.chunks.set(index)

    @_storage_errors
    def store_run(self, first, count, offset, buffer):
        """
        Write verified chunks C{first} to C{first + count - 1}, which follow
        each other in C{buffer}, at C{offset}; then mark them in the map: in
        that order, so the map never claims bytes that are not there.
        """
        self._write(offset, (buffer,))
        if self.chunks is not None:
            self.chunks.set_range(first, count)

    def _write(self, offset, pieces):
        pieces = list(pieces)
        length = sum(len(piece) for piece in pieces)
        while pieces:
            written = os.pwritev(self._fd, pieces[:_IOV_MAX], offset)
            offset += written
            while pieces and written >= len(pieces[0]):
                written -= len(pieces.pop(0))
            if written:
                pieces[0] = memoryview(pieces[0])[written:]
        # Two worker threads may write one file (at their own offsets): the
        # count is only a hint of when to start writeback, and an update
        # lost in a race only starts it a little later.
        self._unflushed += length
        if self._unflushed >= WRITEBACK_EVERY:
            self._unflushed = 0
            start_writeback(self._fd)

    def read(self, offset, length):
        """
        C{length} bytes from C{offset} (to serve a verified chunk).
        """
        return os.pread(self._fd, length, offset)

    @_storage_errors
    def complete(self, name):
        """
        Make the file durable and give it its final name in the folder, never
        replacing a file that is already there: C{name} becomes C{name (1)}
        and so on.  The chunk map goes once the file has its name.

        C{name} may be a path (C{photos/2026/a.jpg}, see
        L{twisted_p2p.names.check_path}): its folders are made as needed,
        each opened without following a symlink, so that nothing planted in
        the downloads folder can send the file anywhere else.  Only the
        file's own name is changed to avoid another file; a folder
        download decides its top folder's name once, before it starts.

        @return: C{(final name, signature)}, the name a path like C{name}.
        """
        try:
            check_path(name)
        except BadName as e:
            raise StorageError(f"will not write {name!r}: {e}") from e
        parts = name.split("/")
        os.fsync(self._fd)
        ours = os.fstat(self._fd)
        os.close(self._fd)
        self._fd = None
        # The partial file's name must still be our file, not something
        # planted in its place since it was opened.
        if not _same_file(_lstat(self.path), ours):
            raise OSError(errno.EEXIST, "the partial file was removed or replaced", self.path)
        folder_fd = _open_folders(self.folder, parts[:-1])
        try:
            leaf = self._link_into(folder_fd, parts[-1], ours)
            os.fsync(folder_fd)
            linked = os.lstat(leaf, dir_fd=folder_fd)
        finally:
            os.close(folder_fd)
        self._close_map()
        _unlink(self.map_path)
        return "/".join(parts[:-1] + [leaf]), file_signature(linked)

    def _link_into(self, folder_fd, name, ours):
        """
        Link the partial file into the folder open as C{folder_fd} under
        C{name} or a free variant of it, and remove the partial name.
        """

        def exists(path):
            try:
                os.lstat(os.path.basename(path), dir_fd=folder_fd)
            except FileNotFoundError:
                return False
            return True

        while True:
            final = free_name("/", name, exists=exists)
            try:
                # link() fails if the name exists, where rename() would
                # replace; without following a symlink swapped in since the
                # check above.
                os.link(self.path, final, dst_dir_fd=folder_fd, follow_symlinks=False)
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                # A filesystem without hard links: check, then rename.
                if exists(final):
                    continue
                os.rename(self.path, final, dst_dir_fd=folder_fd)
            else:
                os.unlink(self.path)
            break
        linked = _lstat_at(folder_fd, final)
        if not _same_file(linked, ours):
            # Lost a race with whoever swapped the partial file: take back
            # the name we gave it.
            try:
                os.unlink(final, dir_fd=folder_fd)
            except FileNotFoundError:
                pass
            raise OSError(errno.EEXIST, "the partial file was removed or replaced", self.path)
        return final

    def close(self):
        """
        Let go of the files and keep them, for a later resume.
        """
        self._close_map()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self):
        """
        Let go of the files and remove them (a cancelled download).
        """
        self.close()
        _unlink(self.path)
        _unlink(self.map_path)

    def _close_map(self):
        if self.chunks is not None:
            fd = self.chunks.detach()
            if fd is not None:
                os.close(fd)


def _open_own(path):
    """
    Open our file at C{path} for reading and writing, creating it if need
    be, and never through a symlink: what is there must be a regular file
    with no other link, or it is removed and the file created afresh.

    @return: the file descriptor.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        pass
    except OSError as e:
        # ELOOP: a symlink (EMLINK on some BSDs); EISDIR, ENXIO and the like:
        # something else that is not ours.
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO):
            raise
        _unlink(path)
    else:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            return fd
        os.close(fd)
        _unlink(path)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)


def _open_folders(top, parts):
    """
    Open folder C{top}, then each of C{parts} below it in turn, making the
    ones that are missing; never through a symlink, and never into anything
    but a folder.

    @return: a file descriptor of the last folder (the caller closes it).
    @raise OSError: something that is not a folder is in the way.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise OSError(
                        errno.ENOTDIR, f"{part!r} is in the way: it is not a folder"
                    ) from e
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lstat_at(folder_fd, name):
    try:
        return os.lstat(name, dir_fd=folder_fd)
    except FileNotFoundError:
        return None


def _lstat(path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _same_file(info, ours):
    return (
        info is not None
        and stat.S_ISREG(info.st_mode)
        and (info.st_dev, info.st_ino) == (ours.st_dev, ours.st_ino)
    )


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def is_folder_here(folder, name):
    """
    Whether C{folder} (the downloads folder) holds a real folder (not a
    symlink) at path C{name}.  Blocks, briefly.
    """
    try:
        return stat.S_ISDIR(os.lstat(local_path(folder, name)).st_mode)
    except (OSError, BadName):
        return False


def already_here(folder, entries, known=None):
    """
    Which of C{entries}, C{(path below folder, file id, size)} each, are in
    C{folder} already with that content: a regular file (not a symlink) of
    that size whose id is that id.  C{known} maps the full paths of files
    the index has hashed to C{(signature, file id)}; a file whose signature
    is still that one is not read again, the others are hashed.  Blocks:
    run it in a thread.

    @return: a list of booleans, one per entry.
    """
    known = known or {}
    here = []
    for name, file_id, size in entries:
        try:
            path = local_path(folder, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                here.append(False)
                continue
            seen = known.get(path)
            if seen is not None and seen == (file_signature(st), file_id):
                here.append(True)
                continue
            here.append(hash_file(path).file_id == file_id)
        except (OSError, BadName, ManifestMismatch):
            here.append(False)
    return here
