"""
The distributee: this peer as a cache.  L{Distributee} takes chunks pushed
on its distributee port (T+3) into its L{twisted_p2p.cache.ChunkCache},
each in the L{DistributeeSession} of its connection: only for a file whose
manifest it fetched itself from a peer that serves it, only if the hash
matches, and never over C{--cache-size}; anything else is refused with a
reason.  It also pulls from a peer with files that appears.  See
L{twisted_p2p.distribution} for the whole.
"""

from collections import Counter

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_p2p import wire
from twisted_p2p.cache import ALREADY_HELD, BAD_HASH, CacheRefused
from twisted_p2p.client import SenderClient, fetch_manifest
from twisted_p2p.distribution import DISTRIBUTOR_OFFSET
from twisted_p2p.limits import (
    BAN_ADDRESS_SECONDS,
    CHUNK_SIZE,
    MANIFEST_FETCH_TIMEOUT,
    MAX_FILE_SIZE,
    MAX_OFFER_CHUNKS,
    MAX_OFFERED_CHUNKS,
    MAX_OFFERED_CHUNKS_PER_HOST,
    MAX_STRIKES,
)
from twisted_p2p.transfer.framed import RequestRefused

log = Logger()


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
