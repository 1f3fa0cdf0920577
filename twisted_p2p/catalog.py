"""
The network catalog: what the other peers offer.
"""

from dataclasses import dataclass

from twisted.logger import Logger

log = Logger()

#: Seconds before a failed catalog fetch is tried again.
RETRY_DELAY = 2.0


@dataclass(frozen=True)
class Offer:
    """
    One file content on the network: its id, a display name, its size, and
    the peers that hold it.
    """

    file_id: str
    name: str
    size: int
    peers: tuple

    @property
    def short_id(self):
        return self.file_id[:8]


class NetworkCatalog:
    """
    Owns what each known peer offers, as last fetched from its sender port.

    It observes the L{PeerTable}: a peer that joins, restarts or announces a
    new revision has its catalog fetched again; a peer that leaves takes its
    files with it.

    @param table: the L{PeerTable}.
    @param fetch: C{fetch(peer)} giving a Deferred of C{(revision, files)}
        where files are C{(file_id, name, size)}.
    @param clock: an L{IReactorTime}, for retries.
    """

    def __init__(self, table, fetch, clock):
        self._table = table
        self._fetch = fetch
        self._clock = clock
        self._files = {}
        self._revisions = {}
        self._fetching = {}
        self._retries = {}
        table.subscribe(self)

    # PeerTable observer

    def joined(self, peer):
        self.refresh(peer.peer_id)

    def changed(self, peer, old_revision):
        if peer.revision != self._revisions.get(peer.peer_id):
            self.refresh(peer.peer_id)

    def left(self, peer, reason):
        self._files.pop(peer.peer_id, None)
        self._revisions.pop(peer.peer_id, None)
        retry = self._retries.pop(peer.peer_id, None)
        if retry is not None and retry.active():
            retry.cancel()

    # fetching

    def refresh(self, peer_id):
        """
        Fetch C{peer_id}'s catalog, unless a fetch is already on its way (then
        fetch once more after it).
        """
        if peer_id in self._fetching:
            self._fetching[peer_id] = True
            return
        peer = self._table.get(peer_id)
        if peer is None:
            return
        self._fetching[peer_id] = False
        d = self._fetch(peer)
        d.addCallbacks(self._fetched, self._failed, (peer_id,), None, (peer,))
        d.addBoth(self._done, peer_id)

    def _fetched(self, result, peer_id):
        if peer_id not in self._table:
            return
        revision, files = result
        self._files[peer_id] = list(files)
        self._revisions[peer_id] = revision

    def _failed(self, failure, peer):
        log.info(
            "Could not fetch the catalog of {peer}: {error}",
            peer=peer.label,
            error=failure.getErrorMessage(),
        )
        if peer.peer_id in self._table and peer.peer_id not in self._retries:
            self._retries[peer.peer_id] = self._clock.callLater(
                RETRY_DELAY, self._retry, peer.peer_id
            )

    def _retry(self, peer_id):
        del self._retries[peer_id]
        self.refresh(peer_id)

    def _done(self, _, peer_id):
        again = self._fetching.pop(peer_id, False)
        if again:
            self.refresh(peer_id)

    # queries

    def offers(self):
        """
        Every file content the known peers offer, one L{Offer} per id.
        """
        by_id = {}
        for peer in self._table.peers():
            for file_id, name, size in self._files.get(peer.peer_id, ()):
                entry = by_id.setdefault(file_id, [name, size, []])
                if peer not in entry[2]:
                    entry[2].append(peer)
        return sorted(
            (Offer(fid, name, size, tuple(peers)) for fid, (name, size, peers) in by_id.items()),
            key=lambda o: (o.name, o.file_id),
        )

    def files_of(self, peer_id):
        return list(self._files.get(peer_id, ()))

    def sources(self, file_id):
        """
        The known peers that hold C{file_id}.
        """
        for offer in self.offers():
            if offer.file_id == file_id:
                return list(offer.peers)
        return []
