"""
The stdio console: one command per line in, lines of output out.
"""

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from twisted_p2p.limits import MAX_COMMAND_LINE

log = Logger()


@implementer(IHalfCloseableProtocol)
class ConsoleProtocol(LineReceiver):
    """
    Frames console lines and hands each to a L{Commands}.

    End of input means the console went away (a closed terminal, stdin from
    /dev/null): the peer keeps running, and only C{exit} or a signal stops
    it.

    @param commands: the L{Commands} to run.
    @param prompt: whether to show a prompt (on a terminal, not a pipe).
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_COMMAND_LINE

    def __init__(self, commands, prompt=False, greeting=()):
        self._commands = commands
        self._prompt = prompt
        self._greeting = greeting
        self._discarding = False
        self._rest = b""
        self.detached = False
        self._can_write = True

    def connectionMade(self):
        for line in self._greeting:
            self.say(line)
        self._show_prompt()

    def dataReceived(self, data):
        if self._discarding:
            end = data.find(self.delimiter)
            if end < 0:
                return
            self._discarding = False
            data = data[end + 1 :]
        LineReceiver.dataReceived(self, data)
        while self._rest:
            rest, self._rest = self._rest, b""
            LineReceiver.dataReceived(self, rest)

    def lineLengthExceeded(self, line):
        self.say(f"error: a command is at most {self.MAX_LENGTH} bytes")
        end = line.find(self.delimiter)
        if end < 0:
            self._discarding = True
        else:
            self._rest = line[end + 1 :]
        self._show_prompt()

    def lineReceived(self, line):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            self.say("error: a command must be UTF-8 text")
            self._show_prompt()
            return
        d = self._commands.run(text, self.say)
        d.addErrback(lambda f: log.failure("A console command failed", f))
        self._show_prompt()

    def say(self, text):
        if self._can_write and self.transport is not None:
            self.transport.write(text.encode("utf-8", "replace") + b"\n")

    def _show_prompt(self):
        if self._prompt and self._can_write and self.transport is not None:
            self.transport.write(b"p2p> ")

    def readConnectionLost(self):
        self.detached = True
        log.info("Console input closed; the peer keeps running (stop it with SIGTERM).")

    def writeConnectionLost(self):
        self._can_write = False

    def connectionLost(self, reason):
        self.detached = True
        self._can_write = False
