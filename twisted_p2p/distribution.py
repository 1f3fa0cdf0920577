"""
Distribution: each peer's files copied, chunk by chunk, onto other peers'
caches, so that they stay downloadable after it leaves.

 - L{Distributor} (this peer as an origin): every C{--distribute-interval}
   it plans, with L{twisted_p2p.replication.ReplicaPlanner}, which chunks of
   its whole files have too few copies and where they go, and pushes them to
   those peers' distributee ports (T+3).  It also answers a C{pull} on its
   distributor port (T+2): a peer with room asks what it should hold, and
   the answer is pushed to it the same way.
 - L{Distributee} (this peer as a cache): it takes pushed chunks on T+3 into
   its L{twisted_p2p.cache.ChunkCache}, only for a file whose manifest it
   fetched itself from a peer that serves it, only if the hash matches, and
   never over C{--cache-size}; anything else is refused with a reason.
 - L{CachedLocal}: a cached file as the index offers it, so that its chunks
   are served to downloaders like a partial download's.

The wire format is in C{PROTOCOL.md}; the protocols are in
C{transfer/distribution.py}.  The cache's methods block: they run in a
thread.
"""

import re
from collections import Counter
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_p2p import wire
from twisted_p2p.cache import ALREADY_HELD, BAD_HASH, CacheMiss, CacheRefused
from twisted_p2p.client import PeerRefused, SenderClient, fetch_manifest
from twisted_p2p.interfaces import format_address
from twisted_p2p.limits import (
    BAN_ADDRESS_SECONDS,
    CACHE_ANNOUNCE_DELAY,
    CHUNK_SIZE,
    DISTRIBUTION_ANSWER_TIMEOUT,
    DISTRIBUTION_TRICKLE,
    DISTRIBUTION_YIELD,
    MANIFEST_FETCH_TIMEOUT,
    MAX_FILE_SIZE,
    MAX_OFFER_CHUNKS,
    MAX_OFFERED_CHUNKS,
    MAX_OFFERED_CHUNKS_PER_HOST,
    MAX_PULLS_AT_ONCE,
    MAX_PULLS_PER_HOST,
    MAX_STRIKES,
    OFFER_GROUP,
    PENDING_PUSH_SECONDS,
    PUSHES_AT_ONCE,
    SILENT_TARGET_REST,
    SLOW_ANSWER,
)
from twisted_p2p.manifest import ByManifest
from twisted_p2p.replication import PeerView, Push, ReplicaPlanner
from twisted_p2p.transfer.framed import RequestRefused
from twisted_p2p.transfer.streams import CachedChunks, OpenChunks

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


# -- the distributee (T+3) -------------------------------------------------------


class Distributee:
    """
    Owns what this peer accepts into its cache: pushes on its distributee
    port, each in the L{DistributeeSession} of its connection, and the pulls
    it makes when a peer with files appears.

    @param cache: the L{ChunkCache} (its methods run in C{run_in_thread}).
    @param catalog: the L{NetworkCatalog}: who serves a file (its manifest
        is fetched from one of them) and how many copies a chunk has.
    @param open_client: C{open_client(peer)}, a Deferred L{SenderClient} to
        a peer's sender port.
    @param changed: called after the cache changed (a chunk stored or
        evicted), to offer it anew.
    @param offered_whole: C{offered_whole(file_id)}, whether this peer
        offers that file whole already (in its shared folders): its chunks
        are refused as held, since the cache would hold a second copy.
    """

    def __init__(self, cache, catalog, open_client, run_in_thread, clock, stats, changed,
                 offered_whole=lambda file_id: False):
        self.cache = cache
        self._catalog = catalog
        self._open_client = open_client
        self._run = run_in_thread
        self._clock = clock
        self.stats = stats
        self._changed = changed
        self.offered_whole = offered_whole
        self._learning = {}
        self._offered = Counter()
        # Address group -> chunks it pushed that failed their hash; and
        # -> until when its offers are refused, once that reached MAX_STRIKES.
        self._strikes = Counter()
        self._banned = {}

    def strike(self, host):
        """
        C{host} pushed a chunk that failed its hash: after L{MAX_STRIKES}
        such pushes, its address (its /64, for IPv6) is refused for
        L{BAN_ADDRESS_SECONDS}.
        """
        group = wire.address_group(host)
        self._strikes[group] += 1
        if self._strikes[group] >= MAX_STRIKES and not self.is_banned(host):
            del self._strikes[group]
            self._banned[group] = self._clock.seconds() + BAN_ADDRESS_SECONDS
            self.stats.banned_pushers += 1
            log.warn(
                "Distributee: {host} pushed {count} chunks that failed their hash; "
                "its offers are refused for {minutes} min",
                event="pusher-banned",
                host=host,
                count=MAX_STRIKES,
                minutes=round(BAN_ADDRESS_SECONDS / 60),
            )

    def is_banned(self, host):
        group = wire.address_group(host)
        until = self._banned.get(group)
        if until is None:
            return False
        if self._clock.seconds() >= until:
            del self._banned[group]
            return False
        return True

    def offered_by(self, host):
        """
        Chunks the connections from C{host} (its /64, for IPv6) hold room for
        (offered and accepted, not yet pushed), or are asking room for now.
        """
        return self._offered[wire.address_group(host)]

    def _claim(self, host, count):
        group = wire.address_group(host)
        if self._offered[group] + count > MAX_OFFERED_CHUNKS_PER_HOST:
            raise RequestRefused(
                "busy",
                f"this address holds room for {self._offered[group]} chunk(s) not yet pushed; "
                "push them first",
            )
        self._offered[group] += count

    def _unclaim(self, host, count):
        group = wire.address_group(host)
        self._offered[group] -= count
        if self._offered[group] <= 0:
            del self._offered[group]

    @property
    def hosting(self):
        return self.cache.quota > 0

    def session(self, host):
        return DistributeeSession(self, host)

    def _copies(self):
        """
        C{copies(file_id, index)} for the cache's eviction, from a snapshot
        of the catalog taken now (it is called in a thread): the known peers
        that hold the chunk, and this cache if it does.
        """
        others = self._catalog.copies_counter()
        cache = self.cache

        def copies(file_id, index):
            return others(file_id, index) + (1 if cache.holds(file_id, index) else 0)

        return copies

    async def manifest_for(self, file_id, host):
        """
        The manifest of C{file_id}: the cache's, else fetched from a peer the
        catalog says serves the file (one at C{host} first) and stored.

        @raise RequestRefused: no peer serves it, or none gave its manifest.
        """
        manifest = self.cache.manifest(file_id)
        if manifest is not None:
            return manifest
        learning = self._learning.get(file_id)
        if learning is None:
            learning = self._learning[file_id] = defer.ensureDeferred(
                self._learn(file_id, host)
            )
            learning.addBoth(self._learnt, file_id)
        waiter = defer.Deferred()
        learning.addBoth(lambda result: waiter.callback(result) or result)
        result = await waiter
        if isinstance(result, Exception):
            raise result
        return result

    def _learnt(self, result, file_id):
        del self._learning[file_id]
        if isinstance(result, Failure):
            # Handed to every waiter as an exception, never left unhandled.
            return result.value
        return result

    async def _learn(self, file_id, host):
        sources = self._catalog.sources(file_id)
        if not sources:
            raise RequestRefused(
                "unknown-file",
                "no peer this one knows serves that file, so its chunks cannot be checked",
            )
        # Whole holders first, the one at the pushing address before them.
        whole = lambda peer: self._catalog.holds_whole(peer.peer_id, file_id)
        sources.sort(key=lambda peer: (not whole(peer), peer.host != host))
        errors = []
        for peer in sources[:3]:
            name = self._catalog.name_at(peer.peer_id, file_id)
            try:
                client = await self._open_client(peer)
                try:
                    size = self._catalog.size_offered(peer.peer_id, file_id)
                    d = defer.ensureDeferred(fetch_manifest(client, file_id, size))
                    manifest = await d.addTimeout(MANIFEST_FETCH_TIMEOUT, self._clock)
                finally:
                    client.close()
                await self._run(self.cache.add_manifest, manifest, name)
            except CacheRefused as e:
                raise RequestRefused(e.code, e.reason)
            except Exception as e:
                errors.append(f"{peer.label}: {e}")
                continue
            log.info(
                "Caching chunks of {name} for the network (manifest from {peer})",
                event="cache-file",
                name=name,
                peer=peer.label,
            )
            return manifest
        raise RequestRefused(
            "unknown-file", "could not fetch that file's manifest: " + "; ".join(errors)
        )

    def stored(self):
        self._changed()

    # pulls

    def pull_from(self, peer, connect, own_id, port):
        """
        Ask distributor C{peer} (on its T+2) which of its chunks this cache
        should hold; they come on our T+3.  Only with room for a chunk.
        """
        free = self.cache.free
        if not self.hosting or free < CHUNK_SIZE:
            return defer.succeed(None)

        async def pull():
            client = await connect(
                peer.host, peer.transfer_port + DISTRIBUTOR_OFFSET, SenderClient(), peer.peer_id
            )
            try:
                header, _ = await client.call(
                    wire.request("pull", peer=own_id, port=port, free=free)
                )
            finally:
                client.close()
            if header.get("t") != "pulling":
                raise wire.ProtocolError("expected a pulling answer")
            chunks = wire.int_field(header, "chunks", 0, 2**40)
            if chunks:
                log.info(
                    "{peer} will push {chunks} chunk(s) to this cache",
                    event="pull",
                    peer=peer.label,
                    chunks=chunks,
                )

        def failed(failure):
            log.info(
                "Could not ask {peer} what to cache: {error}",
                peer=peer.label,
                error=failure.getErrorMessage(),
            )

        return defer.ensureDeferred(pull()).addErrback(failed)


class DistributeeSession:
    """
    Owns one connection to our distributee port: the room it was given by
    its offers (reservations), until it pushes those chunks or closes.
    """

    def __init__(self, owner, host):
        self._owner = owner
        self.host = host
        self.reservations = {}
        self.files = set()
        self.closed = False

    def handle(self, header, body):
        """
        The C{(reply, body)} for one frame, or a Deferred of it.

        @raise wire.ProtocolError: a malformed frame.
        @raise RequestRefused: a refusal, with a reason.
        """
        wire.check_version(header)
        kind = header["t"]
        if kind == "offer":
            if body:
                raise wire.ProtocolError("an offer has no body")
            return defer.ensureDeferred(self._offer(header))
        if kind == "push":
            return defer.ensureDeferred(self._push(header, body))
        raise wire.ProtocolError(f"unknown request {kind!r}")

    async def _offer(self, header):
        owner = self._owner
        file_id = wire.file_id_field(header)
        chunks = wire.list_field(header, "chunks", MAX_OFFER_CHUNKS)
        if not chunks or not all(type(i) is int and 0 <= i for i in chunks):
            raise wire.ProtocolError("an offer names chunk indexes")
        if len(set(chunks)) != len(chunks):
            raise wire.ProtocolError("a chunk is offered twice")
        if not owner.hosting:
            owner.stats.refused_offers += 1
            raise RequestRefused("hosting-off", "this peer hosts nothing (--cache-size 0)")
        if owner.is_banned(self.host):
            owner.stats.refused_offers += 1
            raise RequestRefused(
                "banned", "this address pushed chunks that failed their hash; try again later"
            )
        if owner.offered_whole(file_id):
            # Held here whole: the pusher counts it as held, as it should.
            owner.stats.refused_offers += 1
            refused = [{"i": index, "code": ALREADY_HELD} for index in chunks]
            return {"t": "offered", "id": file_id, "accepted": [], "refused": refused}, b""
        if len(self.reservations) + len(chunks) > MAX_OFFERED_CHUNKS:
            raise wire.ProtocolError("too many chunks offered and not pushed")
        try:
            owner._claim(self.host, len(chunks))
        except RequestRefused:
            owner.stats.refused_offers += 1
            raise
        accepted, refused = [], []
        try:
            try:
                await owner.manifest_for(file_id, self.host)
                self.files.add(file_id)
            except RequestRefused:
                owner.stats.refused_offers += 1
                raise
            copies = owner._copies()
            results = await owner._run(_reserve_all, owner.cache, file_id, chunks, copies)
            for index, outcome in zip(chunks, results):
                if isinstance(outcome, CacheRefused):
                    refused.append({"i": index, "code": outcome.code})
                elif self.closed:
                    outcome.release()
                else:
                    self.reservations[(file_id, index)] = outcome
                    accepted.append(index)
        finally:
            # What this session keeps stays claimed until pushed or closed.
            owner._unclaim(self.host, len(chunks) - len(accepted))
        if refused:
            owner.stats.refused_offers += 1
        owner.stored()  # evictions may have made room
        return {"t": "offered", "id": file_id, "accepted": accepted, "refused": refused}, b""

    async def _push(self, header, body):
        owner = self._owner
        file_id = wire.file_id_field(header)
        index = wire.int_field(header, "i", 0, MAX_FILE_SIZE // CHUNK_SIZE)
        reservation = self.reservations.pop((file_id, index), None)
        if reservation is None:
            owner.stats.refused_pushes += 1
            code = "hosting-off" if not owner.hosting else "not-offered"
            raise RequestRefused(code, "a chunk must be offered, and accepted, before it is pushed")
        owner._unclaim(self.host, 1)
        try:
            await owner._run(owner.cache.put, file_id, index, [body], reservation)
        except CacheRefused as e:
            owner.stats.refused_pushes += 1
            if e.code == BAD_HASH:
                owner.strike(self.host)
            log.info(
                "Refused chunk {index} of {file_id} from {host}: {reason}",
                event="push-refused",
                index=index,
                file_id=file_id[:8],
                host=self.host,
                reason=e.reason,
            )
            raise RequestRefused(e.code, e.reason)
        finally:
            reservation.release()
        owner.stats.stored_chunks += 1
        owner.stats.stored_bytes += len(body)
        owner.stored()
        return {"t": "stored", "id": file_id, "i": index}, b""

    def close(self):
        self.closed = True
        reservations, self.reservations = self.reservations, {}
        if reservations:
            self._owner._unclaim(self.host, len(reservations))
        for reservation in reservations.values():
            reservation.release()
        # A manifest fetched for offers that came to nothing goes too.
        for file_id in self.files:
            d = self._owner._run(self._owner.cache.forget_if_empty, file_id)
            d.addErrback(lambda f: log.failure("Tidying the cache failed", f))


def _reserve_all(cache, file_id, chunks, copies):
    """
    A reservation, or the L{CacheRefused}, for each of C{chunks}.  Blocks.
    """
    results = []
    for index in chunks:
        try:
            results.append(cache.reserve(file_id, index, copies))
        except CacheRefused as e:
            results.append(e)
    return results


# -- the distributor (T+2, and pushes to T+3) ---------------------------------------


@dataclass(frozen=True)
class _Target:
    peer_id: str
    host: str
    port: int
    label: str


class Distributor:
    """
    Owns this peer's distribution of its own files: the rounds, the pushes
    in flight, and the copies pushed that the others' catalogs do not show
    yet (counted as held meanwhile, so they are not sent twice).

    @param own_id: this peer's id.
    @param index: the L{SharedIndex}: the whole files it distributes.
    @param catalog: the L{NetworkCatalog}: what the others hold, their room.
    @param table: the L{PeerTable}: where they are.
    @param uploads: the L{Uploads}: downloads go first, and distribution
        shares its upload rate (C{uploads.bucket}).
    @param connect: C{connect(host, port, protocol, peer_id)}, a Deferred
        fired when connected (the group's TLS in a private group).
    @param replicas: copies of each chunk wanted outside its origin.
    @param interval: seconds between rounds (the budget of a round, with an
        upload rate).
    """

    def __init__(self, own_id, index, catalog, table, uploads, connect, run_in_thread, clock,
                 replicas, interval, stats):
        self.own_id = own_id
        self._index = index
        self._catalog = catalog
        self._table = table
        self._uploads = uploads
        self._connect = connect
        self._run = run_in_thread
        self._clock = clock
        self.replicas = replicas
        self.interval = interval
        self.stats = stats
        self._pending = {}
        self._jobs = set()
        self._clients = set()
        self._limit = defer.DeferredSemaphore(PUSHES_AT_ONCE)
        #: peer id -> until when a target that did not answer gets no push.
        self._silent = {}
        self._round = None
        self._pulls = Counter()
        # While downloads are served, no chunk goes before this time.
        self._trickle_at = 0.0
        self.stopped = False

    # planning

    def _planner(self):
        files = {}
        for local in self._index.files():
            files.setdefault(local.file_id, local.manifest)
        if not files or self.replicas == 0:
            return None
        peers = []
        for peer in self._table.peers():
            if peer.peer_id == self.own_id:
                continue
            now = self._clock.seconds()
            silent = self._silent.get(peer.peer_id, 0) > now
            peers.append(PeerView(
                peer.peer_id,
                # What it holds still counts; it is given nothing more.
                None if silent else self._catalog.free_of(peer.peer_id),
                self._catalog.holdings_of(peer.peer_id),
            ))
        now = self._clock.seconds()
        for peer_id, until in list(self._silent.items()):
            if until <= now:
                del self._silent[peer_id]
        for key, until in list(self._pending.items()):
            if until <= now or self._catalog_shows(key):
                del self._pending[key]
        # A peer that pulled before we knew it: what is on its way to it
        # still counts.
        known = {view.peer_id for view in peers} | {self.own_id}
        for peer_id in sorted({key[0] for key in self._pending} - known):
            peers.append(PeerView(peer_id))
        return ReplicaPlanner(self.own_id, files, peers, self.replicas, pending=list(self._pending))

    def _catalog_shows(self, key):
        return self._catalog.holds_chunk(*key)

    def _budget(self):
        bucket = self._uploads.bucket
        return int(bucket.rate * self.interval) if bucket is not None else None

    def round(self):
        """
        One distribution round: push what the plan gives this peer, unless
        the last round's pushes are still on their way.
        """
        if self.stopped or self._round is not None:
            return
        planner = self._planner()
        if planner is None:
            return
        self.stats.rounds += 1
        pushes = planner.plan(budget=self._budget())
        if not pushes:
            return
        jobs = []
        for push in pushes:
            peer = self._table.get(push.target)
            if peer is None:
                continue
            target = _Target(
                peer.peer_id, peer.host, peer.transfer_port + DISTRIBUTEE_OFFSET, peer.label
            )
            jobs.append(self._start(target, push)[0])
        log.info(
            "Distribution round: {chunks} chunk(s) to {peers} peer(s)",
            event="distribution-round",
            chunks=sum(len(p.chunks) for p in pushes),
            peers=len({p.target for p in pushes}),
        )
        self._round = defer.DeferredList(jobs)
        self._round.addBoth(self._round_over)

    def _round_over(self, _):
        self._round = None

    def pull(self, header, host):
        """
        Answer a C{pull} from C{host}: what the plan gives the asker, pushed
        to its distributee port at C{host}.
        """
        wire.check_version(header)
        if header["t"] != "pull":
            raise wire.ProtocolError(f"unknown request {header['t']!r}")
        peer_id = wire.text_field(header, "peer", _PEER_ID)
        port = wire.port_field(header, "port")
        free = wire.int_field(header, "free", 0, MAX_FILE_SIZE * 1024)
        self._silent.pop(peer_id, None)  # it asks: it answers
        group = wire.address_group(host)
        if (self._pulls[group] >= MAX_PULLS_PER_HOST
                or sum(self._pulls.values()) >= MAX_PULLS_AT_ONCE):
            raise RequestRefused(
                "busy", "this peer is still pushing what an earlier pull asked; ask again later"
            )
        planner = self._planner() if not self.stopped else None
        wanted = planner.wanted(peer_id, free, budget=self._budget()) if planner else {}
        pushes = [
            Push(peer_id, file_id, chunks, 0) for file_id, chunks in wanted.items() if chunks
        ]
        label = format_address(host, port)
        if pushes:
            # Done, not settled: a pull's pushes hold its address's place
            # until they are over, slow or not.
            jobs = [self._start(_Target(peer_id, host, port, label), push)[1] for push in pushes]
            self._pulls[group] += 1
            defer.DeferredList(jobs).addBoth(lambda _: self._pulled(group))
        chunks = sum(len(p.chunks) for p in pushes)
        return {"t": "pulling", "chunks": chunks}, b""

    def _pulled(self, group):
        self._pulls[group] -= 1
        if self._pulls[group] <= 0:
            del self._pulls[group]

    # pushing

    def _start(self, target, push):
        """
        Push C{push}'s chunks to C{target}, in one of the L{PUSHES_AT_ONCE}
        places; they count as held there from now on.

        @return: C{(settled, done)}: Deferreds that fire when the push is
            over, or (C{settled}) also when it gives up its place, its
            target being slow to answer (L{SLOW_ANSWER}).
        """
        until = self._clock.seconds() + PENDING_PUSH_SECONDS
        for index in push.chunks:
            self._pending[(target.peer_id, push.file_id, index)] = until
        settled = defer.Deferred()

        def settle():
            if not settled.called:
                settled.callback(None)

        def run(_):
            place = _Place(self._limit, settle)
            pushing = defer.ensureDeferred(self._push(target, push, place))
            return pushing.addBoth(place.leave_with)

        d = self._limit.acquire().addCallback(run)
        d.addErrback(self._push_failed, target, push)
        self._jobs.add(d)
        d.addBoth(lambda result: self._jobs.discard(d) or settle() or result)
        return settled, d

    def _forget(self, target, file_id, chunks):
        for index in chunks:
            self._pending.pop((target.peer_id, file_id, index), None)

    def _push_failed(self, failure, target, push):
        self._forget(target, push.file_id, push.chunks)
        if self.stopped:
            return
        if failure.check(defer.TimeoutError):
            # It takes connections and never answers: left alone for a
            # while, or every round would wait on it again.
            self._silent[target.peer_id] = self._clock.seconds() + SILENT_TARGET_REST
            log.info(
                "{peer} did not answer a push of {file_id} in {timeout:.0f} s; "
                "no more pushes to it for {rest:.0f} min, unless it pulls",
                event="push-target-silent",
                peer=target.label,
                file_id=push.file_id[:8],
                timeout=DISTRIBUTION_ANSWER_TIMEOUT,
                rest=SILENT_TARGET_REST / 60,
            )
            return
        log.info(
            "Could not push chunks of {file_id} to {peer}: {error}",
            event="push-failed",
            file_id=push.file_id[:8],
            peer=target.label,
            error=failure.getErrorMessage(),
        )

    async def _push(self, target, push, place=None):
        if self.stopped:
            raise defer.CancelledError()
        local = self._index.by_id(push.file_id)
        if local is None:
            raise ValueError("the file is no longer shared")
        opened = await self._run(OpenChunks, local.path, local.manifest, local.signature)
        try:
            client = await self._connect(target.host, target.port, SenderClient(), target.peer_id)
        except BaseException:
            opened.close()
            raise
        self._clients.add(client)
        sent = chunks_sent = 0
        try:
            chunks = list(push.chunks)
            for start in range(0, len(chunks), OFFER_GROUP):
                group = chunks[start : start + OFFER_GROUP]
                accepted = await self._offer(client, target, push.file_id, group, place)
                for index in accepted:
                    await self._take_turn(local.manifest.chunk_length(index))
                    data = await self._run(opened.read, opened.segments(index, 1))
                    if self.stopped:
                        raise defer.CancelledError()
                    self.stats.pushed_chunks += 1
                    self.stats.pushed_bytes += len(data)
                    sent += len(data)
                    chunks_sent += 1
                    try:
                        await self._call(client, wire.request("push", id=push.file_id, i=index),
                                         data, place)
                    except PeerRefused as e:
                        self._forget(target, push.file_id, [index])
                        log.info(
                            "{peer} refused chunk {index} of {name}: {reason}",
                            event="push-refused",
                            peer=target.label,
                            index=index,
                            name=local.name,
                            reason=e.message,
                        )
        finally:
            self._clients.discard(client)
            client.close()
            opened.close()
        log.info(
            "Pushed {chunks} chunk(s), {bytes} B of {name} to {peer}",
            event="push-done",
            chunks=chunks_sent,
            bytes=sent,
            name=local.name,
            peer=target.label,
        )

    async def _offer(self, client, target, file_id, group, place=None):
        """
        Offer C{group}; the chunks the target takes.  Those refused as held
        stay counted as held there; the others are forgotten.
        """
        try:
            header, _ = await self._call(
                client, wire.request("offer", id=file_id, chunks=group), place=place
            )
        except PeerRefused as e:
            self._forget(target, file_id, group)
            raise PeerRefused(e.code, f"refused the offer: {e.message}")
        if header.get("t") != "offered" or header.get("id") != file_id:
            raise wire.ProtocolError("expected an answer to our offer")
        accepted = wire.list_field(header, "accepted", MAX_OFFER_CHUNKS)
        refused = wire.list_field(header, "refused", MAX_OFFER_CHUNKS)
        offered = set(group)
        if not all(type(i) is int and i in offered for i in accepted):
            raise wire.ProtocolError("accepted chunks we did not offer")
        held = set()
        for entry in refused:
            if isinstance(entry, dict) and entry.get("code") == "already-held":
                held.add(entry.get("i"))
        self._forget(target, file_id, [i for i in group if i not in held and i not in accepted])
        if refused:
            self.stats.refused_offers += 1
        return [i for i in group if i in set(accepted)]

    def _call(self, client, header, body=b"", place=None):
        d = client.call(header, body).addTimeout(DISTRIBUTION_ANSWER_TIMEOUT, self._clock)
        if place is not None and place.held and not d.called:
            # An answer that is slow to come (a manifest fetched first, or a
            # target that never answers) is waited for outside the limit.
            slow = self._clock.callLater(SLOW_ANSWER, place.leave)
            d.addBoth(lambda result: (slow.cancel() if slow.active() else None) or result)
        return d

    async def _take_turn(self, length):
        """
        Wait while downloads use the uploads (they go first), but for one
        chunk every L{DISTRIBUTION_TRICKLE} seconds among all the pushes
        waiting, then for the upload rate's leave to send C{length} bytes.
        """
        waited = False
        while self._uploads.active > 0 and not self.stopped:
            now = self._clock.seconds()
            if not waited:
                self._trickle_at = max(self._trickle_at, now + DISTRIBUTION_TRICKLE)
                waited = True
            elif now >= self._trickle_at:
                self._trickle_at = now + DISTRIBUTION_TRICKLE
                break
            await task.deferLater(self._clock, DISTRIBUTION_YIELD, lambda: None)
        if self.stopped:
            raise defer.CancelledError()
        bucket = self._uploads.bucket
        if bucket is not None:
            await bucket.take(length)

    def stop(self):
        """
        Stop: no more rounds, and the pushes under way end.
        """
        self.stopped = True
        for client in list(self._clients):
            client.close()


class _Place:
    """
    One of a distributor's L{PUSHES_AT_ONCE} places, held by a push, and
    left once: when the push is over, or earlier, when its target is slow to
    answer (it is then waited for outside the limit).
    """

    def __init__(self, limit, left):
        self._limit = limit
        self._left = left
        self.held = True

    def leave(self):
        if self.held:
            self.held = False
            self._limit.release()
            self._left()

    def leave_with(self, result):
        self.leave()
        return result


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
