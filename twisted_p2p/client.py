"""
Our side of a peer's sender port: ask, and get answers in order.
"""

import unicodedata
from collections import deque
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.error import ConnectionLost

from twisted_p2p import wire
from twisted_p2p.limits import (
    HAVE_PAGE,
    MANIFEST_PAGE,
    MAX_CATALOG_FILES,
    MAX_FILE_SIZE,
    MAX_PATH_BYTES,
    MAX_REMOTE_TEXT,
)
from twisted_p2p.manifest import HASH_SIZE, Manifest, ManifestMismatch, chunk_count, compute_file_id
from twisted_p2p.names import is_legal_path
from twisted_p2p.transfer import FramedProtocol

#: Unicode categories that must not reach a terminal or a log line from a
#: remote peer: controls (escape sequences, newlines), format characters
#: (bidirectional overrides), line and paragraph separators, private use,
#: surrogates and unassigned.
_UNSAFE = frozenset(("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"))


def clean_text(text, limit=MAX_REMOTE_TEXT):
    """
    Remote C{text} made safe to show: each character of an L{_UNSAFE}
    category becomes C{?}, and the text is cut to C{limit} characters (an
    ellipsis marks the cut).
    """
    cleaned = "".join("?" if unicodedata.category(ch) in _UNSAFE else ch for ch in text)
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 1] + "\u2026"
    return cleaned


class PeerRefused(Exception):
    """
    A peer answered a request with an error.  Its code and message are
    remote text, cleaned (see L{clean_text}) because they reach users.
    """

    def __init__(self, code, message):
        code, message = clean_text(code), clean_text(message)
        Exception.__init__(self, message)
        self.code = code
        self.message = message


class CatalogChanged(Exception):
    """
    A peer's catalog kept changing while it was fetched page by page.
    """


class SenderClient(FramedProtocol):
    """
    A connection to a peer's sender port.  L{call} sends a request and gives
    a Deferred of its C{(header, body)} answer; the sender answers in order.
    """

    def __init__(self):
        self._waiting = deque()
        self._closed = defer.Deferred()

    def when_closed(self):
        """
        A Deferred that fires when the connection is gone.
        """
        d = defer.Deferred()
        self._closed.addBoth(lambda r: d.callback(None) or r)
        return d

    def call(self, header, body=b""):
        if self.transport is None or self._closed.called or self.transport.disconnecting:
            return defer.fail(ConnectionLost("the connection is closed"))
        d = defer.Deferred()
        self._waiting.append(d)
        self.send(header, body)
        return d

    def frame_received(self, header, body):
        if not self._waiting:
            raise wire.ProtocolError("an answer to nothing we asked")
        if header["t"] == "error":
            # Checked before the call is taken off the queue: a malformed
            # answer drops the connection, which then fails the call.
            code = wire.text_field(header, "code", max_length=64)
            message = wire.text_field(header, "message")
            self._waiting.popleft().errback(PeerRefused(code, message))
        else:
            self._waiting.popleft().callback((header, body))

    def connectionLost(self, reason):
        FramedProtocol.connectionLost(self, reason)
        waiting, self._waiting = self._waiting, deque()
        self._closed.callback(None)
        for d in waiting:
            d.errback(ConnectionLost("the peer closed the connection"))

    def close(self):
        if self.transport is not None:
            self.transport.loseConnection()


class Deadline:
    """
    A sender connection whose every call fails with C{TimeoutError} unless
    answered within C{seconds}.
    """

    def __init__(self, client, seconds, clock):
        self._client = client
        self._seconds = seconds
        self._clock = clock

    def call(self, header):
        return self._client.call(header).addTimeout(self._seconds, self._clock)


def parse_catalog(header):
    """
    C{(revision, [(file_id, name, size)])} from a catalog answer (one page).
    Entries with an illegal name or path are left out; anything else malformed is an
    error.  An entry's optional C{partial} flag (a partial download the peer
    serves) is checked but not returned: a download asks every source which
    chunks it has (see L{fetch_have}).
    """
    revision, _, _, _, files, _, _ = _parse_catalog_page(header)
    return revision, files


@dataclass(frozen=True)
class CatalogView:
    """
    A peer's catalog as fetched: its revision, its files C{(file_id, name,
    size)}, the ids of those it holds only part of (partial downloads, and
    chunks it caches for others), and the cache space it has free for
    others (C{None}: it hosts nothing, or did not say).
    """

    revision: str
    files: list
    partial: frozenset = frozenset()
    free: int = None


def _parse_catalog_page(header):
    """
    C{(revision, start, total, entries on the page, legal files, partial
    ids, free)} of one catalog page.  An answer without C{start} and
    C{total} (a peer from before paging) is the whole catalog.
    """
    if header["t"] != "catalog":
        raise wire.ProtocolError("expected a catalog")
    revision = wire.revision_field(header)
    entries = wire.list_field(header, "files", MAX_CATALOG_FILES)
    if "total" in header:
        start = wire.int_field(header, "start", 0, 2**31)
        total = wire.int_field(header, "total", start + len(entries), 2**31)
    else:
        start, total = 0, len(entries)
    free = wire.int_field(header, "free", 0, MAX_FILE_SIZE * 1024) if "free" in header else None
    files = []
    partial = set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise wire.ProtocolError("a catalog entry is not an object")
        file_id = wire.file_id_field(entry)
        name = wire.text_field(entry, "name", max_length=MAX_PATH_BYTES)
        size = wire.int_field(entry, "size", 0, MAX_FILE_SIZE)
        if not isinstance(entry.get("partial", False), bool):
            raise wire.ProtocolError("field 'partial' is not true or false")
        # A path that breaks the path rule (.., an absolute path, a hidden
        # part) is left out here, before anything else sees it.
        if is_legal_path(name):
            files.append((file_id, name, size))
            if entry.get("partial"):
                partial.add(file_id)
    return revision, start, total, len(entries), files, partial, free


async def fetch_catalog(client):
    """
    C{(revision, [(file_id, name, size)])}: a peer's catalog, fetched page by
    page, at most L{MAX_CATALOG_FILES} entries of it.

    Every page must carry the same revision.  If it changes part way, the
    fetch starts over once; if it changes again, L{CatalogChanged} (the
    caller tries again later).
    """
    view = await fetch_catalog_view(client)
    return view.revision, view.files


async def fetch_catalog_view(client):
    """
    A peer's catalog as a L{CatalogView}, fetched as L{fetch_catalog} does.
    """
    # The cycle collector is left on: an entry is a tuple of a str, a str
    # and an int, which the first collection it survives stops tracking, so
    # 100,000 of them cost a few young collections as they come.  Paused
    # (as a scan pauses it, see heap.py), it walked them all at once when
    # it was let go: 30-50 ms on the reactor, and the fetch took longer.
    for attempt in range(2):
        try:
            return await _fetch_catalog_pages(client)
        except CatalogChanged:
            if attempt:
                raise


async def _fetch_catalog_pages(client):
    revision = total = None
    fetched = 0
    files = []
    partial = set()
    free = None
    while True:
        header, _ = await client.call(wire.request("catalog", start=fetched))
        (page_revision, start, page_total, count, page_files, page_partial,
         page_free) = _parse_catalog_page(header)
        if revision is None:
            revision, total = page_revision, page_total
        elif page_revision != revision:
            raise CatalogChanged("the catalog changed while it was fetched")
        elif page_total != total:
            raise wire.ProtocolError("the catalog changed size but not revision")
        if start != fetched:
            raise wire.ProtocolError("a catalog page we did not ask for")
        fetched += count
        files.extend(page_files)
        partial |= page_partial
        if start == 0:
            free = page_free
        if fetched >= min(total, MAX_CATALOG_FILES):
            if len(files) > MAX_CATALOG_FILES:
                del files[MAX_CATALOG_FILES:]
                # The partial files cut off are not offered either.  (Not
                # cut, every partial one is among the files: no walk of
                # 100,000 entries on the reactor to find that out.)
                partial &= {file_id for file_id, _, _ in files}
            return CatalogView(revision, files, frozenset(partial), free)
        if not count:
            raise wire.ProtocolError("an empty catalog page before the end")
async def fetch_manifest(client, file_id, size_offered=None):
    """
    The manifest of C{file_id}, fetched page by page and checked against the
    id: a peer cannot make us accept hashes for other content.  The hashes
    are gathered in one buffer (32 bytes each, whatever the peer claims) and
    checked against the id before they are split, so that a liar claiming a
    huge file costs at most that buffer, for as long as the fetch.

    @param size_offered: the size the peer's catalog offered the file at, if
        known: a manifest of another size is refused at its first page, so
        that a liar claiming 1 TiB costs one page, not 128 MiB of hashes.
    """
    hashes = bytearray()
    size = None
    while True:
        header, body = await client.call(
            wire.request("manifest", id=file_id, start=len(hashes) // HASH_SIZE)
        )
        if header["t"] != "manifest" or header.get("id") != file_id:
            raise wire.ProtocolError("expected the manifest we asked for")
        page_size = wire.int_field(header, "size", 0, MAX_FILE_SIZE)
        if size is None:
            if size_offered is not None and page_size != size_offered:
                raise ManifestMismatch(
                    f"the manifest is of a file of {page_size} bytes, "
                    f"but its catalog offered {size_offered}"
                )
            size = page_size
        elif page_size != size:
            raise wire.ProtocolError("the manifest changed size between pages")
        count = wire.int_field(header, "count", 0, MANIFEST_PAGE)
        if len(body) != count * HASH_SIZE:
            raise wire.ProtocolError("manifest page of the wrong length")
        hashes += body
        total = chunk_count(size)
        if len(hashes) >= total * HASH_SIZE or count == 0:
            break
    if len(hashes) != chunk_count(size) * HASH_SIZE:
        raise ManifestMismatch("chunk count does not fit the size")
    if compute_file_id(size, (hashes,)) != file_id:
        raise ManifestMismatch("chunk hashes do not match the file id")
    return Manifest.build(size, hashes, file_id)


async def fetch_have(client, file_id, chunk_count):
    """
    Which chunks of C{file_id} the peer holds: C{None} for all of them, else
    one byte per chunk (1 = held), fetched page by page.
    """
    held = bytearray()
    while len(held) < chunk_count:
        start = len(held)
        header, body = await client.call(wire.request("have", id=file_id, start=start))
        if header["t"] != "have" or header.get("id") != file_id:
            raise wire.ProtocolError("expected the chunk map we asked for")
        if header.get("all") is True:
            if start:
                raise wire.ProtocolError("a whole file after a partial page")
            return None
        if wire.int_field(header, "start", 0, chunk_count) != start:
            raise wire.ProtocolError("a chunk map page we did not ask for")
        # Every page but the last is a full one: a peer cannot stall a
        # download with a trickle of tiny pages.
        expected = min(HAVE_PAGE, chunk_count - start)
        if wire.int_field(header, "count", 0, HAVE_PAGE) != expected:
            raise wire.ProtocolError("a chunk map page of the wrong size")
        count = expected
        if len(body) != (count + 7) // 8:
            raise wire.ProtocolError("chunk map page of the wrong length")
        held += wire.expand_bits(body, count)
    return held
