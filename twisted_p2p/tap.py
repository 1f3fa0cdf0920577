"""
The C{twistd p2ppeer} command line: L{Options}, checked, and L{makeService}.
"""

import errno
import ipaddress
import os
import socket
import sys

from twisted.python import usage

#: The UDP port every peer on a network shares for discovery, unless told
#: otherwise.  Below the Linux ephemeral range (32768-60999) so that no
#: outgoing connection is ever handed it.
DEFAULT_DISCOVERY_PORT = 27000

#: Log file under C{twistd -n} without C{--logfile}, inside the state dir.
CONSOLE_LOG_NAME = "p2ppeer.log"


class Options(usage.Options):
    """
    Options of C{twistd p2ppeer}.  Every check is in L{postOptions}; a bad
    value fails with one sentence that names the option and the fix.
    """

    synopsis = "[options]"
    longdesc = (
        "Share the files in ./shared with peers on the local network, and "
        "download theirs into ./downloads.  Type 'help' at the console."
    )
    optParameters = [
        ["transfer-port", "t", None,
         "TCP port T (required). The peer listens on T (receiver), T+1 (sender), "
         "T+2 (distributor) and T+3 (distributee)."],
        ["discovery-port", "d", str(DEFAULT_DISCOVERY_PORT),
         "UDP port for discovery, shared by every peer on the network."],
        ["host", None, "0.0.0.0",
         "Address to bind the transfer ports to and to send discovery from."],
        ["broadcast", None, "255.255.255.255",
         "Address announcements are sent to (127.255.255.255 for peers on one machine)."],
        ["announce-interval", None, "5", "Seconds between announcements."],
        ["peer-timeout", None, None,
         "Seconds of silence before a peer is forgotten [default: 3 announce intervals]."],
        ["shared", None, "shared", "Folder of files to offer (must exist)."],
        ["downloads", None, "downloads", "Folder downloads are saved to (created if missing)."],
        ["state-dir", None, ".p2ppeer",
         "Folder for the peer id, the hash cache and logs (created if missing)."],
    ]

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
        for key in ("host", "broadcast"):
            try:
                ipaddress.IPv4Address(self[key])
            except ValueError:
                raise usage.UsageError(f"--{key} {self[key]!r} is not an IPv4 address")
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
        self._check_folders()
        self.check_ports()

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
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise usage.UsageError(f"cannot create the --{key} folder {path}: {e.strerror}")
            if not os.access(path, os.W_OK | os.X_OK):
                raise usage.UsageError(f"the --{key} folder {path} is not writable")
            self[key] = path
        if self["downloads"] == self["shared"]:
            raise usage.UsageError("--downloads and --shared must be different folders")

    def check_ports(self):
        """
        Try each port now, so that a busy or privileged port is one clear
        sentence rather than a traceback once twistd is running.
        """
        host, port = self["host"], self["transfer-port"]
        for offset in range(4):
            _probe(socket.SOCK_STREAM, host, port + offset, "--transfer-port")
        _probe(socket.SOCK_DGRAM, "", self["discovery-port"], "--discovery-port", shared=True)


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
    sock = socket.socket(socket.AF_INET, kind)
    try:
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


def _console_log_path(options):
    """
    Where logs go when they would otherwise share stdout with the console:
    under C{twistd -n} with no C{--logfile} and no C{--logger}.
    """
    parent = getattr(options, "parent", None)
    if parent is None or not parent.get("nodaemon"):
        return None
    if parent.get("logfile") or parent.get("logger"):
        return None
    return os.path.join(options["state-dir"], CONSOLE_LOG_NAME)


def makeService(options, reactor=None):
    """
    The L{PeerService} for checked C{options}.
    """
    if reactor is None:
        from twisted.internet import reactor
    from twisted_p2p.service import PeerService

    options["console-log-path"] = _console_log_path(options)
    return PeerService(options, reactor)
