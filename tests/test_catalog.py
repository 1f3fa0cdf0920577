"""
Tests for L{twisted_p2p.catalog}: a L{NetworkCatalog} over a real
L{PeerTable}, a L{Clock}, and a fetch whose Deferreds the test fires.
"""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger

from twisted_p2p import catalog as catalog_module
from twisted_p2p.catalog import RETRY_DELAY, NetworkCatalog, Offer
from twisted_p2p.limits import CATALOG_RETRY_MAX, MAX_CATALOG_ENTRIES
from twisted_p2p.peers import Peer, PeerTable
from twisted_p2p.wire import Announce, Goodbye

TIMEOUT = 30.0
ALICE = "a" * 32
BOB = "b" * 32
INSTANCE = "1" * 16
OTHER_INSTANCE = "2" * 16
REV1 = "1" * 16
REV2 = "2" * 16
REV3 = "3" * 16
ALICE_ADDR = ("192.0.2.1", 5000)
BOB_ADDR = ("192.0.2.2", 5000)
FILE_X = "ab" * 32
FILE_Y = "cd" * 32


class FakeFetch:
    """
    C{fetch(peer)} giving a Deferred the test fires.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, peer):
        d = defer.Deferred()
        self.calls.append((peer.peer_id, d))
        return d

    def of(self, peer_id):
        return [d for p, d in self.calls if p == peer_id]

    def last(self, peer_id):
        return self.of(peer_id)[-1]


class World:
    def __init__(self, **kwargs):
        self.clock = Clock()
        self.table = PeerTable(self.clock, TIMEOUT)
        self.fetch = FakeFetch()
        self.catalog = NetworkCatalog(self.table, self.fetch, self.clock, **kwargs)

    def announce(self, peer_id=ALICE, rev=REV1, address=None, instance=INSTANCE, port=4000):
        if address is None:
            address = ALICE_ADDR if peer_id == ALICE else BOB_ADDR
        return self.table.heard(Announce(peer_id, instance, port, rev), *address)

    def goodbye(self, peer_id=ALICE, address=ALICE_ADDR):
        assert self.table.goodbye(Goodbye(peer_id, INSTANCE), *address)


@pytest.fixture
def w():
    return World()


def files(*entries):
    return [(file_id, name, size) for file_id, name, size in entries]


class TestFetching:
    def test_joined_triggers_a_fetch(self, w):
        assert w.fetch.calls == []
        w.announce()
        assert [p for p, _ in w.fetch.calls] == [ALICE]
        w.fetch.last(ALICE).callback((REV1, files((FILE_X, "x.txt", 10))))
        assert w.catalog.files_of(ALICE) == [(FILE_X, "x.txt", 10)]

    def test_fetch_is_given_the_peer(self):
        clock = Clock()
        table = PeerTable(clock, TIMEOUT)
        seen = []
        NetworkCatalog(table, lambda peer: seen.append(peer) or defer.Deferred(), clock)
        table.heard(Announce(ALICE, INSTANCE, 4000, REV1), *ALICE_ADDR)
        assert seen == [table.get(ALICE)]
        assert seen[0].label == "192.0.2.1:4000"

    def test_same_revision_does_not_refetch(self, w):
        w.announce()
        w.fetch.last(ALICE).callback((REV1, []))
        w.announce()
        w.announce(address=("192.0.2.9", 5000))  # "changed" address, same revision
        w.announce(port=4100)
        assert len(w.fetch.calls) == 1

    def test_changed_revision_refetches(self, w):
        w.announce()
        w.fetch.last(ALICE).callback((REV1, files((FILE_X, "x.txt", 10))))
        w.announce(rev=REV2)
        assert len(w.fetch.of(ALICE)) == 2
        w.fetch.last(ALICE).callback((REV2, files((FILE_Y, "y.txt", 20))))
        assert w.catalog.files_of(ALICE) == [(FILE_Y, "y.txt", 20)]
        w.announce(rev=REV2)
        assert len(w.fetch.of(ALICE)) == 2

    def test_restart_with_new_revision_refetches(self, w):
        w.announce()
        w.fetch.last(ALICE).callback((REV1, []))
        w.announce(rev=REV2, instance=OTHER_INSTANCE)
        assert len(w.fetch.of(ALICE)) == 2

    def test_change_during_fetch_fetches_once_more_after(self, w):
        w.announce()
        first = w.fetch.last(ALICE)
        w.announce(rev=REV2)
        w.announce(rev=REV3)
        assert len(w.fetch.calls) == 1
        first.callback((REV1, files((FILE_X, "old.txt", 1))))
        assert len(w.fetch.calls) == 2
        w.fetch.last(ALICE).callback((REV3, files((FILE_Y, "new.txt", 2))))
        assert len(w.fetch.calls) == 2
        assert w.catalog.files_of(ALICE) == [(FILE_Y, "new.txt", 2)]

    def test_no_change_during_fetch_no_extra_fetch(self, w):
        w.announce()
        w.announce()
        w.fetch.last(ALICE).callback((REV1, []))
        assert len(w.fetch.calls) == 1

    def test_fetched_revision_behind_the_announce_is_fetched_again(self, w):
        w.announce(rev=REV2)
        # The answer was made before the peer moved on to REV2.
        w.fetch.last(ALICE).callback((REV1, []))
        w.announce(port=4100, rev=REV2)  # "changed", same revision
        assert len(w.fetch.calls) == 2

    def test_refresh_of_unknown_peer_does_nothing(self, w):
        w.catalog.refresh(BOB)
        assert w.fetch.calls == []

    def test_two_peers_fetched_independently(self, w):
        w.announce(ALICE)
        w.announce(BOB)
        assert [p for p, _ in w.fetch.calls] == [ALICE, BOB]
        w.fetch.last(BOB).callback((REV1, files((FILE_Y, "y", 1))))
        assert w.catalog.files_of(ALICE) == []
        assert w.catalog.files_of(BOB) == [(FILE_Y, "y", 1)]


class TestLeaving:
    def test_left_drops_the_peers_files(self, w):
        w.announce()
        w.fetch.last(ALICE).callback((REV1, files((FILE_X, "x.txt", 10))))
        w.goodbye()
        assert w.catalog.files_of(ALICE) == []
        assert w.catalog.offers() == []
        assert w.catalog.sources(FILE_X) == []

    def test_expired_peer_drops_its_files(self, w):
        w.announce()
        w.fetch.last(ALICE).callback((REV1, files((FILE_X, "x.txt", 10))))
        w.clock.advance(TIMEOUT)
        assert w.catalog.offers() == []

    def test_result_for_a_peer_that_left_is_discarded(self, w):
        w.announce()
        pending = w.fetch.last(ALICE)
        w.goodbye()
        pending.callback((REV1, files((FILE_X, "x.txt", 10))))
        assert w.catalog.files_of(ALICE) == []
        assert w.catalog.offers() == []
        # Its return is a fresh peer: fetched again, not trusted from before.
        w.announce()
        assert len(w.fetch.of(ALICE)) == 2

    def test_rejoin_during_stale_fetch_fetches_again(self, w):
        w.announce()
        stale = w.fetch.last(ALICE)
        w.goodbye()
        w.announce(rev=REV2)
        stale.callback((REV1, files((FILE_X, "old", 1))))
        assert len(w.fetch.of(ALICE)) == 2
        w.fetch.last(ALICE).callback((REV2, files((FILE_Y, "new", 2))))
        assert w.catalog.files_of(ALICE) == [(FILE_Y, "new", 2)]

    def test_rejoin_refetches_even_with_the_same_revision(self, w):
        w.announce()
        w.fetch.last(ALICE).callback((REV1, []))
        w.goodbye()
        w.announce()
        assert len(w.fetch.of(ALICE)) == 2


class TestRetry:
    def test_failed_fetch_retries_after_delay(self, w):
        w.announce()
        w.fetch.last(ALICE).errback(ConnectionRefusedError())
        assert len(w.fetch.calls) == 1
        w.clock.advance(RETRY_DELAY - 0.01)
        assert len(w.fetch.calls) == 1
        w.clock.advance(0.01)
        assert len(w.fetch.calls) == 2
        w.fetch.last(ALICE).callback((REV1, files((FILE_X, "x.txt", 10))))
        assert w.catalog.files_of(ALICE) == [(FILE_X, "x.txt", 10)]
        w.clock.advance(RETRY_DELAY * 10)
        assert len(w.fetch.calls) == 2

    def test_keeps_retrying_while_failing_ever_more_slowly(self, w):
        w.announce()
        waits = []
        for attempt in range(1, 10):
            assert len(w.fetch.calls) == attempt
            w.fetch.last(ALICE).errback(ConnectionRefusedError())
            (retry,) = [c for c in w.clock.getDelayedCalls() if c.func == w.catalog._retry]
            waits.append(retry.getTime() - w.clock.seconds())
            while retry.active():
                w.announce()  # keep Alice alive
                w.clock.advance(min(10.0, retry.getTime() - w.clock.seconds()))
        assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0]
        assert waits[0] == RETRY_DELAY and waits[-1] == CATALOG_RETRY_MAX

    def test_success_resets_the_retry_wait(self, w):
        w.announce()
        for _ in range(3):
            w.fetch.last(ALICE).errback(ConnectionRefusedError())
            w.clock.advance(RETRY_DELAY * 4)
            w.announce()
        w.fetch.last(ALICE).callback((REV1, []))
        w.announce(rev=REV2)
        w.fetch.last(ALICE).errback(ConnectionRefusedError())
        calls = len(w.fetch.calls)
        w.clock.advance(RETRY_DELAY)
        assert len(w.fetch.calls) == calls + 1

    def test_one_retry_at_most_per_peer(self, w):
        w.announce()
        w.fetch.last(ALICE).errback(ConnectionRefusedError())
        w.announce(rev=REV2)  # a fetch now, while the retry waits
        w.fetch.last(ALICE).errback(ConnectionRefusedError())
        w.announce(BOB)
        w.fetch.last(BOB).errback(ConnectionRefusedError())
        retries = [c for c in w.clock.getDelayedCalls() if c.func == w.catalog._retry]
        assert sorted(c.args for c in retries) == [(ALICE,), (BOB,)]

    def test_no_retry_for_a_peer_that_left(self, w):
        w.announce()
        w.fetch.last(ALICE).errback(ConnectionRefusedError())
        w.goodbye()
        w.clock.advance(RETRY_DELAY * 5)
        assert len(w.fetch.calls) == 1
        assert w.clock.getDelayedCalls() == []

    def test_failure_after_the_peer_left_schedules_nothing(self, w):
        w.announce()
        pending = w.fetch.last(ALICE)
        w.goodbye()
        pending.errback(ConnectionRefusedError())
        assert w.clock.getDelayedCalls() == []
        w.clock.advance(RETRY_DELAY)
        assert len(w.fetch.calls) == 1

    def test_failure_keeps_the_last_good_catalog(self, w):
        w.announce()
        w.fetch.last(ALICE).callback((REV1, files((FILE_X, "x.txt", 10))))
        w.announce(rev=REV2)
        w.fetch.last(ALICE).errback(ConnectionRefusedError())
        assert w.catalog.files_of(ALICE) == [(FILE_X, "x.txt", 10)]


class TestOffers:
    def test_same_id_from_two_peers_is_one_offer(self, w):
        w.announce(ALICE)
        w.announce(BOB)
        w.fetch.last(BOB).callback((REV1, files((FILE_X, "bob name.txt", 10))))
        w.fetch.last(ALICE).callback(
            (REV1, files((FILE_X, "alice name.txt", 10), (FILE_Y, "a-only.bin", 3)))
        )
        alice, bob = w.table.get(ALICE), w.table.get(BOB)
        assert w.catalog.offers() == [
            Offer(FILE_Y, "a-only.bin", 3, (alice,)),
            # Peers in address order; the first one's name is shown.
            Offer(FILE_X, "alice name.txt", 10, (alice, bob)),
        ]
        assert w.catalog.sources(FILE_X) == [alice, bob]
        assert w.catalog.sources(FILE_Y) == [alice]
        assert w.catalog.sources("ef" * 32) == []

    def test_same_id_twice_in_one_catalog_lists_the_peer_once(self, w):
        w.announce()
        w.fetch.last(ALICE).callback(
            (REV1, files((FILE_X, "one.txt", 10), (FILE_X, "two.txt", 10)))
        )
        (offer,) = w.catalog.offers()
        assert offer.peers == (w.table.get(ALICE),)
        assert offer.name == "one.txt"

    def test_offers_sorted_by_name(self, w):
        w.announce()
        w.fetch.last(ALICE).callback(
            (REV1, files((FILE_X, "b.txt", 1), (FILE_Y, "a.txt", 2)))
        )
        assert [o.name for o in w.catalog.offers()] == ["a.txt", "b.txt"]
        assert w.catalog.offers()[0].short_id == FILE_Y[:8]

    def test_one_peer_leaving_leaves_the_other_as_source(self, w):
        w.announce(ALICE)
        w.announce(BOB)
        w.fetch.last(ALICE).callback((REV1, files((FILE_X, "x", 1))))
        w.fetch.last(BOB).callback((REV1, files((FILE_X, "x", 1))))
        w.goodbye(ALICE)
        (offer,) = w.catalog.offers()
        assert offer.peers == (w.table.get(BOB),)

    def test_offers_never_compare_peers(self, w, monkeypatch):
        # Finding a peer in a list by equality made offers() cost
        # peers^2 x files: 25 s for 1,000 peers of 240 shared files each.
        def no_comparisons(self, other):
            raise AssertionError("offers() compared two peers")

        monkeypatch.setattr(Peer, "__eq__", no_comparisons)
        shared = files(*[(f"{n:064x}", f"f{n}", n) for n in range(20)])
        peer_ids = [f"{n + 1:032x}" for n in range(30)]
        for n, peer_id in enumerate(peer_ids):
            w.announce(peer_id, address=(f"192.0.2.{n + 101}", 5000))
            w.fetch.last(peer_id).callback((REV1, shared))
        offers = w.catalog.offers()
        assert len(offers) == 20
        assert all(len(o.peers) == 30 for o in offers)
        assert [p.peer_id for p in offers[0].peers] == peer_ids
        assert [p.peer_id for p in w.catalog.sources(f"{7:064x}")] == peer_ids


    def test_a_path_two_peers_list_with_two_sizes_is_one_path(self, w):
        # Sizes are the peers' word: a path and id is listed once, with
        # its offer's size (the first peer's), whatever another one says.
        w.announce(ALICE)
        w.announce(BOB)
        w.fetch.last(ALICE).callback((REV1, files((FILE_X, "d/x", 10), (FILE_Y, "d/y", 5))))
        w.fetch.last(BOB).callback((REV1, files((FILE_X, "d/x", 99), (FILE_X, "e/x", 98))))
        both = (w.table.get(ALICE), w.table.get(BOB))
        assert w.catalog.paths() == [
            Offer(FILE_X, "d/x", 10, both),
            Offer(FILE_Y, "d/y", 5, (w.table.get(ALICE),)),
            Offer(FILE_X, "e/x", 10, both),
        ]
        assert w.catalog.offers() == [Offer(FILE_X, "d/x", 10, both),
                                      Offer(FILE_Y, "d/y", 5, (w.table.get(ALICE),))]

    def test_paths_go_by_the_peers_of_the_offers_they_are_made_from(self, w, monkeypatch):
        # The table may change between the offers and the paths made from
        # them (in a thread, while the reactor hears of a peer): the paths
        # go by the offers' peers (their places are of those), whatever the
        # table says by then.
        w.announce(ALICE)
        w.fetch.last(ALICE).callback((REV1, files((FILE_X, "x", 1))))
        w.catalog.offers()
        w.announce(BOB)
        w.fetch.last(BOB).callback((REV1, files((FILE_Y, "y", 2))))
        real = w.catalog.offers
        monkeypatch.setattr(w.catalog, "offers", lambda: stale)
        stale = w.catalog._cached["offers"][1]
        assert w.catalog.paths() == [Offer(FILE_X, "x", 1, (w.table.get(ALICE),))]
        monkeypatch.setattr(w.catalog, "offers", real)
        w.announce(BOB, rev=REV2)
        w.fetch.last(BOB).callback((REV2, files((FILE_Y, "y", 2))))
        assert [o.name for o in w.catalog.paths()] == ["x", "y"]

    def test_kept_offers_are_nothing_for_the_cycle_collector_to_walk(self, w):
        """
        A large catalog's offers and paths, once built, add next to nothing
        to what every full collection walks (named tuples holding peers
        would add one object each), and are made again as they are read.
        """
        import gc

        count = 5_000
        w.announce(ALICE)
        w.announce(BOB)
        w.fetch.last(ALICE).callback(
            (REV1, files(*[(f"{n:064x}", f"d{n % 7}/f{n}", n) for n in range(count)]))
        )
        w.fetch.last(BOB).callback((REV1, files((f"{3:064x}", "again/f3", 3))))
        gc.collect()
        before = len(gc.get_objects())
        offers, paths = w.catalog.offers(), w.catalog.paths()
        gc.collect()
        assert len(gc.get_objects()) - before < 100
        assert len(offers) == count and len(paths) == count + 1
        both = w.catalog.offer_of(f"{3:064x}")
        assert both.peers == (w.table.get(ALICE), w.table.get(BOB))
        assert [o for o in offers if o.file_id == both.file_id] == [both]
        assert [o.name for o in paths if o.file_id == both.file_id] == ["again/f3", "d3/f3"]
        assert offers[0] == Offer(f"{0:064x}", "d0/f0", 0, (w.table.get(ALICE),))
        assert offers[:2] == list(offers)[:2]
        assert offers is w.catalog.offers()  # kept until the catalog changes


class TestLookups:
    """
    C{named}, C{offer_of} and C{with_id_prefix} answer C{download NAME}
    and C{resume} without building every offer of the catalog.
    """

    @pytest.fixture
    def two(self, w):
        w.announce(ALICE)
        w.announce(BOB)
        w.fetch.last(BOB).callback(
            (REV1, files((FILE_X, "bob name.txt", 10), (FILE_Y, "same.txt", 3)))
        )
        w.fetch.last(ALICE).callback(
            (REV1, files((FILE_X, "alice name.txt", 10), (FILE_X, "same.txt", 10)))
        )
        return w.table.get(ALICE), w.table.get(BOB)

    def test_named_finds_every_content_under_a_path(self, w, two):
        alice, bob = two
        assert w.catalog.named("same.txt") == [
            # Each with every peer that holds its id, under any name.
            Offer(FILE_X, "same.txt", 10, (alice, bob)),
            Offer(FILE_Y, "same.txt", 3, (bob,)),
        ]

    def test_named_finds_a_name_that_is_not_the_shown_one(self, w, two):
        alice, bob = two
        # offers() shows FILE_X as Alice names it; Bob's name finds it too.
        assert w.catalog.named("bob name.txt") == [
            Offer(FILE_X, "bob name.txt", 10, (alice, bob))
        ]
        assert w.catalog.named("nothing.txt") == []

    def test_path_names_are_every_path_once_sorted(self, w, two):
        assert w.catalog.path_names() == ["alice name.txt", "bob name.txt", "same.txt"]
        # A catalog out of name order (a peer's catalog is untrusted) too.
        w.announce(ALICE, rev=REV2)
        w.fetch.last(ALICE).callback(
            (REV2, files((FILE_Y, "z.txt", 3), (FILE_X, "a.txt", 10), (FILE_Y, "a.txt", 3)))
        )
        assert w.catalog.path_names() == ["a.txt", "bob name.txt", "same.txt", "z.txt"]

    def test_offer_of_is_the_offer_offers_gives(self, w, two):
        by_id = {o.file_id: o for o in w.catalog.offers()}
        assert w.catalog.offer_of(FILE_X) == by_id[FILE_X]
        assert w.catalog.offer_of(FILE_Y) == by_id[FILE_Y]
        assert w.catalog.offer_of("ef" * 32) is None

    def test_count_and_name_at_a_peer(self, w, two):
        assert w.catalog.count_of(ALICE) == 2 and w.catalog.count_of(BOB) == 2
        assert w.catalog.count_of("f" * 32) == 0
        assert w.catalog.name_at(ALICE, FILE_X) == "alice name.txt"
        assert w.catalog.name_at(BOB, FILE_X) == "bob name.txt"
        assert w.catalog.name_at(ALICE, FILE_Y) is None

    def test_with_id_prefix(self, w, two):
        assert [o.file_id for o in w.catalog.with_id_prefix("abab")] == [FILE_X]
        assert [o.file_id for o in w.catalog.with_id_prefix("")] == [FILE_X, FILE_Y]
        assert w.catalog.with_id_prefix("ffff") == []

    def test_a_peer_that_leaves_or_changes_is_forgotten(self, w, two):
        alice, bob = two
        w.goodbye(ALICE)
        assert w.catalog.named("alice name.txt") == []
        # Alice listed FILE_X as same.txt, Bob only as bob name.txt.
        assert w.catalog.named("same.txt") == [Offer(FILE_Y, "same.txt", 3, (bob,))]
        assert w.catalog.named("bob name.txt") == [Offer(FILE_X, "bob name.txt", 10, (bob,))]
        w.announce(BOB, rev=REV2)
        w.fetch.last(BOB).callback((REV2, files((FILE_Y, "renamed.txt", 3))))
        assert w.catalog.named("same.txt") == []
        assert w.catalog.named("renamed.txt") == [Offer(FILE_Y, "renamed.txt", 3, (bob,))]
        assert w.catalog.offer_of(FILE_X) is None

    @pytest.mark.parametrize("seed", range(20))
    def test_lookups_agree_with_a_walk_of_the_catalog(self, w, seed):
        # Random catalogs of two peers over a few ids and names (the same
        # name for two contents, one content under two names, repeats).
        import random

        rng = random.Random(seed)
        ids = [f"{n:02x}" * 32 for n in range(1, 5)]
        names = ["a", "b", "c/d", "c/e"]
        for peer_id in (ALICE, BOB):
            w.announce(peer_id)
            listed = [(rng.choice(ids), rng.choice(names), 7) for _ in range(rng.randrange(6))]
            w.fetch.last(peer_id).callback((REV1, listed))
        offers = {o.file_id: o for o in w.catalog.offers()}
        for name in names:
            walked = sorted(
                {file_id for file_id, path in ((o.file_id, o.name) for o in w.catalog.paths())
                 if path == name}
            )
            found = w.catalog.named(name)
            assert [o.file_id for o in found] == walked
            for offer in found:
                assert offer.name == name
                assert offer.peers == offers[offer.file_id].peers
                assert offer.size == offers[offer.file_id].size
        for file_id in ids:
            assert w.catalog.offer_of(file_id) == offers.get(file_id)
            assert w.catalog.with_id_prefix(file_id[:6]) == (
                [offers[file_id]] if file_id in offers else []
            )


class TestHoldings:
    def test_holdings_are_a_read_only_view_replaced_whole(self, w):
        w.announce()
        w.fetch.last(ALICE).callback(
            (REV1, files((FILE_X, "x", 10), (FILE_Y, "y", 10)), 0, {FILE_Y: b"\x05"})
        )
        held = w.catalog.holdings_of(ALICE)
        assert dict(held) == {FILE_X: None, FILE_Y: b"\x05"}
        with pytest.raises(TypeError):
            held[FILE_X] = b"\x00"
        w.announce(rev=REV2)
        w.fetch.last(ALICE).callback((REV2, files((FILE_Y, "y", 10)), 0, {}))
        # The view kept is of what was; the catalog holds the new holdings.
        assert dict(held) == {FILE_X: None, FILE_Y: b"\x05"}
        assert dict(w.catalog.holdings_of(ALICE)) == {FILE_Y: None}
        assert dict(w.catalog.holdings_of(BOB)) == {}

    @pytest.mark.parametrize("file_id, index, shown", [
        (FILE_X, 0, True), (FILE_X, 10**6, True),  # whole
        (FILE_Y, 0, True), (FILE_Y, 1, False), (FILE_Y, 2, True), (FILE_Y, 8, False),
        ("ef" * 32, 0, False),
    ])
    def test_holds_chunk(self, w, file_id, index, shown):
        w.announce()
        w.fetch.last(ALICE).callback(
            (REV1, files((FILE_X, "x", 10), (FILE_Y, "y", 10)), 0, {FILE_Y: b"\x05"})
        )
        assert w.catalog.holds_chunk(ALICE, file_id, index) is shown
        assert w.catalog.holds_chunk(BOB, file_id, index) is False


class TestIndexedInAThread:
    """
    A large catalog is indexed in a thread: stored once that is done, and
    dropped if its peer left meanwhile.
    """

    @pytest.fixture
    def jobs(self, monkeypatch):
        monkeypatch.setattr(catalog_module, "INDEX_IN_THREAD", 3)
        return []

    @pytest.fixture
    def w(self, jobs):
        def run_in_thread(f, *args):
            d = defer.Deferred()
            jobs.append(lambda: defer.maybeDeferred(f, *args).chainDeferred(d))
            return d

        return World(run_in_thread=run_in_thread, max_entries=8)

    def test_stored_once_indexed(self, w, jobs):
        w.announce()
        fetched = []
        w.catalog.on_fetched(lambda peer_id, first: fetched.append(peer_id))
        w.fetch.last(ALICE).callback((REV1, entries("a", 3)))
        assert len(jobs) == 1
        assert w.catalog.files_of(ALICE) == [] and fetched == []
        # The fetch is not over: a change now is fetched after it.
        w.announce(rev=REV2)
        assert len(w.fetch.of(ALICE)) == 1
        jobs.pop()()
        assert w.catalog.files_of(ALICE) == entries("a", 3)
        assert w.catalog.sources(entries("a", 3)[0][0]) == [w.table.get(ALICE)]
        assert fetched == [ALICE]
        assert len(w.fetch.of(ALICE)) == 2

    def test_the_names_are_indexed_in_the_thread_too(self, w, jobs, monkeypatch):
        # A lookup by name then builds nothing on the reactor.
        built = []
        index = catalog_module._names_index
        monkeypatch.setattr(catalog_module, "_names_index",
                            lambda files: built.append(len(files)) or index(files))
        w.announce()
        w.fetch.last(ALICE).callback((REV1, entries("a", 3)))
        jobs.pop()()
        assert built == [3]
        (found,) = w.catalog.named("a1")
        assert found.file_id == entries("a", 3)[1][0]
        assert built == [3]

    def test_small_catalogs_are_indexed_at_once(self, w, jobs):
        w.announce()
        w.fetch.last(ALICE).callback((REV1, entries("a", 2)))
        assert jobs == [] and w.catalog.files_of(ALICE) == entries("a", 2)

    def test_dropped_if_the_peer_left_meanwhile(self, w, jobs):
        w.announce()
        w.fetch.last(ALICE).callback((REV1, entries("a", 3)))
        w.goodbye()
        jobs.pop()()
        assert w.catalog.files_of(ALICE) == []
        assert w.catalog.size == 0
        # Back, it is fetched (and indexed) again.
        w.announce()
        w.fetch.last(ALICE).callback((REV1, entries("a", 4)))
        jobs.pop()()
        assert w.catalog.files_of(ALICE) == entries("a", 4)

    def test_a_failed_indexing_gives_its_room_back(self, w, jobs, monkeypatch):
        def broken(files, holdings):
            raise MemoryError("no room")

        monkeypatch.setattr(catalog_module, "_indexed", broken)
        logged = []
        monkeypatch.setattr(catalog_module, "log", Logger(observer=logged.append))
        w.announce()
        w.fetch.last(ALICE).callback((REV1, entries("a", 6)))
        jobs.pop()()
        assert w.catalog._indexing == {} and w.catalog.files_of(ALICE) == []
        assert any("Indexing the catalog" in e.get("log_format", "") for e in logged)

    def test_room_counts_the_catalogs_being_indexed(self, w, jobs):
        w.announce(ALICE)
        w.announce(BOB)
        w.fetch.last(ALICE).callback((REV1, entries("a", 6)))
        w.fetch.last(BOB).callback((REV1, entries("b", 6)))
        for job in list(jobs):
            job()
        assert len(w.catalog.files_of(ALICE)) == 6
        assert len(w.catalog.files_of(BOB)) == 2  # the 8 the catalog holds
        assert w.catalog.size == 8


def entries(prefix, count):
    return files(*[(f"{prefix}{n:063x}", f"{prefix}{n}", 1) for n in range(count)])


class TestEntryLimit:
    @pytest.fixture
    def logged(self, monkeypatch):
        events = []
        monkeypatch.setattr(catalog_module, "log", Logger(observer=events.append))
        return events

    def test_default_limit(self):
        assert NetworkCatalog(PeerTable(Clock(), 1), FakeFetch(), Clock())._max_entries == (
            MAX_CATALOG_ENTRIES
        )

    def test_a_catalog_over_the_limit_keeps_what_fits_logged_once(self, logged):
        w = World(max_entries=5)
        w.announce(ALICE)
        w.fetch.last(ALICE).callback((REV1, entries("a", 3)))
        w.announce(BOB)
        w.fetch.last(BOB).callback((REV1, entries("b", 4)))
        assert w.catalog.files_of(ALICE) == entries("a", 3)
        assert w.catalog.files_of(BOB) == entries("b", 2)
        assert sum(len(o.peers) for o in w.catalog.offers()) == 5
        warnings = [e for e in logged if e["log_level"].name == "warn"]
        assert len(warnings) == 1
        assert (warnings[0]["kept"], warnings[0]["offered"], warnings[0]["limit"]) == (2, 4, 5)
        # Bob's next revision is cut the same way, without a second warning.
        w.announce(BOB, rev=REV2)
        w.fetch.last(BOB).callback((REV2, entries("c", 4)))
        assert w.catalog.files_of(BOB) == entries("c", 2)
        assert len([e for e in logged if e["log_level"].name == "warn"]) == 1

    def test_a_peer_refetched_counts_its_old_entries_as_room(self, logged):
        w = World(max_entries=5)
        w.announce(ALICE)
        w.fetch.last(ALICE).callback((REV1, entries("a", 5)))
        w.announce(ALICE, rev=REV2)
        w.fetch.last(ALICE).callback((REV2, entries("b", 5)))
        assert w.catalog.files_of(ALICE) == entries("b", 5)
        assert logged == [e for e in logged if e["log_level"].name != "warn"]

    def test_room_comes_back_when_a_peer_leaves(self, logged):
        w = World(max_entries=5)
        w.announce(ALICE)
        w.fetch.last(ALICE).callback((REV1, entries("a", 5)))
        w.announce(BOB)
        w.fetch.last(BOB).callback((REV1, entries("b", 3)))
        assert w.catalog.files_of(BOB) == []
        w.goodbye(ALICE)
        w.announce(BOB, rev=REV2)
        w.fetch.last(BOB).callback((REV2, entries("b", 3)))
        assert w.catalog.files_of(BOB) == entries("b", 3)


# -- fetches take turns between hosts (issue 11) ------------------------------------------


def test_fetches_take_turns_between_hosts():
    """
    Invented peers on one host, whose ports never answer, hold at most the
    places not wanted by others: a real peer on another host starts as
    soon as one is free, ahead of the invented ones queued before it.
    """
    from twisted.internet import defer

    from twisted_p2p.catalog import FairFetches

    fetches = FairFetches(4)
    started = []

    def fetch(name):
        d = defer.Deferred()
        started.append((name, d))
        return d

    results = [fetches.run("198.51.100.6", lambda n=n: fetch(f"fake{n}")) for n in range(5)]
    # One host has at most half the places running.
    assert [name for name, _ in started] == ["fake0", "fake1"]
    results += [fetches.run("198.51.100.7", lambda n=n: fetch(f"other{n}")) for n in range(3)]
    assert [name for name, _ in started] == ["fake0", "fake1", "other0", "other1"]
    real = fetches.run("192.0.2.1", lambda: fetch("real"))
    started[0][1].errback(defer.TimeoutError())
    # The host with none running goes first.
    assert [name for name, _ in started][-1] == "real"
    started[-1][1].callback(("rev", []))
    got = []
    real.addCallback(got.append)
    assert got == [("rev", [])]
    assert started[-1][0] == "fake2"
    assert fetches.running() == 4
    for d in results:
        d.addErrback(lambda f: None)


# -- indexing a catalog in slices ------------------------------------------------------


def reference_index(files, holdings):
    """What _indexed gives, written plainly, an entry at a time."""
    ids, names = {}, {}
    for file_id, path, size in files:
        ids.setdefault(file_id, size)
        listed = names.setdefault(path, file_id)
        if listed != file_id:
            have = listed if isinstance(listed, tuple) else (listed,)
            if file_id not in have:
                names[path] = have + (file_id,)
    held = {file_id: holdings.get(file_id) for file_id in ids}
    return ids, held, names


@pytest.mark.parametrize("slice_size", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("duplicated_paths", [False, True])
def test_a_catalog_indexed_in_slices_is_indexed_as_a_whole(monkeypatch, slice_size,
                                                           duplicated_paths):
    monkeypatch.setattr(catalog_module, "INDEX_IN_THREAD", 1)
    monkeypatch.setattr(catalog_module, "INDEX_SLICE", slice_size)
    # Ids that come back in later slices with other sizes (the first size
    # is the one kept), in an order a sort would change.
    files = [(f"{(i * 7) % 23:02x}" * 32, f"path {i:03d}", 100 + i) for i in range(40)]
    if duplicated_paths:
        files += [("ff" * 32, "path 005", 9), (files[5][0], "path 005", 1)]
    holdings = {files[3][0]: b"\x01", "ee" * 32: b"\x02"}
    ids, held, names = catalog_module._indexed(files, holdings)
    want_ids, want_held, want_names = reference_index(files, holdings)
    assert list(ids.items()) == list(want_ids.items())
    assert list(held.items()) == list(want_held.items())
    assert names == want_names


def test_indexing_takes_the_entries_a_slice_at_a_time(monkeypatch):
    seen = []
    slices = catalog_module._slices

    def counted(items):
        for part in slices(items):
            seen.append(len(part))
            yield part

    monkeypatch.setattr(catalog_module, "_slices", counted)
    count = 3 * catalog_module.INDEX_SLICE + 1
    files = [(f"{i:064x}", f"f{i}", i) for i in range(count)]
    catalog_module._indexed(files, {})
    assert seen and max(seen) <= catalog_module.INDEX_SLICE
    assert sum(seen) >= 2 * count  # ids, sizes, held and names all went by slices
