"""
Chunks, hashes and file identity.

A file is cut into L{CHUNK_SIZE} chunks, each with a BLAKE3 hash (32
bytes).  Its identity is a BLAKE3 over its size and its chunk hashes, so a
manifest fetched from an untrusted peer can be checked against the id it
claims, and every chunk against its hash.  The name is only for display.

Why BLAKE3 and not SHA-256: once the transfer core streamed chunks on
lasting connections, hashing was the largest share of a downloading peer's
CPU (as much as writing the file, and more than receiving it; py-spy over
96 MiB downloads), and SHA-256 ran at 1.85 GB/s here even with the CPU's SHA
instructions, BLAKE3 at 8.8 GB/s (both on 1 MiB, one thread).  Its
security claims are those of SHA-256 for this use (collision and second
preimage resistance at 128 bits), and it too releases the GIL while it
hashes, so the two worker threads still hash at once.

Pure code: L{hash_file} blocks, and callers run it in a thread.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from blake3 import blake3

from twisted_p2p.limits import CHUNK_SIZE, MAX_FILE_SIZE

#: Version 2 of the file id: BLAKE3 where version 1 had SHA-256.
_ID_PREFIX = b"twisted-p2p file v2\n"
HASH_SIZE = 32


class ManifestMismatch(ValueError):
    """
    Chunk hashes that do not add up to the file id they were fetched for.
    """


def chunk_count(size):
    """
    How many chunks a file of C{size} bytes has (an empty file has none).
    """
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def chunk_hash(data):
    """
    The hash of one chunk, C{data} (any buffer).  Blocks for as long as the
    hash takes: call it from a thread for anything large.
    """
    return blake3(data).digest()


def compute_file_id(size, chunk_hashes):
    """
    The hex identity of a file of C{size} bytes with these chunk hashes
    (hashes one after the other: L{ChunkHashes}, or any iterable of
    buffers, each one or several hashes).
    """
    digest = blake3(_ID_PREFIX)
    digest.update(size.to_bytes(8, "big"))
    if isinstance(chunk_hashes, ChunkHashes):
        digest.update(bytes(chunk_hashes))
        return digest.hexdigest()
    for chunk_hash in chunk_hashes:
        digest.update(chunk_hash)
    return digest.hexdigest()


class ChunkHashes(Sequence):
    """
    A file's chunk hashes, in order, kept in one C{bytes} of L{HASH_SIZE}
    bytes each: item C{i} is chunk C{i}'s hash (a new C{bytes}), a slice is
    a L{ChunkHashes} of those, and C{bytes()} gives them all, joined.

    One object, not one per chunk: a 1 TiB file's 4 million hashes are
    128 MiB, not 350 as a tuple of C{bytes} was, are made in one go, and give
    the cycle collector nothing to walk.
    """

    __slots__ = ("_blob",)

    def __init__(self, blob=b""):
        blob = bytes(blob)
        if len(blob) % HASH_SIZE:
            raise ManifestMismatch("chunk hash of the wrong length")
        self._blob = blob

    @classmethod
    def of(cls, hashes):
        """
        C{hashes} as L{ChunkHashes}: one buffer of them joined, or an
        iterable of one buffer per hash.

        @raise ManifestMismatch: a hash is not L{HASH_SIZE} bytes.
        """
        if isinstance(hashes, cls):
            return hashes
        if isinstance(hashes, (bytes, bytearray, memoryview)):
            return cls(hashes)
        hashes = [bytes(h) for h in hashes]
        if any(len(h) != HASH_SIZE for h in hashes):
            raise ManifestMismatch("chunk hash of the wrong length")
        return cls(b"".join(hashes))

    def __len__(self):
        return len(self._blob) // HASH_SIZE

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return ChunkHashes.of(self[i] for i in range(start, stop, step))
            return ChunkHashes(self._blob[start * HASH_SIZE : max(start, stop) * HASH_SIZE])
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(index)
        return self._blob[index * HASH_SIZE : (index + 1) * HASH_SIZE]

    def __iter__(self):
        blob = self._blob
        for offset in range(0, len(blob), HASH_SIZE):
            yield blob[offset : offset + HASH_SIZE]

    def __bytes__(self):
        return self._blob

    def __eq__(self, other):
        if isinstance(other, ChunkHashes):
            return self._blob == other._blob
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self):
        return hash(self._blob)

    def __repr__(self):
        return f"ChunkHashes({len(self)} hashes)"


@dataclass(frozen=True)
class Manifest:
    """
    What is known of a file's content: its size, chunk hashes and id.
    """

    size: int
    #: L{ChunkHashes}; L{build} takes them joined or one by one.
    chunk_hashes: "ChunkHashes"
    file_id: str

    @classmethod
    def build(cls, size, chunk_hashes, expected_id=None):
        """
        A manifest, checked for consistency and, if given, against the id it
        is meant to have.

        @raise ManifestMismatch: the pieces do not fit together.
        """
        if not 0 <= size <= MAX_FILE_SIZE:
            raise ManifestMismatch(f"size {size} out of range")
        chunk_hashes = ChunkHashes.of(chunk_hashes)
        if len(chunk_hashes) != chunk_count(size):
            raise ManifestMismatch("chunk count does not fit the size")
        file_id = compute_file_id(size, chunk_hashes)
        if expected_id is not None and file_id != expected_id:
            raise ManifestMismatch("chunk hashes do not match the file id")
        return cls(size, chunk_hashes, file_id)

    @property
    def chunk_count(self):
        # From the size (build checked that the hashes fit it): asked for
        # several times per chunk that comes.
        return (self.size + CHUNK_SIZE - 1) // CHUNK_SIZE

    def chunk_offset(self, index):
        return index * CHUNK_SIZE

    def chunk_length(self, index):
        """
        Bytes in chunk C{index}: L{CHUNK_SIZE} except for the last one.
        """
        if not 0 <= index < self.chunk_count:
            raise IndexError(index)
        return min(CHUNK_SIZE, self.size - index * CHUNK_SIZE)

    def verify_chunk(self, index, data):
        """
        Whether C{data} is chunk C{index} of this file.  Blocks for the hash:
        call it from a thread.
        """
        return self.verify_pieces(index, (data,))

    def verify_pieces(self, index, pieces):
        """
        Whether the buffers C{pieces}, one after the other, are chunk
        C{index} of this file (a chunk as it came off the network, in the
        pieces the socket gave, never joined).  Blocks: call it from a thread.
        """
        digest = blake3()
        length = 0
        for piece in pieces:
            digest.update(piece)
            length += len(piece)
        return length == self.chunk_length(index) and digest.digest() == self.chunk_hashes[index]


def hash_file(path):
    """
    The L{Manifest} of the file at C{path}, read one chunk at a time so memory
    stays flat.  Blocks: run it in a thread.

    @raise OSError: the file cannot be read.
    @raise ManifestMismatch: it is larger than L{MAX_FILE_SIZE}.
    """
    hashes = bytearray()
    size = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(CHUNK_SIZE)
            if not data:
                break
            size += len(data)
            if size > MAX_FILE_SIZE:
                raise ManifestMismatch(f"{path} is larger than {MAX_FILE_SIZE} bytes")
            hashes += chunk_hash(data)
            if len(data) < CHUNK_SIZE:
                # A short read is the end of a regular file.
                tail = f.read(1)
                if tail:
                    raise ManifestMismatch(f"{path} changed while it was read")
                break
    return Manifest.build(size, hashes)


class ByManifest:
    """
    A file known by its L{Manifest} (in a C{manifest} attribute): its id
    and size are the manifest's.
    """

    @property
    def file_id(self):
        return self.manifest.file_id

    @property
    def size(self):
        return self.manifest.size
