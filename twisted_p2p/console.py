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
        self._prompt_visible = False
        self._leaving = False

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
        self._prompt_visible = False
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
            self._prompt_visible = False
            self.say("error: a command must be UTF-8 text")
            self._show_prompt()
            return
        self._prompt_visible = False  # the user's Enter moved to a new line
        d = self._commands.run(text, self.emit)
        d.addErrback(lambda f: log.failure("A console command failed", f))
        self._show_prompt()

    def emit(self, event):
        """
        Print an event's text.  On a terminal, a line that arrives while the
        prompt is shown (download progress, say) is written over the prompt,
        which is then drawn again below it.
        """
        if event.get("event") == "bye":
            self._leaving = True
        redraw = self._prompt and self._prompt_visible
        if redraw:
            self._write(b"\r\x1b[K")
            self._prompt_visible = False
        for line in event["text"].splitlines() or [""]:
            self.say(line)
        if redraw:
            self._show_prompt()

    def say(self, text):
        self._write(text.encode("utf-8", "replace") + b"\n")

    def _write(self, data):
        if self._can_write and self.transport is not None:
            self.transport.write(data)

    def _show_prompt(self):
        if self._prompt and not self._leaving and not self._prompt_visible:
            self._write(b"p2p> ")
            self._prompt_visible = True

    def readConnectionLost(self):
        self.detached = True
        log.info("Console input closed; the peer keeps running (stop it with SIGTERM).")

    def writeConnectionLost(self):
        self._can_write = False

    def connectionLost(self, reason):
        self.detached = True
        self._can_write = False
