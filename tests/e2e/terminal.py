"""
A real peer whose console is on a pseudo-terminal, as a person at a
terminal has it, and the screen that person sees.

The peer's output is read from the pty's master side and fed to conch's own
terminal parser (L{insults.ClientProtocol}) over an in-memory screen
(L{helper.TerminalBuffer}), so tests look at what the screen shows, not at
escape sequences.
"""

import fcntl
import os
import pty
import struct
import subprocess
import termios
import threading
import time

from twisted.conch.insults import helper, insults
from twisted.internet.testing import StringTransport

from .peers import Peer, PeerError, peer_env

COLUMNS, ROWS = 160, 50


def _screen(columns, rows):
    terminal = helper.TerminalBuffer()
    terminal.width, terminal.height = columns, rows
    return terminal


class Screen:
    """
    What a terminal of C{columns} x C{rows} shows of the bytes fed to it.
    """

    def __init__(self, columns=COLUMNS, rows=ROWS):
        self._parser = insults.ClientProtocol(_screen, columns, rows)
        self._parser.makeConnection(StringTransport())
        self._lock = threading.Lock()
        #: Every line that was ever on the screen, in the order first seen.
        self.seen = []

    def feed(self, data):
        with self._lock:
            self._parser.dataReceived(data)
            for line in self._lines():
                if line and line not in self.seen:
                    self.seen.append(line)

    def _lines(self):
        text = bytes(self._parser.terminal).decode("utf-8", "replace")
        return [line.rstrip() for line in text.split("\n")]

    def lines(self):
        with self._lock:
            lines = self._lines()
        while lines and not lines[-1]:
            lines.pop()
        return lines


def open_pty(columns=COLUMNS, rows=ROWS):
    """
    A pseudo-terminal C{(master, slave)} of the given size.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, slave


def read_into(master, screen, done):
    """
    Feed what the pty's master side reads to C{screen} until it closes;
    then set C{done}.
    """
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            screen.feed(data)
    finally:
        done.set()


def wait_for(check, timeout, what, diagnostics=lambda: ""):
    """
    Poll C{check()} until it gives something true; that, or L{PeerError}.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise PeerError(f"{what} within {timeout} s\n{diagnostics()}")
        time.sleep(0.02)


class TerminalPeer(Peer):
    """
    A L{Peer} whose console is a pseudo-terminal: keys in, a screen out.
    """

    def start(self):
        self._stderr_file = open(self.stderr_path, "ab")
        self.screen = Screen()
        self._master, slave = open_pty()
        self._closed = threading.Event()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.folder,
            env=dict(peer_env(), TERM="xterm"),
            stdin=slave,
            stdout=slave,
            stderr=self._stderr_file,
            start_new_session=True,
        )
        os.close(slave)
        Peer._live.append(self)
        self._reader = threading.Thread(
            target=read_into, args=(self._master, self.screen, self._closed), daemon=True
        )
        self._reader.start()
        return self

    def keys(self, text):
        """Type C{text} (str or bytes), as keys."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        os.write(self._master, data)

    def enter(self, line):
        self.keys(line + "\r")

    def see(self, check, timeout=10.0, what="the screen never showed it"):
        """
        Wait until C{check(lines)} is true of the screen's lines; its result.
        """
        if isinstance(check, str):
            wanted = check
            check = lambda lines: next((line for line in lines if wanted in line), None)  # noqa: E731
            what = f"the screen never showed {wanted!r}"
        return wait_for(lambda: check(self.screen.lines()), timeout, what, self.diagnostics)

    def ever_saw(self, wanted, timeout=10.0):
        """
        Wait until a line with C{wanted} has been on the screen (it may have
        scrolled away, or been redrawn since).
        """
        return wait_for(
            lambda: next((line for line in self.screen.seen if wanted in line), None),
            timeout, f"the screen never showed {wanted!r}", self.diagnostics,
        )

    def ready(self, timeout=20.0):
        self.see(lambda lines: lines and lines[-1].startswith("p2p>"), timeout,
                 "no prompt")
        return time.monotonic()

    def cleanup(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        try:
            os.close(self._master)
        except OSError:
            pass
        self._reader.join(5)
        if self._stderr_file is not None:
            self._stderr_file.close()
        if self in Peer._live:
            Peer._live.remove(self)

    def diagnostics(self, lines=60):
        text = Peer.diagnostics(self, lines)
        screen = "\n".join(self.screen.lines()[-lines:]) or "(nothing)"
        return f"{text}\n----- screen:\n{screen}"
