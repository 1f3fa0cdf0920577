"""
The stdio console: one command per line in, lines of output out, and the
progress of downloads.

Progress.  On a terminal, the downloads in progress have one bar line just
above the prompt, redrawn in place every second (the cursor and what the
user is typing stay where they are).  On a pipe or a file, progress is a
plain line per download every L{PLAIN_PROGRESS_INTERVAL} seconds.
"""

import time

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from twisted_p2p.download import human_size
from twisted_p2p.limits import MAX_COMMAND_LINE

log = Logger()

#: Seconds between progress lines of one download on a pipe or a file.
PLAIN_PROGRESS_INTERVAL = 5.0

#: Characters in a progress bar.
BAR_WIDTH = 24

#: Events after which a download has no bar any more.
_ENDINGS = ("download-finished", "download-failed", "download-cancelled", "download-stopped")

# Terminal controls: save and restore the cursor, one line up, clear the line.
_SAVE, _RESTORE, _UP, _CLEAR = b"\x1b7", b"\x1b8", b"\x1b[1A", b"\r\x1b[K"


def progress_bar(progress):
    """
    The bar line of the downloads in C{progress} (progress events, in the
    order they started).
    """
    parts = []
    for e in progress:
        percent = max(0, min(100, e.get("percent", 0)))
        rate = f"{human_size(e.get('rate', 0))}/s"
        if len(progress) == 1:
            filled = BAR_WIDTH * percent // 100
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            eta = e.get("eta")
            left = "" if eta is None else f", {eta} s left"
            parts.append(
                f"{e.get('file', '?')} [{bar}] {percent}% {rate} "
                f"from {e.get('sources', 0)} peer(s){left}"
            )
        else:
            parts.append(f"{e.get('file', '?')} {percent}% {rate}")
    return " | ".join(parts)


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

    def __init__(self, commands, prompt=False, greeting=(), clock=None):
        self._commands = commands
        self._prompt = prompt
        self._now = clock.seconds if clock is not None else time.monotonic
        self._progress = {}
        self._plain_shown = {}
        self._bar_visible = False
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
        self._bar_visible = False  # and the bar is above the line typed
        d = self._commands.run(text, self.emit)
        d.addErrback(lambda f: log.failure("A console command failed", f))
        self._show_prompt()

    def emit(self, event):
        """
        Print an event's text.  On a terminal, a line that arrives while the
        prompt is shown (a download finishing, say) is written over the
        prompt (and the progress bar), which are then drawn again below it.
        Progress events draw the bar, or a plain line now and then.
        """
        kind = event.get("event")
        if kind == "bye":
            self._leaving = True
        if kind == "download-progress":
            self._show_progress(event)
            return
        if kind in _ENDINGS:
            self._progress.pop(event.get("id"), None)
            self._plain_shown.pop(event.get("id"), None)
        self._print_lines(event["text"].splitlines() or [""])

    def _print_lines(self, lines):
        redraw = self._prompt and (self._prompt_visible or self._bar_visible)
        if redraw:
            self._write(_CLEAR)
            if self._bar_visible:
                self._write(_UP + _CLEAR)
            self._prompt_visible = self._bar_visible = False
        for line in lines:
            self.say(line)
        if redraw:
            self._draw_bar()
            self._show_prompt()

    def _show_progress(self, event):
        key = event.get("id", event.get("file"))
        if not self._prompt:
            now = self._now()
            shown = self._plain_shown.get(key)
            if shown is None or now - shown >= PLAIN_PROGRESS_INTERVAL:
                self._plain_shown[key] = now
                self.say(event["text"])
            return
        self._progress[key] = event
        if self._bar_visible and self._prompt_visible:
            bar = progress_bar(list(self._progress.values())).encode("utf-8", "replace")
            self._write(_SAVE + _UP + _CLEAR + bar + _RESTORE)
        else:
            self._print_lines([])

    def _draw_bar(self):
        """
        The bar line, on the current (empty) line; the prompt goes below it.
        """
        if self._progress and not self._leaving:
            self.say(progress_bar(list(self._progress.values())))
            self._bar_visible = True

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
