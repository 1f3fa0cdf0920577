"""
The stdio console: commands in, what the peer says out, and the progress of
downloads.  Two protocols over one command layer:

 - L{TerminalConsole}, on a terminal: line editing, history with the arrow
   keys and Tab completion (C{twisted.conch.recvline}), and a live progress
   bar just above the prompt, redrawn in place, with lines that arrive while
   the user types written above both;
 - L{LineConsole}, on a pipe or a file (a script, supervisor, the e2e
   harness): one command per line in, plain lines out, no prompt and no
   escape sequences, and progress as a plain line now and then.

Both render events from their fields (L{twisted_p2p.render}) and listen to
the peer's L{EventHub} for what happens on its own: peers joining and
leaving, uploads, downloads asked for by another face.  C{--quiet} leaves
out the notices (L{render.NOTICES}).
"""

import os
import shlex
import time

from twisted.conch.recvline import HistoricRecvLine
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from twisted_p2p import events, render
from twisted_p2p.limits import MAX_COMMAND_LINE
from twisted_p2p.names import next_parts

log = Logger()

#: Seconds between progress lines of one download on a pipe or a file.
PLAIN_PROGRESS_INTERVAL = 5.0

#: The prompt on a terminal.
PROMPT = b"p2p> "

#: Commands whose arguments are file names, for Tab completion.
_FILE_COMMANDS = frozenset({"download", "get", "resume", "cancel", "list", "ls"})

# Control keys a terminal sends as single bytes.
_CTRL_A, _CTRL_C, _CTRL_D, _CTRL_E = b"\x01", b"\x03", b"\x04", b"\x05"
_CTRL_H, _CTRL_L, _CTRL_U = b"\x08", b"\x0c", b"\x15"


class _Face:
    """
    What both consoles share: running commands, rendering events, keeping
    the progress of downloads, and listening to the hub.

    @param commands: the L{Commands} to run.
    @param hub: the peer's L{EventHub}, or C{None}.
    @param quiet: leave out the notices (C{--quiet}).
    @param stop_hint: C{(command, pid)}: how to stop the peer without its
        console, said when the console's input closes.
    """

    #: How the command layer names this face.
    face = "console"
    #: Whether C{exit} asks first while files are moving.
    interactive = False

    def _setup(self, commands, hub, quiet, stop_hint):
        self._commands = commands
        self._hub = hub
        self._quiet = quiet
        self._stop_hint = stop_hint
        self._unsubscribe = None
        self._progress = {}
        self._leaving = False
        self.detached = False

    def _listen(self):
        if self._hub is not None and self._unsubscribe is None:
            self._unsubscribe = self._hub.subscribe(self.notify, owner=self)

    def _stop_listening(self):
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def run_command(self, text):
        d = self._commands.run(text, self.emit, origin=self)
        d.addErrback(lambda f: log.failure("A console command failed", f))
        return d

    def notify(self, event):
        """
        An event from the hub: shown unless it is a notice and we are quiet.
        """
        if self._quiet and event.get("event") in render.NOTICES:
            return
        self.emit(event)

    def emit(self, event):
        """
        Show an event: progress goes to the bar (or a plain line now and
        then), everything else as lines.
        """
        kind = event.get("event")
        if kind == "bye":
            self._leaving = True
        if kind == "download-progress":
            self._show_progress(event)
            return
        if kind in render.ENDINGS:
            self._progress.pop(event.get("id", event.get("file")), None)
        self.show(render.render(event, max_rows=self._max_rows()))

    def input_closed(self):
        """
        Say that the console reads nothing more, and how to stop the peer.
        """
        if self._stop_hint is not None and not self._leaving:
            command, pid = self._stop_hint
            self.emit(events.event("input-closed", stop=command, pid=pid))

    def _max_rows(self):
        return None


@implementer(IHalfCloseableProtocol)
class LineConsole(_Face, LineReceiver):
    """
    The console on a pipe or a file: frames lines and hands each to the
    command layer; writes plain lines.

    End of input means the console went away (a closed pipe, the end of a
    file): the peer keeps running, and only C{exit} or a signal stops it.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_COMMAND_LINE

    def __init__(self, commands, hub=None, quiet=False, stop_hint=None, clock=None):
        self._setup(commands, hub, quiet, stop_hint)
        self._now = clock.seconds if clock is not None else time.monotonic
        self._plain_shown = {}
        self._discarding = False
        self._rest = b""
        self._can_write = True

    def connectionMade(self):
        self._listen()

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

    def lineReceived(self, line):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            self.say("error: a command must be UTF-8 text")
            return
        self.run_command(text)

    def show(self, lines):
        for line in lines:
            self.say(line)

    def _show_progress(self, event):
        key = event.get("id", event.get("file"))
        now = self._now()
        shown = self._plain_shown.get(key)
        if shown is None or now - shown >= PLAIN_PROGRESS_INTERVAL:
            self._plain_shown[key] = now
            self.show(render.render(event))

    def say(self, text):
        self._write(text.encode("utf-8", "replace") + b"\n")

    def _write(self, data):
        if self._can_write and self.transport is not None:
            self.transport.write(data)

    def readConnectionLost(self):
        self.detached = True
        log.info("Console input closed; the peer keeps running.")
        self.input_closed()

    def writeConnectionLost(self):
        self._can_write = False

    def connectionLost(self, reason):
        self.detached = True
        self._can_write = False
        self._stop_listening()


class TerminalConsole(_Face, HistoricRecvLine):
    """
    The console on a terminal, over C{insults}: line editing and history
    (L{HistoricRecvLine}), Tab completion of commands, file names and peers,
    and the progress bar above the prompt.

    The screen below what has scrolled by is the I{input area}: the bar line
    (while downloads run) and the prompt line.  A line to show clears the
    area, is written where it was, and the area is drawn again below it, so
    that what the user is typing is never lost or mixed with output.

    Keys: Enter runs, Up and Down walk the history, Tab completes, Ctrl-A and
    Ctrl-E go to the start and the end, Ctrl-U clears the line, Ctrl-L draws
    the area again, Ctrl-D on an empty line says how to leave, and Ctrl-C
    leaves (as C{exit!}).

    @param greeting: lines written first.
    @param size: C{size()} gives the terminal's C{(columns, rows)}.
    """

    interactive = True
    ps = (PROMPT, PROMPT)

    def __init__(self, commands, hub=None, quiet=False, stop_hint=None, greeting=(),
                 size=lambda: (80, 24)):
        self._setup(commands, hub, quiet, stop_hint)
        self._greeting = list(greeting)
        self._size = size
        self._area = False
        self._bar_shown = False
        self._pending = b""
        self._running = False

    # -- lifetime -----------------------------------------------------------------

    def connectionMade(self):
        HistoricRecvLine.connectionMade(self)
        t = self.terminal
        self.keyHandlers.update({
            t.TAB: self.complete,
            _CTRL_A: self.handle_HOME,
            _CTRL_E: self.handle_END,
            _CTRL_H: self.handle_BACKSPACE,
            _CTRL_U: self.clear_line,
            _CTRL_L: self.redraw,
            _CTRL_C: self.interrupt,
            _CTRL_D: self.end_of_input,
        })
        self._listen()

    def initializeScreen(self):
        # Not RecvLine's: it resets the terminal, which would wipe what the
        # user's shell shows above us.
        for line in self._greeting:
            self._write_line(line)
        self.setInsertMode()
        self._draw_area()

    def connectionLost(self, reason):
        self.detached = True
        self._stop_listening()

    # -- keys ---------------------------------------------------------------------

    def keystrokeReceived(self, keyID, modifier):
        # A UTF-8 character comes a byte at a time: keep it whole, as one
        # character of the line (RecvLine knows only ASCII).
        if isinstance(keyID, bytes) and len(keyID) == 1 and (keyID[0] >= 0x80 or self._pending):
            self._pending += keyID
            try:
                self._pending.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and len(self._pending) < 4:
                    return
                self._pending = b""  # not UTF-8: dropped
                return
            character, self._pending = self._pending, b""
            self.characterReceived(character, False)
            return
        HistoricRecvLine.keystrokeReceived(self, keyID, modifier)

    def handle_RETURN(self):
        line = b"".join(self.lineBuffer)
        if line:
            self.historyLines.append(line)
        self.historyPosition = len(self.historyLines)
        # The command stays on the screen, without the bar above it.
        self._clear_area()
        self._write_line((PROMPT + line).decode("utf-8", "replace"))
        self.lineBuffer = []
        self.lineBufferIndex = 0
        self.lineReceived(line)

    def lineReceived(self, line):
        if len(line) > MAX_COMMAND_LINE:
            self.show([f"error: a command is at most {MAX_COMMAND_LINE} bytes"])
        else:
            self._running = True
            try:
                self.run_command(line.decode("utf-8", "replace"))
            finally:
                self._running = False
        self._draw_area()

    def clear_line(self):
        self.lineBuffer = []
        self.lineBufferIndex = 0
        self.redraw()

    def redraw(self):
        self._clear_area()
        self._draw_area()

    def interrupt(self):
        """
        Ctrl-C: leave, as C{exit!} does, saying so.
        """
        self.lineBuffer = []
        self.lineBufferIndex = 0
        self._clear_area()
        self._write_line((PROMPT + b"^C").decode())
        self._running = True
        try:
            self.run_command("exit!")
        finally:
            self._running = False
        self._draw_area()

    def end_of_input(self):
        """
        Ctrl-D: on an empty line, say how to leave (the console stays);
        within a line, delete the character under the cursor.
        """
        if self.lineBuffer:
            self.handle_DELETE()
            return
        self.show([
            "Ctrl-D: this console stays open and the peer keeps running; "
            "type exit (or press Ctrl-C) to stop it"
        ])

    def complete(self):
        """
        Tab: complete the word before the cursor: a command name first, then
        file names (quoted when they need it) or, after C{--from}, peers.
        Several candidates complete to what they share, and are listed when
        they share no more than is typed.
        """
        before = b"".join(self.lineBuffer[: self.lineBufferIndex]).decode("utf-8", "replace")
        words, current, start = _split_partial(before)
        if not words:
            candidates = [name for name in self._commands.names() if name != "exit!"]
        elif words[-1] == "--from":
            candidates = self._commands.peer_names()
        elif words[0].lower() in _FILE_COMMANDS:
            candidates = self._commands.file_names(words[0])
        else:
            return
        matches = sorted(next_parts(candidates, current))
        if not matches:
            return
        if len(matches) == 1:
            # A folder completes up to its slash, and the typing goes on in it.
            folder = matches[0].endswith("/")
            self._replace_word(start, _quoted(matches[0], closed=not folder) + ("" if folder else " "))
            return
        shared = os.path.commonprefix(matches)
        if len(shared) > len(current):
            self._replace_word(start, _quoted(shared, closed=False))
        else:
            self.show(["  ".join(_quoted(m) for m in matches)])

    def _replace_word(self, start, text):
        """
        Replace the characters from C{start} to the cursor with C{text}.
        """
        before = b"".join(self.lineBuffer[: self.lineBufferIndex]).decode("utf-8", "replace")
        after = self.lineBuffer[self.lineBufferIndex :]
        head = _characters(before[:start] + text)
        self.lineBuffer = head + after
        self.lineBufferIndex = len(head)
        self.redraw()

    # -- output -------------------------------------------------------------------

    def show(self, lines):
        """
        Write C{lines} above the input area.
        """
        redraw = self._area
        if redraw:
            self._clear_area()
        for line in lines:
            self._write_line(line)
        if redraw and not self._running:
            self._draw_area()

    def _show_progress(self, event):
        self._progress[event.get("id", event.get("file"))] = event
        if self._area:
            self.redraw()

    def _max_rows(self):
        _, rows = self._size()
        return max(rows - 4, 5)

    def _write_line(self, text):
        self.terminal.write(text.encode("utf-8", "replace"))
        self.terminal.nextLine()

    def _clear_area(self):
        """
        Erase the bar and the prompt line; the cursor ends where the bar (or
        the prompt) began.
        """
        if not self._area:
            return
        columns, _ = self._size()
        typed = len(PROMPT) + self.lineBufferIndex
        up = typed // max(columns, 1) + (1 if self._bar_shown else 0)
        self.terminal.write(b"\r")
        if up:
            self.terminal.cursorUp(up)
        self.terminal.eraseToDisplayEnd()
        self._area = self._bar_shown = False

    def _draw_area(self):
        """
        The bar (if downloads run) and the prompt with what is typed, the
        cursor where the user left it.
        """
        if self._area or self._leaving or self.detached:
            return
        if self._progress:
            columns, _ = self._size()
            bar = render.progress_bar(list(self._progress.values()), columns - 1)
            self._write_line(bar)
            self._bar_shown = True
        self.terminal.write(PROMPT + b"".join(self.lineBuffer))
        back = len(self.lineBuffer) - self.lineBufferIndex
        if back:
            self.terminal.cursorBackward(back)
        self._area = True


def _split_partial(text):
    """
    The whole words of C{text} before the last one, the last (partial) word
    without its quotes, and where that word starts in C{text}; the last
    word is empty when C{text} ends between words.
    """
    words, current, start, quote, in_word = [], [], len(text), None, False
    for i, c in enumerate(text):
        if quote is not None:
            if c == quote:
                quote = None
            else:
                current.append(c)
        elif c in "\"'":
            quote = c
            if not in_word:
                in_word, start = True, i
        elif c.isspace():
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            if not in_word:
                in_word, start = True, i
            current.append(c)
    if not in_word:
        return words, "", len(text)
    return words, "".join(current), start


def _quoted(name, closed=True):
    """
    C{name} as it must be typed: quoted if it has spaces or quotes.  An
    unclosed quote lets completion go on typing the name.
    """
    quoted = shlex.quote(name)
    if quoted == name or closed:
        return quoted
    return quoted[:-1]


def _characters(text):
    """
    C{text} as a line buffer: one item per character, in UTF-8.
    """
    return [c.encode("utf-8") for c in text]
