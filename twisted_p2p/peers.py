"""
The peer table: who is out there, and who has gone quiet.
"""

from collections import Counter
from dataclasses import dataclass, field

from twisted_p2p.limits import MAX_PEERS, MAX_PEERS_PER_HOST


@dataclass
class Peer:
    """
    One known peer, as last heard.

    C{host} and C{udp_port} are where its datagrams come from; a goodbye is
    honoured only from there, and they change only when the peer restarts
    (see L{PeerTable.heard}).  Its transfer ports are derived from
    C{transfer_port} on C{host}.
    """

    peer_id: str
    instance_id: str
    host: str
    udp_port: int
    transfer_port: int
    revision: str
    last_seen: float
    expiry: object = field(default=None, repr=False, compare=False)

    @property
    def short_id(self):
        return self.peer_id[:8]

    @property
    def label(self):
        """
        How the console names this peer: its address and transfer port.
        """
        return f"{self.host}:{self.transfer_port}"

    @property
    def sender_port(self):
        return self.transfer_port + 1


class PeerTable:
    """
    Owns the set of known peers, one entry per peer id, and their expiry.

    Observers registered with L{subscribe} get C{joined(peer)},
    C{changed(peer, old_revision)} and C{left(peer, reason)} calls.

    The table is bounded, because anyone on the LAN can invent peer ids: at
    most C{max_peers} entries, and at most C{max_per_host} from one source
    address.  Peers already known are refreshed whatever the count.

    @param clock: an L{IReactorTime}, for expiry.
    @param timeout: seconds of silence after which a peer is dropped.
    """

    def __init__(self, clock, timeout, max_peers=MAX_PEERS, max_per_host=MAX_PEERS_PER_HOST):
        self._clock = clock
        self._timeout = timeout
        self._max_peers = max_peers
        self._max_per_host = max_per_host
        self._peers = {}
        self._per_host = Counter()
        self._observers = []

    def subscribe(self, observer):
        self._observers.append(observer)

    def _tell(self, event, *args):
        for observer in list(self._observers):
            getattr(observer, event)(*args)

    def __len__(self):
        return len(self._peers)

    def __contains__(self, peer_id):
        return peer_id in self._peers

    def get(self, peer_id):
        return self._peers.get(peer_id)

    def peers(self):
        """
        The known peers, by address.
        """
        return sorted(self._peers.values(), key=lambda p: (p.host, p.transfer_port))

    def heard(self, announce, host, udp_port):
        """
        Record an announce from C{(host, udp_port)}.

        An entry's address changes only with a new instance id (a restart):
        while it is alive, an announce naming its current instance from
        another address is ignored, so that nobody can move a peer to their
        own address and then say goodbye for it from there.

        @return: C{"new"} for a peer id we did not know, C{"restarted"} for a
            known one with a new instance id, C{"changed"} for a changed
            transfer port or revision, C{"same"} for a refresh; or, for an
            announce that changed nothing, C{"full"} (a new id and no room
            for it, overall or for its host) or C{"moved"} (the current
            instance from another address).
        """
        now = self._clock.seconds()
        peer = self._peers.get(announce.peer_id)
        if peer is None:
            if len(self._peers) >= self._max_peers or self._per_host[host] >= self._max_per_host:
                return "full"
            peer = Peer(
                announce.peer_id,
                announce.instance_id,
                host,
                udp_port,
                announce.transfer_port,
                announce.revision,
                now,
            )
            self._peers[peer.peer_id] = peer
            self._per_host[host] += 1
            self._arm(peer)
            self._tell("joined", peer)
            return "new"

        restarted = peer.instance_id != announce.instance_id
        if not restarted and (peer.host, peer.udp_port) != (host, udp_port):
            return "moved"
        old_revision = peer.revision
        old_transfer_port = peer.transfer_port
        if peer.host != host:
            self._per_host[peer.host] -= 1
            if not self._per_host[peer.host]:
                del self._per_host[peer.host]
            self._per_host[host] += 1
        peer.instance_id = announce.instance_id
        peer.host, peer.udp_port = host, udp_port
        peer.transfer_port = announce.transfer_port
        peer.revision = announce.revision
        peer.last_seen = now
        self._arm(peer)
        if restarted:
            outcome = "restarted"
        elif (old_transfer_port, old_revision) != (announce.transfer_port, announce.revision):
            outcome = "changed"
        else:
            return "same"
        self._tell("changed", peer, None if outcome == "restarted" else old_revision)
        return outcome

    def goodbye(self, goodbye, host, udp_port):
        """
        Drop a peer that said goodbye, if the goodbye came from the address the
        peer announced from and names its current instance.

        @return: whether the peer was dropped.
        """
        peer = self._peers.get(goodbye.peer_id)
        if peer is None:
            return False
        if (peer.host, peer.udp_port, peer.instance_id) != (
            host,
            udp_port,
            goodbye.instance_id,
        ):
            return False
        self._drop(peer, "said goodbye")
        return True

    def forget(self, peer_id, reason):
        """
        Drop a peer for C{reason}, if known.
        """
        peer = self._peers.get(peer_id)
        if peer is not None:
            self._drop(peer, reason)

    def clear(self):
        """
        Forget everyone, cancelling every expiry (on shutdown).
        """
        for peer in list(self._peers.values()):
            if peer.expiry is not None and peer.expiry.active():
                peer.expiry.cancel()
        self._peers.clear()
        self._per_host.clear()

    def _arm(self, peer):
        if peer.expiry is not None and peer.expiry.active():
            peer.expiry.reset(self._timeout)
        else:
            peer.expiry = self._clock.callLater(self._timeout, self._expire, peer.peer_id)

    def _expire(self, peer_id):
        peer = self._peers.get(peer_id)
        if peer is not None:
            self._drop(peer, "timed out")

    def _drop(self, peer, reason):
        if peer.expiry is not None and peer.expiry.active():
            peer.expiry.cancel()
        del self._peers[peer.peer_id]
        self._per_host[peer.host] -= 1
        if not self._per_host[peer.host]:
            del self._per_host[peer.host]
        self._tell("left", peer, reason)
