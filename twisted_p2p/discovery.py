"""
Discovery: announcing ourselves, hearing others, passing on whom we know,
saying goodbye.

L{Discovery} holds the logic and feeds the L{PeerTable}; L{DiscoveryProtocol}
only hands it datagrams, with the name of the socket that heard them.  The
sockets themselves belong to L{twisted_p2p.service.DiscoveryService}:

 - I{listeners} on the shared discovery port D (IPv4 broadcasts; the IPv6
   discovery group on each interface; unicast to D);
 - I{private} sockets on ephemeral ports, from which we send everything.
   Unicast replies go to them, because a unicast datagram to a shared port
   reaches only one of the sockets bound to it.

In a private group (a C{seal}, L{twisted_p2p.group.DiscoverySeal}) every
datagram we send is sealed with the group key, and only sealed datagrams
of our group, with the right MAC, a time close to ours and a counter not
seen before, are heard; the others are dropped and counted.

Each announce round goes to every L{Link} (an interface's broadcast
address, or the IPv6 group on an interface), to every C{--peer} target,
and by unicast to every known peer that is in none of the links' networks
(a peer beyond a router, heard of through C{--peer} or peer exchange).
"""

import ipaddress
from collections import Counter, OrderedDict

from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_p2p import events, wire
from twisted_p2p.group import Stale
from twisted_p2p.interfaces import covered, format_address, is_link_local, link_for
from twisted_p2p.limits import (
    EARLY_ANNOUNCE_INTERVAL,
    EXCHANGE_INTRO_BURST,
    EXCHANGE_INTRO_RATE,
    MAX_EXCHANGE_CANDIDATES,
    MAX_EXCHANGE_PEERS,
    MAX_OWN_ADDRESSES,
    NEWCOMER_REPLY_BURST,
    NEWCOMER_REPLY_RATE,
)

log = Logger()

_OWN_ADDRESSES = MAX_OWN_ADDRESSES

#: What the console says when discovery cannot send anywhere.
NO_ROUTE_ADVICE = (
    "other peers will not find this one. Check that the network is up (an "
    "interface with an IPv4 broadcast address, or IPv6), or name a peer with "
    "--peer HOST; peers on one machine use --host 127.0.0.1 --broadcast 127.255.255.255"
)


class TokenBucket:
    """
    C{burst} tokens, refilled at C{rate} per second: how many datagrams of
    one kind we send in reply to what others send.
    """

    def __init__(self, clock, burst, rate):
        self._clock = clock
        self._burst = float(burst)
        self._rate = rate
        self._tokens = float(burst)
        self._refilled = clock.seconds()

    def take(self):
        now = self._clock.seconds()
        elapsed = max(0.0, now - self._refilled)
        self._refilled = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Discovery:
    """
    Owns our side of discovery: when and where we announce, whom we answer,
    whom we introduce ourselves to, and how incoming datagrams update the
    peer table.

    @param clock: an L{IReactorTime}.
    @param table: the L{PeerTable} to feed.
    @param peer_id: our stable peer id.
    @param instance_id: this run's id.
    @param transfer_port: our transfer port T.
    @param revision: a callable giving our current catalog revision.
    @param discovery_port: the shared discovery port D.
    @param interval: seconds between announcements.
    @param name: our name for people, carried in announces.
    @param advertise: the address others should reach us at
        (C{--advertise-host}), or C{None} for our datagrams' source.
    @param notify: C{notify(event)}, for what the user must hear of at once
        (discovery cannot send anywhere, or can again).
    @param seal: for a private group, the L{twisted_p2p.group.DiscoverySeal}
        that seals what we send and checks what we hear; C{None} for an
        open group.

    Datagrams that change nothing are counted in C{dropped}, by reason; so
    are replies held back by the rate limits (such a newcomer still hears
    our next periodic announce).  C{problem} says, while discovery can send
    nowhere, why, in one sentence; else it is C{None}.
    """

    def __init__(
        self,
        clock,
        table,
        peer_id,
        instance_id,
        transfer_port,
        revision,
        discovery_port,
        interval,
        name=None,
        advertise=None,
        notify=None,
        seal=None,
        reply_burst=NEWCOMER_REPLY_BURST,
        reply_rate=NEWCOMER_REPLY_RATE,
        intro_burst=EXCHANGE_INTRO_BURST,
        intro_rate=EXCHANGE_INTRO_RATE,
    ):
        self._clock = clock
        self.table = table
        self.peer_id = peer_id
        self.instance_id = instance_id
        self.transfer_port = transfer_port
        self._revision = revision
        self.discovery_port = discovery_port
        self.interval = interval
        self.name = wire.clean_peer_name(name) if name else None
        self.advertise = advertise
        self._notify = notify or (lambda event: None)
        self._seal = seal
        self.dropped = Counter()
        self.problem = None
        self._send = None
        self._links = lambda: []
        self._targets = lambda: []
        self._current_links = []
        self._loop = None
        self._early = None
        self._last_early = None
        self._replies = TokenBucket(clock, reply_burst, reply_rate)
        self._intros = TokenBucket(clock, intro_burst, intro_rate)
        self._candidates = OrderedDict()
        self._own = OrderedDict()
        self._failing = {}
        self._exchange_offset = 0

    def attach(self, send, links=None, targets=None):
        """
        Give discovery its way out.

        @param send: C{send(data, (host, port), via)}; C{via} names the
            socket to send from (a L{Link}'s), or is C{None} to let the
            sender choose by address.  May raise L{OSError}.
        @param links: a callable giving the L{Link}s to announce on now.
        @param targets: a callable giving the C{(host, port)} of every
            C{--peer} now.
        """
        self._send = send
        if links is not None:
            self._links = links
        if targets is not None:
            self._targets = targets

    def start(self):
        """
        Announce now, then every interval.
        """
        self._loop = LoopingCall(self.announce)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def stop(self):
        """
        Stop announcing, and say goodbye: on every link, and to every peer
        that hears us only by unicast.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._early is not None and self._early.active():
            self._early.cancel()
        goodbye = wire.Goodbye(self.peer_id, self.instance_id)
        links = self._current_links or self._fetch_links()
        for link in links:
            self._transmit(goodbye, (link.destination, self.discovery_port), link.via)
        for peer in self._beyond(links):
            self._transmit(goodbye, peer.main_address, peer.via)
        self.table.clear()

    # -- announcing ------------------------------------------------------------

    def announce(self):
        """
        One announce round: every link, every C{--peer} target, and every
        known peer beyond the links' networks.
        """
        links = self._current_links = self._fetch_links()
        reached = []
        for link in links:
            message = self._announce(self._exchange(exclude=link.networks))
            reached.append(
                self._transmit(message, (link.destination, self.discovery_port), link.via)
            )
        for target in self._fetch_targets():
            reached.append(self._transmit(self._announce(self._exchange()), target, None))
        for peer in self._beyond(links):
            message = self._announce(self._exchange(skip=peer))
            self._transmit(message, peer.main_address, peer.via)
        self._exchange_offset += MAX_EXCHANGE_PEERS
        self._check_reach(links, reached)

    def revision_changed(self):
        """
        What we offer changed: tell everyone now rather than at the next tick.
        """
        if self._loop is not None and self._loop.running:
            self._loop.reset()
            self.announce()

    def _announce(self, peers=()):
        return wire.Announce(
            self.peer_id,
            self.instance_id,
            self.transfer_port,
            self._revision(),
            self.name,
            self.advertise,
            tuple(peers),
        )

    def _fetch_links(self):
        try:
            return list(self._links())
        except Exception:
            log.failure("Could not list the network interfaces")
            return []

    def _fetch_targets(self):
        return list(self._targets())

    def _beyond(self, links):
        """
        The known peers that do not hear our links: they get unicast.
        """
        return [p for p in self.table.peers() if not covered(links, p.main_address[0])]

    def _exchange(self, exclude=(), skip=None):
        """
        The peers to pass on in one announce: known peers outside the
        networks C{exclude} (the recipients hear those themselves), but for
        C{skip} (the recipient).  Loopback and link-local addresses mean
        nothing elsewhere and are never passed on.  When there are more
        than fit, each round passes on a different slice.
        """
        entries = []
        for peer in self.table.peers():
            if peer is skip:
                continue
            host, port = peer.main_address
            if is_link_local(host):
                continue
            address = ipaddress.ip_address(host)
            if address.is_loopback:
                continue
            if any(address in n for n in exclude if n.version == address.version):
                continue
            entries.append((host, port))
        if len(entries) > MAX_EXCHANGE_PEERS:
            start = self._exchange_offset % len(entries)
            entries = entries[start:] + entries[:start]
        return entries[:MAX_EXCHANGE_PEERS]

    def _announce_soon(self):
        """
        Tell our links now of a peer beyond them (a newcomer from across a
        router), so that our LAN meets it within a round trip; at most once
        per L{EARLY_ANNOUNCE_INTERVAL}.
        """
        if self._loop is None or not self._loop.running:
            return
        if self._early is not None and self._early.active():
            return
        now = self._clock.seconds()
        delay = 0.0
        if self._last_early is not None:
            delay = max(0.0, self._last_early + EARLY_ANNOUNCE_INTERVAL - now)
        self._early = self._clock.callLater(delay, self._announce_early)

    def _announce_early(self):
        self._last_early = self._clock.seconds()
        links = self._current_links
        for link in links:
            message = self._announce(self._exchange(exclude=link.networks))
            self._transmit(message, (link.destination, self.discovery_port), link.via)

    # -- sending and telling the user ---------------------------------------------

    def _transmit(self, message, address, via, watch=True):
        """
        Send C{message}; whether it went.  A failure is logged once per
        address and error, and once more when sending there works again.
        """
        if self._send is None:
            return False
        key = (address[0], address[1])
        if self._seal is None:
            data = wire.encode_datagram(message)
        else:
            data = self._seal.seal(
                wire.encode_datagram(message, self._seal.room), self._clock.seconds()
            )
        try:
            self._send(data, key, via)
        except OSError as e:
            error = e.strerror or str(e)
            if watch and self._failing.get(key) != error:
                log.warn(
                    "Could not send a discovery datagram to {address}: {error}",
                    address=format_address(*key),
                    error=error,
                )
                if len(self._failing) < 1024:
                    self._failing[key] = error
            return False
        if watch and self._failing.pop(key, None) is not None:
            log.info(
                "Discovery datagrams reach {address} again", address=format_address(*key)
            )
        return True

    def _check_reach(self, links, reached):
        """
        Tell the user once when a round could send nowhere, and once when it
        can again.
        """
        if any(reached):
            if self.problem is not None:
                self.problem = None
                text = "discovery can send again: " + ", ".join(
                    link.interface or link.destination for link in links
                )
                log.info("{text}", text=text, event="discovery-restored")
                self._notify(events.event("discovery-restored", text))
            return
        if not links:
            why = "no interface is up with an IPv4 broadcast address or IPv6 multicast"
        else:
            why = "every interface refused: " + "; ".join(
                f"{format_address(link.destination, self.discovery_port)}: "
                f"{self._failing.get((link.destination, self.discovery_port), 'failed')}"
                for link in links
            )
        text = f"discovery cannot send on any interface ({why}); {NO_ROUTE_ADVICE}"
        if text != self.problem:
            self.problem = text
            log.warn("{text}", text=text, event="discovery-problem")
            self._notify(events.event("discovery-problem", text, reason=why))

    # -- hearing ------------------------------------------------------------------

    def datagram_received(self, data, address, via=None):
        """
        Decode one datagram from C{address}, heard on our socket C{via}, and
        act on it.  Never raises.
        """
        host, port = address[0], address[1]
        try:
            if self._seal is not None:
                counter, data = self._seal.open(data, self._clock.seconds())
            message = wire.decode_datagram(data)
        except wire.Oversized:
            self.dropped["oversized"] += 1
            return
        except wire.Sealed:
            self.dropped["of a private group"] += 1
            return
        except wire.NotSealed:
            self.dropped["without our group key"] += 1
            return
        except wire.OtherGroup:
            self.dropped["of another group"] += 1
            return
        except wire.Forged:
            self.dropped["forged"] += 1
            return
        except Stale:
            self.dropped["outside the time window (clocks apart?)"] += 1
            return
        except wire.WrongVersion:
            self.dropped["wrong version"] += 1
            return
        except wire.ProtocolError:
            self.dropped["malformed"] += 1
            return
        if self._seal is not None and not self._seal.fresh(
            (message.peer_id, message.instance_id), counter
        ):
            self.dropped["replayed"] += 1
            return
        if message.peer_id == self.peer_id:
            if message.instance_id != self.instance_id:
                # Another process with our state dir: worth a warning, as
                # both would answer for the same id.
                self.dropped["our id, other instance"] += 1
            else:
                self._remember_own((host, port))
            return
        if isinstance(message, wire.Goodbye):
            if self.table.goodbye(message, host, port) is None:
                self.dropped["unmatched goodbye"] += 1
            return
        outcome = self.table.heard(message, host, port, via)
        if outcome == "full":
            self.dropped["peer table full"] += 1
        elif outcome == "too many addresses":
            self.dropped["too many addresses"] += 1
        elif outcome == "duplicate":
            self.dropped["a live peer's id from another host"] += 1
        elif outcome in ("new", "restarted"):
            # A newcomer learns of us, and of the peers it cannot hear, now
            # rather than one interval from now.
            if self._replies.take():
                link = link_for(self._current_links, host)
                peer = self.table.get(message.peer_id)
                exchange = self._exchange(exclude=link.networks if link else (), skip=peer)
                self._transmit(self._announce(exchange), (host, port), via, watch=False)
            else:
                self.dropped["newcomer reply held back"] += 1
            if outcome == "new" and not covered(self._current_links, host):
                self._announce_soon()
        for entry in message.peers:
            self._introduce(entry)

    def _remember_own(self, address):
        self._own[address] = True
        self._own.move_to_end(address)
        while len(self._own) > _OWN_ADDRESSES:
            self._own.popitem(last=False)

    def _introduce(self, address):
        """
        Peer exchange: a peer told us of C{address}.  Unless it is known (or
        ours, or was tried within the peer timeout), send it an announce: a
        peer there answers as to any newcomer, and from then on we hear it
        ourselves.  Nothing heard of through another peer enters the table
        until the peer itself speaks.
        """
        host, port = address
        if self.table.at(host, port) is not None or address in self._own:
            return
        if is_link_local(host) or ipaddress.ip_address(host).is_loopback:
            return
        now = self._clock.seconds()
        tried = self._candidates.get(address)
        if tried is not None and now - tried < self.table.timeout:
            return
        if not self._intros.take():
            self.dropped["introduction held back"] += 1
            return
        self._candidates[address] = now
        self._candidates.move_to_end(address)
        while len(self._candidates) > MAX_EXCHANGE_CANDIDATES:
            self._candidates.popitem(last=False)
        self._transmit(self._announce(self._exchange()), address, None, watch=False)


class DiscoveryProtocol(DatagramProtocol):
    """
    Hands every datagram to a L{Discovery}, with the name of the socket that
    heard it.

    @param via: that name (see L{twisted_p2p.interfaces.Link.via}).
    @param scope: for an IPv6 socket on one interface, its name: a
        link-local source address is given it as its scope
        (C{fe80::1%eth0}), without which nobody could answer it.
    """

    noisy = False

    def __init__(self, discovery, via=None, scope=None):
        self.discovery = discovery
        self.via = via
        self.scope = scope

    def datagramReceived(self, data, address):
        host, port = address[0], address[1]
        if self.scope is not None and "%" not in host and is_link_local(host):
            host = f"{host}%{self.scope}"
        self.discovery.datagram_received(data, (host, port), self.via)
