"""
The distributor: this peer as an origin.  Every C{--distribute-interval}
L{Distributor} plans, with L{twisted_p2p.replication.ReplicaPlanner}, which
chunks of its whole files have too few copies and where they go, and pushes
them to those peers' distributee ports (T+3), at most L{PUSHES_AT_ONCE} at
a time (a L{_Place} each).  It also answers a C{pull} on its distributor
port (T+2).  See L{twisted_p2p.distribution} for the whole.
"""

from collections import Counter
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger

from twisted_p2p import wire
from twisted_p2p.client import PeerRefused, SenderClient
from twisted_p2p.distribution import DISTRIBUTEE_OFFSET, _PEER_ID
from twisted_p2p.interfaces import format_address
from twisted_p2p.limits import (
    DISTRIBUTION_ANSWER_TIMEOUT,
    DISTRIBUTION_TRICKLE,
    DISTRIBUTION_YIELD,
    MAX_FILE_SIZE,
    MAX_OFFER_CHUNKS,
    MAX_PULLS_AT_ONCE,
    MAX_PULLS_PER_HOST,
    OFFER_GROUP,
    PENDING_PUSH_SECONDS,
    PUSHES_AT_ONCE,
    SILENT_TARGET_REST,
    SLOW_ANSWER,
)
from twisted_p2p.replication import PeerView, Push, ReplicaPlanner
from twisted_p2p.transfer.framed import RequestRefused
from twisted_p2p.transfer.streams import OpenChunks

log = Logger()


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
