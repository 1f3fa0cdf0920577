"""
The scheduler's map of one download's chunks: what each chunk is doing,
which sources hold it, which requests wait for it, and from that, which
chunks to ask of a source next.

Pure bookkeeping: no reactor, no I/O.  Times are passed in as numbers.
L{twisted_p2p.download.Download} drives it and does the asking.  (The map of
verified chunks kept on disk for a resume is another thing:
L{twisted_p2p.storage.ChunkMap}.)
"""

import math

from twisted_p2p.limits import ENDGAME_COPIES, ENDGAME_STALL

# What each chunk is doing, one byte per chunk in ChunkLedger._state.
_QUEUED, _FLIGHT, _VERIFYING, _HAVE = 0, 1, 2, 3

#: In a pick array, a chunk that is not to be asked for.
_NOT_PICKABLE = 0xFF
#: Availability counts stop here (below _NOT_PICKABLE).
_MAX_LEVEL = 0xFE

_UP = bytes(min(b + 1, _MAX_LEVEL) if b != _NOT_PICKABLE else b for b in range(256))
_DOWN = bytes(max(b - 1, 0) if b != _NOT_PICKABLE else b for b in range(256))

# Byte tables for whole-array work (bytes.translate), so that a source coming,
# going or changing costs a few passes in C rather than a Python loop over
# every chunk.  Arrays are combined as little-endian ints, byte by byte: the
# operands are chosen so that no byte ever carries or borrows into the next.
_FLAG = bytes(1 if b else 0 for b in range(256))
_BELOW_MAX = bytes(1 if b < _MAX_LEVEL else 0 for b in range(256))
_NOT_HELD = bytes(_NOT_PICKABLE if not b else 0 for b in range(256))
_NOT_QUEUED = bytes(0 if b == _QUEUED else _NOT_PICKABLE for b in range(256))

#: An update that changes more than one chunk in this many is done with
#: whole-array operations; fewer, chunk by chunk.
_SPARSE = 64


def _int(array):
    return int.from_bytes(array, "little")


def _array(number, count):
    return bytearray(number.to_bytes(count, "little"))


def _positions(flags):
    """
    The indexes of the bytes set to 1 in C{flags} (bytes of 0 and 1).
    """
    index = flags.find(1)
    while index >= 0:
        yield index
        index = flags.find(1, index + 1)


class _Ask:
    """
    One request as the ledger sees it: the source asked, the chunks it still
    waits for, and when it last made progress.
    """

    __slots__ = ("source", "pending", "progress")

    def __init__(self, source, chunks, now):
        self.source = source
        self.pending = set(chunks)
        self.progress = now


class ChunkLedger:
    """
    Owns the state of every chunk of one download (queued, in flight, being
    verified, verified), what each source it counts holds, and the requests
    in flight; it picks the chunks to ask of a source next: the rarest
    first, and near the end, second copies of stalled ones (the endgame).

    Sources and requests are the caller's objects, used here only as keys
    (hashable, compared by equality).  A source holds every chunk
    (C{has=None}, a full copy) or those marked 1 in C{has}, one byte per
    chunk (a partial holder).

    Chunk bookkeeping is in three arrays of one byte per chunk: C{_state},
    C{_avail} (counted sources that hold it) and C{_key}, the pick array: the
    chunk's availability if it is queued, else L{_NOT_PICKABLE}.  Picking the
    rarest chunks is then a C{find} of the lowest level in C{_key} (a partial
    holder has its own pick array, masked by what it holds).  Memory is a few
    bytes per chunk.  A source coming or going, or a partial holder's
    holdings changing much, is counted a whole array at a time (in C); a
    small change, chunk by chunk; an unchanged one costs a comparison.

    @ivar count: how many chunks the file has.
    @ivar have: how many of them are verified.
    """

    def __init__(self, count, verified=(), endgame_stall=ENDGAME_STALL,
                 endgame_copies=ENDGAME_COPIES):
        """
        @param verified: the chunks already here (a resume).
        @param endgame_stall: seconds without progress after which a chunk
            in flight may be asked of another source too.
        @param endgame_copies: requests a chunk may be in at once.
        """
        self.count = count
        self._stall = endgame_stall
        self._copies = endgame_copies
        self._state = bytearray(count)
        self._avail = bytearray(count)
        self._key = bytearray(count)
        # Counted source -> None (a full copy) or its holdings.
        self._holdings = {}
        # Partial holder -> its own pick array, in the order they were counted.
        self._picks = {}
        # Request in flight (it waits for some chunk) -> _Ask; one answered
        # whole is over and forgotten at once (_over_if_answered).
        self._asks = {}
        # Chunk in flight -> the requests waiting for it, in the order asked.
        self._askers = {}
        # Source -> chunks asked of it and still awaited.
        self._in_flight = {}
        # No request can have stalled before this time: every _Ask's
        # progress + stall is at least this (see endgame_pick), so that the
        # endgame, asked after every chunk once all are in flight, looks at
        # its requests only when one may have stalled.
        self._no_stall_before = math.inf
        self.have = 0
        for index in verified:
            if self._state[index] != _HAVE:
                self._state[index] = _HAVE
                self._key[index] = _NOT_PICKABLE
                self.have += 1

    # -- what it looks like ----------------------------------------------------

    @property
    def complete(self):
        """
        Whether every chunk is verified.
        """
        return self.have == self.count

    def is_verified(self, index):
        return self._state[index] == _HAVE

    def verifying(self):
        """
        Whether some chunk is being verified.
        """
        return self._state.find(_VERIFYING) >= 0

    def availability(self, index):
        """
        How many counted sources hold chunk C{index}.
        """
        return self._avail[index]

    def first_unheld(self):
        """
        The first chunk still to ask for that no counted source holds, or
        C{None}.
        """
        index = self._key.find(0)
        return index if index >= 0 else None

    def in_flight(self, source):
        """
        How many chunks C{source} was asked for and has not sent yet.
        """
        return self._in_flight.get(source, 0)

    def pending(self, request):
        """
        The chunks C{request} still waits for (none once it is over).
        """
        ask = self._asks.get(request)
        return frozenset(ask.pending) if ask is not None else frozenset()

    # -- sources -------------------------------------------------------------

    def __contains__(self, source):
        """
        Whether C{source} is counted.
        """
        return source in self._holdings

    def holds(self, source, index):
        """
        Whether counted C{source} holds chunk C{index}.
        """
        if source not in self._holdings:
            return False
        has = self._holdings[source]
        return has is None or has[index] == 1

    def is_partial(self, source):
        return source in self._picks

    def partial_sources(self):
        """
        The counted partial holders, in the order they were counted.
        """
        return list(self._picks)

    def add_source(self, source, has=None):
        """
        Count what C{source} holds in the availability of each chunk.  A
        source counted already is left as it is.
        """
        if source in self._holdings:
            return
        if has is None:
            self._holdings[source] = None
            self._shift(_UP)
            return
        has = bytes(has).translate(_FLAG)
        self._holdings[source] = has
        self._picks[source] = None  # made by _rebuild_picks
        self._count(gained=_int(has))

    def remove_source(self, source):
        """
        Forget what C{source} holds (it is gone, or no longer asked).  Its
        requests in flight stay until they are over (L{end}).
        """
        if source not in self._holdings:
            return
        has = self._holdings.pop(source)
        if has is None:
            self._shift(_DOWN)
            return
        del self._picks[source]
        self._count(lost=_int(has))

    def update_source(self, source, has):
        """
        What counted partial holder C{source} holds now (C{None}: every
        chunk, it completed its copy).  A full copy stays one; a source not
        counted is left out.

        Only the chunks that changed are touched: an unchanged answer costs
        one comparison, a few changes a step each.
        """
        old = self._holdings.get(source)
        if source not in self._holdings or old is None:
            return
        if has is None:
            self.remove_source(source)
            self.add_source(source)
            return
        if has == old:
            return
        new = bytes(has).translate(_FLAG)
        before, after = _int(old), _int(new)
        lost, gained = before & ~after, after & ~before
        self._holdings[source] = new
        if (before ^ after).bit_count() * _SPARSE > self.count:
            self._count(lost=lost, gained=gained)
            return
        pick = self._picks[source]
        for index in _positions(lost.to_bytes(self.count, "little")):
            if self._avail[index]:
                self._avail[index] -= 1
            pick[index] = _NOT_PICKABLE
            self._set_key(index)
        for index in _positions(gained.to_bytes(self.count, "little")):
            if self._avail[index] < _MAX_LEVEL:
                self._avail[index] += 1
            self._set_key(index)

    def _shift(self, table):
        """
        A full copy came or went: every chunk's availability moves by one.
        """
        self._avail = self._avail.translate(table)
        self._key = self._key.translate(table)
        for source, pick in self._picks.items():
            self._picks[source] = pick.translate(table)

    def _count(self, lost=0, gained=0):
        """
        Availability down by one for the chunks flagged in C{lost}, up by one
        for those in C{gained} (ints of one byte per chunk, 0 or 1), within
        0 and L{_MAX_LEVEL}; then every pick array made again from it.
        """
        if lost:
            lost &= _int(self._avail.translate(_FLAG))
            self._avail = _array(_int(self._avail) - lost, self.count)
        if gained:
            gained &= _int(self._avail.translate(_BELOW_MAX))
            self._avail = _array(_int(self._avail) + gained, self.count)
        self._rebuild_picks()

    def _rebuild_picks(self):
        """
        C{_key} and every partial holder's pick array, from C{_avail} and
        C{_state}, a whole array at a time: a chunk not queued, or not held,
        is L{_NOT_PICKABLE} (0xFF, which OR-ed onto any level gives itself).
        """
        key = _int(self._avail) | _int(self._state.translate(_NOT_QUEUED))
        self._key = _array(key, self.count)
        for source in self._picks:
            not_held = _int(self._holdings[source].translate(_NOT_HELD))
            self._picks[source] = _array(key | not_held, self.count)

    def _set_key(self, index):
        """
        Bring chunk C{index}'s place in every pick array up to date.
        """
        level = self._avail[index] if self._state[index] == _QUEUED else _NOT_PICKABLE
        self._key[index] = level
        for source, pick in self._picks.items():
            if self._holdings[source][index]:
                pick[index] = level

    # -- picking ---------------------------------------------------------------

    def pick(self, source, count, exclude=()):
        """
        Up to C{count} queued chunks that counted C{source} holds, rarest
        first, then in file order; none of those in C{exclude} (chunks
        already planned for another source).
        """
        if source not in self._holdings:
            return []
        key = self._picks.get(source, self._key)
        levels = min(_MAX_LEVEL, len(self._holdings))
        picked = []
        for level in range(1, levels + 1):
            position = 0
            while len(picked) < count:
                position = key.find(level, position)
                if position < 0:
                    break
                if position not in exclude:
                    picked.append(position)
                position += 1
            if len(picked) >= count:
                break
        return picked

    def copies(self, index):
        """
        How many requests wait for chunk C{index} now.
        """
        return len(self._askers.get(index, ()))

    def askers(self, index):
        """
        The requests that wait for chunk C{index} now, in the order asked.
        """
        return list(self._askers.get(index, ()))

    def requests_in_flight(self):
        """
        How many requests wait for something.
        """
        return len(self._asks)

    def endgame_pick(self, source, count, now):
        """
        Up to C{count} chunks in flight elsewhere for a second copy from
        counted C{source}: those whose requests have made no progress for the
        endgame stall, longest stalled first, in fewer than the endgame
        copies of requests, none of them to C{source}.
        """
        if now < self._no_stall_before:
            return []
        self._no_stall_before = min(
            (a.progress for a in self._asks.values()), default=math.inf) + self._stall
        candidates = []
        for index, requests in self._askers.items():
            asks = [self._asks[r] for r in requests]
            if (
                self._state[index] != _FLIGHT
                or len(asks) >= self._copies
                or not self.holds(source, index)
                or any(a.source == source for a in asks)
            ):
                continue
            progress = max(a.progress for a in asks)
            if now - progress >= self._stall:
                candidates.append((progress, index))
        candidates.sort()
        return [index for _, index in candidates[:count]]

    # -- a chunk's life --------------------------------------------------------

    def ask(self, request, source, chunks, now):
        """
        C{request}, new, asks C{source} for C{chunks} (distinct indexes).
        """
        ask = _Ask(source, chunks, now)
        self._asks[request] = ask
        self._no_stall_before = min(self._no_stall_before, now + self._stall)
        for index in sorted(ask.pending):
            self._askers.setdefault(index, []).append(request)
            if self._state[index] == _QUEUED:
                self._state[index] = _FLIGHT
                self._set_key(index)
        self._in_flight[source] = self.in_flight(source) + len(ask.pending)

    def arrived(self, request, index, now):
        """
        Chunk C{index} came in answer to C{request}: whether the request was
        waiting for it.  If it was, it waits no more, and it made progress
        C{now}; if not, this copy was cancelled (another came first).
        """
        ask = self._asks.get(request)
        if ask is None or index not in ask.pending:
            return False
        self._withdraw(request, ask, index)
        self._over_if_answered(request, ask)
        ask.progress = now
        self._no_stall_before = min(self._no_stall_before, now + self._stall)
        return True

    def withdraw(self, request, index):
        """
        C{request} no longer waits for chunk C{index} (its source was told
        to cancel it, and did): the chunk goes back into the queue unless
        another request waits for it.
        """
        ask = self._asks.get(request)
        if ask is None or index not in ask.pending:
            return
        self._withdraw(request, ask, index)
        self._over_if_answered(request, ask)
        if self._state[index] == _FLIGHT and index not in self._askers:
            self._state[index] = _QUEUED
            self._set_key(index)

    def begin_verifying(self, index):
        """
        Chunk C{index} is here, to be verified: no request waits for it any
        more.  The requests that now wait for nothing, to be cancelled; or
        C{None} when it is being verified or verified already (this copy is
        not needed).
        """
        was = self._state[index]
        if was in (_VERIFYING, _HAVE):
            return None
        self._state[index] = _VERIFYING
        if was == _QUEUED:
            self._set_key(index)
        finished = []
        for request in self._askers.pop(index, ()):
            ask = self._asks[request]
            ask.pending.discard(index)
            self._count_out(ask.source)
            if not ask.pending:
                self._over_if_answered(request, ask)
                finished.append(request)
        return finished

    def verified(self, index):
        """
        Chunk C{index} passed verification and is stored.
        """
        was = self._state[index]
        if was == _HAVE:
            return
        self._state[index] = _HAVE
        self.have += 1
        if was == _QUEUED:
            self._set_key(index)

    def requeue(self, index):
        """
        Chunk C{index} failed verification or could not be stored: to be
        asked for again.
        """
        self._state[index] = _QUEUED
        self._set_key(index)

    def end(self, request):
        """
        C{request} is over: the chunks it still waited for go back into the
        queue, but for those another request waits for too.
        """
        ask = self._asks.pop(request, None)
        if ask is None:
            return
        for index in sorted(ask.pending):
            self._withdraw(request, ask, index)
            if self._state[index] == _FLIGHT and index not in self._askers:
                self._state[index] = _QUEUED
                self._set_key(index)

    def _over_if_answered(self, request, ask):
        """
        A request that waits for nothing more is over: it is forgotten, so
        that what a download keeps, and L{requests_in_flight}, stay the
        requests in flight (not every request of the download so far).
        """
        if not ask.pending:
            del self._asks[request]

    def _withdraw(self, request, ask, index):
        """
        C{request} no longer waits for chunk C{index}.
        """
        ask.pending.discard(index)
        self._count_out(ask.source)
        requests = self._askers.get(index)
        if requests is not None:
            if request in requests:
                requests.remove(request)
            if not requests:
                del self._askers[index]

    def _count_out(self, source):
        left = self._in_flight[source] - 1
        if left:
            self._in_flight[source] = left
        else:
            del self._in_flight[source]
