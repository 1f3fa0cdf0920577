"""
L{ChunkLedger} on its own: plain sources and requests (strings and
numbers), times as numbers, no reactor.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from twisted_p2p.chunkmap import ChunkLedger
from twisted_p2p.limits import ENDGAME_COPIES, ENDGAME_STALL


def flags(held, count):
    """
    A partial holder's C{has}: one byte per chunk, 1 for those in C{held}.
    """
    return bytes(1 if i in held else 0 for i in range(count))


def ledger_with(count, sources, verified=()):
    """
    A ledger counting C{sources}: name -> C{None} (full) or the set held.
    """
    ledger = ChunkLedger(count, verified=verified)
    for name, held in sources.items():
        ledger.add_source(name, None if held is None else flags(held, count))
    return ledger


# -- picking -----------------------------------------------------------------------


def test_rarest_first_then_in_file_order():
    # Availability: 0-2 on full and a (2), 3-4 on all three (3), 5-7 on full
    # and b (2), 8-9 on full only (1).
    ledger = ledger_with(10, {"full": None, "a": set(range(5)), "b": set(range(3, 8))})
    assert [ledger.availability(i) for i in range(10)] == [2, 2, 2, 3, 3, 2, 2, 2, 1, 1]
    assert ledger.pick("full", 10) == [8, 9, 0, 1, 2, 5, 6, 7, 3, 4]


def test_a_source_is_picked_only_what_it_holds():
    ledger = ledger_with(10, {"full": None, "a": set(range(5)), "b": set(range(3, 8))})
    assert ledger.pick("a", 10) == [0, 1, 2, 3, 4]
    assert ledger.pick("b", 10) == [5, 6, 7, 3, 4]
    assert ledger.pick("stranger", 10) == []


def test_a_pick_is_at_most_the_count_asked():
    ledger = ledger_with(10, {"full": None, "a": {0, 1}})
    assert ledger.pick("full", 3) == [2, 3, 4]
    assert ledger.pick("full", 0) == []
    assert len(ledger.pick("full", 100)) == 10


def test_chunks_in_flight_are_not_picked_again():
    ledger = ledger_with(6, {"x": None, "y": None})
    ledger.ask("r1", "x", [0, 1, 2], now=0)
    assert ledger.in_flight("x") == 3 and ledger.in_flight("y") == 0
    assert ledger.pick("y", 6) == [3, 4, 5]
    assert ledger.pending("r1") == {0, 1, 2}


def test_verified_chunks_are_never_picked_again():
    ledger = ledger_with(3, {"x": None})
    ledger.ask("r1", "x", [0, 1], now=0)
    assert ledger.arrived("r1", 0, now=1)
    assert ledger.begin_verifying(0) == []
    assert ledger.verifying()
    assert ledger.pick("x", 3) == [2]
    ledger.verified(0)
    ledger.end("r1")  # chunk 1 never came: back in the queue
    assert ledger.pick("x", 3) == [1, 2]
    assert ledger.have == 1 and ledger.is_verified(0) and not ledger.verifying()


def test_a_rejected_chunk_is_picked_again():
    ledger = ledger_with(2, {"x": None})
    ledger.ask("r1", "x", [0, 1], now=0)
    assert ledger.arrived("r1", 0, now=1)
    assert ledger.begin_verifying(0) == []
    ledger.requeue(0)
    assert ledger.pick("x", 2) == [0]
    assert ledger.have == 0


def test_resume_with_some_chunks_verified():
    ledger = ledger_with(5, {"x": None}, verified=[0, 3])
    assert ledger.have == 2 and not ledger.complete
    assert ledger.pick("x", 5) == [1, 2, 4]
    ledger.ask("r1", "x", [1, 2, 4], now=0)
    for index in (1, 2, 4):
        assert ledger.arrived("r1", index, now=1)
        ledger.begin_verifying(index)
        ledger.verified(index)
    assert ledger.complete and ledger.have == 5
    assert ledger.pick("x", 5) == []


def test_an_empty_file_is_complete_at_once():
    assert ChunkLedger(0).complete


# -- sources coming and going ------------------------------------------------------------


def test_removing_a_source_makes_its_chunks_rarer():
    ledger = ledger_with(4, {"full": None, "a": {0, 1}, "b": {1, 2, 3}})
    assert ledger.pick("full", 4) == [0, 2, 3, 1]
    ledger.remove_source("b")
    assert [ledger.availability(i) for i in range(4)] == [2, 2, 1, 1]
    assert ledger.pick("full", 4) == [2, 3, 0, 1]
    assert ledger.pick("b", 4) == []
    ledger.remove_source("full")
    assert [ledger.availability(i) for i in range(4)] == [1, 1, 0, 0]
    assert ledger.pick("a", 4) == [0, 1]
    assert ledger.first_unheld() == 2


def test_a_removed_source_keeps_its_requests_until_they_end():
    ledger = ledger_with(3, {"x": None, "y": None})
    ledger.ask("r1", "x", [0, 1], now=0)
    ledger.remove_source("x")
    assert "x" not in ledger and ledger.in_flight("x") == 2
    assert ledger.pick("y", 3) == [2]
    ledger.end("r1")
    assert ledger.in_flight("x") == 0
    assert ledger.pick("y", 3) == [0, 1, 2]


def test_a_source_counted_twice_counts_once():
    ledger = ledger_with(2, {"x": None, "a": {0}})
    ledger.add_source("x")
    ledger.add_source("a", flags({0, 1}, 2))
    assert [ledger.availability(i) for i in range(2)] == [2, 1]


def test_a_partial_holder_that_gains_chunks():
    ledger = ledger_with(4, {"a": {0}})
    assert ledger.is_partial("a") and ledger.partial_sources() == ["a"]
    ledger.update_source("a", flags({0, 2}, 4))
    assert ledger.pick("a", 4) == [0, 2]
    ledger.update_source("a", None)
    assert not ledger.is_partial("a") and ledger.partial_sources() == []
    assert ledger.pick("a", 4) == [0, 1, 2, 3]
    # A full copy stays one.
    ledger.update_source("a", flags({0}, 4))
    assert ledger.pick("a", 4) == [0, 1, 2, 3]


def test_a_partial_holder_that_lost_chunks():
    ledger = ledger_with(3, {"a": {0, 1, 2}, "b": {2}})
    ledger.update_source("a", flags({0}, 3))
    assert [ledger.availability(i) for i in range(3)] == [1, 0, 1]
    assert ledger.pick("a", 3) == [0]
    assert ledger.partial_sources() == ["a", "b"]
    assert ledger.first_unheld() == 1


def test_an_update_for_a_source_not_counted_is_ignored():
    ledger = ledger_with(2, {})
    ledger.update_source("a", flags({0}, 2))
    assert "a" not in ledger and ledger.availability(0) == 0


@settings(max_examples=60, deadline=None)
@given(count=st.integers(65, 300), full=st.booleans(), data=st.data())
def test_updates_of_few_or_many_chunks_match_a_ledger_counted_afresh(count, full, data):
    """
    A partial holder's update touches only the chunks that changed (or, for
    many, redoes whole arrays): either way the ledger says what one counting
    the same holdings from scratch says.
    """
    chunk = st.integers(0, count - 1)
    holdings = data.draw(st.lists(st.sets(chunk), min_size=1, max_size=3), label="holdings")
    in_flight = sorted(data.draw(st.sets(chunk, max_size=10), label="in flight"))
    verified = sorted(data.draw(st.sets(chunk, max_size=10), label="verified") - set(in_flight))

    def counted(holdings):
        ledger = ChunkLedger(count, verified=verified)
        if full:
            ledger.add_source("full")
        for n, held in enumerate(holdings):
            ledger.add_source(n, flags(held, count))
        if in_flight:
            ledger.ask("r", "elsewhere", in_flight, now=0)
        return ledger

    ledger = counted(holdings)
    for _ in range(data.draw(st.integers(1, 5), label="updates")):
        n = data.draw(st.integers(0, len(holdings) - 1), label="holder")
        flips = data.draw(st.sets(chunk, max_size=3) | st.sets(chunk, min_size=count // 2),
                          label="flips")
        holdings[n] = holdings[n] ^ flips
        ledger.update_source(n, flags(holdings[n], count))
        fresh = counted(holdings)
        sources = list(range(len(holdings))) + (["full"] if full else [])
        assert [ledger.availability(i) for i in range(count)] == [
            fresh.availability(i) for i in range(count)
        ]
        for source in sources:
            assert ledger.pick(source, count) == fresh.pick(source, count)
            assert [ledger.holds(source, i) for i in range(count)] == [
                fresh.holds(source, i) for i in range(count)
            ]
        assert ledger.first_unheld() == fresh.first_unheld()


def test_holdings_given_as_any_nonzero_bytes_count_as_held():
    ledger = ChunkLedger(3)
    ledger.add_source("a", b"\x00\x07\xff")
    assert [ledger.availability(i) for i in range(3)] == [0, 1, 1]
    ledger.update_source("a", b"\x02\x00\x01")
    assert [ledger.availability(i) for i in range(3)] == [1, 0, 1]
    assert ledger.pick("a", 3) == [0, 2]


# -- the endgame -------------------------------------------------------------------


def test_a_stalled_chunk_is_asked_of_a_second_source_only_once():
    ledger = ledger_with(2, {"slow": None, "fast": None, "third": None})
    ledger.ask("r1", "slow", [0, 1], now=0)
    assert ledger.pick("fast", 2) == []
    assert ledger.endgame_pick("fast", 2, now=ENDGAME_STALL - 0.1) == []
    assert ledger.endgame_pick("fast", 2, now=ENDGAME_STALL) == [0, 1]
    # Never a second copy from the source already asked.
    assert ledger.endgame_pick("slow", 2, now=100) == []
    ledger.ask("r2", "fast", [0, 1], now=ENDGAME_STALL)
    # At most ENDGAME_COPIES requests for a chunk.
    assert ENDGAME_COPIES == 2
    assert ledger.endgame_pick("third", 2, now=100) == []


def test_the_endgame_looks_at_its_requests_only_once_one_may_have_stalled():
    # Once every chunk is in flight the download asks for second copies
    # after each chunk that comes; until some request is ENDGAME_STALL old,
    # that must cost nothing like a walk over every chunk in flight.
    ledger = ledger_with(300, {"a": None, "b": None})
    looked = []
    holds = ledger.holds
    ledger.holds = lambda source, index: looked.append(index) or holds(source, index)
    ledger.ask("r1", "a", list(range(300)), now=0)
    for step in range(100):
        assert ledger.endgame_pick("b", 4, now=step * ENDGAME_STALL / 100) == []
    assert looked == []
    assert ledger.endgame_pick("b", 4, now=ENDGAME_STALL) == [0, 1, 2, 3]
    assert looked
    # Progress moves the next possible stall on: after one more walk, which
    # finds none, no walk until then.
    ledger.arrived("r1", 0, now=ENDGAME_STALL + 1)
    ledger.ask("r2", "b", [1, 2, 3, 4], now=ENDGAME_STALL + 1)
    assert ledger.endgame_pick("b", 4, now=ENDGAME_STALL + 1.5) == []
    del looked[:]
    assert ledger.endgame_pick("b", 4, now=2 * ENDGAME_STALL + 0.9) == []
    assert looked == []
    assert ledger.endgame_pick("b", 4, now=2 * ENDGAME_STALL + 1) == [5, 6, 7, 8]
    # A request asked with an earlier time (a clock set back) still counts.
    ledger = ledger_with(2, {"a": None, "b": None})
    ledger.ask("r1", "a", [0], now=10)
    assert ledger.endgame_pick("b", 1, now=10) == []
    ledger.ask("r2", "a", [1], now=0)
    assert ledger.endgame_pick("b", 1, now=ENDGAME_STALL) == [1]


def test_the_endgame_copies_limit_is_a_parameter():
    ledger = ChunkLedger(1, endgame_stall=1, endgame_copies=3)
    for name in ("a", "b", "c", "d"):
        ledger.add_source(name)
    ledger.ask("r1", "a", [0], now=0)
    ledger.ask("r2", "b", ledger.endgame_pick("b", 1, now=1), now=1)
    assert ledger.endgame_pick("c", 1, now=1.5) == []
    ledger.ask("r3", "c", ledger.endgame_pick("c", 1, now=2), now=2)
    assert ledger.pending("r3") == {0}
    assert ledger.endgame_pick("d", 1, now=100) == []


def test_the_endgame_takes_the_longest_stalled_first_and_held_only():
    ledger = ledger_with(3, {"x": None, "y": None, "a": {1, 2}})
    ledger.ask("r1", "x", [0, 1], now=0)
    ledger.ask("r2", "y", [2], now=1)
    assert ledger.endgame_pick("a", 3, now=10) == [1, 2]
    assert ledger.endgame_pick("a", 1, now=10) == [1]
    # A chunk arriving is progress for its request: its other chunks wait.
    assert ledger.arrived("r1", 0, now=9)
    ledger.begin_verifying(0)
    assert ledger.endgame_pick("a", 3, now=10) == [2]


def test_the_first_copy_in_cancels_the_others_that_wait_for_nothing_else():
    ledger = ledger_with(2, {"slow": None, "fast": None})
    ledger.ask("r1", "slow", [0, 1], now=0)
    ledger.ask("r2", "fast", [0, 1], now=5)
    assert ledger.arrived("r2", 0, now=6)
    assert ledger.begin_verifying(0) == []
    assert ledger.pending("r1") == {1} and ledger.in_flight("slow") == 1
    assert ledger.arrived("r2", 1, now=7)
    assert ledger.begin_verifying(1) == ["r1"]
    assert ledger.in_flight("slow") == 0 and ledger.in_flight("fast") == 0
    # The loser's late copy is not wanted.
    assert not ledger.arrived("r1", 0, now=8)
    ledger.end("r1")
    ledger.end("r2")
    assert ledger.pick("fast", 2) == []


def test_a_request_answered_whole_is_no_longer_in_flight():
    ledger = ledger_with(4, {"x": None, "y": None})
    ledger.ask("r1", "x", [0, 1], now=0)
    ledger.ask("r2", "y", [2, 3], now=0)
    assert ledger.requests_in_flight() == 2
    assert ledger.arrived("r1", 0, now=1)
    assert ledger.requests_in_flight() == 2
    assert ledger.arrived("r1", 1, now=1)
    # Over without an end(): a download of many requests keeps only those
    # still waiting, and is not held back by the others.
    assert ledger.requests_in_flight() == 1
    assert ledger.pending("r1") == frozenset()
    assert not ledger.arrived("r1", 1, now=2)
    ledger.withdraw("r2", 2)
    ledger.withdraw("r2", 3)
    assert ledger.requests_in_flight() == 0
    ledger.end("r1")  # over already: nothing
    assert ledger.pick("x", 4) == [2, 3]


def test_a_request_whose_last_chunk_came_elsewhere_is_over():
    ledger = ledger_with(2, {"slow": None, "fast": None})
    ledger.ask("r1", "slow", [0], now=0)
    ledger.ask("r2", "fast", [0, 1], now=5)
    assert ledger.arrived("r2", 0, now=6)
    assert ledger.begin_verifying(0) == ["r1"]
    assert ledger.requests_in_flight() == 1
    assert ledger.pending("r2") == {1}


def test_a_stall_is_measured_from_the_requests_still_in_flight():
    # A request answered long ago is over: it does not count as a stall.
    ledger = ledger_with(3, {"x": None, "y": None})
    ledger.ask("r1", "x", [0], now=0)
    assert ledger.arrived("r1", 0, now=0)
    ledger.begin_verifying(0)
    ledger.verified(0)
    ledger.ask("r2", "x", [1, 2], now=STALL)
    assert ledger.endgame_pick("y", 2, now=STALL + 1) == []
    assert ledger.endgame_pick("y", 2, now=2 * STALL) == [1, 2]


def test_a_copy_of_a_chunk_being_verified_is_not_needed():
    ledger = ledger_with(1, {"x": None, "y": None})
    ledger.ask("r1", "x", [0], now=0)
    assert ledger.arrived("r1", 0, now=1)
    assert ledger.begin_verifying(0) == []
    assert ledger.begin_verifying(0) is None


def test_ending_a_request_keeps_a_chunk_another_still_waits_for():
    ledger = ledger_with(1, {"x": None, "y": None})
    ledger.ask("r1", "x", [0], now=0)
    ledger.ask("r2", "y", [0], now=3)
    ledger.end("r1")
    assert ledger.pick("x", 1) == []
    assert ledger.endgame_pick("x", 1, now=3 + ENDGAME_STALL) == [0]
    ledger.end("r2")
    assert ledger.pick("x", 1) == [0]


# -- properties ----------------------------------------------------------------------

SOURCES = ("a", "b", "c", "d")
STALL = 2.0


class LedgerMachine(RuleBasedStateMachine):
    """
    Random sources, holdings, picks, arrivals, verifications and ends,
    against a plain model of what the ledger should say.
    """

    @initialize(count=st.integers(1, 12), copies=st.integers(1, 3), data=st.data())
    def start(self, count, copies, data):
        verified = data.draw(st.sets(st.integers(0, count - 1)), label="verified")
        self.count = count
        self.copies = copies
        self.ledger = ChunkLedger(count, verified=sorted(verified),
                                  endgame_stall=STALL, endgame_copies=copies)
        self.verified = set(verified)
        self.verifying = set()
        # Counted source -> the set of chunks it holds.
        self.holdings = {}
        # Request -> [source, pending chunks, last progress].
        self.asks = {}
        self.requests = 0
        self.now = 0.0
        for source in data.draw(st.sets(st.sampled_from(SOURCES), min_size=1), label="sources"):
            self.add(source, data)

    def _held(self, data):
        held = data.draw(st.none() | st.sets(st.integers(0, self.count - 1)), label="has")
        return held

    def _asked(self, index):
        return [r for r, (_, pending, _) in self.asks.items() if index in pending]

    def _queued(self):
        return [i for i in range(self.count)
                if i not in self.verified and i not in self.verifying and not self._asked(i)]

    def _availability(self, index):
        return sum(1 for held in self.holdings.values() if index in held)

    # -- sources

    @rule(source=st.sampled_from(SOURCES), data=st.data())
    def add(self, source, data):
        held = self._held(data)
        self.ledger.add_source(source, None if held is None else flags(held, self.count))
        if source not in self.holdings:
            self.holdings[source] = set(range(self.count)) if held is None else held

    @rule(source=st.sampled_from(SOURCES))
    def remove(self, source):
        self.ledger.remove_source(source)
        self.holdings.pop(source, None)

    @rule(source=st.sampled_from(SOURCES), data=st.data())
    def update(self, source, data):
        held = self._held(data)
        was_partial = self.ledger.is_partial(source)
        self.ledger.update_source(source, None if held is None else flags(held, self.count))
        if was_partial:
            self.holdings[source] = set(range(self.count)) if held is None else held

    # -- time and requests

    @rule(seconds=st.sampled_from([1.0, STALL]))
    def wait(self, seconds):
        self.now += seconds

    def _ask(self, source, chunks):
        assert set(chunks) <= self.holdings.get(source, set())
        assert not set(chunks) & (self.verified | self.verifying)
        if chunks:
            self.requests += 1
            self.ledger.ask(self.requests, source, chunks, self.now)
            self.asks[self.requests] = [source, set(chunks), self.now]

    @rule(source=st.sampled_from(SOURCES), count=st.integers(0, 8))
    def ask_rarest(self, source, count):
        chunks = self.ledger.pick(source, count)
        held = self.holdings.get(source, set())
        expected = sorted((i for i in self._queued() if i in held),
                          key=lambda i: (self._availability(i), i))
        assert chunks == expected[:count]
        self._ask(source, chunks)

    @precondition(lambda self: self.asks)
    @rule(source=st.sampled_from(SOURCES), count=st.integers(1, 8))
    def ask_endgame(self, source, count):
        chunks = self.ledger.endgame_pick(source, count, self.now)
        candidates = []
        for index in range(self.count):
            asks = [self.asks[r] for r in self._asked(index)]
            if (asks and len(asks) < self.copies and index in self.holdings.get(source, ())
                    and all(a[0] != source for a in asks)):
                progress = max(a[2] for a in asks)
                if self.now - progress >= STALL:
                    candidates.append((progress, index))
        assert chunks == [index for _, index in sorted(candidates)[:count]]
        self._ask(source, chunks)

    @precondition(lambda self: any(pending for _, pending, _ in self.asks.values()))
    @rule(data=st.data())
    def arrive(self, data):
        request = data.draw(st.sampled_from(sorted(r for r, a in self.asks.items() if a[1])))
        index = data.draw(st.sampled_from(sorted(self.asks[request][1])))
        assert self.ledger.arrived(request, index, self.now)
        ask = self.asks[request]
        ask[1].discard(index)
        ask[2] = self.now
        finished = self.ledger.begin_verifying(index)
        others = self._asked(index)
        for other in others:
            self.asks[other][1].discard(index)
        assert finished == [r for r in others if not self.asks[r][1]]
        self.verifying.add(index)

    @precondition(lambda self: self.asks)
    @rule(data=st.data())
    def late_copy(self, data):
        request = data.draw(st.sampled_from(sorted(self.asks)))
        index = data.draw(st.integers(0, self.count - 1))
        if index not in self.asks[request][1]:
            assert not self.ledger.arrived(request, index, self.now)

    @precondition(lambda self: self.verifying)
    @rule(data=st.data(), good=st.booleans())
    def verify(self, data, good):
        index = data.draw(st.sampled_from(sorted(self.verifying)))
        self.verifying.discard(index)
        if good:
            self.ledger.verified(index)
            self.verified.add(index)
        else:
            self.ledger.requeue(index)

    @precondition(lambda self: self.asks)
    @rule(data=st.data())
    def end(self, data):
        request = data.draw(st.sampled_from(sorted(self.asks)))
        self.ledger.end(request)
        del self.asks[request]
        assert self.ledger.pending(request) == frozenset()

    # -- what must always hold

    @invariant()
    def counts_agree(self):
        ledger = self.ledger
        assert ledger.have == len(self.verified)
        assert ledger.complete == (len(self.verified) == self.count)
        assert ledger.verifying() == bool(self.verifying)
        for index in range(self.count):
            assert ledger.availability(index) == self._availability(index)
            assert ledger.is_verified(index) == (index in self.verified)
        for source in SOURCES:
            expected = sum(len(p) for s, p, _ in self.asks.values() if s == source)
            assert ledger.in_flight(source) == expected
            assert (source in ledger) == (source in self.holdings)
        for request, (_, pending, _) in self.asks.items():
            assert ledger.pending(request) == pending
        # A request that waits for nothing more is over, and not counted.
        assert ledger.requests_in_flight() == sum(1 for _, p, _ in self.asks.values() if p)
        unheld = [i for i in self._queued() if not self._availability(i)]
        assert ledger.first_unheld() == (unheld[0] if unheld else None)

    @invariant()
    def something_to_ask_while_every_chunk_is_held(self):
        # Nothing in flight or being verified, every chunk held by someone:
        # until all are verified, somebody is given something to ask for.
        queued = self._queued()
        if self.asks or self.verifying or not queued:
            return
        if all(self._availability(i) for i in queued):
            picked = set()
            for source in self.holdings:
                picked.update(self.ledger.pick(source, self.count))
            assert picked == set(queued)


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


@given(
    count=st.integers(1, 40),
    holders=st.lists(st.none() | st.sets(st.integers(0, 39)), min_size=1, max_size=5),
    order=st.randoms(use_true_random=False),
)
def test_every_chunk_held_by_someone_is_fetched_from_its_holders(count, holders, order):
    """
    Served in a random order, with random rejections and ends: the download
    completes, each chunk asked only of a source that holds it and never
    once verified.
    """
    ledger = ChunkLedger(count)
    held = {}
    for n, has in enumerate(holders):
        has = None if has is None else {i for i in has if i < count}
        held[n] = set(range(count)) if has is None else has
        ledger.add_source(n, None if has is None else flags(has, count))
    unheld = set(range(count)) - set().union(*held.values())
    requests = {}
    troubles = count  # rejections and requests cut short, at most
    now = 0
    for step in range(4 * count):
        now += 1
        for source in held:
            chunks = ledger.pick(source, order.randint(1, 8))
            if chunks:
                assert set(chunks) <= held[source]
                assert not any(ledger.is_verified(i) for i in chunks)
                requests[step, source] = chunks
                ledger.ask((step, source), source, chunks, now)
        if not requests:
            break
        request = order.choice(sorted(requests))
        chunks = requests.pop(request)
        for index in chunks:
            if troubles and order.random() < 0.1:
                troubles -= 1
                break  # the rest never came
            assert ledger.arrived(request, index, now)
            assert ledger.begin_verifying(index) == []
            if troubles and order.random() < 0.2:
                troubles -= 1
                ledger.requeue(index)
            else:
                ledger.verified(index)
        ledger.end(request)
    assert not requests
    assert ledger.have == count - len(unheld)
    assert ledger.complete == (not unheld)
    assert ledger.first_unheld() == (min(unheld) if unheld else None)


def test_a_pick_leaves_out_the_chunks_excluded():
    ledger = ChunkLedger(10)
    ledger.add_source("a")
    assert ledger.pick("a", 4, exclude={0, 2}) == [1, 3, 4, 5]


def test_askers_and_copies_follow_the_requests_waiting():
    ledger = ChunkLedger(4)
    for s in ("a", "b"):
        ledger.add_source(s)
    ledger.ask("r1", "a", [0, 1], now=0.0)
    ledger.ask("r2", "b", [1], now=0.0)
    assert (ledger.copies(0), ledger.copies(1), ledger.copies(2)) == (1, 2, 0)
    assert ledger.askers(1) == ["r1", "r2"]
    assert ledger.requests_in_flight() == 2


def test_a_withdrawn_chunk_goes_back_to_the_queue_unless_another_waits():
    ledger = ChunkLedger(4)
    for s in ("a", "b"):
        ledger.add_source(s)
    ledger.ask("r1", "a", [0, 1], now=0.0)
    ledger.ask("r2", "b", [1], now=0.0)
    ledger.withdraw("r1", 0)
    ledger.withdraw("r1", 1)
    assert ledger.in_flight("a") == 0
    # 0 is asked of nobody now; 1 still of b.
    assert ledger.pick("a", 4) == [0, 2, 3]
    assert ledger.askers(1) == ["r2"]
    ledger.withdraw("r1", 1)  # twice: nothing
    assert ledger.in_flight("b") == 1
