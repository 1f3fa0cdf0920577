"""
The replication planner: which chunks of this peer's files to copy to which
other peers, and which cached chunks to give up first when a cache is full.

Pure code: no reactor, no I/O, no clock.  The distributor builds a
L{ReplicaPlanner} from what it knows (its own files, and every other peer's
free cache space and holdings from the catalogs) once a round, and sends what
L{ReplicaPlanner.plan} says; a peer that asks what it should hold (a pull)
is answered with L{ReplicaPlanner.wanted}.

Copies.  A chunk's copies are the peers that hold it: this peer (which holds
its own files whole), every peer whose catalog lists the file whole or the
chunk in its map, and the pushes still in flight.  A chunk has enough copies
when it has C{replicas + 1}: the origin's and C{replicas} outside it, so that
the chunk survives any one holder leaving with C{replicas} copies.  With a
single origin this is exactly "C{replicas} copies outside the origin".

Agreement.  Every peer that holds a file whole distributes it, so a chunk
short of copies may have several would-be pushers, and several distributors
fill gaps in the same caches.  Everything here is decided from the shared
view alone, never from who is asking (except for the final filter):

 - I{who pushes} a chunk is the rendezvous (highest random weight) choice
   over the file's whole holders, of which there are at most C{replicas}
   when the chunk is short;
 - I{to whom} is a walk of a consistent-hashing ring of the peers with free
   space, from the chunk's own point: the first peers met that neither hold
   the chunk nor are out of room.  Like rendezvous hashing it spreads the
   chunks of a file evenly over the targets and changes little when a peer
   comes or goes, but it costs a step per copy rather than a hash per peer;
 - chunks are taken rarest first, then file by file, then in file order, and
   each takes room from its targets in that order.

Each distributor simulates that one plan for its files (everyone's pushes,
not only its own), and keeps its own part.  So two distributors with the
same view never send the same chunk, and for a file they both hold whole,
their pushes together stay within each target's free space.  Budgets and
limits only decide where a distributor stops in the common order, never
what it chooses before that.  Space a distributor cannot see being used
(other distributors' other files) is the cache's to guard: it refuses a
push over its quota (L{twisted_p2p.cache}).

Views are untrusted data: indexes out of range and bitmap bits past the last
chunk are ignored, never an error.
"""

import functools
import hashlib
from bisect import bisect_right
from dataclasses import dataclass, field

from twisted_p2p.limits import CHUNK_SIZE, MAX_ROUND_COPIES

# Limits of this module, with their reasons (to move to limits.py).

#: Most copies outside the origin the network may be asked to keep.  More
#: buys no real safety on a LAN and multiplies distribution traffic.
MAX_REPLICAS = 16

#: Points each peer has on the placement ring.  More points spread the chunks
#: more evenly over the targets (with 32, each peer's share is within about a
#: fifth of the mean), at a cost of a hash per point once per plan.
RING_POINTS = 32

# The hashes, each in a domain of its own (blake2b's personalization), so that
# no two uses ever collide; copied from these rather than made anew, which
# costs half as much.
_RING = hashlib.blake2b(digest_size=8, person=b"p2p-ring")
_CHUNK = hashlib.blake2b(digest_size=8, person=b"p2p-chunk")
_PUSHER = hashlib.blake2b(digest_size=8, person=b"p2p-pusher")
_EVICT = hashlib.blake2b(digest_size=8, person=b"p2p-evict")

#: Files of at most this many chunks have their bits looked at one by one
#: (a loop costs less than the C passes for so few).
_SMALL_FILE = 64

#: Not in a peer's holdings (None there means held whole).
_ABSENT = object()

# For each bit position, a table taking a bitmap byte to that bit (0 or 1).
_BIT = [bytes((b >> bit) & 1 for b in range(256)) for bit in range(8)]


def _hash(domain, data):
    """
    A 64-bit integer hash of C{data} in C{domain} (one of the hashers above).
    """
    hasher = domain.copy()
    hasher.update(data)
    return int.from_bytes(hasher.digest(), "big")


@functools.lru_cache(maxsize=1024)
def _ring_points(peer_id):
    """
    Where C{peer_id}'s points lie on the ring: the same in every plan, so
    kept for the peers met lately (a few hundred at most, see MAX_PEERS).
    """
    prefix = peer_id.encode() + b"\0"
    return tuple(_hash(_RING, prefix + point.to_bytes(2, "big")) for point in range(RING_POINTS))


@dataclass(frozen=True)
class FileShape:
    """
    What the planner needs of a file when no manifest is at hand: its size,
    cut into chunks of C{chunk_size} (the last one shorter).  A
    L{twisted_p2p.manifest.Manifest} serves as well.
    """

    size: int
    chunk_size: int = CHUNK_SIZE

    @property
    def chunk_count(self):
        return (self.size + self.chunk_size - 1) // self.chunk_size

    def chunk_length(self, index):
        if not 0 <= index < self.chunk_count:
            raise IndexError(index)
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass(frozen=True)
class PeerView:
    """
    What this peer knows of another: its id, the cache space it has free,
    and what it holds.

    @ivar free: bytes it will still take for others, or C{None} when it
        hosts nothing or has not said.
    @ivar holdings: file id -> C{None} (the whole file), a bitmap as C{bytes}
        (chunk i is bit i % 8 of byte i // 8, as in the C{have} answer), or a
        set of chunk indexes.  A file it does not list, it does not hold.
    """

    peer_id: str
    free: int = None
    holdings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Push:
    """
    Chunks of one file to copy to one peer, in the order to send them.

    @ivar size: their bytes.
    """

    target: str
    file_id: str
    chunks: tuple
    size: int


def _bitmap(held, count):
    """
    The bitmap (as in the C{have} answer) of the first C{count} chunks of
    C{held}, a bitmap or a set of indexes; whatever lies past C{count} is
    dropped.
    """
    size = (count + 7) // 8
    if isinstance(held, (bytes, bytearray, memoryview)):
        bitmap = bytes(held[:size])
        tail = count % 8
        if len(bitmap) == size and not (tail and bitmap[-1] >> tail):
            return bitmap
        bitmap = bytearray(bitmap)
        bitmap.extend(bytes(size - len(bitmap)))
        if tail:
            bitmap[-1] &= (1 << tail) - 1
        return bytes(bitmap)
    bitmap = bytearray(size)
    for index in held:
        if isinstance(index, int) and 0 <= index < count:
            bitmap[index >> 3] |= 1 << (index & 7)
    return bitmap


def _flags(bitmap):
    """
    One byte per bit of C{bitmap} (1 set, 0 not), so that C{find} can look
    for set bits in C.
    """
    flags = bytearray(len(bitmap) * 8)
    # Bit k of every byte at once: a pass in C per bit.
    for bit in range(8):
        flags[bit::8] = bitmap.translate(_BIT[bit])
    return flags


class _File:
    """
    One of this peer's files as the planner sees it: its shape, who holds it
    whole, what each partial holder holds (a bitmap), and how many copies
    each chunk has.

    Copies are kept bit-sliced: C{at_least[k]} is an integer whose bit i is
    set when chunk i has at least k copies, for k up to C{replicas + 1}
    (enough).  Adding a holder is then a few whole-file C{&} and C{|} on
    integers of one bit per chunk, whatever the file's size.

    Every chunk but the last is as long as the first, as in every manifest.
    """

    def __init__(self, file_id, shape, own_id):
        self.file_id = file_id
        self.count = shape.chunk_count
        self._first = shape.chunk_length(0)
        self._last = shape.chunk_length(self.count - 1)
        self.key_prefix = file_id.encode() + b"\0"
        self.whole_set = {own_id}
        self.whole = None
        self.partial = {}
        self.at_least = None
        self._levels = {}

    def add_holder(self, peer_id, held):
        """
        Peer C{peer_id} holds the whole file (C{held} is C{None}), or the
        chunks of bitmap or set C{held}.
        """
        if held is None:
            self.whole_set.add(peer_id)
        else:
            self.partial[peer_id] = _bitmap(held, self.count)

    def length(self, index):
        return self._last if index == self.count - 1 else self._first

    def holds(self, peer_id, index):
        if peer_id in self.whole_set:
            return True
        bitmap = self.partial.get(peer_id)
        return bitmap is not None and (bitmap[index >> 3] >> (index & 7)) & 1 == 1

    def add_copy(self, peer_id, index):
        """
        Count a copy of chunk C{index} at partial holder C{peer_id} (a push
        in flight); before L{count_copies}.
        """
        bitmap = self.partial.get(peer_id)
        if not isinstance(bitmap, bytearray):
            bitmap = bytearray(bitmap or (self.count + 7) // 8)
            self.partial[peer_id] = bitmap
        bitmap[index >> 3] |= 1 << (index & 7)

    def count_copies(self, replicas):
        """
        Count the copies of every chunk, once every holder is known.
        """
        self.whole_set = frozenset(self.whole_set)
        self.whole = sorted(self.whole_set)
        every = (1 << self.count) - 1
        at_least = [every] + [
            every if k <= len(self.whole) else 0 for k in range(1, replicas + 2)
        ]
        if len(self.whole) > replicas:
            # Enough copies everywhere, whatever the partial holders hold.
            self.at_least = at_least
            return
        for bitmap in self.partial.values():
            held = int.from_bytes(bitmap, "little")
            if held:
                # A saturating counter per chunk: from the top, so each
                # level grows from the one below as it was.
                for k in range(replicas + 1, 0, -1):
                    at_least[k] |= at_least[k - 1] & held
        self.at_least = at_least

    def level_mask(self, level):
        """
        The chunks with exactly C{level} copies, as an integer of bits.
        """
        return self.at_least[level] & ~self.at_least[level + 1]

    def at_level(self, level):
        """
        The chunks with exactly C{level} copies, in file order.
        """
        mask = self.level_mask(level)
        if not mask:
            return
        if self.count <= _SMALL_FILE:
            for index in range(self.count):
                if (mask >> index) & 1:
                    yield index
            return
        flags = self._levels.get(level)
        if flags is None:
            flags = self._levels[level] = _flags(mask.to_bytes((self.count + 7) // 8, "little"))
        index = flags.find(1)
        while index >= 0:
            yield index
            index = flags.find(1, index + 1)

    def chunk_key(self, index):
        return _hash(_CHUNK, self.key_prefix + index.to_bytes(8, "big"))

    def pusher(self, key):
        """
        Which whole holder sends the copies of the chunk of this C{key}.
        """
        if len(self.whole) == 1:
            return self.whole[0]
        prefix = key.to_bytes(8, "big")
        return max(self.whole, key=lambda peer: (_hash(_PUSHER, prefix + peer.encode()), peer))


class _Ring:
    """
    The consistent-hashing ring of the peers that still have room this
    round: L{RING_POINTS} points each, a peer leaving when it is full.
    """

    def __init__(self, peers):
        points = sorted(
            (position, peer) for peer in peers for position in _ring_points(peer)
        )
        self.positions = [position for position, _ in points]
        self.owners = [owner for _, owner in points]

    def __bool__(self):
        return bool(self.owners)

    def remove(self, peers):
        keep = [i for i, owner in enumerate(self.owners) if owner not in peers]
        self.positions = [self.positions[i] for i in keep]
        self.owners = [self.owners[i] for i in keep]


class ReplicaPlanner:
    """
    Owns one round's view of replication for one peer: the copies of each
    chunk of its files, the room every other peer has, and the common plan
    that fills the gaps (see the module docstring).  Built afresh each
    round, from inputs it neither keeps nor changes.

    @param own_id: this peer's id.
    @param files: file id -> the shape of each file this peer holds whole (a
        L{twisted_p2p.manifest.Manifest} or a L{FileShape}).
    @param peers: a L{PeerView} for each other known peer, once each (one
        naming C{own_id} is ignored).
    @param replicas: copies each chunk should have besides one holder's.
    @param pending: C{(peer id, file id, chunk index)} of copies pushed but
        not yet seen in that peer's catalog: counted as held, and their bytes
        taken from its free space, so that they are not sent twice.
    @raise ValueError: C{replicas} out of range, or a peer listed twice.
    """

    def __init__(self, own_id, files, peers, replicas, pending=()):
        if not 0 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be between 0 and {MAX_REPLICAS}")
        self.own_id = own_id
        self.replicas = replicas
        peers = [peer for peer in peers if peer.peer_id != own_id]
        ids = [peer.peer_id for peer in peers]
        if len(set(ids)) != len(ids):
            raise ValueError("a peer is listed twice")
        self._files = [
            _File(file_id, files[file_id], own_id)
            for file_id in sorted(files)
            if files[file_id].chunk_count > 0
        ]
        by_id = {f.file_id: f for f in self._files}
        for peer in peers:
            holdings = peer.holdings
            # The shorter side is walked: a peer sharing 100,000 files lists
            # as many, of which this one offers a few (and the other way).
            if len(holdings) <= len(by_id):
                held_here = ((by_id.get(i), held) for i, held in holdings.items())
            else:
                held_here = ((f, holdings.get(i, _ABSENT)) for i, f in by_id.items())
            for f, held in held_here:
                if f is not None and held is not _ABSENT:
                    f.add_holder(peer.peer_id, held)
        self._room = {
            peer.peer_id: peer.free for peer in peers if peer.free is not None and peer.free > 0
        }
        self._count_pending(pending, set(ids))
        for f in self._files:
            f.count_copies(replicas)

    def _count_pending(self, pending, known):
        by_id = {f.file_id: f for f in self._files}
        for peer_id, file_id, index in pending:
            f = by_id.get(file_id)
            if f is None or peer_id not in known or not 0 <= index < f.count:
                continue
            if f.holds(peer_id, index):
                continue
            f.add_copy(peer_id, index)
            if peer_id in self._room:
                self._room[peer_id] -= f.length(index)
                if self._room[peer_id] <= 0:
                    del self._room[peer_id]

    def deficit(self):
        """
        The bytes still to send for every chunk of our files to have enough
        copies: the least that all distributors together must send.
        """
        total = 0
        for f in self._files:
            for level in range(1, self.replicas + 1):
                mask = f.level_mask(level)
                if not mask:
                    continue
                total += (self.replicas + 1 - level) * f.length(0) * mask.bit_count()
                if (mask >> (f.count - 1)) & 1:
                    total -= (self.replicas + 1 - level) * (f.length(0) - f.length(f.count - 1))
        return total

    def plan(self, budget=None, limit=MAX_ROUND_COPIES):
        """
        This round's pushes from this peer: the copies the common plan gives
        it to send, at most C{limit} of them and C{budget} bytes.

        @param budget: bytes this peer may send this round, or C{None}.
        @return: a list of L{Push}, in the order their first chunk was
            planned (rarest first).
        """
        return self._plan(self._room, budget, limit)

    def wanted(self, peer_id, room, budget=None, limit=MAX_ROUND_COPIES):
        """
        What peer C{peer_id}, with C{room} bytes free, should hold of our
        files, as the common plan would have us send it: the answer to its
        pull.  Its stated room stands in for the view's; a peer the view does
        not know is taken to hold nothing.

        @return: file id -> chunk indexes, rarest first.
        """
        if peer_id == self.own_id:
            return {}
        rooms = dict(self._room)
        rooms.pop(peer_id, None)
        if room > 0:
            rooms[peer_id] = room
        return {
            push.file_id: push.chunks
            for push in self._plan(rooms, budget, limit)
            if push.target == peer_id
        }

    def _plan(self, rooms, budget, limit):
        room = dict(rooms)
        ring = _Ring(room)
        groups = {}
        sent = 0
        copies = 0
        # The common plan (every pusher's part) is simulated only this far, so
        # that a peer that pushes few of the chunks still plans in bounded
        # time; every planner with this view stops at the same place.
        simulated_left = limit * max(1, self.replicas)
        for level in range(1, self.replicas + 1):
            need = self.replicas + 1 - level
            for f in self._files:
                for index in f.at_level(level):
                    if not ring or simulated_left <= 0:
                        return _pushes(groups)
                    length = f.length(index)
                    key = f.chunk_key(index)
                    ours = f.pusher(key) == self.own_id
                    wanted = need
                    if ours:
                        affordable = limit - copies
                        if budget is not None:
                            affordable = min(affordable, (budget - sent) // length)
                        if affordable <= 0:
                            return _pushes(groups)
                        wanted = min(need, affordable)
                    targets = _pick(ring, room, f, index, key, length, wanted)
                    simulated_left -= len(targets)
                    if ours and targets:
                        copies += len(targets)
                        sent += length * len(targets)
                        for target in targets:
                            group = groups.setdefault((target, f.file_id), [[], 0])
                            group[0].append(index)
                            group[1] += length
        return _pushes(groups)


def _pick(ring, room, f, index, key, length, wanted):
    """
    Up to C{wanted} targets for chunk C{index} of C{f}: the first peers met
    on the ring clockwise from C{key} that do not hold it and have room for
    it.  Their room is taken; a peer with no room for it leaves the ring (it
    can take no full chunk any more).
    """
    targets = []
    full = set()
    whole = f.whole_set
    partial = f.partial
    byte, bit = index >> 3, 1 << (index & 7)
    owners = ring.owners
    size = len(owners)
    start = bisect_right(ring.positions, key)
    for step in range(size):
        owner = owners[(start + step) % size]
        if owner in full or owner in targets or owner in whole:
            continue
        bitmap = partial.get(owner)
        if bitmap is not None and bitmap[byte] & bit:
            continue
        if room[owner] < length:
            full.add(owner)
            continue
        targets.append(owner)
        if len(targets) == wanted:
            break
    for target in targets:
        room[target] -= length
        if room[target] <= 0:
            full.add(target)
    if full:
        ring.remove(full)
    return targets


def _pushes(groups):
    return [
        Push(target, file_id, tuple(chunks), size)
        for (target, file_id), (chunks, size) in groups.items()
    ]


def eviction_order(chunks, copies, salt=""):
    """
    The order in which a full cache gives up C{chunks}: the most copied
    first, since the network misses them least.  Ties are broken by a hash
    salted with C{salt} (the cache's peer id), so that caches holding the
    same well-copied chunks do not all drop the same ones at once.

    @param chunks: C{(file id, index)} pairs.
    @param copies: C{copies(file_id, index)}, the chunk's copies on the
        network.
    @return: a list of the pairs.
    """
    salt = salt.encode() + b"\0"

    def rank(chunk):
        file_id, index = chunk
        tie = _hash(_EVICT, salt + file_id.encode() + b"\0" + index.to_bytes(8, "big"))
        return (-copies(file_id, index), tie)

    return sorted(chunks, key=rank)
