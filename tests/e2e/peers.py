"""
A harness for end-to-end tests: real C{twistd -n p2ppeer} processes on
127.0.0.1, driven through their stdio console.

Every peer binds 127.0.0.1 and broadcasts to 127.255.255.255 only, and every
test run picks its own free ports, so that two runs (or a demo) never hear
each other.
"""

import atexit
import errno
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The twistd next to the running interpreter: the venv's, whether the
#: project is installed there or only found through PYTHONPATH.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

HOST = "127.0.0.1"
BROADCAST = "127.255.255.255"

#: Ports are picked from here: below the Linux ephemeral range (32768+), so
#: no outgoing connection is handed one while a test holds it unbound.
PORT_RANGE = (20000, 32000)

#: Kept clear of the demo (sandbox/demo.sh: discovery 27000, peers
#: 27101/27201/27301 and the ports after them).
_DEMO_PORTS = range(26990, 27400)

_taken = set()
_taken_lock = threading.Lock()


def _can_bind(kind, host, port):
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.bind((host, port))
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            return False
        raise
    finally:
        sock.close()
    return True


def _pick(count, usable, tries=500):
    low, high = PORT_RANGE
    for _ in range(tries):
        base = random.randint(low, high - count)
        ports = range(base, base + count)
        with _taken_lock:
            if any(p in _taken or p in _DEMO_PORTS for p in ports):
                continue
        if all(usable(p) for p in ports):
            with _taken_lock:
                if any(p in _taken for p in ports):
                    continue
                _taken.update(ports)
            return base
    raise RuntimeError(f"no {count} free consecutive port(s) found in {PORT_RANGE}")


def free_transfer_port():
    """
    A port T such that T to T+3 are all free for TCP on 127.0.0.1, and were
    handed out by no earlier call in this process.
    """
    return _pick(4, lambda p: _can_bind(socket.SOCK_STREAM, HOST, p))


def free_udp_port():
    """
    A UDP port free on every address (the discovery listener binds them
    all), outside every range handed out before in this process.
    """
    return _pick(1, lambda p: _can_bind(socket.SOCK_DGRAM, "", p))


def hosting_off(args):
    """
    C{--cache-size 0} unless C{args} give a cache size: a test peer holds
    nothing for others unless its test asks, so that what each peer lists
    is what its test set up (tests/e2e/test_distribution.py asks).
    """
    return [] if any(str(a).startswith("--cache-size") for a in args) else ["--cache-size", "0"]


def peer_env():
    """
    The environment for a peer: the checkout first on PYTHONPATH, so that
    the package and its twisted/plugins drop-in are found with or without
    an (editable) install.
    """
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path, lines):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else f"({path} is empty)"


class PeerError(AssertionError):
    """
    A peer did not do what the test expected; the message carries its
    recent console output, stderr and log.
    """


class Peer:
    """
    One C{twistd -n p2ppeer} process in C{folder} (which holds C{shared/}),
    with its console on pipes.

    Console lines are collected by a reader thread with the time each
    arrived.  L{expect} looks for a line at or after a cursor, which
    L{mark} moves to the end, so that old output is never taken for new.
    """

    _live = []

    def __init__(self, name, folder, transfer_port, discovery_port,
                 announce_interval=0.5, peer_timeout=2.0, extra_args=()):
        self.name = name
        self.folder = Path(folder)
        self.transfer_port = transfer_port
        self.discovery_port = discovery_port
        self.announce_interval = announce_interval
        self.peer_timeout = peer_timeout
        self.extra_args = list(extra_args)
        self.proc = None
        self.started_at = None
        self.lines = []
        self.times = []
        self.cursor = 0
        self._eof = False
        self._cond = threading.Condition()
        self._reader = None
        self._stderr_file = None
        self._sync = 0

    @property
    def label(self):
        """How other peers' consoles name this one."""
        return f"{HOST}:{self.transfer_port}"

    @property
    def stderr_path(self):
        return self.folder / "stderr.txt"

    @property
    def log_path(self):
        return self.folder / ".p2ppeer" / "p2ppeer.log"

    @property
    def downloads(self):
        return self.folder / "downloads"

    @property
    def shared(self):
        return self.folder / "shared"

    def argv(self):
        return [
            TWISTD, "-n", "--pidfile", str(self.folder / "twistd.pid"),
            "p2ppeer",
            "--transfer-port", str(self.transfer_port),
            "--discovery-port", str(self.discovery_port),
            "--host", HOST,
            "--broadcast", BROADCAST,
            "--announce-interval", str(self.announce_interval),
            "--peer-timeout", str(self.peer_timeout),
        ] + hosting_off(self.extra_args) + self.extra_args

    def start(self):
        self._stderr_file = open(self.stderr_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.folder,
            env=peer_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            # Out of the test runner's process group: a Ctrl-C there is
            # not delivered to the peers; teardown kills them.
            start_new_session=True,
        )
        Peer._live.append(self)
        self._reader = threading.Thread(
            target=self._read, name=f"{self.name}-stdout", daemon=True
        )
        self._reader.start()
        return self

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                self.lines.append(line)
                self.times.append(time.monotonic())
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # input

    def send(self, line):
        try:
            self.proc.stdin.write(line.encode("utf-8") + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as e:
            raise PeerError(f"{self.name}: cannot send {line!r}: {e}\n{self.diagnostics()}")

    def close_stdin(self):
        self.proc.stdin.close()

    # output

    def mark(self):
        """Move the cursor past every line read so far."""
        with self._cond:
            self.cursor = len(self.lines)
        return self.cursor

    def expect(self, pattern, timeout=10.0, fail=None):
        """
        Wait for a console line, at or after the cursor, that matches
        C{pattern} (a regex searched in the line, or a predicate); move the
        cursor past it and return it.

        @param fail: a regex (or predicate) that, if a line matches it
            first, fails at once with that line (an "error: ..." say).
        """
        match = _matcher(pattern)
        bad = _matcher(fail) if fail is not None else (lambda line: False)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self.cursor < len(self.lines):
                    line = self.lines[self.cursor]
                    self.cursor += 1
                    if match(line):
                        return line
                    if bad(line):
                        raise PeerError(
                            f"{self.name}: got {line!r} while waiting for {pattern!r}\n"
                            + self.diagnostics()
                        )
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "stdout closed" if self._eof else f"{timeout} s passed"
                    raise PeerError(
                        f"{self.name}: no line matching {pattern!r} ({why})\n"
                        + self.diagnostics()
                    )
                self._cond.wait(remaining)

    def line_time(self, line_number):
        """When console line C{line_number} arrived (time.monotonic)."""
        with self._cond:
            return self.times[line_number]

    def command(self, cmd, until, timeout=10.0, fail=None):
        """
        Send C{cmd} and return the first later line that matches C{until}.
        """
        self.mark()
        self.send(cmd)
        return self.expect(until, timeout, fail=fail)

    def ask(self, cmd, timeout=5.0):
        """
        Send C{cmd} and return all it printed, as a list of lines.

        The end of the answer is found by sending a second, unknown command
        right after it: the console answers in order, so its error line
        closes the answer of C{cmd}.  Meant for commands that answer at once
        (C{list}, C{peers}, C{help}).
        """
        self._sync += 1
        token = f"__e2e_sync_{self._sync}__"
        start = self.mark()
        self.send(cmd)
        self.send(token)
        end_line = self.expect(lambda line: f"'{token}'" in line, timeout)
        with self._cond:
            answer = self.lines[start:self.cursor - 1]
        assert end_line.startswith("error: unknown command"), end_line
        return answer

    def ready(self, timeout=20.0):
        """
        Wait until the console answers (it starts after the ports are up and
        discovery has announced); the time the answer came
        (C{time.monotonic}).

        A console on a pipe may print no greeting, so a command is the
        reliable sign: input sent earlier waits in the pipe until then.
        """
        self.ask("help", timeout)
        return self.line_time(self.cursor - 1)

    # lifetime

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout=10.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise PeerError(
                f"{self.name}: still running {timeout} s later\n" + self.diagnostics()
            )

    def exit(self, timeout=10.0):
        """The console's C{exit}; the exit code."""
        self.send("exit")
        return self.wait(timeout)

    def terminate(self, timeout=10.0):
        """SIGTERM, then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self):
        """SIGKILL, then the exit code (never waits long)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(10)
        self._reader.join(5)
        return code

    def cleanup(self):
        """Kill the process if it still runs, and close our ends."""
        if self.proc is None:
            return
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self._stderr_file is not None:
            self._stderr_file.close()
        if self in Peer._live:
            Peer._live.remove(self)

    # diagnosis

    def diagnostics(self, lines=60):
        """
        Recent console output, stderr and log of this peer, for a failure
        message.
        """
        state = "not started"
        if self.proc is not None:
            code = self.proc.poll()
            state = f"pid {self.proc.pid}, " + (
                "running" if code is None else f"exit code {code}"
            )
        with self._cond:
            console = "\n".join(self.lines[-lines:]) or "(nothing)"
        return "\n".join([
            f"===== {self.name} ({self.label}; {state}) in {self.folder}",
            f"----- command: {' '.join(self.argv())}",
            "----- console (last lines):",
            console,
            "----- stderr (tail):",
            _tail(self.stderr_path, lines),
            f"----- log {self.log_path} (tail):",
            _tail(self.log_path, 2 * lines),
        ])


def _matcher(pattern):
    if callable(pattern):
        return pattern
    regex = re.compile(pattern)
    return lambda line: regex.search(line) is not None


@atexit.register
def _kill_leftovers():
    for peer in list(Peer._live):
        peer.cleanup()
