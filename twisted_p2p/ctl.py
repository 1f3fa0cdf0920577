"""
C{p2ppeer-ctl}: control a running peer through its control socket.

A plain blocking client: it sends one request and prints the events that
come back, rendered as text (as the console shows them, L{render}) or, with
C{--json}, as JSON lines.  Exit status: 0 when the command succeeded, 1 when
it failed (an error, a failed download), 2 when the peer could not be
reached.
"""

import argparse
import errno
import json
import os
import shlex
import socket
import stat
import sys

from twisted_p2p import render
from twisted_p2p.control import SOCKET_NAME
from twisted_p2p.version import version

#: Each command and its arguments: C{(at least, at most)}, C{None} for any.
COMMANDS = {
    "list": (0, 1),
    "peers": (0, 0),
    "download": (1, None),
    "status": (0, 0),
    "cache": (0, 0),
    "resume": (1, 1),
    "cancel": (1, 1),
    "version": (0, 0),
    "watch": (0, 0),
    "stop": (0, 0),
}

#: Seconds to wait for the peer to answer (a download with --wait may take
#: longer: then there is no limit).
ANSWER_TIMEOUT = 30.0


class CtlError(Exception):
    """
    The peer could not be reached; the message says what to check.
    """


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog="p2ppeer-ctl",
        description="Control a running twisted-p2p peer through its control socket. "
        "watch prints what the peer does (peers, uploads, downloads) until Ctrl-C.",
    )
    parser.add_argument("--version", action="version", version=f"p2ppeer-ctl (twisted-p2p) {version()}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--state-dir",
        default=".p2ppeer",
        help="the peer's --state-dir; its control socket is in it [default: .p2ppeer]",
    )
    where.add_argument("--socket", help="the control socket's path")
    parser.add_argument("--json", action="store_true", help="print events as JSON lines")
    parser.add_argument(
        "--wait",
        action="store_true",
        help="download, resume: wait, showing progress, until the download is over",
    )
    parser.add_argument(
        "--from", dest="source", metavar="PEER",
        help="download: from this peer only (its name, address or id)",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to do")
    parser.add_argument(
        "argument", nargs="*",
        help="files for download (names, patterns such as '*.jpg', id prefixes), "
        "one for resume and cancel, a pattern for list",
    )
    args = parser.parse_intermixed_args(argv)
    least, most = COMMANDS[args.command]
    if len(args.argument) < least:
        parser.error(f"{args.command} needs a file name or id")
    if most is not None and len(args.argument) > most:
        parser.error(f"{args.command} takes no argument" if most == 0 else
                     f"{args.command} takes one argument")
    if args.wait and args.command not in ("download", "resume"):
        parser.error("--wait goes with download")
    if args.source is not None and args.command != "download":
        parser.error("--from goes with download")
    return args


def command_line(args):
    """
    The command to send, quoted as the command layer reads it (a shell's
    way), so that a name with spaces stays one name.
    """
    words = [args.command, *args.argument]
    if args.source is not None:
        words += ["--from", args.source]
    return shlex.join(words)


def socket_path(args):
    if args.socket:
        return args.socket
    return os.path.join(args.state_dir, SOCKET_NAME)


def connect(path, state_dir):
    """
    A socket connected to the peer at C{path}.

    @param state_dir: the state dir C{path} was found from, for the message;
        C{None} when the path was given with C{--socket}.
    @raise CtlError: with a sentence naming the likely cause.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        if state_dir is None:
            raise CtlError(f"no control socket at {path}: is the peer running? (check --socket)")
        raise CtlError(
            f"no control socket at {path}: is the peer running, and is its "
            f"state dir {state_dir}? (pass --state-dir or --socket)"
        )
    except ConnectionRefusedError:
        sock.close()
        # Linux refuses a connection to a file that is not a socket too.
        if not _is_socket(path):
            raise CtlError(f"{path} is not a socket")
        where = "--socket" if state_dir is None else f"--state-dir {state_dir}"
        raise CtlError(
            f"the control socket {path} is stale: no peer is running on it "
            f"(start the peer, or check {where})"
        )
    except PermissionError:
        sock.close()
        raise CtlError(f"permission denied on {path}: run p2ppeer-ctl as the peer's user")
    except OSError as e:
        sock.close()
        if e.errno == errno.ENOTSOCK:
            raise CtlError(f"{path} is not a socket")
        # Some errors (a path too long for a UNIX socket) have no strerror.
        raise CtlError(f"cannot connect to {path}: {e.strerror or e}")
    return sock


def _is_socket(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True  # gone meanwhile: let the caller's message stand


def events_from(sock):
    """
    The events the peer sends, one JSON object per line, until it closes.
    """
    buffer = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError(f"not an event: {line[:80]!r}")
                yield event


class _Screen:
    """
    Writes rendered events.  On a terminal, progress redraws one line in
    place; elsewhere each progress event is a line of its own.
    """

    def __init__(self, out, as_json):
        self._out = out
        self._json = as_json
        self._tty = not as_json and _isatty(out)
        self._open_line = False

    def show(self, event):
        if self._json:
            self._out.write(json.dumps(event) + "\n")
        elif self._tty and event.get("event") == "download-progress":
            [line] = render.render(event)[-1:] or [""]
            self._out.write("\r" + line + "\x1b[K")
            self._open_line = True
        else:
            self.close_line()
            for line in render.render(event):
                self._out.write(line + "\n")
        self._out.flush()

    def close_line(self):
        if self._open_line:
            self._out.write("\n")
            self._open_line = False


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run(argv, out=sys.stdout, err=sys.stderr):
    """
    Run C{p2ppeer-ctl} with C{argv}; returns the exit status.
    """
    if argv[:1] == ["new-group-key"]:
        # Needs no peer: writes a key file (twisted_p2p.group).
        from twisted_p2p.group import new_group_key_main

        return new_group_key_main(argv[1:], out, err)
    args = parse_arguments(argv)
    path = socket_path(args)
    try:
        sock = connect(path, None if args.socket else args.state_dir)
    except CtlError as e:
        err.write(f"p2ppeer-ctl: {e}\n")
        return 2
    watching = args.command == "watch"
    if watching:
        request = {"watch": True}
    else:
        request = {"command": command_line(args), "wait": args.wait}
    screen = _Screen(out, args.json)
    with sock:
        waiting = watching or args.wait
        sock.settimeout(None if waiting else ANSWER_TIMEOUT)
        ok = None
        try:
            # Inside the try: a peer that closes at once (it is stopping)
            # breaks the send, and that is a message, not a traceback.
            sock.sendall(json.dumps(request).encode() + b"\n")
            for event in events_from(sock):
                if event.get("event") == "end":
                    ok = bool(event.get("ok"))
                    continue
                screen.show(event)
        except KeyboardInterrupt:
            screen.close_line()
            return 0 if watching else 1
        except socket.timeout:
            screen.close_line()
            err.write(f"p2ppeer-ctl: the peer did not answer within {ANSWER_TIMEOUT:.0f} s\n")
            return 2
        except (OSError, ValueError) as e:
            screen.close_line()
            err.write(f"p2ppeer-ctl: the connection to the peer broke: {e}\n")
            return 2
        screen.close_line()
    if ok is None:
        if args.command == "stop":
            return 0  # the peer went away, as asked
        if watching:
            err.write("p2ppeer-ctl: the peer stopped\n")
            return 0
        err.write("p2ppeer-ctl: the peer closed the connection before answering (is it stopping?)\n")
        return 2
    return 0 if ok else 1


def main():
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
