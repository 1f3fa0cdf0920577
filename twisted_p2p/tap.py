"""
The C{twistd p2ppeer} command line: L{Options}, checked, and L{makeService}.
"""

import errno
import ipaddress
import os
import re
import socket
import sys
import tomllib

from twisted.python import usage

from twisted_p2p.group import GroupKeyError, load_key_file
from twisted_p2p.interfaces import ANY_HOST, AUTO_BROADCAST, families, parse_host
from twisted_p2p.limits import MAX_PEER_TARGETS, MAX_PEERS, MAX_PEERS_PER_HOST, MAX_UPLOADS
from twisted_p2p.wire import clean_peer_name, parse_address
from twisted_p2p.logs import LOG_FORMATS
from twisted_p2p.replication import MAX_REPLICAS
from twisted_p2p.units import parse_size

#: The UDP port every peer on a network shares for discovery, unless told
#: otherwise.  Below the Linux ephemeral range (32768-60999) so that no
#: outgoing connection is ever handed it.
DEFAULT_DISCOVERY_PORT = 27000

#: Copies of each chunk the network should hold outside its origin.
DEFAULT_REPLICAS = 2

#: What a peer holds for others unless told: enough for a few large files,
#: little on a disk of today.
DEFAULT_CACHE_SIZE = "1G"

#: Seconds between distribution rounds, as in the original design.
DEFAULT_DISTRIBUTE_INTERVAL = 10.0

#: Log file under C{twistd -n} without C{--logfile}, inside the state dir.
CONSOLE_LOG_NAME = "p2ppeer.log"


#: Every setting, its default, and the TOML types a settings file may give it.
SETTINGS = {
    "transfer-port": (None, (int,)),
    "discovery-port": (DEFAULT_DISCOVERY_PORT, (int,)),
    "host": (ANY_HOST, (str,)),
    "broadcast": (AUTO_BROADCAST, (str,)),
    "peer": ((), (list, str)),
    "advertise-host": (None, (str,)),
    "name": (None, (str,)),
    "max-peers-per-host": (MAX_PEERS_PER_HOST, (int,)),
    "announce-interval": (5.0, (int, float)),
    "peer-timeout": (None, (int, float)),
    "shared": ("shared", (str,)),
    "downloads": ("downloads", (str,)),
    "state-dir": (".p2ppeer", (str,)),
    "console": ("auto", (str,)),
    "max-upload-rate": ("0", (str, int)),
    "max-uploads": (MAX_UPLOADS, (int,)),
    "share-downloads": ("yes", (str, bool)),
    "log-file": (None, (str,)),
    "log-format": ("text", (str,)),
    "group-key-file": (None, (str,)),
    "replicas": (DEFAULT_REPLICAS, (int,)),
    "cache-size": (DEFAULT_CACHE_SIZE, (str, int)),
    "distribute-interval": (DEFAULT_DISTRIBUTE_INTERVAL, (int, float)),
}

CONSOLE_MODES = ("auto", "on", "off")


class Options(usage.Options):
    """
    Options of C{twistd p2ppeer}.  Every check is in L{postOptions}; a bad
    value fails with one sentence that names the option and the fix.

    Each setting comes from the command line, else from the C{--config}
    file, else from its default in L{SETTINGS}.
    """

    synopsis = "[options]"
    longdesc = (
        "Share the files in ./shared with peers on the local network, and "
        "download theirs into ./downloads.  Run it in the foreground, with its "
        "console, as: twistd -n --pidfile peer.pid p2ppeer -t 27101.  twistd's "
        "-n (--nodaemon) keeps it in the foreground; without -n the peer starts "
        "in the background with no console and twistd returns at once (stop it "
        "with p2ppeer-ctl stop).  twistd's --pidfile gives each peer its own pid "
        "file (the default, twistd.pid in the working folder, lets only one run "
        "there).  Type 'help' at the console for its commands."
    )
    optFlags = [
        ["quiet", "q",
         "Console: show only answers, errors and your downloads, not peers "
         "joining and leaving or uploads (command line only)."],
    ]
    optParameters = [
        ["config", "c", None,
         "TOML settings file whose keys are these options' long names; "
         "the command line wins over it."],
        ["transfer-port", "t", None,
         "TCP port T (required). The peer listens on T (receiver), T+1 (sender), "
         "T+2 (distributor) and T+3 (distributee)."],
        ["discovery-port", "d", None,
         f"UDP port for discovery, shared by every peer on the network [default: {DEFAULT_DISCOVERY_PORT}]."],
        ["host", None, None,
         "Address (IPv4 or IPv6) to bind the transfer ports to and to send "
         "discovery from; 'any' for every address, IPv4 and IPv6 [default: any]."],
        ["broadcast", None, None,
         "Where IPv4 announcements go; 'auto' for the broadcast address of every "
         "interface (or of --host's), 127.255.255.255 for peers on one machine. "
         "An IPv6 multicast address replaces the IPv6 discovery group "
         "[default: auto]."],
        ["advertise-host", None, None,
         "Address other peers should reach this one at (behind NAT or port "
         "forwarding) [default: the address its datagrams come from]."],
        ["name", None, None,
         "A name for people, shown by the other peers [default: the host name]."],
        ["max-peers-per-host", None, None,
         f"Peers kept from one address (peers on one host share it) "
         f"[default: {MAX_PEERS_PER_HOST}]."],
        ["announce-interval", None, None, "Seconds between announcements [default: 5]."],
        ["peer-timeout", None, None,
         "Seconds of silence before a peer is forgotten [default: 3 announce intervals]."],
        ["shared", None, None, "Folder of files to offer; must exist [default: shared]."],
        ["downloads", None, None,
         "Folder downloads are saved to; created if missing [default: downloads]."],
        ["state-dir", None, None,
         "Folder for the peer id, hash cache, control socket and log; created "
         "if missing [default: .p2ppeer]."],
        ["console", None, None,
         "auto, on or off. auto: a console when stdin is a terminal, a pipe or "
         "a file; none for /dev/null or a closed stdin [default: auto]."],
        ["max-upload-rate", None, None,
         "Upload limit for the whole peer, in bytes per second, with an optional "
         "K, M or G suffix for KiB, MiB or GiB (25M = 25 MiB/s, as the console "
         "shows rates); 0 for no limit [default: 0]."],
        ["max-uploads", None, None,
         f"Chunk streams served at once; more requests are told to retry [default: {MAX_UPLOADS}]."],
        ["share-downloads", None, None,
         "yes or no: offer finished downloads to the other peers [default: yes]."],
        ["log-file", None, None,
         "Where to log ('-' for stdout); reopened on SIGHUP, for logrotate. "
         "[default: twistd's choice; under -n with a console, <state-dir>/p2ppeer.log]"],
        ["log-format", None, None,
         "text, or json for one JSON object per line (journald, log shippers) [default: text]."],
        ["group-key-file", None, None,
         "The key file of a private group (make one with p2ppeer-ctl new-group-key): "
         "only peers holding the same key find this one, list or download, and "
         "every transfer is encrypted [default: none; the group is open to anyone "
         "on the network]."],
        ["replicas", None, None,
         f"Copies of each chunk of this peer's files the network should hold "
         f"on other peers, 0 to {MAX_REPLICAS} [default: {DEFAULT_REPLICAS}]."],
        ["cache-size", None, None,
         "Disk this peer gives to other peers' files, in bytes with an optional "
         "K, M or G suffix (KiB, MiB, GiB), kept in <state-dir>/cache; 0 hosts "
         f"nothing [default: {DEFAULT_CACHE_SIZE}]."],
        ["distribute-interval", None, None,
         "Seconds between distribution rounds, in which this peer copies chunks "
         "of its files that have too few copies to peers with room "
         f"[default: {DEFAULT_DISTRIBUTE_INTERVAL:g}]."],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["peer"] = None

    def opt_peer(self, target):
        """
        HOST[:PORT] of a peer beyond this network (across a router) to
        announce to by unicast as well; repeatable. PORT is its discovery
        port [default: --discovery-port].
        """
        if self["peer"] is None:
            self["peer"] = []
        self["peer"].append(target)
    def opt_version(self):
        """
        Print the version and exit.
        """
        from twisted_p2p.version import version

        print(f"twisted-p2p {version()}")
        raise SystemExit(0)

    def parseOptions(self, options=None):
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            # Under twistd: one sentence and a non-zero exit, not the whole
            # usage text that twistd would print.
            sys.stderr.write(f"twistd p2ppeer: error: {e}\n")
            raise SystemExit(1)

    def postOptions(self):
        self._apply_settings_file()
        if self["transfer-port"] is None:
            raise usage.UsageError("--transfer-port is required, for example --transfer-port 27101")
        port = _whole(self, "transfer-port")
        if not 1 <= port <= 65535 - 3:
            raise usage.UsageError(
                f"--transfer-port {port} is out of range: the peer uses T to T+3, "
                "so T must be from 1 to 65532"
            )
        self["transfer-port"] = port
        discovery = _whole(self, "discovery-port")
        if not 1 <= discovery <= 65535:
            raise usage.UsageError(f"--discovery-port {discovery} is out of range (1 to 65535)")
        if port <= discovery <= port + 3:
            raise usage.UsageError(
                f"--discovery-port {discovery} clashes with the transfer ports "
                f"{port}-{port + 3}; choose a discovery port outside that range"
            )
        self["discovery-port"] = discovery
        self._check_addresses()
        interval = _number(self, "announce-interval")
        if not 0 < interval <= 3600:
            raise usage.UsageError("--announce-interval must be more than 0 and at most 3600 seconds")
        self["announce-interval"] = interval
        if self["peer-timeout"] is None:
            timeout = 3 * interval
        else:
            timeout = _number(self, "peer-timeout")
            if timeout <= interval:
                raise usage.UsageError(
                    f"--peer-timeout must be longer than --announce-interval ({interval:g} s), "
                    "or every peer would expire between announcements"
                )
        self["peer-timeout"] = timeout
        self["max-upload-rate"] = parse_rate(self["max-upload-rate"])
        uploads = _whole(self, "max-uploads")
        if not 1 <= uploads <= 10000:
            raise usage.UsageError("--max-uploads must be from 1 to 10000")
        self["max-uploads"] = uploads
        per_host = _whole(self, "max-peers-per-host")
        if not 1 <= per_host <= MAX_PEERS:
            raise usage.UsageError(f"--max-peers-per-host must be from 1 to {MAX_PEERS}")
        self["max-peers-per-host"] = per_host
        replicas = _whole(self, "replicas")
        if not 0 <= replicas <= MAX_REPLICAS:
            raise usage.UsageError(f"--replicas must be from 0 to {MAX_REPLICAS}")
        self["replicas"] = replicas
        try:
            self["cache-size"] = parse_size(self["cache-size"])
        except ValueError:
            raise usage.UsageError(
                "--cache-size must be bytes such as 500000000, 800M or 2G "
                f"(K, M, G: KiB, MiB, GiB), or 0 to host nothing; not {self['cache-size']!r}"
            )
        distribute = _number(self, "distribute-interval")
        if not 0 < distribute <= 86400:
            raise usage.UsageError(
                "--distribute-interval must be more than 0 and at most 86400 seconds"
            )
        self["distribute-interval"] = distribute
        if self["name"] is None:
            self["name"] = clean_peer_name(socket.gethostname()) or None
        else:
            name = clean_peer_name(self["name"])
            if not name:
                raise usage.UsageError("--name must have a printable character")
            self["name"] = name
        share = str(self["share-downloads"]).lower()
        if share not in ("yes", "no", "true", "false"):
            raise usage.UsageError(f"--share-downloads must be yes or no, not {self['share-downloads']!r}")
        self["share-downloads"] = share in ("yes", "true")
        if self["console"] not in CONSOLE_MODES:
            raise usage.UsageError(f"--console must be auto, on or off, not {self['console']!r}")
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be text or json, not {self['log-format']!r}")
        parent = getattr(self, "parent", None)
        if parent is not None and (parent.get("logfile") or parent.get("logger")):
            if self["log-file"] is not None or self["log-format"] != "text":
                raise usage.UsageError(
                    "give either twistd's --logfile/--logger or p2ppeer's "
                    "--log-file/--log-format, not both"
                )
        self._check_folders()
        self["group-key"] = None
        if self["group-key-file"] is not None:
            try:
                self["group-key"] = load_key_file(self["group-key-file"])
            except GroupKeyError as e:
                raise usage.UsageError(str(e))
        self.check_ports()

    def _check_addresses(self):
        """
        C{--host}, C{--broadcast}, C{--advertise-host} and C{--peer}: each
        an address of the right kind, and of a family C{--host} uses.
        """
        try:
            self["host"] = parse_host(self["host"])
        except ValueError:
            raise usage.UsageError(
                f"--host {self['host']!r} is not an IPv4 or IPv6 address (or 'any')"
            )
        used = families(self["host"])
        if self["broadcast"] != AUTO_BROADCAST:
            try:
                broadcast = ipaddress.ip_address(self["broadcast"])
            except ValueError:
                broadcast = None
            if broadcast is None or (broadcast.version == 6 and not broadcast.is_multicast):
                raise usage.UsageError(
                    f"--broadcast {self['broadcast']!r} is not an IPv4 address or an "
                    "IPv6 multicast address (or 'auto')"
                )
            if broadcast.version not in used:
                raise usage.UsageError(
                    f"--broadcast {broadcast} is IPv{broadcast.version}, but --host "
                    f"{self['host']} is not"
                )
            self["broadcast"] = str(broadcast)
        if self["advertise-host"] is not None:
            advertised = parse_address(self["advertise-host"])
            if advertised is None:
                raise usage.UsageError(
                    f"--advertise-host {self['advertise-host']!r} is not a unicast IP address"
                )
            self["advertise-host"] = advertised
        targets = self["peer"]
        if isinstance(targets, str):
            targets = [targets]
        if not all(isinstance(t, str) for t in targets):
            raise usage.UsageError("peer in a settings file must be a list of strings")
        if len(targets) > MAX_PEER_TARGETS:
            raise usage.UsageError(f"at most {MAX_PEER_TARGETS} --peer may be given")
        self["peer"] = [parse_peer(t, used) for t in targets]

    def _apply_settings_file(self):
        """
        Fill every setting the command line left unset from the C{--config}
        file, then from the defaults.  Relative paths in the file are, like
        those on the command line, relative to the working directory: one
        settings file in /etc serves a peer run in its own folder (systemd's
        WorkingDirectory, supervisor's directory).
        """
        from_file = {}
        path = self["config"]
        if path is not None:
            from_file = load_settings(path)
            for key in ("shared", "downloads", "state-dir", "log-file", "group-key-file"):
                if key in from_file and from_file[key] != "-":
                    from_file[key] = os.path.expanduser(from_file[key])
        for key, (default, _) in SETTINGS.items():
            if self[key] is None:
                self[key] = from_file.get(key, default)
            if isinstance(self[key], (int, float)) and not isinstance(self[key], bool):
                self[key] = str(self[key])

    def _check_folders(self):
        shared = os.path.abspath(self["shared"])
        if not os.path.isdir(shared):
            raise usage.UsageError(
                f"the shared folder {self['shared']} does not exist; create it or pass --shared"
            )
        self["shared"] = shared
        for key in ("downloads", "state-dir"):
            path = os.path.abspath(self[key])
            try:
                # A new state dir is private: it holds the control socket.
                os.makedirs(path, mode=0o700 if key == "state-dir" else 0o777, exist_ok=True)
            except OSError as e:
                raise usage.UsageError(f"cannot create the --{key} folder {path}: {e.strerror}")
            if not os.access(path, os.W_OK | os.X_OK):
                raise usage.UsageError(f"the --{key} folder {path} is not writable")
            self[key] = path
        control_socket = os.path.join(self["state-dir"], "control.sock")
        if len(control_socket.encode()) > 100:
            raise usage.UsageError(
                f"the --state-dir path {self['state-dir']} is too long for a control "
                "socket (UNIX sockets allow about 100 bytes); choose a shorter one"
            )
        if self["downloads"] == self["shared"]:
            raise usage.UsageError("--downloads and --shared must be different folders")

    def check_ports(self):
        """
        Try each port now, so that a busy or privileged port is one clear
        sentence rather than a traceback once twistd is running.
        """
        from twisted_p2p.service import ipv6_available

        host, port = self["host"], self["transfer-port"]
        if host == ANY_HOST:
            hosts = ["0.0.0.0"] + (["::"] if ipv6_available() else [])
        else:
            hosts = [host]
        for address in hosts:
            for offset in range(4):
                _probe(socket.SOCK_STREAM, address, port + offset, "--transfer-port")
        for address in hosts:
            wildcard = "::" if ":" in address else ""
            _probe(socket.SOCK_DGRAM, wildcard, self["discovery-port"], "--discovery-port", shared=True)


#: A host name: letters, digits, hyphens and dots (RFC 1123).
_HOST_NAME = re.compile(r"\A(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?\Z")


def parse_peer(text, used=(4, 6)):
    """
    C{--peer HOST[:PORT]}: C{(host, port or None)}.  HOST is an IPv4
    address, an IPv6 address (in brackets when a port follows:
    C{[fd00::1]:27000}) or a host name.

    @param used: the address families this peer uses (from C{--host}).
    @raise usage.UsageError: not a HOST[:PORT].
    """
    bad = usage.UsageError(
        f"--peer {text!r} is not HOST or HOST:PORT (an IPv6 address with a port "
        "goes in brackets: [fd00::1]:27000)"
    )
    host, port = text.strip(), None
    if host.startswith("["):
        inside, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise bad
        host, port = inside, rest[1:] if rest else None
        if ":" not in host:
            raise bad
    elif host.count(":") == 1:
        host, port = host.split(":")
    if port is not None:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise usage.UsageError(f"--peer {text!r}: the port must be from 1 to 65535")
        port = int(port)
    address = parse_address(host)
    if address is not None:
        version = ipaddress.ip_address(address).version
        if version not in used:
            raise usage.UsageError(
                f"--peer {text!r} is IPv{version}, but --host does not use IPv{version}"
            )
        return address, port
    if ":" in host or not _HOST_NAME.match(host) or host.replace(".", "").isdigit():
        raise bad
    return host, port


def load_settings(path):
    """
    The settings in the TOML file at C{path}, checked: every key must be a
    setting, and every value of the setting's type.

    @raise usage.UsageError: one sentence naming the file and the key.
    """
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except OSError as e:
        raise usage.UsageError(f"cannot read the settings file {path}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"the settings file {path} is not valid TOML: {e}")
    except UnicodeDecodeError:
        raise usage.UsageError(f"the settings file {path} is not valid TOML: it is not UTF-8 text")
    for key, value in settings.items():
        if key not in SETTINGS:
            known = ", ".join(SETTINGS)
            raise usage.UsageError(f"{path}: unknown setting {key!r} (known: {known})")
        kinds = SETTINGS[key][1]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = {
                int: "an integer", float: "a number", str: "a string",
                bool: "true or false", list: "a list of strings",
            }
            wanted = " or ".join(names[k] for k in kinds)
            raise usage.UsageError(
                f"{path}: setting {key!r} must be {wanted}, not {type(value).__name__} {value!r}"
            )
    return settings


def parse_rate(text):
    """
    Bytes per second from C{text} such as C{"25M"} (25 MiB/s) or
    C{"500000"}; C{None} for no limit (C{"0"}).  Suffixes are binary, like
    every size the peer shows (see L{twisted_p2p.units}).

    @raise usage.UsageError: not a rate.
    """
    try:
        rate = parse_size(text)
    except ValueError:
        raise usage.UsageError(
            f"--max-upload-rate must be bytes per second such as 500000, 800K or 25M "
            f"(K, M, G: KiB, MiB, GiB), not {text!r}"
        )
    if rate == 0:
        return None
    if rate < 1024:
        raise usage.UsageError("--max-upload-rate below 1K would stall transfers; use at least 1K")
    return rate


def _whole(options, key):
    try:
        return int(options[key])
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{key} must be a whole number, not {options[key]!r}")


def _number(options, key):
    try:
        value = float(options[key])
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{key} must be a number of seconds, not {options[key]!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise usage.UsageError(f"--{key} must be a finite number of seconds")
    return value


def _probe(kind, host, port, option, shared=False):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except PermissionError:
        raise usage.UsageError(
            f"port {port} is below 1024 and needs privilege: pass a {option} of 1024 "
            "or more, or run as root / with CAP_NET_BIND_SERVICE"
        )
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise usage.UsageError(
                f"port {port} is already in use: stop what uses it or pass another {option}"
            )
        if e.errno == errno.EADDRNOTAVAIL:
            raise usage.UsageError(f"--host {host} is not an address of this machine")
        raise usage.UsageError(f"cannot use port {port} ({option}): {e.strerror}")
    finally:
        sock.close()


def console_enabled(mode, stdin):
    """
    Whether to run the stdio console, from C{--console} and what stdin is
    (see L{twisted_p2p.service.stdin_kind}).
    """
    if mode == "off" or stdin == "closed":
        return False
    if mode == "on":
        return True
    return stdin in ("tty", "pipe", "file")


def log_target(options, console):
    """
    C{(path or "-", format)} for the peer's own log observer, or C{None} to
    leave logging to twistd (its C{--logfile} or C{--logger}, or its
    defaults).

    Under C{twistd -n} with a console and no log option, logs go to
    C{<state-dir>/p2ppeer.log} rather than to stdout, where the console
    writes.
    """
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("logfile") or parent.get("logger"):
        return None
    log_format = options["log-format"]
    if options["log-file"] is not None:
        return options["log-file"], log_format
    if console and parent.get("nodaemon"):
        return os.path.join(options["state-dir"], CONSOLE_LOG_NAME), log_format
    if log_format != "text":
        return ("-" if parent.get("nodaemon") else "twistd.log"), log_format
    return None


def makeService(options, reactor=None):
    """
    The L{PeerService} for checked C{options}.
    """
    from twisted_p2p.service import PeerService, stdin_kind

    stdin = stdin_kind()
    if reactor is None:
        from twisted.internet import reactor
    console = console_enabled(options["console"], stdin)
    options["log-target"] = log_target(options, console)
    terminal = stdin == "tty" and os.isatty(1)
    return PeerService(options, reactor, console_enabled=console, terminal_console=terminal)
