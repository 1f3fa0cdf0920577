"""
Storage of downloads: a hidden partial file written at chunk offsets, made
durable and renamed into place only once every chunk is verified.

All methods block; the download runs them in a thread.
"""

import os

from twisted_p2p.index import file_signature
from twisted_p2p.names import free_name

PARTIAL_PREFIX = ".p2ppeer-"
PARTIAL_SUFFIX = ".part"


class PartialFile:
    """
    Owns one download's bytes on disk until they are complete.

    The partial file lives in the downloads folder itself (hidden, so it is
    never offered or listed), so that the final rename stays on one
    filesystem and is atomic.
    """

    def __init__(self, folder, file_id):
        self.folder = folder
        self.path = os.path.join(folder, f"{PARTIAL_PREFIX}{file_id[:32]}{PARTIAL_SUFFIX}")
        self._fd = None

    def open(self, size):
        """
        Create (or reopen) the partial file at its full C{size}; unwritten
        ranges are holes.
        """
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.ftruncate(self._fd, size)

    def write(self, offset, data):
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def complete(self, name):
        """
        Make the file durable and give it its final name in the folder, never
        replacing a file that is already there: C{name} becomes C{name (1)}
        and so on.

        @return: C{(final name, signature)}.
        """
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        while True:
            final = free_name(self.folder, name)
            target = os.path.join(self.folder, final)
            try:
                # link() fails if the name exists, where rename() would replace.
                os.link(self.path, target)
            except FileExistsError:
                continue
            except OSError:
                # A filesystem without hard links: check, then rename.
                if os.path.lexists(target):
                    continue
                os.rename(self.path, target)
            else:
                os.unlink(self.path)
            break
        _fsync_folder(self.folder)
        return final, file_signature(os.stat(target))

    def discard(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
