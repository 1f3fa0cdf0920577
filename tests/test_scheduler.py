"""
The pure scheduler, C{plan(ledger, sources, now)}: windows sized by each
source's rate, runs of chunks, rests, and the endgame (steals and stalled
chunks), with no reactor.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twisted_p2p.chunkmap import ChunkLedger
from twisted_p2p.download.scheduler import ask_size, in_flight_at, plan, run_for, window_for
from twisted_p2p.limits import (
    CHUNK_SIZE,
    DEFAULT_RUN,
    ENDGAME_STALL,
    FRAME_READ_BUDGET,
    INITIAL_WINDOW,
    MAX_CHUNKS_PER_REQUEST,
    MAX_RUN,
    MAX_WINDOW,
    MIN_ASK,
    MIN_WINDOW,
    STEAL_MARGIN,
    WINDOW_SECONDS,
)


class Source:
    """
    What the scheduler reads of a source: its rest, its rate, and the
    chunks waiting at it (in the order asked), and the run its stream asked.
    """

    run = DEFAULT_RUN

    def __init__(self, name, rate=None, rest_until=0.0):
        self.name = name
        self._rate = rate
        self.rest_until = rest_until
        self.waiting = []

    def rate(self, now):
        return self._rate

    def queue(self):
        return list(self.waiting)

    def __repr__(self):
        return f"<{self.name}>"


class Request:
    """A ledger key for one ask."""


def ask(ledger, source, chunks, now=0.0):
    """What the download does with an ask of the plan."""
    request = Request()
    ledger.ask(request, source, chunks, now)
    source.waiting.extend(chunks)
    return request


def carry_out(ledger, decided, now=0.0):
    requests = {}
    for source, chunks in decided.asks:
        requests[source] = ask(ledger, source, chunks, now)
    return requests


# -- windows and runs ----------------------------------------------------------


def test_a_source_of_unknown_rate_gets_the_initial_window():
    assert window_for(None) == INITIAL_WINDOW


@pytest.mark.parametrize("rate", [0, 1, 100_000, 8_000_000, 100_000_000, 10**10])
def test_the_window_covers_the_rate_for_its_seconds_within_bounds(rate):
    window = window_for(rate)
    assert MIN_WINDOW <= window <= MAX_WINDOW
    wanted = rate * WINDOW_SECONDS / CHUNK_SIZE
    if MIN_WINDOW < window < MAX_WINDOW:
        assert window >= wanted


def test_a_faster_source_has_a_window_at_least_as_large():
    rates = [0, 10**5, 10**6, 8 * 10**6, 10**8, 10**9]
    windows = [window_for(r) for r in rates]
    assert windows == sorted(windows)


def test_asks_are_a_quarter_of_the_window_at_least():
    assert ask_size(MAX_WINDOW) == MAX_WINDOW // 4
    assert ask_size(MIN_WINDOW) == MIN_ASK


def test_one_source_is_asked_its_window_of_chunks_in_file_order():
    ledger = ChunkLedger(100)
    source = Source("a")
    ledger.add_source(source)
    decided = plan(ledger, [source], 0.0)
    assert decided.asks == [(source, list(range(INITIAL_WINDOW)))]
    assert decided.cancels == [] and decided.wake_at is None


def test_a_fast_source_is_asked_up_to_a_request_limit():
    ledger = ChunkLedger(1000)
    source = Source("a", rate=10**10)
    ledger.add_source(source)
    [(asked, chunks)] = plan(ledger, [source], 0.0).asks
    assert chunks == list(range(min(MAX_WINDOW, MAX_CHUNKS_PER_REQUEST)))


def test_a_source_with_its_window_full_is_asked_nothing():
    ledger = ChunkLedger(100)
    source = Source("a")
    ledger.add_source(source)
    carry_out(ledger, plan(ledger, [source], 0.0))
    assert plan(ledger, [source], 0.0).asks == []


def test_room_for_less_than_a_run_waits_while_more_is_left():
    ledger = ChunkLedger(100)
    source = Source("a", rate=10**10)  # window MAX_WINDOW, runs of a quarter
    ledger.add_source(source)
    request = carry_out(ledger, plan(ledger, [source], 0.0))[source]
    # A few chunks arrive: room for fewer than a run.
    for index in range(ask_size(MAX_WINDOW) - 1):
        ledger.arrived(request, index, 0.0)
    assert plan(ledger, [source], 0.0).asks == []
    ledger.arrived(request, ask_size(MAX_WINDOW) - 1, 0.0)
    [(_, chunks)] = plan(ledger, [source], 0.0).asks
    assert len(chunks) == ask_size(MAX_WINDOW)


def test_the_last_chunks_are_asked_even_if_fewer_than_a_run():
    ledger = ChunkLedger(3)
    source = Source("a", rate=10**10)
    ledger.add_source(source)
    assert plan(ledger, [source], 0.0).asks == [(source, [0, 1, 2])]


def test_two_sources_are_never_asked_the_same_chunk_in_one_plan():
    ledger = ChunkLedger(20)
    a, b = Source("a"), Source("b")
    ledger.add_source(a)
    ledger.add_source(b)
    decided = plan(ledger, [a, b], 0.0)
    asked = [i for _, chunks in decided.asks for i in chunks]
    assert sorted(asked) == list(range(20))
    assert len(set(asked)) == len(asked)


def test_the_rarest_chunks_go_first():
    ledger = ChunkLedger(12)
    full, partial = Source("full"), Source("partial")
    ledger.add_source(full)
    ledger.add_source(partial, bytes(1 if i < 6 else 0 for i in range(12)))
    decided = plan(ledger, [full, partial], 0.0)
    # Chunks 6-11 only the full source has: it is asked those first.
    assert decided.asks[0] == (full, [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5])


def test_a_resting_source_is_not_asked_and_sets_the_wake():
    ledger = ChunkLedger(10)
    tired = Source("tired", rest_until=5.0)
    other = Source("other", rest_until=3.0)
    for s in (tired, other):
        ledger.add_source(s)
    decided = plan(ledger, [tired, other], 1.0)
    assert decided.asks == []
    assert decided.wake_at == 3.0
    assert plan(ledger, [tired, other], 3.0).asks == [(other, list(range(10)))]


# -- the endgame -------------------------------------------------------------------


def test_an_idle_fast_source_takes_over_the_tail_of_a_slow_one():
    ledger = ChunkLedger(20)
    slow, fast = Source("slow", rate=1_000_000), Source("fast", rate=100_000_000)
    for s in (slow, fast):
        ledger.add_source(s)
    # Everything is asked of the slow one first.
    ask(ledger, slow, list(range(20)))
    decided = plan(ledger, [slow, fast], 0.0)
    [(thief, stolen)] = decided.asks
    assert thief is fast
    # The longest waits first: from the end of the slow source's queue.
    assert stolen[0] == 19
    assert stolen == sorted(stolen, reverse=True)
    assert decided.cancels == [(slow, stolen)]
    # What it takes it would deliver well before the slow one would.
    ahead = 0
    for index in stolen:
        ahead += 1
        position = slow.waiting.index(index) + 1
        assert ahead * CHUNK_SIZE / fast.rate(0) < STEAL_MARGIN * position * CHUNK_SIZE / slow.rate(0)


def test_sources_as_fast_as_each_other_take_nothing_from_each_other():
    ledger = ChunkLedger(8)
    a, b = Source("a", rate=8_000_000), Source("b", rate=8_000_000)
    for s in (a, b):
        ledger.add_source(s)
    ask(ledger, a, [0, 1, 2, 3])
    ask(ledger, b, [4, 5, 6, 7])
    decided = plan(ledger, [a, b], 0.0)
    assert decided.asks == [] and decided.cancels == []


def test_a_source_of_unknown_rate_takes_nothing_over():
    ledger = ChunkLedger(10)
    slow, new = Source("slow", rate=1000), Source("new")
    for s in (slow, new):
        ledger.add_source(s)
    ask(ledger, slow, list(range(10)))
    assert plan(ledger, [slow, new], 0.0).cancels == []


def test_a_source_of_unknown_rate_is_not_taken_from():
    """
    Asked moments ago, it has no rate yet, and what it was asked may be on
    its way already: taking it over would bring it twice.
    """
    ledger = ChunkLedger(40)
    new, fast = Source("new"), Source("fast", rate=100_000_000)
    for s in (new, fast):
        ledger.add_source(s)
    ask(ledger, new, list(range(40)))
    assert plan(ledger, [new, fast], 0.0).cancels == []
    # Once it is measured, and slow, its tail is taken over.
    new._rate = 1_000_000
    assert plan(ledger, [new, fast], 0.0).cancels


def test_a_chunk_is_never_in_more_than_two_requests():
    ledger = ChunkLedger(4)
    slow, fast, faster = (Source("slow", 1000), Source("fast", 10**8), Source("faster", 10**9))
    for s in (slow, fast, faster):
        ledger.add_source(s)
    ask(ledger, slow, [0, 1, 2, 3])
    carry_out(ledger, plan(ledger, [slow, fast], 0.0))
    decided = plan(ledger, [slow, fast, faster], 0.0)
    assert all(ledger.copies(i) < 2 for _, chunks in decided.asks for i in chunks)


def test_a_stalled_chunk_of_a_silent_source_goes_to_another_too():
    ledger = ChunkLedger(3)
    silent, other = Source("silent", rate=0.0), Source("other")
    for s in (silent, other):
        ledger.add_source(s)
    ask(ledger, silent, [0, 1, 2], now=0.0)
    assert plan(ledger, [silent, other], ENDGAME_STALL - 0.1).asks == []
    decided = plan(ledger, [silent, other], ENDGAME_STALL)
    assert decided.asks == [(other, [0, 1, 2])]
    # Not cancelled at the stalled source: whichever copy comes first wins.
    assert decided.cancels == []


def test_a_partial_holder_takes_over_only_what_it_holds():
    ledger = ChunkLedger(16)
    slow, partial = Source("slow", rate=1000), Source("partial", rate=10**9)
    ledger.add_source(slow)
    ledger.add_source(partial, bytes([1, 0] * 8))
    ask(ledger, slow, list(range(16)))
    decided = plan(ledger, [slow, partial], 0.0)
    [(_, stolen)] = decided.asks
    assert stolen and set(stolen) <= set(range(0, 16, 2))


def test_what_is_on_its_way_from_a_source_is_left_to_it():
    ledger = ChunkLedger(40)
    busy, idle = Source("busy", rate=10_000_000), Source("idle", rate=500_000_000)
    for s in (busy, idle):
        ledger.add_source(s)
    ask(ledger, busy, list(range(40)))
    decided = plan(ledger, [busy, idle], 0.0)
    on_its_way = in_flight_at(busy.rate(0))
    assert 0 < on_its_way < 40
    stolen = [i for _, chunks in decided.asks for i in chunks]
    assert stolen and min(stolen) >= on_its_way


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.integers(1, 80),
    rates=st.lists(st.one_of(st.none(), st.floats(0, 2e9)), min_size=1, max_size=5),
    holdings=st.data(),
)
def test_every_plan_keeps_its_invariants(chunks, rates, holdings):
    """
    Whatever the sources: nobody is asked a chunk it does not hold, or a
    verified one; no chunk goes to more than two requests; each ask is
    within the source's window and a request's size; every cancel names
    chunks waiting at that source; and carried out to the end, every chunk
    that someone holds is fetched.
    """
    ledger = ChunkLedger(chunks)
    sources = []
    for n, rate in enumerate(rates):
        s = Source(f"s{n}", rate)
        held = holdings.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=chunks,
                                                              max_size=chunks)))
        ledger.add_source(s, None if held is None else bytes(held))
        sources.append(s)
    now = 0.0
    for _ in range(chunks * 3):
        decided = plan(ledger, sources, now)
        for source, chunk_list in decided.asks:
            assert 0 < len(chunk_list) <= MAX_CHUNKS_PER_REQUEST
            assert ledger.in_flight(source) + len(chunk_list) <= max(
                window_for(source.rate(now)), MAX_WINDOW)
            for index in chunk_list:
                assert ledger.holds(source, index)
                assert not ledger.is_verified(index)
        for victim, chunk_list in decided.cancels:
            assert set(chunk_list) <= set(victim.queue())
        carry_out(ledger, decided, now)
        assert all(ledger.copies(i) <= 2 for i in range(chunks))
        # Each source delivers the first chunk waiting at it.
        delivered = False
        for s in sources:
            while s.waiting and ledger.is_verified(s.waiting[0]):
                s.waiting.pop(0)
            if s.waiting:
                index = s.waiting.pop(0)
                for request in ledger.askers(index):
                    ledger.arrived(request, index, now)
                if ledger.begin_verifying(index) is not None:
                    ledger.verified(index)
                delivered = True
        if ledger.complete:
            break
        if not delivered and not decided.asks:
            now += ENDGAME_STALL
    held_somewhere = [i for i in range(chunks) if any(ledger.holds(s, i) for s in sources)]
    assert all(ledger.is_verified(i) for i in held_somewhere)
    assert math.isfinite(now)


def test_a_source_seen_sending_what_it_was_told_to_cancel_keeps_that_much():
    ledger = ChunkLedger(40)
    slow, fast = Source("slow", rate=1_000_000), Source("fast", rate=500_000_000)
    for s in (slow, fast):
        ledger.add_source(s)
    ask(ledger, slow, list(range(40)))
    slow.in_transit = 30  # a cancel at position 29 came too late once
    stolen = [i for _, chunks in plan(ledger, [slow, fast], 0.0).asks for i in chunks]
    assert stolen and min(stolen) >= 30


@pytest.mark.parametrize(
    "streams, run",
    [(0, MAX_RUN), (1, MAX_RUN), (4, MAX_RUN), (5, 12), (8, 8), (16, 4), (64, 1), (300, 1)],
)
def test_a_download_of_many_streams_asks_each_for_shorter_runs(streams, run):
    assert run_for(streams) == run
    # What its connections hold while each reads a frame stays in budget.
    assert max(streams, 1) * run * CHUNK_SIZE <= max(FRAME_READ_BUDGET, streams * CHUNK_SIZE)


def test_a_longer_run_leaves_more_on_its_way_but_never_more_than_a_window():
    fast, slow = 500_000_000, CHUNK_SIZE  # a chunk a second
    assert in_flight_at(fast, MAX_RUN) - in_flight_at(fast, DEFAULT_RUN) == MAX_RUN - DEFAULT_RUN
    # A slow source is never asked a frame's worth at once.
    assert in_flight_at(slow, MAX_RUN) == in_flight_at(slow, window_for(slow))
    assert in_flight_at(slow, MAX_RUN) < 1 + MAX_RUN
    assert in_flight_at(0, MAX_RUN) == 0


def test_what_is_on_its_way_counts_the_run_of_the_victims_stream():
    ledger = ChunkLedger(60)
    busy, idle = Source("busy", rate=10_000_000), Source("idle", rate=500_000_000)
    busy.run = MAX_RUN
    for s in (busy, idle):
        ledger.add_source(s)
    ask(ledger, busy, list(range(60)))
    decided = plan(ledger, [busy, idle], 0.0)
    stolen = [i for _, chunks in decided.asks for i in chunks]
    assert stolen and min(stolen) >= in_flight_at(busy.rate(0), MAX_RUN)
    assert in_flight_at(busy.rate(0), MAX_RUN) > in_flight_at(busy.rate(0))
