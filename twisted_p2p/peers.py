"""
The peer table: who is out there, where each one is heard from, and who has
gone quiet.
"""

import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from twisted_p2p.interfaces import format_address, is_link_local
from twisted_p2p.limits import MAX_ADDRESSES_PER_PEER, MAX_DEPARTED, MAX_PEERS, MAX_PEERS_PER_HOST
from twisted_p2p.wire import address_group

_DEPARTED = MAX_DEPARTED


@dataclass
class Address:
    """
    One place a peer's datagrams come from: a source address and UDP port,
    and which of our sockets heard it (C{via}, see
    L{twisted_p2p.interfaces.Link}).
    """

    host: str
    udp_port: int
    via: object
    last_heard: float


@dataclass
class Peer:
    """
    One known peer, as last heard.

    A peer may be heard from several addresses (IPv4 and IPv6, or a host on
    two LANs); L{addresses} holds them all, oldest first.  C{udp_port} and
    C{via} are those of its I{main} address: the first one heard that is
    still heard, IPv4 before IPv6, and a link-local one only when there is
    no other.  C{host} is
    where its transfer ports are reached: the address it advertises
    (C{--advertise-host}), else its main address.

    @ivar name: the name it gives itself (remote text, cleaned), or C{None}.
    @ivar fingerprint: in a private group, the short fingerprint of its
        public key (L{twisted_p2p.identity.fingerprint_of}) once a
        connection with it has proven that it holds the key of its peer id;
        C{None} until then, and always in an open group.
    """

    peer_id: str
    instance_id: str
    host: str
    udp_port: int
    transfer_port: int
    revision: str
    last_seen: float
    name: object = None
    advertised: object = None
    via: object = None
    fingerprint: object = field(default=None, compare=False)
    main: object = field(default=None, repr=False, compare=False)
    addresses: dict = field(default_factory=dict, repr=False, compare=False)
    expiry: object = field(default=None, repr=False, compare=False)
    #: When this peer id was first heard (for the bans of an address).
    joined: float = field(default=0.0, compare=False)

    @property
    def short_id(self):
        return self.peer_id[:8]

    @property
    def label(self):
        """
        How the console names this peer: the address its transfer ports are
        reached at, and its transfer port (C{[addr]:port} for IPv6).
        """
        return format_address(self.host, self.transfer_port)

    @property
    def sender_port(self):
        return self.transfer_port + 1

    @property
    def main_address(self):
        """
        C{(host, udp_port)} of the main address: where its datagrams come
        from, and where ours go.
        """
        return self.main or (self.host, self.udp_port)


def _rank(address):
    # Link-local addresses need a scope and work on one link only: use them
    # when nothing else is heard.  Otherwise IPv4 first, so that a
    # dual-stack peer is always shown at the same address.
    return (is_link_local(address.host), ":" in address.host)


class PeerTable:
    """
    Owns the set of known peers, one entry per peer id, their addresses and
    their expiry.

    Observers registered with L{subscribe} get C{joined(peer)},
    C{changed(peer, old_revision)} and C{left(peer, reason)} calls.
    C{changed} comes too when the address a peer is reached at changes.

    The table is bounded, because anyone on the LAN can invent peer ids: at
    most C{max_peers} entries, at most C{max_per_host} of them heard from
    one source address, and at most L{MAX_ADDRESSES_PER_PEER} addresses per
    peer.  Peers already known are refreshed whatever the count.

    Each address expires on its own, C{timeout} seconds after it was last
    heard; a peer with no address left is dropped.

    @param clock: an L{IReactorTime}, for expiry.
    @param timeout: seconds of silence after which an address (and a peer
        with no other) is dropped.
    """

    def __init__(self, clock, timeout, max_peers=MAX_PEERS, max_per_host=MAX_PEERS_PER_HOST):
        self._clock = clock
        self.timeout = timeout
        self._max_peers = max_peers
        self.max_per_host = max_per_host
        self._peers = {}
        self._per_host = Counter()
        #: Peers dropped to make room for a peer of a less crowded host.
        self.made_room = 0
        self._by_address = {}
        self._departed = OrderedDict()
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

    def at(self, host, udp_port):
        """
        The peer heard from C{(host, udp_port)}, or C{None}.
        """
        return self._by_address.get((host, udp_port))

    def peers(self):
        """
        The known peers, by address.
        """
        return sorted(self._peers.values(), key=lambda p: (_sort_key(p.host), p.transfer_port))

    def heard(self, announce, host, udp_port, via=None):
        """
        Record an announce from C{(host, udp_port)}, heard on our socket
        C{via}.

        The addresses of an entry are replaced only with a new instance id
        (a restart) from a host it is at; while it is alive, an announce
        naming its current instance from another address adds that address,
        and the main one stays, so that nobody can move a peer to their own
        address, and a new instance from another host is refused.

        @return: C{"new"} for a peer id we did not know, C{"restarted"} for a
            known one with a new instance id, C{"changed"} for a changed
            transfer port, revision, name or advertised address,
            C{"added"} for a new address of the current instance, C{"same"}
            for a refresh; or, for an announce that changed nothing,
            C{"full"} (a new id and no room for it, overall or for its
            host) or C{"too many addresses"}.
        """
        now = self._clock.seconds()
        peer = self._peers.get(announce.peer_id)
        if peer is None:
            if self._per_host[address_group(host)] >= self.max_per_host:
                return "full"
            if len(self._peers) >= self._max_peers and not self._make_room(host):
                return "full"
            peer = Peer(
                announce.peer_id,
                announce.instance_id,
                announce.host or host,
                udp_port,
                announce.transfer_port,
                announce.revision,
                now,
                name=announce.name,
                advertised=announce.host,
                via=via,
                joined=now,
            )
            self._peers[peer.peer_id] = peer
            self._add_address(peer, host, udp_port, via, now)
            self._arm(peer)
            self._tell("joined", peer)
            return "new"

        key = (host, udp_port)
        restarted = peer.instance_id != announce.instance_id
        outcome = "same"
        old_revision = peer.revision
        before = (peer.transfer_port, peer.revision, peer.name, peer.advertised, peer.host)
        if restarted and host not in {h for h, _ in peer.addresses}:
            # A new instance from a host the peer is not at, while the
            # current one is still heard: another host claiming its id.  A
            # peer that moved and restarted is taken once its old entry
            # has expired (or said goodbye, as a peer that stops does).
            return "duplicate"
        if restarted:
            for old in list(peer.addresses):
                self._remove_address(peer, old)
            if self._per_host[address_group(host)] >= self.max_per_host:
                self._drop(peer, "restarted elsewhere, and its address is full")
                return "full"
            self._add_address(peer, host, udp_port, via, now)
            outcome = "restarted"
        elif key in peer.addresses:
            peer.addresses[key].last_heard = now
            peer.addresses[key].via = via
        else:
            if len(peer.addresses) >= MAX_ADDRESSES_PER_PEER:
                return "too many addresses"
            if (
                self._by_address.get(key) not in (None, peer)
                or self._per_host[address_group(host)] >= self.max_per_host
            ):
                return "full"
            self._add_address(peer, host, udp_port, via, now)
            outcome = "added"
        peer.instance_id = announce.instance_id
        peer.transfer_port = announce.transfer_port
        peer.revision = announce.revision
        peer.name = announce.name
        peer.advertised = announce.host
        peer.last_seen = now
        self._choose_main(peer)
        self._arm(peer)
        if outcome == "same" and before != (
            peer.transfer_port, peer.revision, peer.name, peer.advertised, peer.host
        ):
            outcome = "changed"
        if outcome == "restarted":
            self._tell("changed", peer, None)
        elif before != (peer.transfer_port, peer.revision, peer.name, peer.advertised, peer.host):
            self._tell("changed", peer, old_revision)
        return outcome

    def goodbye(self, goodbye, host, udp_port):
        """
        A peer said goodbye from C{(host, udp_port)}.  From its main
        address, naming its current instance, it is dropped; from another
        of its addresses, only that address is (so that an address added by
        someone else cannot say goodbye for it).

        @return: C{"dropped"}, C{"address dropped"}, C{"repeated"} (it has
            left already), or C{None} for a goodbye that changed nothing.
        """
        if (goodbye.peer_id, goodbye.instance_id) in self._departed:
            return "repeated"
        peer = self._peers.get(goodbye.peer_id)
        if peer is None or peer.instance_id != goodbye.instance_id:
            return None
        key = (host, udp_port)
        if key not in peer.addresses:
            return None
        if key == peer.main_address or len(peer.addresses) == 1:
            self._departed[(peer.peer_id, peer.instance_id)] = True
            while len(self._departed) > _DEPARTED:
                self._departed.popitem(last=False)
            self._drop(peer, "said goodbye")
            return "dropped"
        self._remove_address(peer, key)
        return "address dropped"

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
        self._by_address.clear()

    # addresses

    def _add_address(self, peer, host, udp_port, via, now):
        peer.addresses[(host, udp_port)] = Address(host, udp_port, via, now)
        self._by_address[(host, udp_port)] = peer
        self._per_host[address_group(host)] += 1
        self._choose_main(peer)

    def _remove_address(self, peer, key):
        peer.addresses.pop(key)
        if self._by_address.get(key) is peer:
            del self._by_address[key]
        group = address_group(key[0])
        self._per_host[group] -= 1
        if not self._per_host[group]:
            del self._per_host[group]

    def _choose_main(self, peer):
        if not peer.addresses:
            return
        main = min(peer.addresses.values(), key=_rank)
        current = peer.addresses.get(peer.main)
        if current is not None and _rank(current) <= _rank(main):
            main = current
        peer.main = (main.host, main.udp_port)
        peer.udp_port, peer.via = main.udp_port, main.via
        peer.host = peer.advertised or main.host

    def _changed_main(self, peer):
        before = peer.host
        self._choose_main(peer)
        if peer.host != before:
            self._tell("changed", peer, peer.revision)

    # expiry

    def _arm(self, peer):
        if peer.expiry is None or not peer.expiry.active():
            oldest = min(a.last_heard for a in peer.addresses.values())
            delay = max(0.0, oldest + self.timeout - self._clock.seconds())
            peer.expiry = self._clock.callLater(delay, self._expire, peer.peer_id)

    def _expire(self, peer_id):
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        now = self._clock.seconds()
        main = peer.main_address
        for key, address in list(peer.addresses.items()):
            if address.last_heard + self.timeout <= now:
                self._remove_address(peer, key)
        if not peer.addresses:
            self._drop(peer, "timed out")
            return
        peer.expiry = None
        if main not in peer.addresses:
            # The main address went silent: the first one still heard takes
            # its place.
            self._changed_main(peer)
        self._arm(peer)

    def _make_room(self, host):
        """
        The table is full and a new peer of C{host} would join: make room by
        dropping the least recently heard peer of the most crowded host, if
        that host holds at least two more entries than C{host} does.  So
        invented ids from a few hosts can fill the table only until a peer
        of another host comes, which then takes a place of theirs, and the
        table ends shared out between hosts.
        """
        if not self._per_host:
            return False
        crowded, count = self._per_host.most_common(1)[0]
        if count < self._per_host[address_group(host)] + 2:
            return False
        victim = min(
            (p for p in self._peers.values() if address_group(p.main_address[0]) == crowded),
            key=lambda p: p.last_seen,
            default=None,
        )
        if victim is None:
            return False
        self._drop(victim, "made room for a peer of a less crowded host")
        self.made_room += 1
        return True

    def _drop(self, peer, reason):
        if peer.expiry is not None and peer.expiry.active():
            peer.expiry.cancel()
        for key in list(peer.addresses):
            self._remove_address(peer, key)
        del self._peers[peer.peer_id]
        self._tell("left", peer, reason)


def _sort_key(host):
    """
    Addresses in numeric order, IPv4 before IPv6.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return (2, 0, host)
    return (address.version, int(address), host)
