"""
The network catalog: what the other peers offer.
"""

import itertools
from collections import Counter
from collections.abc import Sequence
from operator import itemgetter
from types import MappingProxyType
from typing import NamedTuple

from twisted.internet import defer
from twisted.logger import Logger

from twisted_p2p import heap, wire
from twisted_p2p.limits import CATALOG_RETRY_MAX, CATALOG_RETRY_MIN, MAX_CATALOG_ENTRIES

log = Logger()

#: Seconds before a failed catalog fetch is first tried again; each further
#: failure doubles the wait, up to L{CATALOG_RETRY_MAX}.
RETRY_DELAY = CATALOG_RETRY_MIN


class Offer(NamedTuple):
    """
    One file content on the network: its id, a display name, its size, and
    the peers that hold it.  A named tuple: a catalog of 100,000 entries
    makes as many at a time, and a tuple is made several times faster than
    a frozen dataclass.
    """

    file_id: str
    name: str
    size: int
    peers: tuple

    @property
    def short_id(self):
        return self.file_id[:8]


class _Offers(Sequence):
    """
    The offers (L{Offer}s) of a catalog, in order, made as they are looked
    at: what is kept is a plain tuple per offer, C{(name, file_id, size,
    places)}, the places those of its peers in C{peers} (an int, or a
    tuple of ints).  In that order, a plain sort of them is by name, then
    id, with no key to make per row: a sort is one C call, which holds the
    GIL, and so the reactor, throughout (100,000 rows, in order already:
    27-30 ms with a key, 4-9 ms without, on the test machine).

    Kept this way because the cycle collector stops tracking a plain tuple
    of strings and ints once it has seen it, and never an L{Offer} (a named
    tuple, holding peers): 100,000 offers and 100,000 paths kept as
    L{Offer}s were nearly all a full collection walked, 40-70 ms holding
    the GIL on the test machine, whichever thread set it off.  An L{Offer}
    made while a caller goes through them goes again as soon as it is let
    go.
    """

    __slots__ = ("_rows", "_peers", "_sets")

    def __init__(self, rows, peers):
        self._rows = rows
        self._peers = tuple(peers)
        self._sets = {}  # places -> the tuple of those peers, made once

    def _peers_at(self, places):
        found = self._sets.get(places)
        if found is None:
            if type(places) is int:
                found = (self._peers[places],)
            else:
                found = tuple(self._peers[place] for place in places)
            self._sets[places] = found
        return found

    def _offer(self, row):
        name, file_id, size, places = row
        return _make_offer((file_id, name, size, self._peers_at(places)))

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._offer(row) for row in self._rows[i]]
        return self._offer(self._rows[i])

    def __iter__(self):
        offer = self._offer
        for row in self._rows:
            yield offer(row)

    def __eq__(self, other):
        if not isinstance(other, (list, tuple, _Offers)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self):
        return f"<{len(self)} offers>"

    @property
    def peers(self):
        """The peers the places are of."""
        return self._peers

    def by_id(self):
        """A new dict of each file id to its size and its peers' places."""
        return {file_id: (size, places) for _, file_id, size, places in self._rows}


_make_offer = Offer._make


class FairFetches:
    """
    Runs at most C{slots} catalog fetches at once, taking turns between the
    hosts they go to: the next to start is, of those waiting, one whose host
    has the fewest fetches running (the longest waiting first among them),
    and no host has more than half of them running.
    So invented peers on a few hosts, whose ports never answer, hold at
    most the places their hosts' turns give them, and a real peer on
    another host is fetched as soon as any place is free.
    """

    def __init__(self, slots):
        self._slots = slots
        #: Fetches one host may have running: half the places, so that
        #: another host always finds one free at once.
        self._per_host = max(1, slots // 2)
        self._running = Counter()
        self._waiting = []
        self._order = itertools.count()

    def run(self, host, f):
        """
        C{f()} (a Deferred) once a place is free and it is C{host}'s turn; a
        Deferred of its result.
        """
        d = defer.Deferred()
        self._waiting.append((next(self._order), host, f, d))
        self._next()
        return d

    def running(self):
        return sum(self._running.values())

    def _next(self):
        while self._waiting and self.running() < self._slots:
            entry = min(self._waiting, key=lambda e: (self._running[e[1]], e[0]))
            if self._running[entry[1]] >= self._per_host:
                return  # every host waiting has its share running
            self._waiting.remove(entry)
            _, host, f, d = entry
            self._running[host] += 1
            result = defer.maybeDeferred(f)
            result.addBoth(self._done, host)
            result.chainDeferred(d)

    def _done(self, result, host):
        self._running[host] -= 1
        if not self._running[host]:
            del self._running[host]
        self._next()
        return result


class NetworkCatalog:
    """
    Owns what each known peer offers, as last fetched from its sender port.

    It observes the L{PeerTable}: a peer that joins, restarts or announces a
    new revision has its catalog fetched again; a peer that leaves takes its
    files with it.

    At most C{max_entries} catalog entries are kept across all peers: a
    peer whose catalog would go over keeps only what fits (logged once).

    @param table: the L{PeerTable}.
    @param fetch: C{fetch(peer)} giving a Deferred of C{(revision, files)}
        where files are C{(file_id, name, size)}, or of C{(revision, files,
        free, holdings)}: the peer's free cache space (C{None} if it hosts
        nothing) and, for the files it holds only part of, file id -> the
        bitmap of its chunks (as in the C{have} answer).
    @param clock: an L{IReactorTime}, for retries.
    @param run_in_thread: C{deferToThread}, to index a catalog of
        L{INDEX_IN_THREAD} entries or more; C{None}: at once.
    """

    def __init__(self, table, fetch, clock, max_entries=MAX_CATALOG_ENTRIES, run_in_thread=None):
        self._table = table
        self._fetch = fetch
        self._clock = clock
        self._max_entries = max_entries
        self._files = {}
        self._file_ids = {}
        #: peer id -> path -> the file id listed under it (a tuple of ids
        #: where one peer lists several contents under one path), made at
        #: the first lookup: a C{download NAME} finds its file without a
        #: walk of the catalog.
        self._names = {}
        self._free = {}
        self._holdings = {}
        self._listeners = []
        self._entries = 0
        self._cut = set()
        self._revisions = {}
        self._fetching = {}
        self._retries = {}
        self._failures = {}
        self._generation = 0
        self._cached = {}
        self._run = run_in_thread
        #: peer id -> (token, entries) of a catalog being indexed in a thread.
        self._indexing = {}
        table.subscribe(self)

    def on_fetched(self, listener):
        """
        Call C{listener(peer_id, first)} after each catalog of a peer is
        stored; C{first} for the first one since it joined.
        """
        self._listeners.append(listener)

    # PeerTable observer

    def joined(self, peer):
        self.refresh(peer.peer_id)

    def changed(self, peer, old_revision):
        if peer.revision != self._revisions.get(peer.peer_id):
            self.refresh(peer.peer_id)

    def left(self, peer, reason):
        self._indexing.pop(peer.peer_id, None)
        self._store(peer.peer_id, [])
        self._cut.discard(peer.peer_id)
        self._revisions.pop(peer.peer_id, None)
        self._failures.pop(peer.peer_id, None)
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
            return None
        revision, files, *extra = result
        free, holdings = extra if extra else (None, {})
        files = list(files)
        # Room left by the other peers' entries, and by those of catalogs
        # being indexed for them right now.
        others = self._entries - len(self._files.get(peer_id, ()))
        others += sum(n for p, (_, n) in self._indexing.items() if p != peer_id)
        room = self._max_entries - others
        if len(files) > room:
            if peer_id not in self._cut:
                self._cut.add(peer_id)
                peer = self._table.get(peer_id)
                log.warn(
                    "Keeping {kept} of the {offered} files {peer} offers: the catalog "
                    "holds at most {limit} entries across all peers",
                    kept=max(room, 0),
                    offered=len(files),
                    peer=peer.label,
                    limit=self._max_entries,
                )
            files = files[: max(room, 0)]
        if self._run is None or len(files) < INDEX_IN_THREAD:
            self._stored(peer_id, revision, files, free, _indexed(files, holdings))
            return None
        # 100,000 entries take longer to index than a turn of the reactor
        # should: in a thread, and stored once it is done (the fetch is
        # not over until then: the next of this peer waits for it).
        token = object()
        self._indexing[peer_id] = (token, len(files))
        d = self._run(_indexed, files, holdings)
        d.addCallbacks(
            self._indexed, self._index_failed,
            (peer_id, token, revision, files, free), None, (peer_id, token),
        )
        return d

    def _indexed(self, index, peer_id, token, revision, files, free):
        if self._indexing.get(peer_id, (None,))[0] is not token:
            return  # the peer left meanwhile
        del self._indexing[peer_id]
        self._stored(peer_id, revision, files, free, index)

    def _index_failed(self, failure, peer_id, token):
        if self._indexing.get(peer_id, (None,))[0] is token:
            del self._indexing[peer_id]
        log.failure("Indexing the catalog of {peer} failed", failure, peer=peer_id[:8])

    def _stored(self, peer_id, revision, files, free, index):
        self._store(peer_id, files, free, index)
        first = peer_id not in self._revisions
        self._revisions[peer_id] = revision
        self._failures.pop(peer_id, None)
        for listener in list(self._listeners):
            listener(peer_id, first)

    def _store(self, peer_id, files, free=None, index=None):
        """
        Keep C{files} as C{peer_id}'s catalog, with the ids and holdings
        L{_indexed} gave for them (worked out here if not given).
        """
        self._generation += 1
        self._entries -= len(self._files.pop(peer_id, ()))
        self._file_ids.pop(peer_id, None)
        self._names.pop(peer_id, None)
        self._free.pop(peer_id, None)
        self._holdings.pop(peer_id, None)
        if free is not None:
            self._free[peer_id] = free
        if files:
            self._files[peer_id] = files
            ids, held, names = _indexed(files, {}) if index is None else index
            self._file_ids[peer_id] = ids
            self._holdings[peer_id] = held
            if names is not None:
                self._names[peer_id] = names
            self._entries += len(files)
        heap.settled(f"catalog {id(self)}", self._entries)

    def _failed(self, failure, peer):
        log.info(
            "Could not fetch the catalog of {peer}: {error}",
            peer=peer.label,
            error=failure.getErrorMessage(),
        )
        peer_id = peer.peer_id
        if peer_id in self._table and peer_id not in self._retries:
            failures = self._failures[peer_id] = self._failures.get(peer_id, 0) + 1
            delay = min(RETRY_DELAY * 2 ** min(failures - 1, 16), CATALOG_RETRY_MAX)
            self._retries[peer_id] = self._clock.callLater(delay, self._retry, peer_id)

    def _retry(self, peer_id):
        del self._retries[peer_id]
        self.refresh(peer_id)

    def _done(self, _, peer_id):
        again = self._fetching.pop(peer_id, False)
        if again:
            self.refresh(peer_id)

    # queries

    def _memo(self, kind, compute):
        """
        C{compute(peers)}, kept until the catalog or the peers change: with
        100,000 entries, going over them takes longer than one turn of the
        reactor should, and C{list}, completion and C{download} all ask.
        """
        peers = self._table.peers()
        key = (self._generation, tuple(map(id, peers)))
        cached = self._cached.get(kind)
        if cached is None or cached[0] != key:
            cached = self._cached[kind] = (key, compute(peers))
        return cached[1]

    def offers(self):
        """
        Every file content the known peers offer, one L{Offer} per id, in
        name order: a sequence (see L{_Offers}) kept until the catalog or
        the peers change.

        Linear in the number of catalog entries: the peers of each file are
        kept in a dict by id, in the table's address order.
        """
        return self._memo("offers", self._offers)

    def _offers(self, peers):
        # 100,000 offers are worked out in one go, as plain tuples (see
        # _Offers): nothing else is made per entry (the names and sizes are
        # those of the catalog's own entries, and the peers of each file
        # are their places in the table, one int for a file one peer holds).
        first = {}  # file id -> the entry that first lists it
        holders = {}  # file id -> its peers' places: an int, or a list of them
        for place, peer in enumerate(peers):
            files = self._files.get(peer.peer_id)
            if not files:
                continue
            for entry in files:
                file_id = entry[0]
                held = holders.get(file_id)
                if held is None:
                    first[file_id] = entry
                    holders[file_id] = place
                elif type(held) is int:
                    if held != place:  # not a second name of this peer's
                        holders[file_id] = [held, place]
                elif held[-1] != place:
                    held.append(place)
        rows = []
        for file_id, (_, name, size) in first.items():
            held = holders[file_id]
            rows.append((name, file_id, size, held if type(held) is int else tuple(held)))
        rows.sort()  # by name, then id: see _Offers
        return _Offers(rows, peers)

    def paths(self):
        """
        Every path the known peers offer, one L{Offer} per path and id: a
        folder may hold the same content under two names, and a folder
        download fetches both.  Each lists every peer that holds the id.  A
        sequence, as L{offers}.
        """
        return self._memo("paths", self._paths)

    def _paths(self, peers):
        offers = self.offers()
        known = offers.by_id()
        # The offers' own peers, not these: the places are theirs, and the
        # table may have changed between the two (one may be made in a
        # thread while the reactor's thread hears of peers).
        peers = offers.peers
        entries = []
        for peer in peers:
            entries.extend(self._files.get(peer.peer_id, ()))
        # By path and id (see _Offers), each once, with the size and peers
        # of its offer.
        listed = [(name, file_id) for file_id, name, _ in entries]
        listed.sort()
        paths = []
        last = None
        for name_id in listed:
            if name_id == last:
                continue
            last = name_id
            size, places = known[name_id[1]]
            paths.append((*name_id, size, places))
        return _Offers(paths, peers)

    @property
    def size(self):
        """
        Catalog entries kept, across all peers.
        """
        return self._entries

    def free_of(self, peer_id):
        """
        The cache space C{peer_id} said it has free for others, or C{None}.
        """
        return self._free.get(peer_id)

    def holdings_of(self, peer_id):
        """
        What C{peer_id} holds: file id -> C{None} (the whole file) or the
        bitmap of the chunks it holds (as in the C{have} answer).  A
        read-only view, not a copy (a peer sharing 100,000 files lists as
        many): the catalog replaces a peer's holdings whole, never changes
        them in place, so the view may be kept and read from another thread.
        """
        return MappingProxyType(self._holdings.get(peer_id, _NOTHING))

    def holds_chunk(self, peer_id, file_id, index):
        """
        Whether C{peer_id}'s catalog shows chunk C{index} of C{file_id}.
        """
        held = self._holdings.get(peer_id, _NOTHING)
        if file_id not in held:
            return False
        bitmap = held[file_id]
        return bitmap is None or (
            index >> 3 < len(bitmap) and (bitmap[index >> 3] >> (index & 7)) & 1 == 1
        )

    def holds_whole(self, peer_id, file_id):
        """
        Whether C{peer_id} offers the whole of C{file_id} (not chunks of it).
        """
        held = self._holdings.get(peer_id)
        return held is not None and file_id in held and held[file_id] is None

    def copies(self, file_id, index):
        """
        How many known peers hold chunk C{index} of C{file_id}.
        """
        count = 0
        for peer in self._table.peers():
            held = self._holdings.get(peer.peer_id, {})
            if file_id not in held:
                continue
            bitmap = held[file_id]
            if bitmap is None or (
                index >> 3 < len(bitmap) and (bitmap[index >> 3] >> (index & 7)) & 1
            ):
                count += 1
        return count

    def copies_counter(self):
        """
        L{copies}, over a snapshot of what the known peers hold taken now:
        safe to call from another thread (a peer's holdings are replaced
        whole, never changed in place).
        """
        held = [self._holdings.get(peer.peer_id, {}) for peer in self._table.peers()]

        def copies(file_id, index):
            count = 0
            for holdings in held:
                if file_id not in holdings:
                    continue
                bitmap = holdings[file_id]
                if bitmap is None or (
                    index >> 3 < len(bitmap) and (bitmap[index >> 3] >> (index & 7)) & 1
                ):
                    count += 1
            return count

        return copies

    def availability(self, file_id, chunks):
        """
        C{(reachable, copies)} of a file of C{chunks} chunks: the share of
        its chunks that some known peer holds (0 to 1), and the fewest
        holders of any chunk.
        """
        if chunks <= 0:
            return 1.0, len(self.sources(file_id))
        whole = 0
        counts = None
        for peer in self._table.peers():
            held = self._holdings.get(peer.peer_id, {})
            if file_id not in held:
                continue
            bitmap = held[file_id]
            if bitmap is None:
                whole += 1
                continue
            if counts is None:
                counts = bytearray(chunks)
            flags = wire.expand_bits(bitmap, chunks)
            for index in _positions(flags):
                if counts[index] < 255:
                    counts[index] += 1
        if counts is None:
            return (1.0 if whole else 0.0), whole
        fewest = min(counts)
        reachable = 1.0 if whole else (chunks - counts.count(0)) / chunks
        return reachable, whole + fewest

    def path_names(self):
        """
        Every path the known peers list, once each, sorted (a list the
        caller must not change): kept until the catalog or the peers change.
        """
        return self._memo("names", self._path_names)

    def _path_names(self, peers):
        # Each peer's catalog comes in name order: the sort goes through a
        # run per peer (a set's order would make it sort 100,000 names from
        # scratch, 75 ms on the reactor on the test machine, not 30).
        names = []
        for peer in peers:
            names.extend(map(_PATH, self._files.get(peer.peer_id, ())))
        names.sort()
        return list(dict.fromkeys(names))

    def named(self, name):
        """
        The contents the known peers offer under path C{name}: one L{Offer}
        per file id, in id order, named C{name}, each with every known peer
        that holds that id (under any name).  Looked up, not walked: quick
        however large the catalog.
        """
        found = set()
        for peer in self._table.peers():
            found.update(_ids_of(self._names_of(peer.peer_id).get(name)))
        return [self._offer(file_id, name) for file_id in sorted(found)]

    def _names_of(self, peer_id):
        """
        C{peer_id}'s paths, each with the file id listed under it (or a
        tuple of ids; see L{_names_index}).  A large catalog's is made in
        the thread that indexes it (one C{dict} call over 100,000 entries
        held the GIL, and so the reactor, 36-52 ms on the test machine); a
        small one's at the first lookup after it came.
        """
        names = self._names.get(peer_id)
        if names is None:
            names = self._names[peer_id] = _names_index(self._files.get(peer_id, ()))
        return names

    def offer_of(self, file_id):
        """
        The L{Offer} of C{file_id} as L{offers} gives it (the name the first
        peer that holds it lists it by), or C{None} if no known peer does.
        Walks that one peer's entries, and only up to the id.
        """
        holders = self.sources(file_id)
        if not holders:
            return None
        entries = self._files.get(holders[0].peer_id, ())
        name = next(name for listed, name, _ in entries if listed == file_id)
        return self._offer(file_id, name, holders)

    def with_id_prefix(self, prefix):
        """
        The L{Offer} of each file id that starts with C{prefix}, in id order.
        """
        found = set()
        for peer in self._table.peers():
            found.update(i for i in self._file_ids.get(peer.peer_id, ()) if i.startswith(prefix))
        return [self.offer_of(file_id) for file_id in sorted(found)]

    def _offer(self, file_id, name, holders=None):
        holders = self.sources(file_id) if holders is None else holders
        size = self._file_ids[holders[0].peer_id][file_id]
        return Offer(file_id, name, size, tuple(holders))

    def files_of(self, peer_id):
        return list(self._files.get(peer_id, ()))

    def count_of(self, peer_id):
        """How many entries C{peer_id}'s catalog has (no copy of them)."""
        return len(self._files.get(peer_id, ()))

    def name_at(self, peer_id, file_id):
        """
        The first name C{peer_id} lists C{file_id} by, or C{None}: a walk of
        that peer's entries up to it, without a copy of them.
        """
        return next((n for f, n, _ in self._files.get(peer_id, ()) if f == file_id), None)

    def size_offered(self, peer_id, file_id):
        """
        The size C{peer_id}'s catalog gave C{file_id} (the first, if it
        listed it twice), or C{None} if it does not list it.
        """
        return self._file_ids.get(peer_id, {}).get(file_id)

    def sources(self, file_id):
        """
        The known peers that hold C{file_id}, in address order.
        """
        return [
            peer
            for peer in self._table.peers()
            if file_id in self._file_ids.get(peer.peer_id, ())
        ]


#: A fetched catalog this large is indexed in a thread (when the catalog is
#: given one), not on the reactor.
INDEX_IN_THREAD = 20_000

_ID, _PATH, _SIZE = itemgetter(0), itemgetter(1), itemgetter(2)
_NOTHING = MappingProxyType({})


#: Entries one dict operation of L{_indexed} takes at a time.  Each such
#: call loops in C and holds the GIL throughout: over 100,000 entries, one
#: took 9-19 ms (up to 44) on the test machine, and the reactor's thread
#: waited as long.  Between slices the GIL can change hands.
INDEX_SLICE = 5_000


def _slices(items):
    size = INDEX_SLICE
    return (items[i : i + size] for i in range(0, len(items), size))


def _indexed(files, holdings):
    """
    C{(ids, held, names)} for catalog entries C{files}: each id with the
    first size given it, in catalog order; each id with C{None} (held
    whole) or the bitmap C{holdings} gives it; and, for a catalog of
    L{INDEX_IN_THREAD} entries or more (indexed in a thread), its
    L{_names_index} (else C{None}: made at the first lookup).  Reads only
    what it is given: safe in a thread.  Dict operations that loop in C,
    over L{INDEX_SLICE} entries at a time: about 15 ms for 100,000 entries
    on the test machine, plus as much for the names.
    """
    ids = {}
    for part in _slices(files):
        ids.update(zip(map(_ID, part), itertools.repeat(None)))
    # The first size given an id: the slices backwards, each backwards.
    for part in reversed(list(_slices(files))):
        ids.update(zip(map(_ID, reversed(part)), map(_SIZE, reversed(part))))
    held = {}
    for part in _slices(list(ids)):
        held.update(zip(part, itertools.repeat(None)))
    for file_id, bitmap in (holdings or {}).items():
        if file_id in held:
            held[file_id] = bitmap
    names = _names_index(files) if len(files) >= INDEX_IN_THREAD else None
    return ids, held, names


def _names_index(files):
    """
    Each path of catalog entries C{files} with the file id listed under it,
    or a tuple of the ids if it is listed under several (an honest peer
    lists each path once).
    """
    names = {}
    for part in _slices(files):
        names.update(zip(map(_PATH, part), map(_ID, part)))
    if len(names) < len(files):
        names = {}
        for file_id, path, _ in files:
            listed = names.setdefault(path, file_id)
            if listed != file_id and file_id not in _ids_of(listed):
                names[path] = _ids_of(listed) + (file_id,)
    return names


def _ids_of(listed):
    """
    The file ids of one path of a peer's L{NetworkCatalog._names}: C{()},
    one id, or a tuple of them.
    """
    if listed is None:
        return ()
    return (listed,) if isinstance(listed, str) else listed


def _positions(flags):
    """
    The indexes of the bytes set to 1 in C{flags} (bytes of 0 and 1).
    """
    flags = bytes(flags)
    index = flags.find(1)
    while index >= 0:
        yield index
        index = flags.find(1, index + 1)
