"""
A harness for multi-host tests: hosts, each its own network namespace with
its own addresses, on switches (a bridge inside a namespace of its own),
with routers between switches, rate limits and cut links; and real
C{twistd p2ppeer} processes on them.

Everything it makes is named after one random tag per L{Network}, so that
concurrent runs never meet, and L{Network.close} removes it all (the
C{hosts} fixture in C{conftest.py} calls it whatever the test did).
Addresses come from 198.18.0.0/15 (set aside for network tests) and the
unique local prefix fd00:198:18::/48, on links that exist only inside these
namespaces: nothing reaches the machine's real network.  No namespace has a
default route.
"""

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .peers import TWISTD, Peer, hosting_off

IP = shutil.which("ip")
TC = shutil.which("tc")


def sh(*args, check=True):
    """Run a command; its CompletedProcess (text), raising on failure."""
    return subprocess.run(args, capture_output=True, text=True, check=check)


def unavailable():
    """Why multi-host tests cannot run here, or C{None}."""
    if os.geteuid() != 0:
        return "multi-host tests need root to make network namespaces"
    if IP is None:
        return "multi-host tests need iproute2 (ip)"
    probe = f"p2p{secrets.token_hex(3)}-probe"
    made = sh(IP, "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make network namespaces here: {made.stderr.strip()}"
    sh(IP, "netns", "del", probe, check=False)
    return None


@dataclass
class Switch:
    """A bridge in its own namespace, and the subnet of the hosts on it."""

    name: str
    namespace: str
    number: int
    ports: int = 0

    @property
    def ipv4(self):
        return ipaddress.ip_network(f"198.18.{self.number}.0/24")

    @property
    def ipv6(self):
        return ipaddress.ip_network(f"fd00:198:18:{self.number:x}::/64")

    def ipv4_address(self, n):
        return str(self.ipv4[n])

    def ipv6_address(self, n):
        return str(self.ipv6[n])


@dataclass
class Link:
    """One interface of a host: its name there, its switch and port."""

    interface: str
    switch: Switch
    port: str
    ipv4: object
    ipv6: object


@dataclass
class Host:
    """A network namespace with links to switches."""

    name: str
    namespace: str
    ipv4: bool
    ipv6: bool
    links: list = field(default_factory=list)

    @property
    def address(self):
        """Its first address: IPv4 if it has one, else IPv6 (None: no links)."""
        if not self.links:
            return None
        link = self.links[0]
        return link.ipv4 or link.ipv6

    def address_on(self, switch):
        link = self.link_to(switch)
        return link.ipv4 or link.ipv6

    def link_to(self, switch):
        for link in self.links:
            if link.switch is switch:
                return link
        raise KeyError(f"{self.name} has no link to {switch.name}")


class HostPeer(Peer):
    """
    A L{Peer} run on a L{Host}: C{twistd -n p2ppeer --transfer-port T} and
    only the options given, inside the host's namespace.
    """

    def __init__(self, host, name, folder, transfer_port, args=(), address=None):
        Peer.__init__(self, name, folder, transfer_port, discovery_port=None,
                      extra_args=args)
        self.host = host
        self.address = address or host.address

    @property
    def label(self):
        if self.address is None:
            return f"(no address):{self.transfer_port}"
        if ":" in self.address:
            return f"[{self.address}]:{self.transfer_port}"
        return f"{self.address}:{self.transfer_port}"

    def argv(self):
        return [
            IP, "netns", "exec", self.host.namespace,
            TWISTD, "-n", "--pidfile", str(self.folder / "twistd.pid"),
            "p2ppeer", "--transfer-port", str(self.transfer_port),
        ] + hosting_off(self.extra_args) + self.extra_args


class Network:
    """
    Switches, hosts and routers in network namespaces, and the peers run on
    them; all removed by L{close}.

    @param base: a folder for the peers' folders.
    """

    def __init__(self, base):
        self.base = Path(base)
        self.tag = f"p2p{secrets.token_hex(3)}"
        self.namespaces = []
        self.switches = []
        self.hosts = []
        self.routers = []
        self.peers = []

    def _namespace(self, name, ipv6):
        namespace = f"{self.tag}-{name}"
        sh(IP, "netns", "add", namespace)
        self.namespaces.append(namespace)
        sh(IP, "-n", namespace, "link", "set", "lo", "up")
        settings = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        if not ipv6:
            settings += ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        sh(IP, "netns", "exec", namespace, "sysctl", "-qw", *settings)
        return namespace

    def switch(self, name):
        """A new switch, with the next subnet: 198.18.N.0/24, fd00:198:18:N::/64."""
        namespace = self._namespace(name, ipv6=False)
        # No multicast snooping: there is no querier, and every port must
        # hear the discovery group.
        sh(IP, "-n", namespace, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        sh(IP, "-n", namespace, "link", "set", "br0", "up")
        switch = Switch(name, namespace, len(self.switches) + 1)
        self.switches.append(switch)
        return switch

    def _plug(self, host, switch, number=None, ipv4=True, ipv6=False):
        switch.ports += 1
        number = number or switch.ports
        interface = f"eth{len(host.links)}"
        port = f"v{len(self.hosts) + len(self.routers)}x{len(host.links)}"
        sh(IP, "-n", host.namespace, "link", "add", interface, "type", "veth",
           "peer", "name", port, "netns", switch.namespace)
        sh(IP, "-n", switch.namespace, "link", "set", port, "master", "br0", "up")
        link = Link(interface, switch, port,
                    switch.ipv4_address(number) if ipv4 else None,
                    switch.ipv6_address(number) if ipv6 else None)
        if ipv4:
            sh(IP, "-n", host.namespace, "addr", "add", f"{link.ipv4}/24",
               "brd", "+", "dev", interface)
        if ipv6:
            sh(IP, "-n", host.namespace, "addr", "add", f"{link.ipv6}/64",
               "dev", interface, "nodad")
        sh(IP, "-n", host.namespace, "link", "set", interface, "up")
        host.links.append(link)
        return link

    def host(self, name, *switches, ipv4=True, ipv6=False):
        """
        A new host plugged into C{switches} (eth0, eth1, ... in that
        order), with an address on each subnet; routes through any router
        already between its switches and others.
        """
        host = Host(name, self._namespace(name, ipv6), ipv4, ipv6)
        for switch in switches:
            self._plug(host, switch, ipv4=ipv4, ipv6=ipv6)
        self.hosts.append(host)
        for router in self.routers:
            self._route_through(router, host)
        return host

    def router(self, name, *switches):
        """
        A router (forwarding on) with address .254 (and ::fe) on each of
        C{switches}; every host on one of them gets a route to the others'
        subnets through it -- only those routes: there is no default route.
        """
        router = Host(name, self._namespace(name, ipv6=True), True, True)
        for switch in switches:
            self._plug(router, switch, number=254, ipv4=True, ipv6=True)
        sh(IP, "netns", "exec", router.namespace, "sysctl", "-qw",
           "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        self.routers.append(router)
        for host in self.hosts:
            self._route_through(router, host)
        return router

    def _route_through(self, router, host):
        mine = {link.switch.number for link in host.links}
        near = [link for link in router.links if link.switch.number in mine]
        if not near:
            return
        gateway = near[0]
        for link in router.links:
            if link.switch.number in mine:
                continue
            if host.ipv4:
                sh(IP, "-n", host.namespace, "route", "add", str(link.switch.ipv4),
                   "via", gateway.ipv4)
            if host.ipv6:
                sh(IP, "-n", host.namespace, "-6", "route", "add", str(link.switch.ipv6),
                   "via", gateway.ipv6)

    def limit(self, host, rate, switch=None, burst="32kb"):
        """
        A C{tbf} rate limit (C{"20mbit"}) on C{host}'s link to C{switch}
        (its first), both ways, letting C{burst} through at once.
        """
        if TC is None:
            raise RuntimeError("tc (iproute2) is needed for rate limits")
        link = host.link_to(switch) if switch else host.links[0]
        for namespace, device in ((host.namespace, link.interface),
                                  (link.switch.namespace, link.port)):
            sh(TC, "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf",
               "rate", rate, "burst", burst, "latency", "100ms")

    def cut(self, host, switch=None):
        """Pull the cable: C{host}'s link to C{switch} (its first) goes down."""
        link = host.link_to(switch) if switch else host.links[0]
        sh(IP, "-n", link.switch.namespace, "link", "set", link.port, "down")

    def peer(self, host, name, transfer_port=27101, args=(), address=None):
        """
        A L{HostPeer} on C{host} in a new folder (with C{shared/}), not
        started yet.
        """
        folder = self.base / name
        (folder / "shared").mkdir(parents=True)
        peer = HostPeer(host, name, folder, transfer_port, list(args), address)
        self.peers.append(peer)
        return peer

    def run(self, host, *argv):
        """Run a command inside C{host}'s namespace; its CompletedProcess."""
        return sh(IP, "netns", "exec", host.namespace, *argv, check=False)

    def diagnostics(self):
        return "\n\n".join(p.diagnostics() for p in self.peers)

    def close(self):
        """
        Stop every peer and remove every namespace made, whatever state
        they are in.
        """
        for peer in self.peers:
            peer.cleanup()
        for namespace in reversed(self.namespaces):
            pids = sh(IP, "netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh(IP, "netns", "del", namespace, check=False)
        self.namespaces = []

    def leftovers(self):
        """Namespaces of this network that still exist (none after close)."""
        listed = sh(IP, "netns", "list", check=False).stdout.split()
        return [name for name in listed if name.startswith(self.tag)]
