"""
The scheduler: which chunks to ask of which source now.  Pure: it reads a
L{ChunkLedger} and the sources and returns a L{Plan}; the download carries
it out.

 - Each source keeps a window of chunks in flight that covers
   L{WINDOW_SECONDS} of its own rate (see L{window_for}), so a fast source
   never waits for our next request and a slow one is not given chunks that
   others would deliver sooner.
 - Chunks are asked in runs (a quarter of the window at least, see
   L{ask_size}, while that many are left), the rarest first, then in file
   order.
 - When nothing is left to ask, a source with room takes over chunks still
   waiting at another source that it would deliver well before that one
   (L{STEAL_MARGIN}); the other is told to cancel them, so at the end every
   source stays busy and few chunks arrive twice.  Chunks at the head of a
   source's queue are on their way already, and are left to it.  A chunk whose request has
   made no progress for the endgame stall is asked of a second source too.
"""

import math
from dataclasses import dataclass, field

from twisted_p2p.limits import (
    CHUNK_SIZE,
    DEFAULT_RUN,
    ENDGAME_COPIES,
    FRAME_READ_BUDGET,
    INITIAL_WINDOW,
    MAX_CHUNKS_PER_REQUEST,
    MAX_RUN,
    MAX_WINDOW,
    MIN_ASK,
    MIN_WINDOW,
    STEAL_IN_FLIGHT_SECONDS,
    STEAL_MARGIN,
    WINDOW_SECONDS,
)


@dataclass
class Plan:
    """
    What to do now: C{asks} are C{(source, chunks)} to ask for; C{cancels}
    are C{(source, chunks)} another source has taken over; C{wake_at} is
    when a resting source may be asked again (C{None}: no one rests).
    """

    asks: list = field(default_factory=list)
    cancels: list = field(default_factory=list)
    wake_at: object = None
    #: Chunks taken over from other sources, and chunks asked a second time
    #: because their request stalled (both count towards the endgame's cost).
    taken_over: int = 0
    doubled: int = 0


def window_for(rate):
    """
    Chunks a source delivering C{rate} bytes per second (C{None}: not known
    yet) may have in flight.
    """
    if rate is None:
        return INITIAL_WINDOW
    wanted = math.ceil(rate * WINDOW_SECONDS / CHUNK_SIZE) + MIN_ASK
    return max(MIN_WINDOW, min(MAX_WINDOW, wanted))


def ask_size(window):
    """
    The fewest chunks asked in one request of a source with C{window}
    (while more are left): a quarter of its window, and at least
    L{MIN_ASK}, so that a fast source is asked a few times per window
    rather than once per chunk.
    """
    return max(MIN_ASK, window // 4)


def in_flight_at(rate, run=DEFAULT_RUN):
    """
    How many chunks at the head of the queue of a source delivering C{rate}
    are sent already or being sent (see L{STEAL_IN_FLIGHT_SECONDS}), and a
    frame: a run of up to C{run} chunks (its stream's), and no longer than
    the window a source of that rate is given.
    """
    if not rate:
        return 0  # stalled: nothing is on its way
    frame = min(run, window_for(rate))
    return math.ceil(rate * STEAL_IN_FLIGHT_SECONDS / CHUNK_SIZE) + frame


def run_for(streams):
    """
    The run (chunks a frame may carry) a download asks a new stream for
    while it reads from C{streams} data connections, this one included:
    L{MAX_RUN}, and less once they are many, so that the frames they hold
    while each is read stay within L{FRAME_READ_BUDGET}.
    """
    fits = FRAME_READ_BUDGET // (max(streams, 1) * CHUNK_SIZE)
    return max(1, min(MAX_RUN, fits))


def plan(ledger, sources, now):
    """
    The L{Plan} for C{sources} (the usable ones, in order of preference)
    over C{ledger}.

    Each source provides C{rest_until} (when it may be asked again),
    C{rate(now)} (bytes per second, or C{None}), C{queue()} (the chunks
    asked of it and not yet here, in the order asked, but for those it is
    being told to cancel) and, optionally, C{in_transit} (how many at the
    head of its queue it was found to be sending already).
    """
    result = Plan()
    taken = set()
    idle = []
    for source in sources:
        if source.rest_until > now:
            if result.wake_at is None or source.rest_until < result.wake_at:
                result.wake_at = source.rest_until
            continue
        window = window_for(source.rate(now))
        room = window - ledger.in_flight(source)
        if room <= 0:
            continue
        want = min(room, MAX_CHUNKS_PER_REQUEST)
        chunks = ledger.pick(source, want, exclude=taken)
        if len(chunks) < want:
            idle.append((source, want - len(chunks)))
        elif want < ask_size(window):
            # Room for a few only, and more to ask: wait for a longer run.
            continue
        if chunks:
            result.asks.append((source, chunks))
            taken.update(chunks)
    cancels = {}
    for thief, room in idle:
        stolen = _steal(ledger, sources, thief, room, taken, now, cancels)
        result.taken_over += len(stolen)
        if not stolen:
            stolen = [i for i in ledger.endgame_pick(thief, room, now) if i not in taken]
            taken.update(stolen)
            result.doubled += len(stolen)
        if stolen:
            result.asks.append((thief, stolen))
    result.cancels = [(victim, chunks) for victim, chunks in cancels.items()]
    return result


def _steal(ledger, sources, thief, room, taken, now, cancels):
    """
    Up to C{room} chunks waiting at other sources that C{thief} would
    deliver in less than L{STEAL_MARGIN} of the time they would take there,
    those with the longest wait first.  Each is added to C{taken}, and to
    C{cancels} under the source it is taken from.
    """
    thief_rate = thief.rate(now)
    if not thief_rate:
        return []
    candidates = []
    for victim in sources:
        if victim is thief:
            continue
        victim_rate = victim.rate(now)
        if victim_rate is None:
            # Not measured yet (asked moments ago): all it was asked may be
            # on its way, and a copy taken over would come twice.  One that
            # never sends is left to the endgame's stall and the silence
            # timeout.
            continue
        queue = victim.queue()
        first = max(in_flight_at(victim_rate, victim.run), getattr(victim, "in_transit", 0))
        for position in range(first, len(queue)):
            index = queue[position]
            copies = ledger.copies(index)
            # A chunk no request waits for any more is here already (or
            # being verified); one asked twice has had its second chance.
            if index in taken or not 0 < copies < ENDGAME_COPIES or not ledger.holds(thief, index):
                continue
            wait = (position + 1) * CHUNK_SIZE / victim_rate if victim_rate else math.inf
            candidates.append((wait, index, victim))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    ahead = ledger.in_flight(thief)
    stolen = []
    for wait, index, victim in candidates:
        if len(stolen) >= room:
            break
        delivery = (ahead + len(stolen) + 1) * CHUNK_SIZE / thief_rate
        if delivery >= STEAL_MARGIN * wait:
            break  # the rest wait less: none is worth taking over
        stolen.append(index)
        taken.add(index)
        cancels.setdefault(victim, []).append(index)
    return stolen
