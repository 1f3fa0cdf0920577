"""
The control socket: the face that C{p2ppeer-ctl} talks to.

A UNIX socket in the state dir (mode 0600).  A client sends one request as a
JSON line and gets events back as JSON lines (see C{events.py}):

 - C{{"command": "download notes.txt", "wait": true}}: the command's
   events, then a last C{{"event": "end", "ok": ...}} line, and the
   connection closes.  Without C{wait}, a download's answer ends once every
   file asked for has started (or failed to);
 - C{{"watch": true}}: every event the peer publishes on its own (peers
   joining and leaving, uploads, downloads), until the client closes.
"""

import json
from collections import OrderedDict

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin

from twisted_p2p import events
from twisted_p2p.limits import CONTROL_REQUEST_TIMEOUT, MAX_COMMAND_LINE, MAX_CONTROL_WAITING

log = Logger()

#: A client that sends no request within this many seconds is dropped.
REQUEST_TIMEOUT = CONTROL_REQUEST_TIMEOUT

#: The control socket's file name in the state dir.
SOCKET_NAME = "control.sock"

#: Commands whose answer, without C{wait}, ends once the downloads started.
_STARTING = ("download", "get", "resume")

#: Events that tell a download asked for has started, or never will.
_STARTED = frozenset({
    "download-started", "download-failed", "download-cancelled", "download-stopped", "error",
})


class ControlProtocol(LineOnlyReceiver, TimeoutMixin):
    """
    One request, its events, the end.  Hands the command to a L{Commands},
    or, for a watch, listens to the factory's L{EventHub}.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_COMMAND_LINE + 256

    #: How the command layer names this face.
    face = "p2ppeer-ctl"
    #: Scripts are not asked to confirm.
    interactive = False

    def connectionMade(self):
        self._waiting_for_start = False
        self._starting = None
        self._asked = False
        self._failed = False
        self._ended = False
        self._unsubscribe = None
        self.setTimeout(REQUEST_TIMEOUT)
        self.factory.waiting(self)

    def dataReceived(self, data):
        # Once the connection is closing, what still arrives is thrown away
        # rather than gathered (LineOnlyReceiver would keep appending it).
        if self.transport is None or self.transport.disconnecting:
            return
        LineOnlyReceiver.dataReceived(self, data)

    def lineReceived(self, line):
        if self._asked:
            return  # one request per connection; the rest is ignored
        self._asked = True
        self.factory.asked(self)
        self.setTimeout(None)
        try:
            request = json.loads(line.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("not an object")
            if request.get("watch") is True:
                self._watch()
                return
            command = request.get("command")
            wait = request.get("wait", False)
            if not isinstance(command, str) or not isinstance(wait, bool):
                raise ValueError("command must be text and wait true or false")
        except (UnicodeDecodeError, ValueError) as e:
            self.emit(events.error(f"a request must be a JSON object with a command ({e})"))
            self._end()
            return
        # Lower case, as the command layer reads it: "Download x" is a download.
        self._waiting_for_start = not wait and command.lower().split()[:1] in [[c] for c in _STARTING]
        d = defer.maybeDeferred(self.factory.commands.run, command, self.emit, self)
        d.addErrback(self._command_failed)
        d.addBoth(lambda _: self._end())

    def _watch(self):
        hub = self.factory.hub
        if hub is None:
            self.emit(events.error("this peer has no events to watch"))
            self._end()
            return
        self._unsubscribe = hub.subscribe(self.emit, owner=self)

    def _command_failed(self, failure):
        # The command layer reports errors as events; a failure here is a bug,
        # and the client must not be told "ok".
        log.failure("A control command failed", failure)
        self.emit(events.error("the command failed unexpectedly; see the peer's log"))

    def emit(self, event):
        if self._ended or self.transport is None:
            return
        kind = event.get("event")
        if events.is_failure(event):
            self._failed = True
        self.sendLine(json.dumps(event).encode("utf-8"))
        if not self._waiting_for_start:
            return
        if kind == "download-requested":
            self._starting = {f.get("id") for f in event.get("files", ())}
        elif kind in _STARTED:
            if self._starting is None:
                # No list of what was asked for: the first one to start.
                self._starting = set() if kind == "download-started" else None
            else:
                self._starting.discard(event.get("id"))
            if self._starting is not None and not self._starting:
                # "download" without --wait: the downloads go on in the peer.
                self._end()

    def _end(self):
        if self._ended:
            return
        self.sendLine(json.dumps({"event": "end", "ok": not self._failed}).encode())
        self._ended = True
        self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self._buffer = b""
        self.transport.loseConnection()

    def timeoutConnection(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.setTimeout(None)
        self.factory.asked(self)
        self._ended = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


class ControlFactory(Factory):
    """
    Makes a L{ControlProtocol} per client, for C{commands} and, for watches,
    C{hub}.
    """

    protocol = ControlProtocol
    noisy = False

    def __init__(self, commands, hub=None, max_waiting=MAX_CONTROL_WAITING):
        self.commands = commands
        self.hub = hub
        self._max_waiting = max_waiting
        self._waiting = OrderedDict()
        self.closed_waiting = 0

    def waiting(self, protocol):
        """
        C{protocol} waits for its request; past L{MAX_CONTROL_WAITING}
        such, the one that has waited longest is closed.
        """
        self._waiting[protocol] = None
        while len(self._waiting) > self._max_waiting:
            oldest, _ = self._waiting.popitem(last=False)
            self.closed_waiting += 1
            if oldest.transport is not None:
                oldest.transport.abortConnection()

    def asked(self, protocol):
        self._waiting.pop(protocol, None)
