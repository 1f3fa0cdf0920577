"""
Tests for L{twisted_p2p.discovery}, driven by a L{Clock} and a fake datagram
sender (C{MemoryReactor} has no UDP).
"""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from twisted_p2p import wire
from twisted_p2p.discovery import Discovery, DiscoveryProtocol
from twisted_p2p.limits import (
    MAX_DATAGRAM,
    MAX_PEERS_PER_HOST,
    NEWCOMER_REPLY_BURST,
    NEWCOMER_REPLY_RATE,
)
from twisted_p2p.peers import PeerTable

OUR_ID = "0" * 32
OUR_INSTANCE = "0" * 16
ALICE = "a" * 32
INSTANCE = "1" * 16
OTHER_INSTANCE = "2" * 16
REV = "0" * 16
REV2 = "f" * 16
BROADCAST = ("127.255.255.255", 9999)
INTERVAL = 10.0
TIMEOUT = 35.0
ALICE_ADDR = ("198.51.100.20", 40001)


class FakeDatagrams:
    """
    Stands in for the private UDP socket: records C{(data, address)} sent,
    and can be told to fail like a socket with no route.
    """

    def __init__(self):
        self.sent = []
        self.error = None

    def __call__(self, data, address):
        if self.error is not None:
            raise self.error
        self.sent.append((data, address))

    def decoded(self):
        return [(wire.decode_datagram(data), address) for data, address in self.sent]

    def to(self, address):
        return [message for message, a in self.decoded() if a == address]


class Recorder:
    def __init__(self):
        self.events = []

    def joined(self, peer):
        self.events.append(("joined", peer.peer_id))

    def changed(self, peer, old_revision):
        self.events.append(("changed", peer.peer_id, old_revision))

    def left(self, peer, reason):
        self.events.append(("left", peer.peer_id, reason))


class Harness:
    def __init__(self):
        self.clock = Clock()
        self.table = PeerTable(self.clock, TIMEOUT)
        self.observer = Recorder()
        self.table.subscribe(self.observer)
        self.revision = REV
        self.discovery = Discovery(
            self.clock,
            self.table,
            OUR_ID,
            OUR_INSTANCE,
            7000,
            lambda: self.revision,
            BROADCAST,
            INTERVAL,
        )
        self.net = FakeDatagrams()
        self.discovery.attach(self.net)

    def feed(self, message, address=ALICE_ADDR):
        self.discovery.datagram_received(wire.encode_datagram(message), address)

    def announces_to(self, address):
        return [m for m in self.net.to(address) if isinstance(m, wire.Announce)]


@pytest.fixture
def h():
    return Harness()


def alice(instance=INSTANCE, port=4000, rev=REV):
    return wire.Announce(ALICE, instance, port, rev)


class TestAnnouncing:
    def test_announce_at_start_then_every_interval(self, h):
        h.discovery.start()
        assert h.net.decoded() == [(wire.Announce(OUR_ID, OUR_INSTANCE, 7000, REV), BROADCAST)]
        h.clock.advance(INTERVAL - 0.5)
        assert len(h.announces_to(BROADCAST)) == 1
        h.clock.advance(0.5)
        assert len(h.announces_to(BROADCAST)) == 2
        h.clock.pump([INTERVAL] * 3)
        assert len(h.announces_to(BROADCAST)) == 5
        assert [a for _, a in h.net.sent] == [BROADCAST] * 5

    def test_announce_carries_current_revision(self, h):
        h.discovery.start()
        h.revision = REV2
        h.clock.advance(INTERVAL)
        assert [m.revision for m in h.announces_to(BROADCAST)] == [REV, REV2]

    def test_nothing_sent_before_attach(self):
        clock = Clock()
        table = PeerTable(clock, TIMEOUT)
        discovery = Discovery(
            clock, table, OUR_ID, OUR_INSTANCE, 7000, lambda: REV, BROADCAST, INTERVAL
        )
        discovery.start()
        clock.advance(INTERVAL)
        net = FakeDatagrams()
        discovery.attach(net)
        clock.advance(INTERVAL)
        assert net.decoded() == [(wire.Announce(OUR_ID, OUR_INSTANCE, 7000, REV), BROADCAST)]

    def test_send_error_is_survived(self, h):
        h.net.error = OSError("Network is unreachable")
        h.discovery.start()
        h.clock.advance(INTERVAL)
        h.net.error = None
        h.clock.advance(INTERVAL)
        assert len(h.announces_to(BROADCAST)) == 1

    def test_revision_changed_announces_at_once(self, h):
        h.discovery.start()
        h.clock.advance(3)
        h.revision = REV2
        h.discovery.revision_changed()
        assert [m.revision for m in h.announces_to(BROADCAST)] == [REV, REV2]
        # The next tick is one interval after the extra announce, not at 10.
        h.clock.advance(INTERVAL - 3)
        assert len(h.announces_to(BROADCAST)) == 2
        h.clock.advance(3)
        assert len(h.announces_to(BROADCAST)) == 3

    def test_revision_changed_before_start_or_after_stop_is_quiet(self, h):
        h.discovery.revision_changed()
        assert h.net.sent == []
        h.discovery.start()
        h.discovery.stop()
        sent = len(h.net.sent)
        h.discovery.revision_changed()
        assert len(h.net.sent) == sent

    def test_stop_says_goodbye_and_stops_announcing(self, h):
        h.discovery.start()
        h.feed(alice())
        h.discovery.stop()
        assert h.net.decoded()[-1] == (wire.Goodbye(OUR_ID, OUR_INSTANCE), BROADCAST)
        # The table is emptied and every timer, ours and the expiries, is gone.
        assert len(h.table) == 0
        assert h.clock.getDelayedCalls() == []
        sent = len(h.net.sent)
        h.clock.advance(INTERVAL * 5)
        assert len(h.net.sent) == sent


class TestHearing:
    def test_newcomer_gets_a_unicast_reply(self, h):
        h.discovery.start()
        h.feed(alice())
        assert ALICE in h.table
        assert h.announces_to(ALICE_ADDR) == [wire.Announce(OUR_ID, OUR_INSTANCE, 7000, REV)]
        assert h.observer.events == [("joined", ALICE)]

    def test_known_peer_gets_no_reply(self, h):
        h.feed(alice())
        h.feed(alice())
        h.feed(alice(rev=REV2))
        assert len(h.announces_to(ALICE_ADDR)) == 1
        assert h.observer.events == [("joined", ALICE), ("changed", ALICE, REV)]

    def test_restarted_instance_gets_a_reply(self, h):
        h.feed(alice())
        h.feed(alice(instance=OTHER_INSTANCE))
        assert len(h.announces_to(ALICE_ADDR)) == 2
        assert h.observer.events == [("joined", ALICE), ("changed", ALICE, None)]

    def test_reply_goes_to_the_sender_port(self, h):
        h.feed(alice(), ("198.51.100.21", 51234))
        assert h.net.sent[-1][1] == ("198.51.100.21", 51234)

    def test_restart_at_a_changed_address_updates_the_single_entry(self, h):
        h.feed(alice())
        h.feed(alice(instance=OTHER_INSTANCE, port=4100), ("198.51.100.99", 40002))
        assert len(h.table) == 1
        peer = h.table.get(ALICE)
        assert (peer.host, peer.udp_port, peer.transfer_port) == ("198.51.100.99", 40002, 4100)
        assert h.observer.events == [("joined", ALICE), ("changed", ALICE, None)]

    def test_same_instance_from_another_address_is_counted_and_ignored(self, h):
        h.feed(alice())
        h.feed(alice(port=4100), ("198.51.100.99", 40002))
        peer = h.table.get(ALICE)
        assert (peer.host, peer.udp_port, peer.transfer_port) == (*ALICE_ADDR, 4000)
        assert len(h.net.sent) == 1
        assert h.discovery.dropped == Counter({"moved without restart": 1})
        assert h.observer.events == [("joined", ALICE)]

    def test_replayed_announce_then_goodbye_does_not_evict(self, h):
        # /tmp/r/evict.py: replay Alice's announce from elsewhere, then say
        # goodbye for her from there.
        attacker = ("198.51.100.66", 31999)
        h.feed(alice())
        h.feed(alice(), attacker)
        h.feed(wire.Goodbye(ALICE, INSTANCE), attacker)
        assert ALICE in h.table
        assert h.discovery.dropped == Counter(
            {"moved without restart": 1, "unmatched goodbye": 1}
        )

    def test_expiry_after_timeout_not_before(self, h):
        h.feed(alice())
        h.clock.advance(TIMEOUT - 1)
        assert ALICE in h.table
        h.clock.advance(1)
        assert ALICE not in h.table
        assert h.observer.events[-1] == ("left", ALICE, "timed out")

    def test_announce_resets_expiry(self, h):
        h.feed(alice())
        h.clock.advance(TIMEOUT - 1)
        h.feed(alice())
        h.clock.advance(TIMEOUT - 1)
        assert ALICE in h.table
        h.clock.advance(1)
        assert ALICE not in h.table

    def test_peer_announcing_regularly_stays(self, h):
        h.discovery.start()
        h.feed(alice())
        for _ in range(20):
            h.clock.advance(INTERVAL)
            h.feed(alice())
        assert ALICE in h.table
        assert h.observer.events == [("joined", ALICE)]

    def test_goodbye_removes_the_peer(self, h):
        h.feed(alice())
        h.feed(wire.Goodbye(ALICE, INSTANCE))
        assert ALICE not in h.table
        assert h.observer.events[-1] == ("left", ALICE, "said goodbye")
        assert h.discovery.dropped == Counter()

    @pytest.mark.parametrize(
        "instance, address",
        [
            (INSTANCE, ("198.51.100.66", ALICE_ADDR[1])),
            (INSTANCE, (ALICE_ADDR[0], ALICE_ADDR[1] + 1)),
            (OTHER_INSTANCE, ALICE_ADDR),
        ],
    )
    def test_spoofed_goodbye_is_ignored(self, h, instance, address):
        h.feed(alice())
        h.feed(wire.Goodbye(ALICE, instance), address)
        assert ALICE in h.table
        assert h.discovery.dropped == Counter({"unmatched goodbye": 1})
        assert h.observer.events == [("joined", ALICE)]

    def test_goodbye_from_unknown_peer(self, h):
        h.feed(wire.Goodbye(ALICE, INSTANCE))
        assert len(h.table) == 0
        assert h.discovery.dropped["unmatched goodbye"] == 1

    def test_own_echo_is_ignored(self, h):
        h.discovery.start()
        echo, _ = h.net.sent[0]
        h.discovery.datagram_received(echo, ("198.51.100.10", 40000))
        h.feed(wire.Goodbye(OUR_ID, OUR_INSTANCE))
        assert len(h.table) == 0
        assert len(h.net.sent) == 1
        assert h.discovery.dropped == Counter()
        assert h.observer.events == []

    def test_our_id_from_another_instance_is_counted(self, h):
        h.feed(wire.Announce(OUR_ID, OTHER_INSTANCE, 7100, REV))
        assert len(h.table) == 0
        assert h.net.sent == []
        assert h.discovery.dropped == Counter({"our id, other instance": 1})


def some_id(n):
    return f"{n + 1:032x}"


class TestFloods:
    def test_new_ids_beyond_the_table_limit_are_counted_and_not_answered(self):
        h = Harness()
        h.table = PeerTable(h.clock, TIMEOUT, max_peers=2)
        h.discovery.table = h.table
        for n in range(5):
            h.feed(wire.Announce(some_id(n), INSTANCE, 4000, REV), (f"192.0.2.{n}", 5000))
        assert len(h.table) == 2
        assert h.discovery.dropped == Counter({"peer table full": 3})
        assert len(h.net.sent) == 2

    def test_newcomer_replies_are_rate_limited(self, h):
        # Every id from its own address, so that only the reply limit bites.
        def newcomer(n):
            address = (f"10.{n // 250}.0.{n % 250}", 5000)
            h.feed(wire.Announce(some_id(n), INSTANCE, 4000, REV), address)

        for n in range(NEWCOMER_REPLY_BURST + 10):
            newcomer(n)
        assert len(h.net.sent) == NEWCOMER_REPLY_BURST
        assert h.discovery.dropped == Counter({"newcomer reply held back": 10})
        # Tokens come back with time, at the set rate, never above the burst.
        h.clock.advance(1.0)
        for n in range(100, 100 + int(NEWCOMER_REPLY_RATE) + 5):
            newcomer(n)
        assert len(h.net.sent) == NEWCOMER_REPLY_BURST + int(NEWCOMER_REPLY_RATE)
        h.clock.advance(3600)
        for n in range(200, 200 + NEWCOMER_REPLY_BURST + 1):
            newcomer(n)
        assert len(h.net.sent) == 2 * NEWCOMER_REPLY_BURST + int(NEWCOMER_REPLY_RATE)

    def test_known_peers_stay_through_a_flood(self, h):
        h.feed(alice())
        flooded = 0
        for _ in range(int(3 * TIMEOUT / INTERVAL)):
            for n in range(MAX_PEERS_PER_HOST + 10):
                h.feed(wire.Announce(some_id(n), INSTANCE, 4000, REV), ("203.0.113.9", 6000 + n))
            flooded += 10
            h.clock.advance(INTERVAL)
            h.feed(alice())
        assert ALICE in h.table
        assert h.observer.events.count(("joined", ALICE)) == 1
        assert len(h.table) == 1 + MAX_PEERS_PER_HOST
        assert h.discovery.dropped["peer table full"] == flooded


class TestBadDatagrams:
    def test_dropped_and_counted_by_kind(self, h):
        good = wire.encode_datagram(alice())
        h.discovery.datagram_received(good + b" " * MAX_DATAGRAM, ALICE_ADDR)
        h.discovery.datagram_received(good.replace(b'"p2p":1', b'"p2p":2'), ALICE_ADDR)
        h.discovery.datagram_received(good.replace(b'"p2p":1', b'"p2p":3'), ALICE_ADDR)
        h.discovery.datagram_received(b"not json", ALICE_ADDR)
        h.discovery.datagram_received(b"[]", ALICE_ADDR)
        h.discovery.datagram_received(good.replace(b'"port":4000', b'"port":0'), ALICE_ADDR)
        h.discovery.datagram_received(good[:-1], ALICE_ADDR)
        assert h.discovery.dropped == Counter(
            {"oversized": 1, "wrong version": 2, "malformed": 4}
        )
        assert len(h.table) == 0
        assert h.net.sent == []
        h.discovery.datagram_received(good, ALICE_ADDR)
        assert ALICE in h.table


@given(st.binary(max_size=2000))
def test_garbage_never_raises_and_never_adds(data):
    h = Harness()
    h.discovery.datagram_received(data, ALICE_ADDR)
    assert len(h.table) == 0
    assert h.net.sent == []
    assert sum(h.discovery.dropped.values()) == 1


@given(st.lists(st.binary(max_size=200), max_size=10))
def test_garbage_between_announces_changes_nothing(datagrams):
    h = Harness()
    h.feed(alice())
    for data in datagrams:
        h.discovery.datagram_received(data, ALICE_ADDR)
    assert len(h.table) == 1
    assert h.table.get(ALICE).revision == REV
    assert len(h.net.sent) == 1


def test_protocol_hands_datagrams_to_discovery(h):
    protocol = DiscoveryProtocol(h.discovery)
    protocol.datagramReceived(wire.encode_datagram(alice()), ALICE_ADDR)
    protocol.datagramReceived(b"junk", ALICE_ADDR)
    assert ALICE in h.table
    assert h.discovery.dropped == Counter({"malformed": 1})
    assert protocol.noisy is False
