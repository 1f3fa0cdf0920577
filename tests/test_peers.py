"""
Tests for L{twisted_p2p.peers}: the peer table, its expiry and its observers.
"""

import pytest
from twisted.internet.task import Clock

from twisted_p2p.limits import MAX_ADDRESSES_PER_PEER, MAX_PEERS, MAX_PEERS_PER_HOST
from twisted_p2p.peers import Peer, PeerTable
from twisted_p2p.wire import Announce, Goodbye

TIMEOUT = 30.0
ALICE = "a" * 32
BOB = "b" * 32
INSTANCE = "1" * 16
OTHER_INSTANCE = "2" * 16
REV = "0" * 16
REV2 = "f" * 16


class Recorder:
    """
    A PeerTable observer that writes down what it is told, and whether the
    table already reflected it at the time.
    """

    def __init__(self, table):
        self.table = table
        self.events = []

    def joined(self, peer):
        assert self.table.get(peer.peer_id) is peer
        self.events.append(("joined", peer.peer_id))

    def changed(self, peer, old_revision):
        assert self.table.get(peer.peer_id) is peer
        self.events.append(("changed", peer.peer_id, old_revision))

    def left(self, peer, reason):
        assert peer.peer_id not in self.table
        self.events.append(("left", peer.peer_id, reason))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def table(clock):
    return PeerTable(clock, TIMEOUT)


@pytest.fixture
def recorder(table):
    recorder = Recorder(table)
    table.subscribe(recorder)
    return recorder


def announce(peer_id=ALICE, instance=INSTANCE, port=4000, rev=REV):
    return Announce(peer_id, instance, port, rev)


class TestHeard:
    def test_new(self, table, recorder, clock):
        clock.advance(5)
        assert table.heard(announce(), "192.0.2.1", 5000) == "new"
        assert len(table) == 1
        assert ALICE in table
        peer = table.get(ALICE)
        assert (peer.peer_id, peer.instance_id, peer.host, peer.udp_port) == (
            ALICE,
            INSTANCE,
            "192.0.2.1",
            5000,
        )
        assert (peer.transfer_port, peer.revision, peer.last_seen) == (4000, REV, 5)
        assert recorder.events == [("joined", ALICE)]

    def test_same(self, table, recorder, clock):
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(3)
        assert table.heard(announce(), "192.0.2.1", 5000) == "same"
        assert table.get(ALICE).last_seen == 3
        assert recorder.events == [("joined", ALICE)]

    def test_restarted(self, table, recorder):
        table.heard(announce(), "192.0.2.1", 5000)
        assert table.heard(announce(instance=OTHER_INSTANCE), "192.0.2.1", 5000) == "restarted"
        assert table.get(ALICE).instance_id == OTHER_INSTANCE
        assert len(table) == 1
        # A restart has no old revision worth comparing with.
        assert recorder.events == [("joined", ALICE), ("changed", ALICE, None)]

    def test_restarted_with_new_revision_and_port(self, table, recorder):
        # A restart binds a new private UDP port: same host, another port.
        table.heard(announce(), "192.0.2.1", 5000)
        outcome = table.heard(announce(instance=OTHER_INSTANCE, rev=REV2), "192.0.2.1", 5001)
        assert outcome == "restarted"
        assert recorder.events[-1] == ("changed", ALICE, None)

    def test_changed_revision(self, table, recorder):
        table.heard(announce(), "192.0.2.1", 5000)
        assert table.heard(announce(rev=REV2), "192.0.2.1", 5000) == "changed"
        assert table.get(ALICE).revision == REV2
        assert recorder.events[-1] == ("changed", ALICE, REV)

    def test_changed_transfer_port(self, table, recorder):
        table.heard(announce(), "192.0.2.1", 5000)
        assert table.heard(announce(port=4009), "192.0.2.1", 5000) == "changed"
        assert len(table) == 1
        assert table.get(ALICE).transfer_port == 4009
        assert recorder.events == [("joined", ALICE), ("changed", ALICE, REV)]

    @pytest.mark.parametrize("host, udp_port", [("192.0.2.9", 5000), ("192.0.2.1", 5009)])
    def test_same_instance_from_another_address_adds_it(
        self, table, recorder, clock, host, udp_port
    ):
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(10)
        assert table.heard(announce(), host, udp_port, "other socket") == "added"
        peer = table.get(ALICE)
        # The main address stays: nobody can move a peer to their address.
        assert (peer.host, peer.udp_port, peer.main_address) == ("192.0.2.1", 5000, ("192.0.2.1", 5000))
        assert list(peer.addresses) == [("192.0.2.1", 5000), (host, udp_port)]
        assert table.at(host, udp_port) is peer
        assert recorder.events == [("joined", ALICE)]

    def test_a_new_instance_from_another_host_is_refused_while_the_peer_lives(
        self, table, recorder, clock
    ):
        # Someone else claiming a live peer's id (issue 11): the entry stays.
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(TIMEOUT - 1)
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(TIMEOUT - 1)
        outcome = table.heard(announce(instance=OTHER_INSTANCE, port=4009), "192.0.2.9", 5009)
        assert outcome == "duplicate"
        peer = table.get(ALICE)
        assert (peer.host, peer.instance_id) == ("192.0.2.1", INSTANCE)
        assert recorder.events == [("joined", ALICE)]

    def test_a_peer_that_moved_and_restarted_is_taken_once_its_old_entry_expired(
        self, table, recorder, clock
    ):
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(TIMEOUT)
        outcome = table.heard(announce(instance=OTHER_INSTANCE, port=4009), "192.0.2.9", 5009)
        assert outcome == "new"
        peer = table.get(ALICE)
        assert (peer.host, peer.udp_port, peer.transfer_port) == ("192.0.2.9", 5009, 4009)

    def test_new_address_after_expiry_is_taken(self, table, clock):
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(TIMEOUT)
        assert table.heard(announce(), "192.0.2.9", 5009) == "new"
        assert (table.get(ALICE).host, table.get(ALICE).udp_port) == ("192.0.2.9", 5009)

    def test_two_peers(self, table, recorder):
        table.heard(announce(ALICE), "192.0.2.2", 5000)
        table.heard(announce(BOB), "192.0.2.1", 5000)
        assert len(table) == 2
        assert [p.peer_id for p in table.peers()] == [BOB, ALICE]
        assert recorder.events == [("joined", ALICE), ("joined", BOB)]

    def test_peers_sorted_by_host_then_transfer_port(self, table):
        table.heard(announce(ALICE, port=4010), "192.0.2.1", 1)
        table.heard(announce(BOB, port=4000), "192.0.2.1", 2)
        assert [p.transfer_port for p in table.peers()] == [4000, 4010]


class TestExpiry:
    def test_expires_after_timeout_not_before(self, table, recorder, clock):
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(TIMEOUT - 0.1)
        assert ALICE in table
        clock.advance(0.1)
        assert ALICE not in table
        assert recorder.events == [("joined", ALICE), ("left", ALICE, "timed out")]

    def test_announce_resets_the_timer(self, table, recorder, clock):
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(20)
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(TIMEOUT - 1)  # t = 49: 29 s after the last announce
        assert ALICE in table
        clock.advance(1)
        assert ALICE not in table
        assert recorder.events[-1] == ("left", ALICE, "timed out")

    def test_one_timer_per_peer(self, table, clock):
        for _ in range(5):
            table.heard(announce(), "192.0.2.1", 5000)
            clock.advance(1)
        assert len(clock.getDelayedCalls()) == 1

    def test_peers_expire_independently(self, table, clock):
        table.heard(announce(ALICE), "192.0.2.1", 5000)
        clock.advance(10)
        table.heard(announce(BOB), "192.0.2.2", 5000)
        clock.advance(TIMEOUT - 10)
        assert ALICE not in table
        assert BOB in table
        clock.advance(10)
        assert len(table) == 0
        assert clock.getDelayedCalls() == []

    def test_rejoin_after_expiry(self, table, recorder, clock):
        table.heard(announce(), "192.0.2.1", 5000)
        clock.advance(TIMEOUT)
        assert table.heard(announce(), "192.0.2.1", 5000) == "new"
        assert [e[0] for e in recorder.events] == ["joined", "left", "joined"]
        assert len(clock.getDelayedCalls()) == 1


class TestGoodbye:
    def test_goodbye_drops(self, table, recorder, clock):
        table.heard(announce(), "192.0.2.1", 5000)
        assert table.goodbye(Goodbye(ALICE, INSTANCE), "192.0.2.1", 5000) == "dropped"
        assert len(table) == 0
        assert recorder.events[-1] == ("left", ALICE, "said goodbye")
        assert clock.getDelayedCalls() == []
        assert table.at("192.0.2.1", 5000) is None

    @pytest.mark.parametrize(
        "instance, host, udp_port",
        [
            (INSTANCE, "192.0.2.66", 5000),
            (INSTANCE, "192.0.2.1", 5001),
            (OTHER_INSTANCE, "192.0.2.1", 5000),
        ],
    )
    def test_spoofed_goodbye(self, table, recorder, instance, host, udp_port):
        table.heard(announce(), "192.0.2.1", 5000)
        assert table.goodbye(Goodbye(ALICE, instance), host, udp_port) is None
        assert ALICE in table
        assert recorder.events == [("joined", ALICE)]

    def test_goodbye_of_old_instance_after_restart(self, table):
        table.heard(announce(), "192.0.2.1", 5000)
        table.heard(announce(instance=OTHER_INSTANCE), "192.0.2.1", 5000)
        assert table.goodbye(Goodbye(ALICE, INSTANCE), "192.0.2.1", 5000) is None
        assert ALICE in table

    def test_goodbye_from_new_address_after_restart_elsewhere(self, table):
        table.heard(announce(), "192.0.2.1", 5000)
        table.heard(announce(instance=OTHER_INSTANCE), "192.0.2.1", 5001)
        assert table.goodbye(Goodbye(ALICE, INSTANCE), "192.0.2.1", 5000) is None
        assert table.goodbye(Goodbye(ALICE, OTHER_INSTANCE), "192.0.2.1", 5000) is None
        assert table.goodbye(Goodbye(ALICE, OTHER_INSTANCE), "192.0.2.1", 5001) == "dropped"

    def test_replayed_announce_cannot_open_the_way_for_a_goodbye(self, table, recorder):
        # An attacker who heard Alice's announce replays it from its own
        # address, then says goodbye for her from there: that drops only
        # the attacker's address.
        table.heard(announce(), "192.0.2.1", 5000)
        assert table.heard(announce(), "192.0.2.66", 6666) == "added"
        assert table.goodbye(Goodbye(ALICE, INSTANCE), "192.0.2.66", 6666) == "address dropped"
        assert ALICE in table
        assert list(table.get(ALICE).addresses) == [("192.0.2.1", 5000)]
        assert recorder.events == [("joined", ALICE)]

    def test_goodbye_over_every_address(self, table, recorder):
        # A dual-stack peer says goodbye on IPv4 and IPv6: the second is
        # no spoof, and changes nothing.
        table.heard(announce(), "192.0.2.1", 5000, "ipv4")
        table.heard(announce(), "fd00::1", 5001, "ipv6 eth0")
        assert table.goodbye(Goodbye(ALICE, INSTANCE), "192.0.2.1", 5000) == "dropped"
        assert table.goodbye(Goodbye(ALICE, INSTANCE), "fd00::1", 5001) == "repeated"
        assert recorder.events == [("joined", ALICE), ("left", ALICE, "said goodbye")]
        # A later run of it is welcome.
        assert table.heard(announce(instance=OTHER_INSTANCE), "192.0.2.1", 5000) == "new"

    def test_goodbye_unknown(self, table, recorder):
        assert table.goodbye(Goodbye(BOB, INSTANCE), "192.0.2.1", 5000) is None
        assert recorder.events == []


class TestAddresses:
    def test_each_address_expires_on_its_own(self, table, recorder, clock):
        table.heard(announce(), "192.0.2.1", 5000, "ipv4")
        table.heard(announce(), "fd00::1", 5001, "ipv6 eth0")
        for _ in range(5):
            clock.advance(TIMEOUT / 3)
            table.heard(announce(), "fd00::1", 5001, "ipv6 eth0")
        # IPv4 went silent (a cut link): the peer is reached over IPv6 now.
        peer = table.get(ALICE)
        assert list(peer.addresses) == [("fd00::1", 5001)]
        assert (peer.host, peer.udp_port, peer.via) == ("fd00::1", 5001, "ipv6 eth0")
        assert peer.label == "[fd00::1]:4000"
        assert recorder.events == [("joined", ALICE), ("changed", ALICE, REV)]
        clock.advance(TIMEOUT)
        assert ALICE not in table
        assert recorder.events[-1] == ("left", ALICE, "timed out")
        assert clock.getDelayedCalls() == []

    def test_link_local_only_when_nothing_else(self, table, recorder):
        table.heard(announce(), "fe80::1%eth0", 5001, "ipv6 eth0")
        assert table.get(ALICE).host == "fe80::1%eth0"
        assert table.heard(announce(), "192.0.2.1", 5000, "ipv4") == "added"
        peer = table.get(ALICE)
        assert (peer.host, peer.via) == ("192.0.2.1", "ipv4")
        assert recorder.events == [("joined", ALICE), ("changed", ALICE, REV)]

    def test_at_most_so_many_addresses(self, table):
        table.heard(announce(), "192.0.2.1", 5000)
        for n in range(1, MAX_ADDRESSES_PER_PEER):
            assert table.heard(announce(), "192.0.2.1", 5000 + n) == "added"
        assert table.heard(announce(), "192.0.2.99", 5000) == "too many addresses"
        assert table.at("192.0.2.99", 5000) is None

    def test_an_address_of_another_peer_is_not_taken(self, table):
        table.heard(announce(BOB), "192.0.2.2", 5000)
        table.heard(announce(), "192.0.2.1", 5000)
        assert table.heard(announce(), "192.0.2.2", 5000) == "full"
        assert table.at("192.0.2.2", 5000).peer_id == BOB

    def test_restart_forgets_the_old_addresses(self, table):
        table.heard(announce(), "192.0.2.1", 5000)
        table.heard(announce(), "192.0.2.7", 5000)
        assert table.heard(announce(instance=OTHER_INSTANCE), "192.0.2.7", 5009) == "restarted"
        assert list(table.get(ALICE).addresses) == [("192.0.2.7", 5009)]
        assert table.at("192.0.2.1", 5000) is None


class TestNameAndAdvertisedHost:
    def test_name_kept_and_changed(self, table, recorder):
        table.heard(Announce(ALICE, INSTANCE, 4000, REV, name="lab-1"), "192.0.2.1", 5000)
        assert table.get(ALICE).name == "lab-1"
        outcome = table.heard(Announce(ALICE, INSTANCE, 4000, REV, name="lab-2"), "192.0.2.1", 5000)
        assert outcome == "changed"
        assert table.get(ALICE).name == "lab-2"

    def test_advertised_host_is_where_transfers_go(self, table, recorder):
        table.heard(Announce(ALICE, INSTANCE, 4000, REV, host="203.0.113.7"), "192.0.2.1", 5000)
        peer = table.get(ALICE)
        assert (peer.host, peer.label) == ("203.0.113.7", "203.0.113.7:4000")
        # Datagrams still go where its datagrams come from.
        assert peer.main_address == ("192.0.2.1", 5000)
        assert table.heard(announce(), "192.0.2.1", 5000) == "changed"
        assert table.get(ALICE).host == "192.0.2.1"


class TestForgetAndClear:
    def test_forget(self, table, recorder, clock):
        table.heard(announce(), "192.0.2.1", 5000)
        table.forget(ALICE, "refused us")
        table.forget(BOB, "never known")
        assert len(table) == 0
        assert recorder.events == [("joined", ALICE), ("left", ALICE, "refused us")]
        assert clock.getDelayedCalls() == []

    def test_clear_cancels_expiry(self, table, recorder, clock):
        table.heard(announce(ALICE), "192.0.2.1", 5000)
        table.heard(announce(BOB), "192.0.2.2", 5000)
        table.clear()
        assert len(table) == 0
        assert clock.getDelayedCalls() == []
        clock.advance(TIMEOUT * 2)
        assert [e[0] for e in recorder.events] == ["joined", "joined"]


def peer_id(n):
    return f"{n:032x}"


class TestBounds:
    def test_a_full_table_makes_room_for_a_peer_of_a_less_crowded_host(self, clock):
        """
        Invented ids from a few hosts fill the table; a real newcomer from
        another host takes the place of the least recently heard of the
        most crowded host, and the flood cannot take it back.
        """
        table = PeerTable(clock, TIMEOUT, max_peers=8, max_per_host=8)
        for n in range(8):
            clock.advance(1)
            host = "198.51.100.1" if n < 6 else "198.51.100.2"
            assert table.heard(announce(peer_id(n)), host, 5000 + n) == "new"
        clock.advance(1)
        assert table.heard(announce(peer_id(100)), "192.0.2.50", 5000) == "new"
        assert peer_id(0) not in table  # the oldest of the crowded host
        assert table.made_room == 1
        # The crowded host's new ids make no room for themselves...
        assert table.heard(announce(peer_id(101)), "198.51.100.1", 6000) == "full"
        # ...nor does a host as crowded as the rest, once they are even.
        for n in range(102, 106):
            table.heard(announce(peer_id(n)), f"192.0.2.{n}", 5000)
        assert table.heard(announce(peer_id(200)), "198.51.100.2", 7000) == "full"
        assert len(table) == 8

    def test_ipv6_addresses_of_one_64_count_as_one_host(self, clock):
        table = PeerTable(clock, TIMEOUT, max_peers=100, max_per_host=2)
        assert table.heard(announce(peer_id(0)), "2001:db8:1:2::1", 5000) == "new"
        assert table.heard(announce(peer_id(1)), "2001:db8:1:2::ffff", 5000) == "new"
        assert table.heard(announce(peer_id(2)), "2001:db8:1:2:abcd::9", 5000) == "full"
        assert table.heard(announce(peer_id(3)), "2001:db8:1:3::1", 5000) == "new"

    def test_new_ids_beyond_the_limit_are_refused(self, clock):
        table = PeerTable(clock, TIMEOUT, max_peers=3, max_per_host=3)
        recorder = Recorder(table)
        table.subscribe(recorder)
        for n in range(3):
            assert table.heard(announce(peer_id(n)), f"192.0.2.{n}", 5000) == "new"
        assert table.heard(announce(peer_id(3)), "192.0.2.3", 5000) == "full"
        assert len(table) == 3
        assert peer_id(3) not in table
        assert len(recorder.events) == 3
        # Peers already known are still refreshed and still change.
        clock.advance(TIMEOUT - 1)
        assert table.heard(announce(peer_id(0)), "192.0.2.0", 5000) == "same"
        assert table.heard(announce(peer_id(1), rev=REV2), "192.0.2.1", 5000) == "changed"
        restart = announce(peer_id(2), instance=OTHER_INSTANCE)
        assert table.heard(restart, "192.0.2.2", 5000) == "restarted"
        clock.advance(1)
        assert len(table) == 3
        # Room again once one has gone.
        table.forget(peer_id(0), "test")
        assert table.heard(announce(peer_id(3)), "192.0.2.3", 5000) == "new"

    def test_one_host_cannot_take_the_whole_table(self):
        table = PeerTable(Clock(), TIMEOUT, max_peers=10, max_per_host=2)
        assert table.heard(announce(peer_id(0)), "192.0.2.1", 5000) == "new"
        assert table.heard(announce(peer_id(1)), "192.0.2.1", 5001) == "new"
        assert table.heard(announce(peer_id(2)), "192.0.2.1", 5002) == "full"
        assert table.heard(announce(peer_id(3)), "192.0.2.2", 5000) == "new"
        assert len(table) == 3

    def test_per_host_room_follows_restarts_and_departures(self):
        clock = Clock()
        table = PeerTable(clock, TIMEOUT, max_peers=10, max_per_host=1)
        table.heard(announce(peer_id(0)), "192.0.2.1", 5000)
        # Peer 0 goes, and restarts on another host: its old host has room again.
        clock.advance(TIMEOUT)
        table.heard(announce(peer_id(0), instance=OTHER_INSTANCE), "192.0.2.2", 5000)
        assert table.heard(announce(peer_id(1)), "192.0.2.1", 5000) == "new"
        assert table.heard(announce(peer_id(2)), "192.0.2.2", 5000) == "full"
        table.goodbye(Goodbye(peer_id(0), OTHER_INSTANCE), "192.0.2.2", 5000)
        assert table.heard(announce(peer_id(2)), "192.0.2.2", 5000) == "new"
        # A second address counts for its host too.
        assert table.heard(announce(peer_id(1)), "192.0.2.2", 5001) == "full"
        table.clear()
        assert table.heard(announce(peer_id(3)), "192.0.2.1", 5000) == "new"

    def test_default_limits(self, table):
        for n in range(MAX_PEERS_PER_HOST + 1):
            table.heard(announce(peer_id(n)), "192.0.2.1", 5000 + n)
        assert len(table) == MAX_PEERS_PER_HOST
        for n in range(MAX_PEERS + 1):
            table.heard(announce(peer_id(1000 + n)), f"10.1.{n // 250}.{n % 250}", 5000)
        assert len(table) == MAX_PEERS


def test_several_observers_all_told(table):
    first, second = Recorder(table), Recorder(table)
    table.subscribe(first)
    table.subscribe(second)
    table.heard(announce(), "192.0.2.1", 5000)
    assert first.events == second.events == [("joined", ALICE)]


def test_peer_properties():
    peer = Peer(ALICE, INSTANCE, "198.51.100.5", 5000, 4000, REV, 0.0)
    assert peer.short_id == "aaaaaaaa"
    assert peer.label == "198.51.100.5:4000"
    assert peer.sender_port == 4001
    assert peer.name is None
    assert Peer(ALICE, INSTANCE, "2001:db8::5", 5000, 4000, REV, 0.0).label == "[2001:db8::5]:4000"


def test_peers_sorted_ipv4_first_then_numerically(table):
    table.heard(announce(ALICE), "2001:db8::1", 1)
    table.heard(announce(BOB), "192.0.2.10", 1)
    table.heard(announce("c" * 32), "192.0.2.9", 1)
    assert [p.host for p in table.peers()] == ["192.0.2.9", "192.0.2.10", "2001:db8::1"]
