"""
Distribution: each peer's files copied, chunk by chunk, onto other peers'
caches, so that they stay downloadable after it leaves.

 - L{twisted_p2p.distributor.Distributor} (this peer as an origin): every
   C{--distribute-interval} it plans, with
   L{twisted_p2p.replication.ReplicaPlanner}, which chunks of its whole files
   have too few copies and where they go, and pushes them to those peers'
   distributee ports (T+3).  It also answers a C{pull} on its distributor
   port (T+2): a peer with room asks what it should hold, and the answer is
   pushed to it the same way.
 - L{twisted_p2p.distributee.Distributee} (this peer as a cache): it takes
   pushed chunks on T+3 into its L{twisted_p2p.cache.ChunkCache}, only for
   a file whose manifest it fetched itself from a peer that serves it, only
   if the hash matches, and never over C{--cache-size}; anything else is
   refused with a reason.
 - Here, what both sides and the service share: the ports' offsets, the
   L{DistributionStats}, L{CachedLocal} (a cached file as the index offers
   it, so that its chunks are served to downloaders like a partial
   download's) and the L{CacheAnnouncer}.

The wire format is in C{PROTOCOL.md}; the protocols are in
C{transfer/distribution.py}.  The cache's methods block: they run in a
thread.
"""

import re
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from twisted_p2p.cache import CacheMiss
from twisted_p2p.limits import CACHE_ANNOUNCE_DELAY
from twisted_p2p.manifest import ByManifest
from twisted_p2p.transfer.streams import CachedChunks

log = Logger()

#: Offsets of the distribution ports from the transfer port T.
DISTRIBUTOR_OFFSET = 2
DISTRIBUTEE_OFFSET = 3

_PEER_ID = re.compile(r"\A[0-9a-f]{32}\Z")


class DistributionStats:
    """
    Counters of what distribution sent and took, for the C{cache} command
    (and the tests that check there is no flooding).
    """

    def __init__(self):
        self.pushed_chunks = 0
        self.pushed_bytes = 0
        self.refused_offers = 0
        self.stored_chunks = 0
        self.stored_bytes = 0
        self.refused_pushes = 0
        #: Addresses whose offers were refused for pushing bad chunks.
        self.banned_pushers = 0
        self.rounds = 0

    def as_dict(self):
        return dict(vars(self))


# -- serving cached chunks ---------------------------------------------------


class _CachedMap:
    """
    A cached file's chunk map as the sender port reads it (C{snapshot()}, as
    L{twisted_p2p.storage.ChunkMap} gives one), read from the cache live.
    """

    def __init__(self, cache, file_id):
        self._cache = cache
        self._file_id = file_id

    def snapshot(self):
        return self._cache.bitmap(self._file_id)

    def __contains__(self, index):
        return self._cache.holds(self._file_id, index)


@dataclass(frozen=True, eq=False)
class CachedLocal(ByManifest):
    """
    A file of which this peer caches chunks for others, as the index offers
    it: like a L{twisted_p2p.index.PartialLocal}, but its chunks are files
    of their own in the cache.

    @ivar held: how many of its chunks were held when it was offered (part
        of the revision, so that the others fetch the catalog again).
    """

    name: str
    manifest: object
    cache: object
    held: int

    @property
    def path(self):
        return f"cached {self.name}"

    @property
    def chunks(self):
        return _CachedMap(self.cache, self.file_id)

    def holds(self, index):
        return self.cache.holds(self.file_id, index)

    def open_chunks(self):
        """
        The L{CachedChunks} a stream sends from.
        """
        file_id = self.file_id

        def open_chunk(index):
            try:
                return self.cache.open_chunk(file_id, index)
            except CacheMiss:
                raise OSError(f"chunk {index} is no longer cached")

        return CachedChunks(self.name, self.manifest, open_chunk)


def cached_locals(cache):
    """
    A L{CachedLocal} for every file the cache holds chunks of.  Blocks
    briefly (the cache's lock).
    """
    found = []
    for cached in cache.files():
        manifest = cache.manifest(cached.file_id)
        if manifest is not None:
            found.append(CachedLocal(cached.name, manifest, cache, cached.chunks))
    return found


def _drop_files(cache, file_ids):
    """
    Drop C{file_ids} from C{cache}; the bytes freed of each.  Blocks.
    """
    return [cache.drop_file(file_id) for file_id in file_ids]



class CacheAnnouncer:
    """
    Owns telling the index what the cache holds: at most once every
    L{CACHE_ANNOUNCE_DELAY} seconds while it changes, so that a burst of
    pushes changes the peer's revision (and its announce) once.

    It also keeps the cache from holding a second copy of what the index
    offers whole: when the index changes (a download finished into a shared
    C{downloads/}, a file put into C{shared/}), each file of the cache that
    it now offers whole is dropped from the cache (L{index_changed}).  The
    whole file serves every chunk the cache did, and the room goes to other
    peers' files.
    """

    def __init__(self, cache, index, run_in_thread, clock, delay=CACHE_ANNOUNCE_DELAY):
        self._cache = cache
        self._index = index
        self._run = run_in_thread
        self._clock = clock
        self._delay = delay
        self._call = None
        self.stopped = False
        #: The ids of the files the index was last told the cache holds.
        self._published = frozenset()
        self._dropping = set()

    def changed(self):
        if self._call is None and not self.stopped:
            self._call = self._clock.callLater(self._delay, self.publish_now)

    def publish_now(self):
        self._call = None
        if self.stopped:
            return defer.succeed(None)
        d = self._run(cached_locals, self._cache)

        def publish(found):
            if not self.stopped:
                self._published = frozenset(cached.file_id for cached in found)
                self._index.set_cached(found)

        d.addCallback(publish)
        d.addErrback(lambda f: log.failure("Listing the cache failed", f))
        return d

    def index_changed(self):
        """
        The index changed: drop from the cache the files it now offers
        whole (in a thread), then offer the cache anew.
        """
        index = self._index
        whole = sorted(
            file_id
            for file_id in self._published - self._dropping
            if index.by_id(file_id) is not None
        )
        if self.stopped or not whole:
            return
        self._dropping.update(whole)
        d = self._run(_drop_files, self._cache, whole)

        def dropped(freed):
            for file_id, size in zip(whole, freed):
                if size:
                    log.info(
                        "Cache: gave back {size} B of {name}: this peer offers it whole now",
                        event="cache-dropped-whole",
                        id=file_id,
                        name=getattr(index.by_id(file_id), "name", file_id[:16]),
                        size=size,
                    )
            self._published = self._published.difference(whole)
            self.changed()

        d.addCallback(dropped)
        d.addErrback(lambda f: log.failure("Dropping files held whole from the cache failed", f))
        d.addBoth(lambda _: self._dropping.difference_update(whole))
        return d

    def stop(self):
        self.stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
