"""
Tests for L{twisted_p2p.discovery}, driven by a L{Clock} and a fake datagram
sender (C{MemoryReactor} has no UDP).
"""

import ipaddress
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger

from twisted_p2p import discovery as discovery_module
from twisted_p2p import wire
from twisted_p2p.discovery import Discovery, DiscoveryProtocol
from twisted_p2p.group import DiscoverySeal, GroupKey
from twisted_p2p.interfaces import Link
from twisted_p2p.limits import (
    DATAGRAM_TIME_WINDOW,
    EARLY_ANNOUNCE_INTERVAL,
    EXCHANGE_INTRO_BURST,
    MAX_DATAGRAM,
    MAX_EXCHANGE_PEERS,
    MAX_PEERS_PER_HOST,
    NEWCOMER_REPLY_BURST,
    NEWCOMER_REPLY_RATE,
)
from twisted_p2p.peers import PeerTable

OUR_ID = "0" * 32
OUR_INSTANCE = "0" * 16
ALICE = "a" * 32
BOB = "b" * 32
INSTANCE = "1" * 16
OTHER_INSTANCE = "2" * 16
REV = "0" * 16
REV2 = "f" * 16
PORT = 9999
INTERVAL = 10.0
TIMEOUT = 35.0
ALICE_ADDR = ("198.51.100.20", 40001)
#: A peer beyond a router: in none of our links' networks.
FAR_ADDR = ("203.0.113.5", 40005)

#: Our one link in most tests.  Fake sends only: nothing leaves the process.
LAN = Link(
    "ipv4",
    "127.255.255.255",
    (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("198.51.100.0/24")),
    "lo",
)
BROADCAST = (LAN.destination, PORT)
V6 = Link(
    "ipv6 eth0",
    "ff02::7032%eth0",
    (ipaddress.ip_network("fe80::/10"), ipaddress.ip_network("2001:db8:1::/64")),
    "eth0",
    "2001:db8:1::1",
)


class FakeDatagrams:
    """
    Stands in for the discovery sockets: records C{(data, address, via)}
    sent, and can be told to fail like a socket with no route.
    """

    def __init__(self):
        self.sent = []
        self.error = None

    def __call__(self, data, address, via):
        assert len(data) <= MAX_DATAGRAM
        if self.error is not None:
            raise self.error
        self.sent.append((data, address, via))

    def decoded(self):
        return [(wire.decode_datagram(data), address) for data, address, _ in self.sent]

    def to(self, address):
        return [message for message, a in self.decoded() if a == address]

    def vias(self):
        return [(address, via) for _, address, via in self.sent]


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
    def __init__(self, links=(LAN,), targets=(), seal=None):
        self.clock = Clock()
        self.table = PeerTable(self.clock, TIMEOUT)
        self.observer = Recorder()
        self.table.subscribe(self.observer)
        self.revision = REV
        self.links = list(links)
        self.targets = list(targets)
        self.notices = []
        self.discovery = Discovery(
            self.clock,
            self.table,
            OUR_ID,
            OUR_INSTANCE,
            7000,
            lambda: self.revision,
            PORT,
            INTERVAL,
            notify=self.notices.append,
            seal=seal,
        )
        self.net = FakeDatagrams()
        self.discovery.attach(self.net, lambda: self.links, lambda: self.targets)

    def feed(self, message, address=ALICE_ADDR, via="ipv4"):
        self.discovery.datagram_received(wire.encode_datagram(message), address, via)

    def announces_to(self, address):
        return [m for m in self.net.to(address) if isinstance(m, wire.Announce)]


@pytest.fixture
def h():
    return Harness()


def alice(instance=INSTANCE, port=4000, rev=REV, peers=()):
    return wire.Announce(ALICE, instance, port, rev, peers=tuple(peers))


def bob(peers=()):
    return wire.Announce(BOB, INSTANCE, 4100, REV, peers=tuple(peers))


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
        assert h.net.vias() == [(BROADCAST, "ipv4")] * 5

    def test_announce_carries_current_revision(self, h):
        h.discovery.start()
        h.revision = REV2
        h.clock.advance(INTERVAL)
        assert [m.revision for m in h.announces_to(BROADCAST)] == [REV, REV2]

    def test_nothing_sent_before_attach(self):
        clock = Clock()
        table = PeerTable(clock, TIMEOUT)
        discovery = Discovery(clock, table, OUR_ID, OUR_INSTANCE, 7000, lambda: REV, PORT, INTERVAL)
        discovery.start()
        clock.advance(INTERVAL)
        net = FakeDatagrams()
        discovery.attach(net, lambda: [LAN])
        clock.advance(INTERVAL)
        assert net.decoded() == [(wire.Announce(OUR_ID, OUR_INSTANCE, 7000, REV), BROADCAST)]

    def test_name_and_advertised_host_are_carried(self):
        h = Harness()
        h.discovery.name = "lab-1"
        h.discovery.advertise = "192.0.2.80"
        h.discovery.announce()
        [(message, _)] = h.net.decoded()
        assert (message.name, message.host) == ("lab-1", "192.0.2.80")

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


class TestWhereAnnouncesGo:
    def test_every_link_from_its_own_socket(self):
        h = Harness(links=[LAN, V6])
        h.discovery.start()
        assert h.net.vias() == [(BROADCAST, "ipv4"), (("ff02::7032%eth0", PORT), "ipv6 eth0")]

    def test_links_are_asked_again_every_round(self):
        h = Harness(links=[LAN])
        h.discovery.start()
        h.links = [LAN, V6]
        h.clock.advance(INTERVAL)
        h.links = []
        h.clock.advance(INTERVAL)
        assert [a for a, _ in h.net.vias()] == [BROADCAST, BROADCAST, ("ff02::7032%eth0", PORT)]

    def test_peer_targets_get_unicast_every_round(self):
        h = Harness(targets=[("203.0.113.9", PORT)])
        h.discovery.start()
        h.clock.advance(INTERVAL)
        assert len(h.announces_to(("203.0.113.9", PORT))) == 2
        assert (("203.0.113.9", PORT), None) in h.net.vias()

    def test_a_peer_beyond_our_links_gets_unicast_every_round(self, h):
        h.feed(alice())
        h.feed(wire.Announce(BOB, INSTANCE, 4100, REV), FAR_ADDR, "ipv4")
        h.net.sent.clear()
        h.discovery.announce()
        # Alice hears the broadcast; Bob, beyond a router, is told directly.
        assert h.net.vias() == [(BROADCAST, "ipv4"), (FAR_ADDR, "ipv4")]

    def test_goodbye_reaches_the_peers_beyond_too(self, h):
        h.discovery.start()
        h.feed(alice())
        h.feed(wire.Announce(BOB, INSTANCE, 4100, REV), FAR_ADDR)
        h.net.sent.clear()
        h.discovery.stop()
        assert h.net.decoded() == [
            (wire.Goodbye(OUR_ID, OUR_INSTANCE), BROADCAST),
            (wire.Goodbye(OUR_ID, OUR_INSTANCE), FAR_ADDR),
        ]


class TestTellingTheUser:
    @pytest.fixture
    def logged(self, monkeypatch):
        events = []
        monkeypatch.setattr(discovery_module, "log", Logger(observer=events.append))
        return events

    def test_no_interface_is_said_once_then_the_fix(self, logged):
        h = Harness(links=[])
        h.discovery.start()
        h.clock.pump([INTERVAL] * 5)
        assert [n["event"] for n in h.notices] == ["discovery-problem"]
        text = h.notices[0]["text"]
        assert text.startswith("discovery cannot send on any interface (no interface is up")
        assert "--peer HOST" in text and "--broadcast 127.255.255.255" in text
        assert h.discovery.problem == text
        assert len(logged) == 1
        h.links = [LAN]
        h.clock.advance(INTERVAL)
        assert [n["event"] for n in h.notices] == ["discovery-problem", "discovery-restored"]
        assert h.discovery.problem is None
        h.clock.pump([INTERVAL] * 3)
        assert len(h.notices) == 2

    def test_a_refused_send_is_logged_once_until_it_works(self, h, logged):
        h.net.error = OSError(101, "Network is unreachable")
        h.discovery.start()
        h.clock.pump([INTERVAL] * 4)
        warnings = [e for e in logged if "Could not send" in e["log_format"]]
        assert len(warnings) == 1
        assert warnings[0]["error"] == "Network is unreachable"
        assert "every interface refused: 127.255.255.255:9999: Network is unreachable" in (
            h.notices[0]["text"]
        )
        h.net.error = None
        h.clock.advance(INTERVAL)
        assert any("again" in e["log_format"] for e in logged)
        assert h.notices[-1]["event"] == "discovery-restored"

    def test_a_working_peer_target_is_enough(self, logged):
        h = Harness(links=[], targets=[("203.0.113.9", PORT)])
        h.discovery.start()
        assert h.notices == [] and h.discovery.problem is None


class TestPeerExchange:
    def test_broadcast_passes_on_the_peers_beyond_the_link(self, h):
        h.feed(alice())
        h.feed(bob(), FAR_ADDR)
        h.feed(wire.Announce("c" * 32, INSTANCE, 4200, REV), ("fe80::9%eth0", 40009), "ipv6 eth0")
        h.feed(wire.Announce("d" * 32, INSTANCE, 4300, REV), ("127.0.0.1", 40010))
        h.net.sent.clear()
        h.discovery.announce()
        [broadcast] = h.announces_to(BROADCAST)
        # Alice hears the broadcast herself; link-local and loopback
        # addresses mean nothing elsewhere.
        assert broadcast.peers == (FAR_ADDR,)
        [to_bob] = h.announces_to(FAR_ADDR)
        assert to_bob.peers == (ALICE_ADDR,)

    def test_a_newcomer_hears_of_the_peers_it_cannot_hear(self, h):
        h.feed(bob(), FAR_ADDR)
        h.net.sent.clear()
        h.feed(alice())
        [reply] = h.announces_to(ALICE_ADDR)
        assert reply.peers == (FAR_ADDR,)

    def test_a_slice_at_a_time(self, h):
        for n in range(MAX_EXCHANGE_PEERS * 2):
            h.feed(wire.Announce(f"{n + 1:032x}", INSTANCE, 4000, REV), (f"203.0.113.{n + 1}", 5000))
        seen = set()
        for _ in range(2):
            h.net.sent.clear()
            h.discovery.announce()
            seen.update(h.announces_to(BROADCAST)[0].peers)
        assert len(seen) > MAX_EXCHANGE_PEERS

    def test_an_unknown_peer_passed_on_is_introduced_to(self, h):
        h.feed(alice(peers=[FAR_ADDR]))
        assert len(h.announces_to(FAR_ADDR)) == 1
        assert (FAR_ADDR, None) in h.net.vias()
        # Nobody enters the table on another's word.
        assert BOB not in h.table
        # Its answer does.
        h.feed(bob(), FAR_ADDR)
        assert BOB in h.table

    def test_known_own_and_useless_addresses_are_not_introduced_to(self, h):
        h.discovery.start()
        echo = h.net.sent[0][0]
        h.discovery.datagram_received(echo, ("198.51.100.10", 40000), "ipv4")
        h.feed(bob(), FAR_ADDR)
        h.net.sent.clear()
        h.feed(alice(peers=[FAR_ADDR, ("198.51.100.10", 40000), ("127.0.0.1", 5), ("fe80::1", 5)]))
        assert [a for a, _ in h.net.vias()] == [ALICE_ADDR]

    def test_each_candidate_once_per_timeout(self, h):
        h.feed(alice(peers=[FAR_ADDR]))
        h.feed(alice(peers=[FAR_ADDR]))
        h.clock.advance(TIMEOUT - 1)
        h.feed(alice(peers=[FAR_ADDR]))
        assert len(h.announces_to(FAR_ADDR)) == 1
        h.clock.advance(1)
        h.feed(alice(peers=[FAR_ADDR]))
        assert len(h.announces_to(FAR_ADDR)) == 2

    def test_introductions_are_rate_limited(self, h):
        h.feed(alice())
        for n in range(3):
            h.feed(alice(peers=[(f"203.0.{n}.{m}", 5000) for m in range(1, MAX_EXCHANGE_PEERS + 1)]))
        introduced = [a for a, _ in h.net.vias() if a[0].startswith("203.")]
        assert len(introduced) == EXCHANGE_INTRO_BURST
        assert h.discovery.dropped["introduction held back"] == 3 * MAX_EXCHANGE_PEERS - EXCHANGE_INTRO_BURST

    def test_a_newcomer_from_beyond_is_told_to_our_lan_at_once(self, h):
        h.discovery.start()
        h.feed(alice())
        h.clock.advance(1)
        h.net.sent.clear()
        h.feed(bob(), FAR_ADDR)
        h.clock.advance(0)
        assert [m.peers for m in h.announces_to(BROADCAST)] == [(FAR_ADDR,)]
        # At most once per EARLY_ANNOUNCE_INTERVAL.
        h.feed(wire.Announce("c" * 32, INSTANCE, 4200, REV), ("203.0.113.77", 1))
        h.clock.advance(0)
        assert len(h.announces_to(BROADCAST)) == 1
        h.clock.advance(EARLY_ANNOUNCE_INTERVAL)
        assert len(h.announces_to(BROADCAST)) == 2

    def test_a_newcomer_on_our_lan_needs_no_early_announce(self, h):
        h.discovery.start()
        h.net.sent.clear()
        h.feed(alice())
        h.clock.advance(EARLY_ANNOUNCE_INTERVAL)
        assert h.announces_to(BROADCAST) == []


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

    def test_reply_leaves_from_the_socket_that_heard(self, h):
        h.feed(alice(), ("2001:db8:1::5", 51234), "ipv6 eth0")
        assert h.net.vias() == [(("2001:db8:1::5", 51234), "ipv6 eth0")]

    def test_restart_at_a_changed_port_updates_the_single_entry(self, h):
        h.feed(alice())
        h.feed(alice(instance=OTHER_INSTANCE, port=4100), (ALICE_ADDR[0], 40002))
        assert len(h.table) == 1
        peer = h.table.get(ALICE)
        assert (peer.host, peer.udp_port, peer.transfer_port) == (ALICE_ADDR[0], 40002, 4100)
        assert h.observer.events == [("joined", ALICE), ("changed", ALICE, None)]

    def test_a_live_peers_id_from_another_host_is_dropped_and_counted(self, h):
        h.feed(alice())
        h.feed(alice(instance=OTHER_INSTANCE, port=4100), ("198.51.100.99", 40002))
        peer = h.table.get(ALICE)
        assert (peer.host, peer.instance_id) == (ALICE_ADDR[0], INSTANCE)
        assert h.discovery.dropped == Counter({"a live peer's id from another host": 1})
        assert h.observer.events == [("joined", ALICE)]

    def test_same_instance_from_another_address_adds_it(self, h):
        h.feed(alice())
        h.feed(alice(port=4100), ("2001:db8:1::20", 40002), "ipv6 eth0")
        peer = h.table.get(ALICE)
        assert (peer.host, peer.udp_port, peer.transfer_port) == (*ALICE_ADDR, 4100)
        assert list(peer.addresses) == [ALICE_ADDR, ("2001:db8:1::20", 40002)]
        # Not a newcomer: no second reply.
        assert len(h.net.sent) == 1

    def test_replayed_announce_then_goodbye_does_not_evict(self, h):
        # /tmp/r/evict.py: replay Alice's announce from elsewhere, then say
        # goodbye for her from there.
        attacker = ("198.51.100.66", 31999)
        h.feed(alice())
        h.feed(alice(), attacker)
        h.feed(wire.Goodbye(ALICE, INSTANCE), attacker)
        assert ALICE in h.table
        assert h.table.get(ALICE).main_address == ALICE_ADDR
        assert h.discovery.dropped == Counter()

    def test_goodbye_over_a_second_address_is_no_spoof(self, h):
        h.feed(alice())
        h.feed(alice(), ("2001:db8:1::20", 40002), "ipv6 eth0")
        h.feed(wire.Goodbye(ALICE, INSTANCE))
        h.feed(wire.Goodbye(ALICE, INSTANCE), ("2001:db8:1::20", 40002), "ipv6 eth0")
        assert ALICE not in h.table
        assert h.discovery.dropped == Counter()

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
        echo = h.net.sent[0][0]
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


GROUP = GroupKey(bytes(range(32)))


class Member:
    """
    Another member of the group: seals its datagrams as a peer would.
    """

    def __init__(self, clock, key=GROUP):
        self.clock = clock
        self.seal = DiscoverySeal(key)

    def sealed(self, message):
        return self.seal.seal(wire.encode_datagram(message, self.seal.room), self.clock.seconds())


class TestPrivateGroup:
    @pytest.fixture
    def g(self):
        return Harness(seal=DiscoverySeal(GROUP))

    def test_members_hear_each_other_and_answer_sealed(self, g):
        alice_seal = Member(g.clock)
        g.discovery.start()
        g.discovery.datagram_received(alice_seal.sealed(alice()), ALICE_ADDR)
        assert ALICE in g.table
        # Everything we sent is sealed, for the group only.
        for data, address, _ in g.net.sent:
            with pytest.raises(wire.Sealed):
                wire.decode_datagram(data)
            _, body = DiscoverySeal(GROUP).open(data, g.clock.seconds())
            assert isinstance(wire.decode_datagram(body), wire.Announce)
        assert len(g.net.sent) == 2  # the round, and the newcomer's reply
        assert not g.discovery.dropped

    def test_a_replayed_announce_is_dropped_and_counted(self, g):
        member = Member(g.clock)
        old = member.sealed(alice())
        g.discovery.datagram_received(old, ALICE_ADDR)
        # Alice restarts; her old announce, replayed, must not undo that.
        g.clock.advance(5)
        g.discovery.datagram_received(Member(g.clock).sealed(alice(instance=OTHER_INSTANCE)), ALICE_ADDR)
        g.discovery.datagram_received(old, ALICE_ADDR)
        assert g.discovery.dropped == Counter({"replayed": 1})
        assert g.table.get(ALICE).instance_id == OTHER_INSTANCE

    def test_a_forged_goodbye_is_dropped_and_counted(self, g):
        member = Member(g.clock)
        g.discovery.datagram_received(member.sealed(alice()), ALICE_ADDR)
        goodbye = member.sealed(wire.Goodbye(ALICE, INSTANCE))
        forged = goodbye[:-1] + bytes([goodbye[-1] ^ 1])
        g.discovery.datagram_received(forged, ALICE_ADDR)
        # Sealed by someone who knows the group id but not the key.
        outsider = wire.seal_datagram(
            wire.encode_datagram(wire.Goodbye(ALICE, INSTANCE)), GROUP.group_id, bytes(32), 0, 99
        )
        g.discovery.datagram_received(outsider, ALICE_ADDR)
        assert g.discovery.dropped == Counter({"forged": 2})
        assert ALICE in g.table
        # The real goodbye still works, once.
        g.discovery.datagram_received(goodbye, ALICE_ADDR)
        assert ALICE not in g.table
        g.discovery.datagram_received(goodbye, ALICE_ADDR)
        assert g.discovery.dropped["replayed"] == 1

    def test_strangers_are_ignored_on_the_same_port(self, g):
        g.feed(alice())  # no key at all
        g.discovery.datagram_received(
            Member(g.clock, GroupKey(bytes(32))).sealed(bob()), ALICE_ADDR
        )
        assert g.discovery.dropped == Counter({"without our group key": 1, "of another group": 1})
        assert len(g.table) == 0
        assert g.net.sent == []

    def test_a_datagram_from_too_long_ago_is_dropped(self, g):
        member = Member(g.clock)
        old = member.sealed(alice())
        g.clock.advance(DATAGRAM_TIME_WINDOW + 1)
        g.discovery.datagram_received(old, ALICE_ADDR)
        assert g.discovery.dropped == Counter({"outside the time window (clocks apart?)": 1})
        assert len(g.table) == 0

    def test_an_open_peer_counts_a_private_groups_datagrams(self, h):
        h.discovery.datagram_received(Member(h.clock).sealed(alice()), ALICE_ADDR)
        assert h.discovery.dropped == Counter({"of a private group": 1})
        assert len(h.table) == 0

    @given(st.binary(max_size=2000))
    def test_garbage_never_raises(self, data):
        g = Harness(seal=DiscoverySeal(GROUP))
        g.discovery.datagram_received(data, ALICE_ADDR)
        g.discovery.datagram_received(wire.SEAL_MAGIC + data, ALICE_ADDR)
        assert len(g.table) == 0
        assert sum(g.discovery.dropped.values()) == 2


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
    protocol = DiscoveryProtocol(h.discovery, "ipv4")
    protocol.datagramReceived(wire.encode_datagram(alice()), ALICE_ADDR)
    protocol.datagramReceived(b"junk", ALICE_ADDR)
    assert ALICE in h.table
    assert h.table.get(ALICE).via == "ipv4"
    assert h.discovery.dropped == Counter({"malformed": 1})
    assert protocol.noisy is False


def test_protocol_scopes_link_local_sources(h):
    protocol = DiscoveryProtocol(h.discovery, "ipv6 eth0", scope="eth0")
    protocol.datagramReceived(wire.encode_datagram(alice()), ("fe80::5", 40001))
    protocol.datagramReceived(wire.encode_datagram(bob()), ("2001:db8:1::5", 40001))
    assert h.table.get(ALICE).host == "fe80::5%eth0"
    assert h.table.get(BOB).host == "2001:db8:1::5"
    # The reply can be sent: it names the link.
    assert ("fe80::5%eth0", 40001) in [a for a, _ in h.net.vias()]


class FakePort:
    def __init__(self, name):
        self.name = name
        self.written = []

    def write(self, data, address):
        self.written.append(address)


class TestServiceRouting:
    """How L{DiscoveryService} picks the socket a datagram leaves from."""

    @pytest.fixture
    def service(self):
        from twisted_p2p.service import DiscoveryService

        h = Harness()
        service = DiscoveryService(None, h.discovery, "any", PORT, peers=[
            ("198.18.5.1", None), ("fd00::5", 27001), ("198.18.6.1", 7),
        ])
        service._private4 = FakePort("v4")
        other = Link("ipv6 eth1", "ff02::7032%eth1", (ipaddress.ip_network("fe80::/10"),
                     ipaddress.ip_network("2001:db8:2::/64")), "eth1", "2001:db8:2::1")
        service._links6 = {
            V6.via: (V6, FakePort("l0"), FakePort("eth0")),
            other.via: (other, FakePort("l1"), FakePort("eth1")),
        }
        return service

    def sent_from(self, service, address, via=None):
        ports = [service._private4] + [entry[2] for entry in service._links6.values()]
        for port in ports:
            port.written.clear()
        service._send(b"x", address, via)
        [port] = [p for p in ports if p.written]
        return port.name

    def test_by_family_and_link(self, service):
        assert self.sent_from(service, ("198.18.0.9", 1), "ipv4") == "v4"
        assert self.sent_from(service, ("ff02::7032%eth1", 1), "ipv6 eth1") == "eth1"

    def test_by_network_when_no_socket_is_named(self, service):
        assert self.sent_from(service, ("2001:db8:2::9", 1)) == "eth1"
        # Beyond every link: any IPv6 socket (the kernel routes it).
        assert self.sent_from(service, ("2001:db8:9::9", 1)) == "eth0"

    def test_a_family_it_does_not_use(self, service):
        service._private4 = None
        with pytest.raises(OSError):
            service._send(b"x", ("198.18.0.9", 1), None)

    def test_peer_targets_get_the_discovery_port_by_default(self, service):
        assert service.targets() == [
            ("198.18.5.1", PORT), ("fd00::5", 27001), ("198.18.6.1", 7)
        ]
        service._families = (4,)
        assert service.targets() == [("198.18.5.1", PORT), ("198.18.6.1", 7)]
