"""
Services: who starts and stops what, and in which order.

L{PeerService} wires every part of a peer together and owns their
lifetimes.  It holds the state dir's lock from before anything is bound
until it has stopped.  Its children start in this order and stop in the
reverse one:

 1. the index of C{shared/} and C{downloads/} (first scan, then re-scans,
    and inotify watches that re-scan at once after a change);
 2. the four transfer ports, T to T+3;
 3. distribution: the cache (opened and re-checked in a thread), then the
    distributor's rounds;
 4. discovery (stops by saying goodbye, while the ports are still up);
 5. the control socket for C{p2ppeer-ctl};
 6. the console, if any.
"""

import atexit
import errno
import ipaddress
import os
import secrets
import signal
import socket
import stat
import struct
import sys

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.lockfile import FilesystemLock
from zope.interface import implementer

from twisted_p2p import (
    catalog,
    client,
    console,
    control,
    discovery,
    distributee,
    distribution,
    distributor,
    download,
    events,
    index,
    interfaces,
    logs,
    partials,
    render,
    tls,
    transfer,
    wire,
)
from twisted_p2p.cache import CACHE_FOLDER, ChunkCache
from twisted_p2p.commands import Commands
from twisted_p2p.group import DiscoverySeal
from twisted_p2p.identity import Identity, IdentityError
from twisted_p2p.limits import (
    CATALOG_ANSWER_TIMEOUT,
    CATALOG_FETCH_TIMEOUT,
    CATALOG_FETCHES,
    CONNECT_TIMEOUT,
    RESCAN_INTERVAL,
    WORKER_THREADS,
)
from twisted_p2p.manifest import chunk_count
from twisted_p2p.peers import PeerTable
from twisted_p2p.storage import PARTIAL_PREFIX, PartialFile
from twisted_p2p.uploads import Uploads
from twisted_p2p.workers import WorkerPool

log = Logger()

#: The state dir's lock: one peer per state dir (its peer id, its hash
#: cache, its control socket).
LOCK_NAME = "peer.lock"

#: Partial files of one catalog whose chunk maps are fetched with it.
CATALOG_HAVE_FETCHES = 256


def stdin_kind(fd=0):
    """
    What stdin is: C{"tty"}, C{"pipe"} (or socket), C{"file"}, C{"null"}
    (/dev/null or another device) or C{"closed"}.

    A closed fd 0 is given /dev/null, so that no socket opened later takes
    fd 0 and is mistaken for a console.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        except OSError:
            pass
        return "closed"
    if os.isatty(fd):
        return "tty"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "pipe"
    if stat.S_ISREG(mode):
        return "file"
    return "null"


class StateDirInUse(Exception):
    """
    Another peer runs with this state dir; the message says which and what
    to do.
    """


def lock_state_dir(state_dir):
    """
    Take C{state_dir}'s lock, so that a second peer started there by
    mistake stops before it binds a port or announces the first one's id.
    A lock left by a peer that died is taken over.

    @return: the held L{FilesystemLock}; C{unlock()} it on the way out.
    @raise StateDirInUse: a running process holds it.
    """
    lock = FilesystemLock(os.path.join(state_dir, LOCK_NAME))
    if lock.lock():
        return lock
    try:
        holder = f"pid {os.readlink(lock.name)}"
    except OSError:
        holder = "another process"
    raise StateDirInUse(
        f"another peer ({holder}) is running with the state dir {state_dir}; "
        "stop it, or start this one in its own folder or with its own --state-dir"
    )


def refuse_to_start(sentence):
    """
    Stop twistd before the peer runs, with one sentence on the terminal.

    Written to the process's real stderr: by now twistd has redirected
    C{sys.stderr} into the log, where nobody starting a peer looks.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"twistd p2ppeer: error: {sentence}\n")
    stream.flush()
    raise SystemExit(1)


class _PeerLog:
    """
    Logs peers coming and going, with structured fields, and tells every
    face through the hub.
    """

    def __init__(self, hub):
        self._hub = hub

    def joined(self, peer):
        log.info(
            "Peer {peer} joined (id {peer_id})",
            event="peer-joined",
            peer=peer.label,
            peer_id=peer.peer_id,
        )
        self._hub.publish(events.event(
            "peer-joined", peer=peer.label, name=getattr(peer, "name", None), id=peer.peer_id
        ))

    def changed(self, peer, old_revision):
        log.debug("Peer {peer} changed", event="peer-changed", peer=peer.label)

    def left(self, peer, reason):
        log.info(
            "Peer {peer} left: {reason}",
            event="peer-left",
            peer=peer.label,
            peer_id=peer.peer_id,
            reason=reason,
        )
        self._hub.publish(events.event(
            "peer-left", peer=peer.label, name=getattr(peer, "name", None), id=peer.peer_id,
            reason=reason,
        ))


class DiscoveryService(Service):
    """
    Owns the discovery sockets and the announce schedule.  Stopping it
    sends the goodbye.

    IPv4: one listener on the discovery port D (all addresses: broadcasts
    carry the broadcast address, not ours, and would miss a socket bound to
    C{--host}) and one private socket bound to C{--host}, which sends to
    every interface's broadcast address.  IPv6: a listener on D for unicast
    (C{--peer}), and, for each interface discovery announces on, a listener
    on the discovery group there and a private socket bound to that
    interface's address.  The interfaces are scanned again before every
    announce round, and the IPv6 sockets follow them.

    @param host: C{--host}: L{interfaces.ANY_HOST} or an address.
    @param broadcast: C{--broadcast}: L{interfaces.AUTO_BROADCAST} or an
        address.
    @param peers: the C{--peer} targets, C{(host, port or None)}; a host
        that is a name is looked up again every announce round.
    @param scan: what lists the interfaces (L{interfaces.scan}).
    """

    def __init__(self, reactor, discovery_logic, host, discovery_port, broadcast="auto",
                 peers=(), scan=interfaces.scan):
        self._reactor = reactor
        self.discovery = discovery_logic
        self._host = host
        self._families = interfaces.families(host)
        self._discovery_port = discovery_port
        self._broadcast = broadcast
        self._scan = scan
        self._peers = list(peers)
        self._resolved = {}
        self._resolving = set()
        self._ports = []
        self._private4 = None
        self._unicast6 = None
        self._links6 = {}
        self._failed_links = {}

    def privilegedStartService(self):
        if 4 in self._families:
            self._ports.append(self._reactor.listenMulticast(
                self._discovery_port,
                discovery.DiscoveryProtocol(self.discovery, "ipv4"),
                listenMultiple=True,
            ))
            interface = "" if self._host == interfaces.ANY_HOST else self._host
            self._private4 = self._reactor.listenUDP(
                0, discovery.DiscoveryProtocol(self.discovery, "ipv4"), interface=interface
            )
            self._private4.setBroadcastAllowed(True)
            self._ports.append(self._private4)
        if 6 in self._families:
            bind = "::" if self._host == interfaces.ANY_HOST else self._host
            try:
                self._unicast6 = self._adopt_udp6(
                    (bind, self._discovery_port), "ipv6", shared=True
                )
                self._ports.append(self._unicast6)
            except OSError as e:
                if self._families == (6,):
                    raise CannotListenError(bind, self._discovery_port, e)
                log.info("No IPv6 discovery on this machine: {error}", error=e)
                self._families = (4,)
        self.discovery.attach(self._send, self.links, self.targets)
        Service.privilegedStartService(self)

    def startService(self):
        if not self._ports:
            self.privilegedStartService()
        Service.startService(self)
        self.discovery.start()

    def stopService(self):
        Service.stopService(self)
        self.discovery.stop()
        ports = self._ports + [p for link in self._links6.values() for p in link[1:]]
        self._ports, self._links6 = [], {}
        self._private4 = self._unicast6 = None
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    # where to announce

    def links(self):
        """
        The links to announce on now, from a fresh scan; the IPv6 sockets
        are opened and closed to match.
        """
        links = interfaces.announce_links(self._scan(), self._host, self._broadcast)
        if 6 in self._families:
            self._follow_ipv6([link for link in links if link.family == 6])
        return [
            link for link in links
            if (link.family == 4 and self._private4 is not None) or link.via in self._links6
        ]

    def _follow_ipv6(self, links):
        wanted = {link.via: link for link in links}
        for via in list(self._links6):
            link, listener, private = self._links6[via]
            if wanted.get(via) != link:
                del self._links6[via]
                listener.stopListening()
                private.stopListening()
        for via, link in wanted.items():
            if via in self._links6:
                continue
            try:
                group = link.destination
                listener = self._adopt_udp6(
                    (group, self._discovery_port), via, shared=True, scope=link.interface
                )
                index = socket.if_nametoindex(link.interface)
                try:
                    # Twisted's joinGroup takes an interface address; an IPv6
                    # membership needs the interface index.
                    listener.socket.setsockopt(
                        socket.IPPROTO_IPV6,
                        socket.IPV6_JOIN_GROUP,
                        socket.inet_pton(socket.AF_INET6, group.split("%")[0])
                        + struct.pack("@I", index),
                    )
                    private = self._adopt_udp6((link.source, 0), via, scope=link.interface)
                except OSError:
                    listener.stopListening()
                    raise
                private.socket.setsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, struct.pack("@I", index)
                )
            except OSError as e:
                error = e.strerror or str(e)
                if self._failed_links.get(via) != error:
                    self._failed_links[via] = error
                    log.warn(
                        "No IPv6 discovery on {interface}: {error}",
                        interface=link.interface,
                        error=error,
                    )
                continue
            self._failed_links.pop(via, None)
            self._links6[via] = (link, listener, private)

    def _adopt_udp6(self, address, via, shared=False, scope=None):
        """
        A UDP socket bound to C{address}, IPv6 only (else a listener on
        C{::} would take IPv4 datagrams too, as mapped addresses), handed to
        the reactor with a L{discovery.DiscoveryProtocol}.
        """
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if hasattr(socket, "SO_REUSEPORT"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if sys.platform.startswith("linux"):
                # Only the groups this socket joined: a wildcard listener
                # must not hear every interface's group as well.
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MULTICAST_ALL, 0)
            sock.bind(socket.getaddrinfo(
                address[0], address[1], socket.AF_INET6, socket.SOCK_DGRAM,
                0, socket.AI_NUMERICHOST,
            )[0][4])
            sock.setblocking(False)
            protocol = discovery.DiscoveryProtocol(self.discovery, via, scope)
            return self._reactor.adoptDatagramPort(sock.fileno(), socket.AF_INET6, protocol)
        finally:
            sock.close()

    def targets(self):
        """
        Where the C{--peer} targets are now: addresses as given, names as
        last looked up (looked up again, in a thread, every round).
        """
        found = []
        for host, port in self._peers:
            port = port or self._discovery_port
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                self._look_up(host)
                found.extend((a, port) for a in self._resolved.get(host, ()))
                continue
            if address.version in self._families:
                found.append((str(address), port))
        return found

    def _look_up(self, name):
        if name in self._resolving:
            return
        self._resolving.add(name)
        family = {(4,): socket.AF_INET, (6,): socket.AF_INET6}.get(self._families, 0)

        def found(results):
            addresses = list(dict.fromkeys(r[4][0] for r in results))
            if not addresses and name not in self._resolved:
                log.warn("--peer {name} has no address", name=name)
            self._resolved[name] = addresses

        def failed(failure):
            if self._resolved.get(name) != []:
                log.warn("Could not look up --peer {name}: {error}", name=name,
                         error=failure.getErrorMessage())
            self._resolved[name] = []

        d = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(),
            socket.getaddrinfo, name, None, family, socket.SOCK_DGRAM,
        )
        d.addCallbacks(found, failed)
        d.addBoth(lambda _: self._resolving.discard(name))

    # the way out

    def _send(self, data, address, via):
        """
        Send from the socket C{via}, or, for C{None}, from the one that fits
        C{address}: the IPv4 private socket, or the IPv6 one on the link
        whose network holds it (any IPv6 one if none does).
        """
        host = address[0]
        if ":" not in host:
            port = self._private4
        elif via in self._links6:
            port = self._links6[via][2]
        else:
            link = interfaces.link_for([entry[0] for entry in self._links6.values()], host)
            if link is not None:
                port = self._links6[link.via][2]
            elif self._links6:
                port = next(iter(self._links6.values()))[2]
            else:
                port = self._unicast6
        if port is None:
            raise OSError(errno.EAFNOSUPPORT, "this peer does not use that address family")
        port.write(data, address)


#: Linux's IPV6_MULTICAST_ALL (Python does not name it).
_IPV6_MULTICAST_ALL = getattr(socket, "IPV6_MULTICAST_ALL", 29)


class ControlService(Service):
    """
    Owns the control socket in the state dir.  It listens in startService,
    after twistd has dropped privileges, so the socket belongs to the peer's
    user; mode 0600 keeps other users out.  A lock file next to it tells a
    stale socket (removed) from one a running peer holds (an error).
    """

    def __init__(self, reactor, path, commands, hub=None):
        self._reactor = reactor
        self.path = path
        self._commands = commands
        self._hub = hub
        self._port = None

    def startService(self):
        Service.startService(self)
        endpoint = UNIXServerEndpoint(self._reactor, self.path, mode=0o600, wantPID=True)
        d = endpoint.listen(control.ControlFactory(self._commands, self._hub))
        failures = []
        d.addCallbacks(lambda port: setattr(self, "_port", port), failures.append)
        if failures:
            refuse_to_start(
                f"cannot open the control socket {self.path}: "
                "another peer may be running with this --state-dir"
            )

    def stopService(self):
        Service.stopService(self)
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()


class ConsoleService(Service):
    """
    Owns the stdio console, if there is a stdin to read.

    On a terminal the console reads keys, not lines: the terminal is put in
    raw mode (no echo, no line buffering, Ctrl-C a key rather than SIGINT)
    for as long as the console runs, and given back as it was on the way
    out, however the peer stops.

    @param make_protocol: C{make_protocol(terminal)} gives the console
        protocol: a L{console.TerminalConsole} if C{terminal}, else a
        L{console.LineConsole}.
    @param terminal: whether stdin and stdout are a terminal.
    """

    def __init__(self, reactor, make_protocol, terminal, fd=0):
        self._reactor = reactor
        self._make_protocol = make_protocol
        self._terminal = terminal
        self._fd = fd
        self._saved_mode = None
        self.stdio = None

    def startService(self):
        Service.startService(self)
        from twisted.internet.stdio import StandardIO

        protocol = self._make_protocol(self._terminal)
        if self._terminal:
            from twisted.conch.insults.insults import ServerProtocol

            self._raw_mode()
            terminal_protocol = protocol
            protocol = ServerProtocol(lambda: terminal_protocol)
        try:
            self.stdio = StandardIO(protocol, reactor=self._reactor)
        except (OSError, ValueError) as e:
            self._restore_mode()
            log.info("No console ({error}); the peer runs without one.", error=e)

    def _raw_mode(self):
        import termios
        import tty

        try:
            self._saved_mode = termios.tcgetattr(self._fd)
            tty.setraw(self._fd, termios.TCSANOW)
            mode = termios.tcgetattr(self._fd)
            # Output as before: a "\n" anyone else writes still starts a line.
            mode[1] |= termios.OPOST
            termios.tcsetattr(self._fd, termios.TCSANOW, mode)
        except termios.error as e:
            log.info("The terminal stays as it is ({error})", error=e)
            return
        atexit.register(self._restore_mode)

    def _restore_mode(self):
        if self._saved_mode is None:
            return
        import termios

        saved, self._saved_mode = self._saved_mode, None
        try:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass

    def stopService(self):
        Service.stopService(self)
        if self.stdio is not None:
            self.stdio.loseConnection()
            self.stdio = None
        self._restore_mode()


def ipv6_available():
    """
    Whether this machine can bind an IPv6 socket at all (IPv6 may be
    disabled in the kernel).
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("::", 0))
    except OSError:
        return False
    return True


@implementer(IStreamServerEndpoint)
class TCP6OnlyServerEndpoint:
    """
    A TCP server endpoint on an IPv6 address that takes IPv6 only
    (C{IPV6_V6ONLY}): then the IPv4 endpoint of the same port can be bound
    beside it, and every IPv4 peer is seen at its IPv4 address, never as
    C{::ffff:a.b.c.d}.  (Twisted's TCP6ServerEndpoint leaves the option to
    the system, where C{::} usually takes IPv4 too.)
    """

    def __init__(self, reactor, port, interface="::", backlog=50):
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog

    def listen(self, factory):
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(socket.getaddrinfo(
                self._interface, self._port, socket.AF_INET6, socket.SOCK_STREAM,
                0, socket.AI_NUMERICHOST,
            )[0][4])
            sock.listen(self._backlog)
            sock.setblocking(False)
            return self._reactor.adoptStreamPort(sock.fileno(), socket.AF_INET6, factory)
        except OSError as e:
            raise CannotListenError(self._interface, self._port, e)
        finally:
            sock.close()


class DistributionService(Service):
    """
    Owns distribution's lifetime: it opens the cache (re-checking every
    chunk against its hash, in a thread), offers what it holds, asks the
    peers with files what to hold (pulls), and runs the distributor's
    rounds every C{--distribute-interval}.  Stopping it ends the rounds and
    the pushes, and lets go of the cache (what it holds stays on disk).

    @param peer: the L{PeerService} whose parts it runs.
    """

    def __init__(self, peer):
        self._peer = peer
        self._loop = None
        self._opening = None
        self._pulled = set()

    def startService(self):
        Service.startService(self)
        peer = self._peer
        self._opening = peer.run_in_thread(peer.cache.open)
        self._opening.addCallbacks(self._opened, self._open_failed)

    def _opened(self, report):
        self._opening = None
        peer = self._peer
        if not self.running:
            peer.cache.close()
            return
        if report.dropped_chunks or report.dropped_files:
            log.warn(
                "Cache: dropped {chunks} damaged chunk(s) and {files} damaged file(s)",
                event="cache-damaged",
                chunks=report.dropped_chunks,
                files=report.dropped_files,
            )
        log.info(
            "Cache: {kept} chunk(s) kept ({used} of {quota} B), {evicted} evicted to fit",
            event="cache-opened",
            kept=report.chunks,
            used=peer.cache.used,
            quota=peer.cache.quota,
            evicted=report.evicted,
        )
        peer.cache_announcer.publish_now()
        peer.catalog.on_fetched(self._catalog_fetched)
        self._loop = task.LoopingCall(peer.distributor.round)
        self._loop.clock = peer.reactor
        self._loop.start(peer.distributor.interval, now=False).addErrback(
            lambda f: log.failure("The distribution rounds stopped", f)
        )

    def _open_failed(self, failure):
        self._opening = None
        log.failure("Could not open the cache; this peer hosts nothing", failure)

    def _catalog_fetched(self, peer_id, first):
        """
        The first catalog of a peer (since it joined) that lists files
        whole: ask it what to hold.
        """
        peer = self._peer
        if first:
            self._pulled.discard(peer_id)
        if peer_id in self._pulled or not self.running or peer.cache.quota == 0:
            return
        holdings = peer.catalog.holdings_of(peer_id)
        if not any(held is None for held in holdings.values()):
            return
        self._pulled.add(peer_id)
        other = peer.table.get(peer_id)
        if other is not None:
            peer.distributee.pull_from(
                other, peer._connect, peer.peer_id, peer.transfer_port + 3
            )

    def stopService(self):
        Service.stopService(self)
        peer = self._peer
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        peer.distributor.stop()
        peer.cache_announcer.stop()
        if self._opening is None:
            peer.cache.close()


class WorkersService(Service):
    """
    Owns the transfer's worker threads (L{WorkerPool}): stopping it lets
    them finish the work given them, then ends them.
    """

    def __init__(self, workers):
        self.workers = workers

    def stopService(self):
        Service.stopService(self)
        return self.workers.stop()


def _logged(report):
    """
    C{report}, which also writes each event but progress to the log, in the
    words the faces use.
    """

    def logged(e):
        if e.get("event") != "download-progress":
            log.info("{line}", line=" ".join(render.render(e)), **e)
        report(e)

    return logged


class PeerService(MultiService):
    """
    One peer: every part, wired, under one service.

    @param settings: the checked L{twisted_p2p.tap.Options}.
    @param reactor: the reactor to use.
    """

    def __init__(self, settings, reactor, console_enabled=True, terminal_console=False):
        MultiService.__init__(self)
        self.reactor = self.clock = reactor
        self.settings = settings
        self.log_file = None
        self._lock = None
        self.host = settings["host"]
        self.transfer_port = settings["transfer-port"]
        state_dir = settings["state-dir"]
        try:
            self.identity = Identity.load_or_create(state_dir)
        except IdentityError as e:
            refuse_to_start(str(e))
        self.peer_id = self.identity.peer_id
        self.instance_id = secrets.token_hex(8)
        self._threads = reactor.getThreadPool()
        # A private group: sealed discovery, and TLS on every connection.
        self.group_key = settings.get("group-key")
        self.security = None
        seal = None
        if self.group_key is not None:
            self.security = tls.GroupSecurity(
                self.group_key, self.identity, reactor, self._verified
            )
            seal = DiscoverySeal(self.group_key)

        offered = [settings["shared"]]
        if settings["share-downloads"]:
            offered.append(settings["downloads"])
        self.index = index.SharedIndex(
            offered,
            os.path.join(state_dir, "hashes.json"),
            self.run_in_thread,
        )
        self.table = PeerTable(
            reactor, settings["peer-timeout"], max_per_host=settings["max-peers-per-host"]
        )
        self.hub = events.EventHub()
        self.discovery = discovery.Discovery(
            reactor,
            self.table,
            self.peer_id,
            self.instance_id,
            self.transfer_port,
            lambda: self.index.revision,
            settings["discovery-port"],
            settings["announce-interval"],
            name=settings["name"],
            advertise=settings["advertise-host"],
            notify=self.hub.publish,
            seal=seal,
        )
        self.index.on_change(self.discovery.revision_changed)
        self._catalog_fetches = catalog.FairFetches(CATALOG_FETCHES)
        self.catalog = catalog.NetworkCatalog(
            self.table, self._fetch_catalog, reactor, run_in_thread=self.run_in_thread
        )
        self.inbox = transfer.Inbox()
        self.workers = WorkerPool(reactor, WORKER_THREADS, "p2ppeer-transfer")
        # Distribution: the cache this peer holds for others, and the
        # copies of its own files it keeps on theirs.
        self.cache = ChunkCache(
            os.path.join(state_dir, CACHE_FOLDER), settings.get("cache-size", 0), self.peer_id
        )
        self.distribution_stats = distribution.DistributionStats()
        self.uploads = Uploads(
            self.index,
            self._connect_back,
            self.run_in_thread,
            self.workers,
            reactor,
            max_uploads=settings["max-uploads"],
            max_rate=settings["max-upload-rate"],
            publish=self.hub.publish,
            free_space=(lambda: self.cache.free) if self.cache.quota > 0 else None,
        )
        self.downloads = download.Downloads(
            self._make_download, self.index if settings["share-downloads"] else None,
            folder=settings["downloads"],
            clock=reactor,
        )
        self.partials = partials.PartialDownloads(os.path.join(state_dir, partials.RECORD_NAME))
        self.cache_announcer = distribution.CacheAnnouncer(
            self.cache, self.index, self.run_in_thread, reactor
        )
        self.distributee = distributee.Distributee(
            self.cache,
            self.catalog,
            self._open_client,
            self.run_in_thread,
            reactor,
            self.distribution_stats,
            self.cache_announcer.changed,
            offered_whole=lambda file_id: self.index.by_id(file_id) is not None,
        )
        self.index.on_change(self.cache_announcer.index_changed)
        self.distributor = distributor.Distributor(
            self.peer_id,
            self.index,
            self.catalog,
            self.table,
            self.uploads,
            self._connect,
            self.run_in_thread,
            reactor,
            settings.get("replicas", 2),
            settings.get("distribute-interval", 10.0),
            self.distribution_stats,
        )
        self.commands = Commands(
            index=self.index,
            table=self.table,
            catalog=self.catalog,
            downloads=self.downloads,
            clock=reactor,
            shutdown=self.shutdown,
            hub=self.hub,
            dropped=lambda: self.discovery.dropped,
            uploads_active=lambda: self.uploads.active,
            partials=self.partials,
            partial_files=os.path.join(settings["downloads"], f"{PARTIAL_PREFIX}<id>.part"),
            run_in_thread=self.run_in_thread,
            distribution=self._distribution_status,
        )
        self.table.subscribe(_PeerLog(self.hub))
        self.table.subscribe(self.downloads)

        # First started, last stopped: the other parts hand it work until
        # they stop.
        WorkersService(self.workers).setServiceParent(self)
        rescans = TimerService(RESCAN_INTERVAL, self.index.rescan)
        rescans.clock = reactor
        rescans.setServiceParent(self)
        index.FolderWatcher(self.index, reactor).setServiceParent(self)
        factories = [
            transfer.ReceiverFactory(self.inbox),
            transfer.SenderFactory(self.uploads),
            transfer.DistributorFactory(self.distributor),
            transfer.DistributeeFactory(self.distributee),
        ]
        # One count of accepted connections for all the ports, under the
        # descriptor limit less a reserve for the peer's own work.
        self.connections = transfer.ConnectionBudget()
        for factory in factories:
            factory.clock = reactor
            self.connections.watch(factory)
        for offset, factory in enumerate(factories):
            for endpoint in self._server_endpoints(self.transfer_port + offset, offset == 0):
                port_service = StreamServerEndpointService(endpoint, factory)
                port_service._raiseSynchronously = True
                port_service.setServiceParent(self)
        DistributionService(self).setServiceParent(self)
        DiscoveryService(
            reactor,
            self.discovery,
            self.host,
            settings["discovery-port"],
            settings["broadcast"],
            settings["peer"],
        ).setServiceParent(self)
        ControlService(
            reactor, os.path.join(state_dir, control.SOCKET_NAME), self.commands, self.hub
        ).setServiceParent(self)
        if console_enabled:
            ConsoleService(reactor, self._make_console, terminal_console).setServiceParent(self)

    def run_in_thread(self, f, *args, **kwargs):
        return deferToThreadPool(self.reactor, self._threads, f, *args, **kwargs)

    def setServiceParent(self, parent):
        # twistd uses an application's ILogObserver when it is given no
        # --logger: that is how the peer's own log options (and the log file
        # that keeps logs off the console's stdout) take effect.
        target = self.settings.get("log-target")
        if target and isinstance(parent, Componentized):
            path, log_format = target
            if path == "-":
                stream = sys.stdout
            else:
                stream = self.log_file = logs.ReopenableFile(path)
            parent.setComponent(ILogObserver, logs.observer_for(stream, log_format))
        MultiService.setServiceParent(self, parent)

    def privilegedStartService(self):
        self._lock_state_dir()
        try:
            MultiService.privilegedStartService(self)
        except CannotListenError as e:
            # One sentence and a non-zero exit, not a traceback.
            refuse_to_start(_listen_error_sentence(e))

    def _lock_state_dir(self):
        """
        Hold the state dir's lock from before the first port is bound until
        the peer has stopped.
        """
        if self._lock is None:
            try:
                self._lock = lock_state_dir(self.settings["state-dir"])
            except StateDirInUse as e:
                refuse_to_start(str(e))

    def startService(self):
        self._lock_state_dir()
        if self.group_key is None:
            log.info(
                "Peer {peer_id} in an open group: anyone on the network can find it, "
                "list and download what it shares",
                peer_id=self.peer_id,
            )
        else:
            log.info(
                "Peer {peer_id} (fingerprint {fingerprint}) in private group {group}",
                peer_id=self.peer_id,
                fingerprint=self.identity.fingerprint,
                group=self.group_key.group_id_hex,
            )
        MultiService.startService(self)
        self._previous_hangup = None
        try:
            self._previous_hangup = signal.signal(signal.SIGHUP, self._on_hangup)
        except ValueError:
            pass  # not the main thread: no signals

    def _on_hangup(self, signum, frame):
        self.reactor.callFromThread(self.hangup)

    def hangup(self):
        """
        SIGHUP: re-scan the shared folders now, and reopen the log file (for
        logrotate).
        """
        if self.log_file is not None:
            self.log_file.reopen()
        log.info("SIGHUP: re-scanning shared folders and reopening the log", event="hangup")
        self.index.rescan()

    def stopService(self):
        if getattr(self, "_previous_hangup", None) is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
            self._previous_hangup = None
        self.downloads.cancel_all()
        # twistd re-raises a SIGTERM on itself once the reactor has stopped,
        # so the process would die "by signal".  The peer has shut down
        # cleanly by now (goodbye sent), and supervisors and scripts expect
        # exit code 0 from a clean stop: clear the signal twistd recorded.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        d = MultiService.stopService(self)
        return d.addBoth(self._unlock_state_dir)

    def _unlock_state_dir(self, result):
        if self._lock is not None:
            self._lock.unlock()
            self._lock = None
        return result

    def shutdown(self):
        """
        Stop the peer (the console's C{exit}): stop the reactor, which stops
        this service and so says goodbye.
        """
        self.reactor.callLater(0, self.reactor.stop)

    # plumbing handed to the parts

    def _server_endpoints(self, port, receiver=False):
        """
        The endpoints transfer port C{port} listens on: C{--host}, or, for
        every address, one IPv4 and (where the machine has IPv6) one IPv6
        endpoint.  The receiver port's read chunks straight into their
        buffers (L{transfer.ReceiverEndpoint}).
        """
        if receiver:
            four = six = transfer.ReceiverEndpoint
        else:
            four, six = TCP4ServerEndpoint, TCP6OnlyServerEndpoint
        families = interfaces.families(self.host)
        if self.host != interfaces.ANY_HOST:
            if families == (4,):
                endpoints = [four(self.reactor, port, interface=self.host)]
            else:
                endpoints = [six(self.reactor, port, interface=self.host)]
        else:
            endpoints = [four(self.reactor, port, interface="")]
            if ipv6_available():
                endpoints.append(six(self.reactor, port, interface="::"))
        # The receiver port stays plain TCP in a private group too: its
        # streams are sealed with keys from the TLS of the request
        # connections they were asked on (see seal.py).
        if self.security is not None and not receiver:
            endpoints = [self.security.server_endpoint(e) for e in endpoints]
        return endpoints

    def _connect(self, host, port, protocol, peer_id=None, secure=True):
        """
        Connect C{protocol} to C{(host, port)}: IPv4 or IPv6 (a link-local
        address carries its scope, C{fe80::1%eth0}).

        In a private group the connection is the group's TLS, and fires
        only once the other side has shown it is a member, and the peer
        C{peer_id} if one is given (else any member); but for C{secure}
        false (a stream's data connection, sealed on its own).
        """
        if ":" in host:
            endpoint = TCP6ClientEndpoint(self.reactor, host, port, timeout=CONNECT_TIMEOUT)
        else:
            endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=CONNECT_TIMEOUT)
        if self.security is not None and secure:
            endpoint = self.security.client_endpoint(
                endpoint, peer_id, where=interfaces.format_address(host, port)
            )
        factory = Factory.forProtocol(lambda: protocol)
        factory.noisy = False
        return endpoint.connect(factory)

    def _connect_back(self, host, port, protocol):
        """
        The sender's data connection to a requester's receiver port: plain
        TCP, for its frames are sealed in a private group (see seal.py).
        """
        return self._connect(host, port, protocol, secure=False)

    def _verified(self, peer_id, fingerprint):
        """
        A connection proved that C{peer_id} holds its key: the peer table
        shows its fingerprint from now on.
        """
        peer = self.table.get(peer_id)
        if peer is not None:
            peer.fingerprint = fingerprint

    def _open_client(self, peer):
        return self._connect(peer.host, peer.sender_port, client.SenderClient(), peer.peer_id)

    def _fetch_catalog(self, peer):
        """
        Fetch C{peer}'s catalog, with the chunk map of each file it holds
        only part of (at most L{CATALOG_HAVE_FETCHES} of them): at most
        L{CATALOG_FETCHES} at once, hosts taking turns, so that many peers
        (or invented ones) cannot hold many catalogs in memory together nor
        keep others waiting, and each within L{CATALOG_FETCH_TIMEOUT} (each
        answer within L{CATALOG_ANSWER_TIMEOUT}), so that a peer that never
        answers does not hold a place.
        """

        async def fetch():
            sender = await self._open_client(peer)
            try:
                timed = client.Deadline(sender, CATALOG_ANSWER_TIMEOUT, self.reactor)
                view = await client.fetch_catalog_view(timed)
                sizes = {file_id: size for file_id, _, size in view.files}
                holdings = {}
                for file_id in sorted(view.partial)[:CATALOG_HAVE_FETCHES]:
                    chunks = chunk_count(sizes[file_id])
                    try:
                        held = await client.fetch_have(timed, file_id, chunks)
                    except client.PeerRefused:
                        held = bytearray(chunks)
                    holdings[file_id] = wire.pack_bits(held) if held is not None else None
                for file_id in view.partial:
                    holdings.setdefault(file_id, b"")
                return view.revision, view.files, view.free, holdings
            finally:
                sender.close()

        def limited():
            d = defer.ensureDeferred(fetch())
            return d.addTimeout(CATALOG_FETCH_TIMEOUT, self.reactor)

        return self._catalog_fetches.run(peer.host, limited)

    def _distribution_status(self):
        """
        What the C{cache} command shows: the cache, and what distribution
        sent and took.
        """
        cache = self.cache
        return {
            "quota": cache.quota,
            "used": cache.used,
            "free": cache.free,
            "replicas": self.distributor.replicas,
            "files": [
                {"id": f.file_id, "name": f.name, "size": f.size, "chunks": f.chunks,
                 "bytes": f.bytes}
                for f in cache.files()
            ],
            **self.distribution_stats.as_dict(),
        }

    def _make_download(self, name, file_id, peers, report, bans, index):
        return download.Download(
            name,
            file_id,
            peers,
            self._open_client,
            self.inbox,
            self.transfer_port,
            PartialFile(self.settings["downloads"], file_id),
            self.run_in_thread,
            self.workers,
            self.reactor,
            _logged(report),
            bans=bans,
            index=index,
            find_peers=lambda: self.catalog.sources(file_id),
            size_offered=lambda peer: self.catalog.size_offered(
                getattr(peer, "peer_id", None), file_id),
            local=self.cache,
        )

    def _make_console(self, terminal):
        """
        The console protocol.  On a pipe or a file (a script, supervisor) it
        writes no greeting and no prompt: only answers and events.
        """
        quiet = bool(self.settings.get("quiet"))
        stop_hint = (f"p2ppeer-ctl --state-dir {self.settings['state-dir']} stop", os.getpid())
        if not terminal:
            return console.LineConsole(self.commands, self.hub, quiet, stop_hint)
        where = (
            f"port {self.transfer_port}" if self.host == interfaces.ANY_HOST
            else interfaces.format_address(self.host, self.transfer_port)
        )
        greeting = [
            f"p2ppeer {self.peer_id[:8]} on {where}: type 'help' "
            "(Tab completes, Ctrl-C leaves)"
        ]
        if self.group_key is None:
            greeting.append("open group: anyone on the network can list and download what you share")
        else:
            greeting.append(
                f"private group {self.group_key.group_id_hex}; this peer's fingerprint "
                f"is {self.identity.fingerprint}"
            )
        target = self.settings.get("log-target")
        if target and target[0] != "-":
            greeting.append(f"logs go to {target[0]}")
        return console.TerminalConsole(
            self.commands, self.hub, quiet, stop_hint, greeting, size=_terminal_size
        )


def _terminal_size():
    """
    The terminal's C{(columns, rows)}, asked each time: it may be resized.
    """
    try:
        size = os.get_terminal_size(1)
    except OSError:
        return 80, 24
    return size.columns, size.lines


def _listen_error_sentence(error):
    port = error.port
    why = error.socketError
    code = getattr(why, "errno", None)
    if code == errno.EADDRINUSE:
        return f"port {port} is already in use; choose another --transfer-port or stop the program using it"
    if code == errno.EACCES:
        return (
            f"port {port} is below 1024 and needs privilege; choose a --transfer-port "
            "of 1024 or more, or run with CAP_NET_BIND_SERVICE"
        )
    return f"cannot listen on port {port}: {why}"
