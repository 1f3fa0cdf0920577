"""
The control socket: the face that C{p2ppeer-ctl} talks to.

A UNIX socket in the state dir (mode 0600).  A client sends one request as a
JSON line, C{{"command": "download notes.txt", "wait": true}}, and gets the
command's events back as JSON lines (see C{events.py}), then a last
C{{"event": "end", "ok": ...}} line, and the connection closes.
"""

import json

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin

from twisted_p2p import events
from twisted_p2p.limits import MAX_COMMAND_LINE

log = Logger()

#: A client that sends no request within this many seconds is dropped.
REQUEST_TIMEOUT = 10.0

#: The control socket's file name in the state dir.
SOCKET_NAME = "control.sock"


class ControlProtocol(LineOnlyReceiver, TimeoutMixin):
    """
    One request, its events, the end.  Hands the command to a L{Commands}.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_COMMAND_LINE + 256

    def connectionMade(self):
        self._waiting_for_start = False
        self._asked = False
        self._failed = False
        self._ended = False
        self.setTimeout(REQUEST_TIMEOUT)

    def lineReceived(self, line):
        if self._asked:
            return  # one request per connection; the rest is ignored
        self._asked = True
        self.setTimeout(None)
        try:
            request = json.loads(line.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("not an object")
            command = request.get("command")
            wait = request.get("wait", False)
            if not isinstance(command, str) or not isinstance(wait, bool):
                raise ValueError("command must be text and wait true or false")
        except (UnicodeDecodeError, ValueError) as e:
            self.emit(events.error(f"a request must be a JSON object with a command ({e})"))
            self._end()
            return
        # Lower case, as the command layer reads it: "Download x" is a download.
        self._waiting_for_start = not wait and command.lower().split()[:1] in (["download"], ["get"])
        d = defer.maybeDeferred(self.factory.commands.run, command, self.emit)
        d.addErrback(self._command_failed)
        d.addBoth(lambda _: self._end())

    def _command_failed(self, failure):
        # The command layer reports errors as events; a failure here is a bug,
        # and the client must not be told "ok".
        log.failure("A control command failed", failure)
        self.emit(events.error("the command failed unexpectedly; see the peer's log"))

    def emit(self, event):
        if self._ended or self.transport is None:
            return
        if events.is_failure(event):
            self._failed = True
        self.sendLine(json.dumps(event).encode("utf-8"))
        if self._waiting_for_start and event.get("event") == "download-started":
            # "download" without --wait: the download goes on in the peer.
            self._end()

    def _end(self):
        if self._ended:
            return
        self.sendLine(json.dumps({"event": "end", "ok": not self._failed}).encode())
        self._ended = True
        self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self.transport.loseConnection()

    def timeoutConnection(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.setTimeout(None)
        self._ended = True


class ControlFactory(Factory):
    protocol = ControlProtocol
    noisy = False

    def __init__(self, commands):
        self.commands = commands
