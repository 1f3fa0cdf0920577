"""
The machine's network interfaces, and where discovery announces on them.

L{scan} reads the interfaces (addresses and prefixes from C{ifaddr}, up and
broadcast flags from the kernel where it says); L{announce_links} turns a
scan and the peer's C{--host} and C{--broadcast} into the L{Link}s discovery
announces on: one per IPv4 interface that is up and can broadcast (to its
broadcast address), and one per IPv6 interface that is up and can multicast
(to the discovery group on that interface).  Both are cheap, so discovery
scans again before every announce round: new interfaces and changed
addresses (DHCP) are picked up without a restart.

Everything but L{scan} is pure, and tested on made-up interfaces.
"""

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

import ifaddr

#: The IPv6 link-local multicast group discovery uses ("p2" in hex): every
#: peer joins it on every IPv6 interface and announces to it there.
DISCOVERY_GROUP = "ff02::7032"

#: What C{--host} and C{--broadcast} mean when they are not given.
ANY_HOST = "any"
AUTO_BROADCAST = "auto"

# Interface flags (net/if.h; the same values on Linux and the BSDs).
_IFF_UP = 0x1
_IFF_BROADCAST = 0x2
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000
#: Linux's ioctl for an interface's flags.
_SIOCGIFFLAGS = 0x8913


@dataclass(frozen=True)
class Interface:
    """
    One network interface as scanned.

    @ivar addresses: its addresses with their networks
        (L{ipaddress.IPv4Interface} or L{ipaddress.IPv6Interface}).
    @ivar flags: its flags (C{IFF_*}), or C{None} where the system does not
        tell; then it is taken as up, able to broadcast and multicast unless
        its addresses are loopback ones.
    """

    name: str
    index: int
    addresses: tuple
    flags: object = None

    def _flag(self, bit):
        if self.flags is None:
            return not self.loopback
        return bool(self.flags & bit)

    @property
    def loopback(self):
        if self.flags is not None:
            return bool(self.flags & _IFF_LOOPBACK)
        return any(a.ip.is_loopback for a in self.addresses)

    @property
    def up(self):
        return self.flags is None or bool(self.flags & _IFF_UP)

    @property
    def can_broadcast(self):
        return self._flag(_IFF_BROADCAST)

    @property
    def can_multicast(self):
        return self._flag(_IFF_MULTICAST)

    def ipv4(self):
        return [a for a in self.addresses if a.version == 4]

    def ipv6(self):
        return [a for a in self.addresses if a.version == 6]


@dataclass(frozen=True)
class Link:
    """
    One place discovery announces to, and who hears it there.

    @ivar via: which of our sockets sends it: C{"ipv4"}, or C{"ipv6 NAME"}
        for the IPv6 socket of interface NAME.
    @ivar destination: the broadcast address, or the discovery group with
        the interface as its scope (C{ff02::7032%eth0}).
    @ivar networks: the networks whose peers hear an announce sent here;
        a peer in one of them needs no unicast announce.
    @ivar source: for IPv6, the address our socket on this link is bound to
        (a global or unique local one if the interface has one, so that
        peers reach us without a scope); C{None} for IPv4.
    @ivar interface: the interface name.
    """

    via: str
    destination: str
    networks: tuple
    interface: str
    source: object = None

    @property
    def family(self):
        return 6 if self.via.startswith("ipv6") else 4


def scan():
    """
    The machine's interfaces that have an address, now.
    """
    found = []
    for adapter in ifaddr.get_adapters():
        addresses = []
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):
                # IPv6: (address, flowinfo, scope id)
                text = ip.ip[0].split("%", 1)[0]
            else:
                text = ip.ip
            try:
                addresses.append(ipaddress.ip_interface(f"{text}/{ip.network_prefix}"))
            except ValueError:
                continue
        if addresses and adapter.index is not None:
            found.append(Interface(adapter.name, adapter.index, tuple(addresses), _flags(adapter.name)))
    return found


def _flags(name):
    """
    The kernel's flags of interface C{name}, or C{None} if it will not say
    (not Linux, or the interface just went away).
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            request = struct.pack("16sH14x", name.encode()[:15], 0)
            answer = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request)
    except (OSError, ValueError):
        return None
    return struct.unpack("16sH14x", answer)[1]


def parse_host(text):
    """
    C{--host}: L{ANY_HOST}, or an IPv4 or IPv6 address (in its usual
    form).  A scoped (link-local) address is none: peers elsewhere on the
    LAN could not reach it without the scope.

    @raise ValueError: not an address.
    """
    if text == ANY_HOST:
        return text
    if "%" in text:
        raise ValueError(f"{text!r} has a scope")
    return str(ipaddress.ip_address(text))


def families(host):
    """
    The address families (4, 6) a peer bound to C{host} uses.
    """
    if host == ANY_HOST:
        return (4, 6)
    return (ipaddress.ip_address(host).version,)


def is_link_local(host):
    """
    Whether C{host} (an address, maybe with a C{%scope}) is link-local:
    meaningful only on one link, and so never passed on to other peers.
    """
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_link_local
    except ValueError:
        return False


def format_address(host, port):
    """
    C{host:port}, or C{[host]:port} for IPv6.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def announce_links(interfaces, host=ANY_HOST, broadcast=AUTO_BROADCAST, group=DISCOVERY_GROUP):
    """
    The L{Link}s to announce on.

     - IPv4: with C{broadcast} an IPv4 address, that address alone (the
       override); otherwise the broadcast address of every IPv4 interface
       that is up and can broadcast -- or, with C{host} an IPv4 address,
       of that address's interface only (a loopback C{host} gives the
       loopback network's broadcast address, for peers on one machine).
     - IPv6: the discovery group (or C{broadcast}, if it is an IPv6
       multicast address) on every IPv6 interface that is up and can
       multicast, or on C{host}'s interface only.

    @param interfaces: L{Interface}s, as from L{scan}.
    @param host: C{--host}: L{ANY_HOST} or an address.
    @param broadcast: C{--broadcast}: L{AUTO_BROADCAST}, an IPv4 address or
        an IPv6 multicast group.
    """
    wanted = families(host)
    bound = None if host == ANY_HOST else ipaddress.ip_address(host)
    override = None if broadcast == AUTO_BROADCAST else ipaddress.ip_address(broadcast)
    if override is not None and override.version == 6:
        group, override = str(override), None
    links = []
    if 4 in wanted:
        links.extend(_ipv4_links(interfaces, bound, override))
    if 6 in wanted:
        links.extend(_ipv6_links(interfaces, bound, group))
    return links


def _ipv4_links(interfaces, bound, override):
    if override is not None:
        networks = tuple(
            a.network for i in interfaces for a in i.ipv4()
            if override in (a.network.broadcast_address, ipaddress.IPv4Address("255.255.255.255"))
        )
        return [Link("ipv4", str(override), networks, "")]
    links = []
    for interface in interfaces:
        for address in interface.ipv4():
            if bound is not None and not bound.is_unspecified and address.ip != bound:
                continue
            if not interface.up or address.network.prefixlen > 30:
                continue
            # Loopback cannot broadcast; peers on one machine broadcast on it
            # only when told to use it (--host 127.0.0.1).
            if interface.loopback and (bound is None or bound.is_unspecified):
                continue
            if not interface.loopback and not interface.can_broadcast:
                continue
            destination = str(address.network.broadcast_address)
            if any(link.destination == destination for link in links):
                continue
            links.append(Link("ipv4", destination, (address.network,), interface.name))
    return links


def _ipv6_links(interfaces, bound, group):
    links = []
    for interface in interfaces:
        addresses = interface.ipv6()
        if not addresses or not interface.up or interface.loopback or not interface.can_multicast:
            continue
        if bound is not None and not bound.is_unspecified:
            if bound not in [a.ip for a in addresses]:
                continue
            source = bound
        else:
            source = _preferred_source(addresses)
        if source is None:
            continue
        source = str(source) + (f"%{interface.name}" if source.is_link_local else "")
        networks = tuple(dict.fromkeys(
            [ipaddress.IPv6Network("fe80::/10")] + [a.network for a in addresses]
        ))
        links.append(Link(
            f"ipv6 {interface.name}", f"{group}%{interface.name}", networks, interface.name, source
        ))
    return links


def _preferred_source(addresses):
    """
    The address to send from on an IPv6 link: a global or unique local one
    if there is one (peers reach it without a scope), else the link-local
    one.
    """
    routable = [a.ip for a in addresses if not a.ip.is_link_local and not a.ip.is_loopback]
    if routable:
        return routable[0]
    local = [a.ip for a in addresses if a.ip.is_link_local]
    return local[0] if local else None


def covered(links, host):
    """
    Whether a peer at C{host} hears what we announce on C{links} (it is in
    one of their networks): if not, it needs a unicast announce.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return any(address in network for link in links for network in link.networks
               if network.version == address.version)


def link_for(links, host):
    """
    The L{Link} whose networks hold C{host}, or C{None}.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    scope = host.split("%", 1)[1] if "%" in host else None
    for link in links:
        if scope is not None and link.interface != scope:
            continue
        if any(address in n for n in link.networks if n.version == address.version):
            return link
    return None
