"""
Services: who starts and stops what, and in which order.

L{PeerService} wires every part of a peer together and owns their
lifetimes.  It holds the state dir's lock from before anything is bound
until it has stopped.  Its children start in this order and stop in the
reverse one:

 1. the index of C{shared/} and C{downloads/} (first scan, then re-scans,
    and inotify watches that re-scan at once after a change);
 2. the four transfer ports, T to T+3;
 3. discovery (stops by saying goodbye, while the ports are still up);
 4. the control socket for C{p2ppeer-ctl};
 5. the console, if any.
"""

import atexit
import errno
import os
import secrets
import signal
import stat
import sys

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.lockfile import FilesystemLock

from twisted_p2p import (
    catalog, client, console, control, discovery, download, events, index, logs, partials, transfer,
)
from twisted_p2p.commands import Commands
from twisted_p2p.limits import RESCAN_INTERVAL
from twisted_p2p.peers import PeerTable
from twisted_p2p.storage import PARTIAL_PREFIX, PartialFile
from twisted_p2p.uploads import Uploads, read_range

log = Logger()

#: Seconds to wait for a TCP connection to a peer.
CONNECT_TIMEOUT = 5

#: The state dir's lock: one peer per state dir (its peer id, its hash
#: cache, its control socket).
LOCK_NAME = "peer.lock"

#: Catalog fetches under way at once, and the seconds each may take.
CATALOG_FETCHES = 8
CATALOG_FETCH_TIMEOUT = 20


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


def load_peer_id(state_dir):
    """
    Our peer id, kept in C{state_dir/peer-id} so it survives restarts.
    """
    path = os.path.join(state_dir, "peer-id")
    try:
        with open(path, encoding="ascii") as f:
            peer_id = f.read().strip()
        if len(peer_id) == 32 and all(c in "0123456789abcdef" for c in peer_id):
            return peer_id
    except (OSError, UnicodeDecodeError):
        pass
    peer_id = secrets.token_hex(16)
    with open(path + ".tmp", "w", encoding="ascii") as f:
        f.write(peer_id + "\n")
    os.replace(path + ".tmp", path)
    return peer_id


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
    Owns the two discovery sockets and the announce schedule.  Stopping it
    sends the goodbye.
    """

    def __init__(self, reactor, discovery_logic, host, discovery_port):
        self._reactor = reactor
        self.discovery = discovery_logic
        self._host = host
        self._discovery_port = discovery_port
        self._listener = None
        self._private = None

    def privilegedStartService(self):
        proto = discovery.DiscoveryProtocol(self.discovery)
        # Bound to all addresses: broadcasts carry the broadcast address, not
        # ours, and would miss a socket bound to --host.
        self._listener = self._reactor.listenMulticast(
            self._discovery_port, proto, listenMultiple=True
        )
        self._private = self._reactor.listenUDP(
            0, discovery.DiscoveryProtocol(self.discovery), interface=self._host
        )
        self._private.setBroadcastAllowed(True)
        self.discovery.attach(self._private.write)
        Service.privilegedStartService(self)

    def startService(self):
        if self._listener is None:
            self.privilegedStartService()
        Service.startService(self)
        self.discovery.start()

    def stopService(self):
        Service.stopService(self)
        self.discovery.stop()
        ports, self._listener, self._private = [self._listener, self._private], None, None
        return defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports if p is not None]
        )


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
        self.peer_id = load_peer_id(state_dir)
        self.instance_id = secrets.token_hex(8)
        self._threads = reactor.getThreadPool()

        offered = [settings["shared"]]
        if settings["share-downloads"]:
            offered.append(settings["downloads"])
        self.index = index.SharedIndex(
            offered,
            os.path.join(state_dir, "hashes.json"),
            self.run_in_thread,
        )
        self.table = PeerTable(reactor, settings["peer-timeout"])
        self.discovery = discovery.Discovery(
            reactor,
            self.table,
            self.peer_id,
            self.instance_id,
            self.transfer_port,
            lambda: self.index.revision,
            (settings["broadcast"], settings["discovery-port"]),
            settings["announce-interval"],
        )
        self.index.on_change(self.discovery.revision_changed)
        self._catalog_fetches = defer.DeferredSemaphore(CATALOG_FETCHES)
        self.catalog = catalog.NetworkCatalog(self.table, self._fetch_catalog, reactor)
        self.inbox = transfer.Inbox()
        self.uploads = Uploads(
            self.index,
            self._connect,
            lambda *a: self.run_in_thread(read_range, *a),
            max_uploads=settings["max-uploads"],
            max_rate=settings["max-upload-rate"],
            clock=reactor,
        )
        self.downloads = download.Downloads(
            self._make_download, self.index if settings["share-downloads"] else None
        )
        self.hub = events.EventHub()
        self.partials = partials.PartialDownloads(os.path.join(state_dir, partials.RECORD_NAME))
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
        )
        self.table.subscribe(_PeerLog(self.hub))

        rescans = TimerService(RESCAN_INTERVAL, self.index.rescan)
        rescans.clock = reactor
        rescans.setServiceParent(self)
        index.FolderWatcher(self.index, reactor).setServiceParent(self)
        factories = [
            transfer.ReceiverFactory(self.inbox),
            transfer.SenderFactory(self.uploads),
            transfer.NotSupportedFactory(),
            transfer.NotSupportedFactory(),
        ]
        for offset, factory in enumerate(factories):
            endpoint = TCP4ServerEndpoint(
                reactor, self.transfer_port + offset, interface=self.host
            )
            port_service = StreamServerEndpointService(endpoint, factory)
            port_service._raiseSynchronously = True
            port_service.setServiceParent(self)
        DiscoveryService(
            reactor, self.discovery, self.host, settings["discovery-port"]
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

    def _connect(self, host, port, protocol):
        endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=CONNECT_TIMEOUT)
        factory = Factory.forProtocol(lambda: protocol)
        factory.noisy = False
        return endpoint.connect(factory)

    def _open_client(self, peer):
        return self._connect(peer.host, peer.sender_port, client.SenderClient())

    def _fetch_catalog(self, peer):
        """
        Fetch C{peer}'s catalog: at most L{CATALOG_FETCHES} at once, so that
        many peers (or invented ones) cannot hold many catalogs in memory
        together, and each within L{CATALOG_FETCH_TIMEOUT}, so that a peer
        that never answers does not hold a place.
        """

        async def fetch():
            sender = await self._open_client(peer)
            try:
                return await client.fetch_catalog(sender)
            finally:
                sender.close()

        def limited():
            d = defer.ensureDeferred(fetch())
            return d.addTimeout(CATALOG_FETCH_TIMEOUT, self.reactor)

        return self._catalog_fetches.run(limited)

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
            self.reactor,
            report,
            bans=bans,
            index=index,
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
        greeting = [
            f"p2ppeer {self.peer_id[:8]} on {self.host}:{self.transfer_port}: type 'help' "
            "(Tab completes, Ctrl-C leaves)"
        ]
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
