"""
L{ConsoleProtocol} on a StringTransport, fed all at once and one byte at a
time.
"""

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p.commands import Commands
from twisted_p2p.console import PLAIN_PROGRESS_INTERVAL, ConsoleProtocol, progress_bar
from twisted_p2p.limits import MAX_COMMAND_LINE

TOO_LONG = f"error: a command is at most {MAX_COMMAND_LINE} bytes"


class FakeCommands:
    """
    Records each command line and answers it with one line.
    """

    def __init__(self):
        self.lines = []

    def run(self, line, say):
        self.lines.append(line)
        say({"event": "test", "text": f"ran {line}"})
        return defer.succeed(None)


def console(commands=None, **kwargs):
    commands = commands or FakeCommands()
    protocol = ConsoleProtocol(commands, **kwargs)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, commands


def output(transport):
    return transport.value().decode("utf-8").splitlines()


def test_lines_are_commands(feed):
    protocol, transport, commands = console()
    feed(protocol, b"list\npeers\n\ndownload my file.txt\n")
    assert commands.lines == ["list", "peers", "", "download my file.txt"]
    assert output(transport) == ["ran list", "ran peers", "ran ", "ran download my file.txt"]


def test_crlf_lines(feed):
    protocol, _, commands = console()
    feed(protocol, b"list\r\npeers\r\n")
    assert commands.lines == ["list", "peers"]


def test_partial_line_waits(feed):
    protocol, _, commands = console()
    feed(protocol, b"lis")
    assert commands.lines == []
    feed(protocol, b"t\n")
    assert commands.lines == ["list"]


def test_utf8_command(feed):
    protocol, _, commands = console()
    feed(protocol, "download café.txt\n".encode("utf-8"))
    assert commands.lines == ["download café.txt"]


def test_invalid_utf8_is_an_error(feed):
    protocol, transport, commands = console()
    feed(protocol, b"download \xff\xfe\nlist\n")
    assert output(transport) == ["error: a command must be UTF-8 text", "ran list"]
    assert commands.lines == ["list"]


def test_over_long_line_is_one_error_and_the_next_command_runs(feed):
    protocol, transport, commands = console()
    feed(protocol, b"x" * (MAX_COMMAND_LINE + 1) + b"\nlist\n")
    assert output(transport) == [TOO_LONG, "ran list"]
    assert commands.lines == ["list"]


def test_very_long_line_in_pieces_is_one_error(feed):
    protocol, transport, commands = console()
    for _ in range(3):
        feed(protocol, b"y" * MAX_COMMAND_LINE)
    feed(protocol, b"yyy\npeers\nlist\n")
    assert output(transport) == [TOO_LONG, "ran peers", "ran list"]
    assert commands.lines == ["peers", "list"]


def test_line_of_exactly_the_limit_runs(feed):
    protocol, transport, commands = console()
    line = b"z" * MAX_COMMAND_LINE
    feed(protocol, line + b"\n")
    assert commands.lines == [line.decode()]


def test_two_over_long_lines_are_two_errors():
    protocol, transport, commands = console()
    long = b"x" * (MAX_COMMAND_LINE + 10)
    protocol.dataReceived(long + b"\n" + long + b"\nhelp\n")
    assert output(transport) == [TOO_LONG, TOO_LONG, "ran help"]


def test_greeting_and_prompt():
    protocol, transport, _ = console(prompt=True, greeting=["hello", "logs go to x"])
    assert transport.value() == b"hello\nlogs go to x\np2p> "
    transport.clear()
    protocol.dataReceived(b"list\n")
    assert transport.value() == b"ran list\np2p> "
    transport.clear()
    protocol.dataReceived(b"\xff\n")
    assert transport.value() == b"error: a command must be UTF-8 text\np2p> "


def test_no_prompt_by_default():
    protocol, transport, _ = console()
    assert transport.value() == b""
    protocol.dataReceived(b"list\n")
    assert transport.value() == b"ran list\n"


def test_end_of_input_detaches_and_stops_nothing():
    protocol, transport, commands = console()
    protocol.readConnectionLost()
    assert protocol.detached
    assert not transport.disconnecting
    assert not transport.disconnected
    assert commands.lines == []
    # Output still goes out: a download finishing later is still reported.
    protocol.say("downloaded x")
    assert transport.value() == b"downloaded x\n"


def test_write_side_gone_writes_nothing():
    protocol, transport, _ = console()
    protocol.writeConnectionLost()
    protocol.dataReceived(b"list\n")
    assert transport.value() == b""


def test_connection_lost_detaches():
    protocol, transport, _ = console()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert protocol.detached
    protocol.say("late")
    assert transport.value() == b""


class ShutdownPeer:
    """
    Just enough of a peer for the real L{Commands}.
    """

    def __init__(self):
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1


def test_with_real_commands(feed):
    peer = ShutdownPeer()
    protocol, transport, _ = console(Commands(peer))
    feed(protocol, b"bogus\r\ndownload\nexit\n")
    assert output(transport) == [
        "error: unknown command 'bogus'; type 'help' for the list",
        "error: download needs an argument: download <file>",
        "bye",
    ]
    assert peer.shutdowns == 1


def test_end_of_input_with_real_commands_does_not_shut_down():
    peer = ShutdownPeer()
    protocol, transport, _ = console(Commands(peer))
    protocol.dataReceived(b"help")  # no newline before the end of input
    protocol.readConnectionLost()
    assert peer.shutdowns == 0
    assert transport.value() == b""


# -- download progress -----------------------------------------------------------


def progress(percent, file_id="f1", name="big.bin", rate=1 << 20, eta=7):
    return {
        "event": "download-progress",
        "text": f"download {name}: {percent}% of 64.0 MiB at 1.0 MiB/s from 2 peer(s)",
        "file": name, "id": file_id, "percent": percent, "rate": rate,
        "sources": 2, "eta": eta,
    }


def test_progress_bar_text():
    assert progress_bar([progress(50)]) == (
        "big.bin [############------------] 50% 1.0 MiB/s from 2 peer(s), 7 s left"
    )
    assert progress_bar([progress(5, "f1"), progress(80, "f2", "other.iso")]) == (
        "big.bin 5% 1.0 MiB/s | other.iso 80% 1.0 MiB/s"
    )


def test_on_a_terminal_the_bar_is_redrawn_in_place_above_the_prompt():
    protocol, transport, _ = console(prompt=True)
    transport.clear()
    protocol.emit(progress(10))
    first = transport.value()
    # Drawn once on the prompt's line, and the prompt below it.
    assert first == b"\r\x1b[K" + progress_bar([progress(10)]).encode() + b"\np2p> "
    transport.clear()
    protocol.emit(progress(20))
    # Then only redrawn where it is: cursor saved, up one line, restored.
    assert transport.value() == (
        b"\x1b7\x1b[1A\r\x1b[K" + progress_bar([progress(20)]).encode() + b"\x1b8"
    )
    transport.clear()
    # A line for the user goes above the bar, which is drawn again below it.
    protocol.emit({"event": "download-finished", "id": "f1", "text": "downloaded big.bin"})
    assert transport.value() == b"\r\x1b[K\x1b[1A\r\x1b[Kdownloaded big.bin\np2p> "


def test_a_bar_stays_while_another_download_ends():
    protocol, transport, _ = console(prompt=True)
    protocol.emit(progress(10, "f1"))
    protocol.emit(progress(30, "f2", "other.iso"))
    transport.clear()
    protocol.emit({"event": "download-failed", "id": "f2", "text": "error: no room"})
    assert transport.value() == (
        b"\r\x1b[K\x1b[1A\r\x1b[Kerror: no room\n"
        + progress_bar([progress(10, "f1")]).encode() + b"\np2p> "
    )


def test_after_a_command_the_bar_is_drawn_anew():
    protocol, transport, _ = console(prompt=True)
    protocol.emit(progress(10))
    protocol.dataReceived(b"list\n")
    transport.clear()
    protocol.emit(progress(20))
    # The old bar scrolled up with the command: a new one, not a redraw.
    assert transport.value().startswith(b"\r\x1b[K" + progress_bar([progress(20)]).encode())


def test_on_a_pipe_progress_is_a_plain_line_every_few_seconds():
    clock = task.Clock()
    protocol, transport, _ = console(clock=clock)
    for second in range(12):
        protocol.emit(progress(second))
        protocol.emit(progress(second, "f2", "other.iso"))
        clock.advance(1)
    lines = output(transport)
    shown = 12 // PLAIN_PROGRESS_INTERVAL + 1
    assert len([line for line in lines if "big.bin" in line]) == shown
    assert len([line for line in lines if "other.iso" in line]) == shown
    assert lines[0] == progress(0)["text"]
    assert b"\x1b" not in transport.value()
