"""
L{ConsoleProtocol} on a StringTransport, fed all at once and one byte at a
time.
"""

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p.commands import Commands
from twisted_p2p.console import ConsoleProtocol
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
