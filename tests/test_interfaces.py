"""
L{twisted_p2p.interfaces}: where discovery announces, on made-up interfaces
(the machine's own are only read, never sent to).
"""

import ipaddress

import pytest

from twisted_p2p import interfaces
from twisted_p2p.interfaces import Interface, announce_links, covered, link_for

UP_BROADCAST_MULTICAST = 0x1 | 0x2 | 0x1000
LOOPBACK_UP = 0x1 | 0x8


def ifc(name, index, *addresses, flags=UP_BROADCAST_MULTICAST):
    return Interface(name, index, tuple(ipaddress.ip_interface(a) for a in addresses), flags)


LO = ifc("lo", 1, "127.0.0.1/8", "::1/128", flags=LOOPBACK_UP)
LAN1 = ifc("eth0", 2, "198.18.1.10/24", "fd00:198:18:1::10/64", "fe80::1/64")
LAN2 = ifc("eth1", 3, "198.18.2.10/24", "fe80::2/64")
DOWN = ifc("eth2", 4, "198.18.3.10/24", "fe80::3/64", flags=0x2 | 0x1000)
POINT = ifc("tun0", 5, "198.18.4.1/32", flags=0x1 | 0x1000)
MACHINE = [LO, LAN1, LAN2, DOWN, POINT]


def destinations(links):
    return [(link.via, link.destination) for link in links]


def test_every_interface_that_is_up_and_can():
    # Not loopback (no broadcast), not eth2 (down), not tun0 (a /32, and no
    # IPv6 address).
    assert destinations(announce_links(MACHINE)) == [
        ("ipv4", "198.18.1.255"),
        ("ipv4", "198.18.2.255"),
        ("ipv6 eth0", "ff02::7032%eth0"),
        ("ipv6 eth1", "ff02::7032%eth1"),
    ]


def test_ipv6_sends_from_a_routable_address_if_there_is_one():
    links = {link.via: link for link in announce_links(MACHINE)}
    assert links["ipv6 eth0"].source == "fd00:198:18:1::10"
    assert links["ipv6 eth1"].source == "fe80::2%eth1"


def test_host_limits_to_its_interface_and_family():
    assert destinations(announce_links(MACHINE, "198.18.2.10")) == [("ipv4", "198.18.2.255")]
    assert destinations(announce_links(MACHINE, "fd00:198:18:1::10")) == [
        ("ipv6 eth0", "ff02::7032%eth0")
    ]
    assert [link.source for link in announce_links(MACHINE, "fd00:198:18:1::10")] == [
        "fd00:198:18:1::10"
    ]
    assert destinations(announce_links(MACHINE, "0.0.0.0")) == [
        ("ipv4", "198.18.1.255"), ("ipv4", "198.18.2.255")
    ]
    assert [link.family for link in announce_links(MACHINE, "::")] == [6, 6]


def test_loopback_only_when_host_is_loopback():
    assert "127.255.255.255" not in [link.destination for link in announce_links(MACHINE)]
    [link] = announce_links(MACHINE, "127.0.0.1")
    assert (link.destination, link.interface) == ("127.255.255.255", "lo")


def test_broadcast_overrides_ipv4():
    [v4] = [link for link in announce_links(MACHINE, broadcast="198.18.1.255") if link.family == 4]
    assert v4.destination == "198.18.1.255"
    assert v4.networks == (ipaddress.ip_network("198.18.1.0/24"),)
    [everywhere] = announce_links(MACHINE, "0.0.0.0", "255.255.255.255")
    assert len(everywhere.networks) == 5


def test_an_ipv6_multicast_broadcast_replaces_the_group():
    links = announce_links(MACHINE, "::", "ff02::1234")
    assert [link.destination for link in links] == ["ff02::1234%eth0", "ff02::1234%eth1"]


def test_no_interface_no_link():
    assert announce_links([LO, DOWN]) == []


def test_covered_and_link_for():
    links = announce_links(MACHINE)
    assert covered(links, "198.18.1.77")
    assert covered(links, "fd00:198:18:1::77")
    assert covered(links, "fe80::77%eth1")
    assert not covered(links, "198.18.5.1")
    assert not covered(links, "not an address")
    assert link_for(links, "198.18.2.9").interface == "eth1"
    assert link_for(links, "fe80::77%eth1").via == "ipv6 eth1"
    assert link_for(links, "198.18.5.1") is None


def test_flags_unknown_means_usable_unless_loopback():
    unknown = Interface("en0", 7, (ipaddress.ip_interface("198.18.7.1/24"),), None)
    assert unknown.up and unknown.can_broadcast and not unknown.loopback
    loop = Interface("lo0", 8, (ipaddress.ip_interface("127.0.0.1/8"),), None)
    assert loop.loopback and not loop.can_broadcast


@pytest.mark.parametrize(
    "text, parsed",
    [("any", "any"), ("0.0.0.0", "0.0.0.0"), ("::", "::"), ("FD00:0::1", "fd00::1")],
)
def test_parse_host(text, parsed):
    assert interfaces.parse_host(text) == parsed


@pytest.mark.parametrize("text", ["fe80::1%eth0", "x", "", "1.2.3"])
def test_parse_host_refuses(text):
    with pytest.raises(ValueError):
        interfaces.parse_host(text)


def test_families_and_formatting():
    assert interfaces.families("any") == (4, 6)
    assert interfaces.families("127.0.0.1") == (4,)
    assert interfaces.families("::1") == (6,)
    assert interfaces.format_address("198.18.0.1", 7) == "198.18.0.1:7"
    assert interfaces.format_address("fd00::1", 7) == "[fd00::1]:7"
    assert interfaces.is_link_local("fe80::1%eth0")
    assert not interfaces.is_link_local("fd00::1")


def test_scan_reads_this_machine():
    # Only read: the loopback interface is always there.
    found = interfaces.scan()
    assert any(i.loopback and any(a.ip.is_loopback for a in i.addresses) for i in found)
