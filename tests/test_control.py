"""
L{ControlProtocol}: one JSON request line in, the command's events out as
JSON lines, then an C{end} line and the close.  On a StringTransport, fed all
at once and one byte at a time, with a fake command layer whose Deferred the
test fires; and once on a real UNIX socket, with C{p2ppeer-ctl} as the client.
"""

import io
import json
import os
import stat

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from twisted_p2p import control, ctl, events
from twisted_p2p.limits import MAX_CONTROL_WAITING

LIST = events.event("list", "NAME  SIZE", files=[])
STARTED = events.event("download-started", "downloading big.bin", file="big.bin")
PROGRESS = events.event("download-progress", "big.bin 50%", file="big.bin", percent=50)
DONE = events.event("download-done", "big.bin done", file="big.bin")
END_OK = {"event": "end", "ok": True}
END_FAILED = {"event": "end", "ok": False}


class FakeCommands:
    """
    The command layer as the control socket sees it: C{run(line, emit)}
    records the line, emits C{immediately} at once, and returns a Deferred
    the test fires (or an already-fired one with C{fire_at_once}).
    """

    def __init__(self, immediately=(), fire_at_once=False):
        self.lines = []
        self.emits = []
        self.deferreds = []
        self._immediately = list(immediately)
        self._fire_at_once = fire_at_once

    def run(self, line, emit, origin=None):
        self.lines.append(line)
        self.emits.append(emit)
        for event in self._immediately:
            emit(event)
        if self._fire_at_once:
            return defer.succeed(None)
        d = defer.Deferred()
        self.deferreds.append(d)
        return d

    @property
    def emit(self):
        """
        The emit function of the one command run so far.
        """
        [emit] = self.emits
        return emit

    @property
    def deferred(self):
        [d] = self.deferreds
        return d


class BrokenCommands:
    """
    A command layer with a bug: its Deferred fails with something that is
    not an event.
    """

    def run(self, line, emit, origin=None):
        emit(LIST)
        return defer.fail(ZeroDivisionError("division by zero"))


class RaisingCommands:
    """
    A command layer with a worse bug: C{run} raises instead of returning.
    """

    def run(self, line, emit, origin=None):
        raise ZeroDivisionError("division by zero")


def connect(commands, clock=None, hub=None):
    """
    A L{ControlProtocol} from a L{ControlFactory}, connected to a
    StringTransport, its timeouts on C{clock}.
    """
    protocol = control.ControlFactory(commands, hub).buildProtocol(None)
    protocol.callLater = (clock or task.Clock()).callLater
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def request(command, **fields):
    return json.dumps(dict(fields, command=command)).encode("utf-8") + b"\n"


def sent(transport):
    """
    What the protocol wrote, as a list of events: every line must be JSON and
    the last one complete.
    """
    data = transport.value()
    if not data:
        return []
    assert data.endswith(b"\n"), data
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def malformed_error(detail):
    return events.error(f"a request must be a JSON object with a command ({detail})")


# --- one request, its events, the end ---


def test_events_then_end(feed):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, request("list"))
    assert commands.lines == ["list"]
    assert sent(transport) == []
    assert not transport.disconnecting  # the command is not over yet

    commands.emit(LIST)
    commands.emit(events.event("help", "line one\nline two"))
    assert sent(transport) == [LIST, {"event": "help", "text": "line one\nline two"}]
    assert not transport.disconnecting

    commands.deferred.callback(None)
    assert sent(transport) == [LIST, {"event": "help", "text": "line one\nline two"}, END_OK]
    assert transport.disconnecting


def test_each_event_is_one_line(feed):
    """
    A multi-line text stays inside its JSON line: newlines are escaped.
    """
    protocol, transport = connect(FakeCommands([events.event("help", "a\nb\nc")], fire_at_once=True))
    feed(protocol, request("help"))
    assert transport.value().count(b"\n") == 2
    assert sent(transport) == [{"event": "help", "text": "a\nb\nc"}, END_OK]


def test_command_answered_at_once(feed):
    protocol, transport = connect(FakeCommands([LIST], fire_at_once=True))
    feed(protocol, request("list"))
    assert sent(transport) == [LIST, END_OK]
    assert transport.disconnecting


def test_command_with_no_events(feed):
    protocol, transport = connect(FakeCommands(fire_at_once=True))
    feed(protocol, request(""))
    assert sent(transport) == [END_OK]
    assert transport.disconnecting


def test_non_ascii_command_and_text(feed):
    commands = FakeCommands([events.event("x", "café ✓")], fire_at_once=True)
    protocol, transport = connect(commands)
    feed(protocol, json.dumps({"command": "download café.txt"}, ensure_ascii=False).encode() + b"\n")
    assert commands.lines == ["download café.txt"]
    assert sent(transport) == [{"event": "x", "text": "café ✓"}, END_OK]


def test_crlf_request(feed):
    commands = FakeCommands(fire_at_once=True)
    protocol, transport = connect(commands)
    feed(protocol, b'{"command": "peers"}\r\n')
    assert commands.lines == ["peers"]
    assert sent(transport) == [END_OK]


@pytest.mark.parametrize(
    "failure",
    [
        events.error("no known peer offers 'x'"),
        events.event("download-failed", "big.bin failed", file="big.bin"),
        events.event("download-cancelled", "big.bin cancelled", file="big.bin"),
    ],
    ids=["error", "download-failed", "download-cancelled"],
)
def test_failure_event_makes_ok_false(feed, failure):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, request("download x", wait=True))
    commands.emit(PROGRESS)
    commands.emit(failure)
    commands.emit(PROGRESS)  # a later success does not undo the failure
    commands.deferred.callback(None)
    assert sent(transport) == [PROGRESS, failure, PROGRESS, END_FAILED]


def test_failing_command_deferred_ends_not_ok(feed):
    """
    A command whose Deferred fails (a bug in the command layer) still ends
    the conversation, and not with ok true: the client must not report
    success for a command that blew up.
    """
    protocol, transport = connect(BrokenCommands())
    feed(protocol, request("list"))
    lines = sent(transport)
    assert lines[0] == LIST
    assert lines[1]["event"] == "error"
    assert lines[1]["message"] == "the command failed unexpectedly; see the peer's log"
    assert lines[2:] == [END_FAILED]
    assert transport.disconnecting


def test_raising_command_ends_not_ok(feed):
    protocol, transport = connect(RaisingCommands())
    feed(protocol, request("list"))
    lines = sent(transport)
    assert [line["event"] for line in lines] == ["error", "end"]
    assert lines[-1] == END_FAILED
    assert transport.disconnecting


# --- download, with and without --wait ---


@pytest.mark.parametrize("command", ["download big.bin", "get big.bin", "DOWNLOAD big.bin", "  Get big.bin  "])
def test_download_without_wait_ends_when_started(feed, command):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, request(command, wait=False))
    commands.emit(events.event("info", "asking 2 peers"))
    assert not transport.disconnecting
    commands.emit(STARTED)
    assert sent(transport) == [{"event": "info", "text": "asking 2 peers"}, STARTED, END_OK]
    assert transport.disconnecting
    assert not commands.deferred.called  # the download goes on in the peer

    # Later events and the download's end are not written.
    commands.emit(PROGRESS)
    commands.emit(events.event("download-failed", "big.bin failed"))
    commands.deferred.callback(None)
    assert sent(transport) == [{"event": "info", "text": "asking 2 peers"}, STARTED, END_OK]


def test_download_without_wait_is_the_default(feed):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, request("download big.bin"))
    commands.emit(STARTED)
    assert sent(transport) == [STARTED, END_OK]
    assert transport.disconnecting


def test_download_without_wait_that_fails_to_start(feed):
    commands = FakeCommands([events.error("no known peer offers 'x'")], fire_at_once=True)
    protocol, transport = connect(commands)
    feed(protocol, request("download x"))
    assert sent(transport) == [events.error("no known peer offers 'x'"), END_FAILED]
    assert transport.disconnecting


def test_download_with_wait_streams_until_done(feed):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, request("download big.bin", wait=True))
    commands.emit(STARTED)
    commands.emit(PROGRESS)
    assert sent(transport) == [STARTED, PROGRESS]
    assert not transport.disconnecting
    commands.emit(DONE)
    assert not transport.disconnecting
    commands.deferred.callback(None)
    assert sent(transport) == [STARTED, PROGRESS, DONE, END_OK]
    assert transport.disconnecting


def test_other_commands_do_not_end_at_download_started(feed):
    """
    Only a download ends at "download-started"; "status" (say) waits for its
    Deferred even if such an event went by.
    """
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, request("status"))
    commands.emit(STARTED)
    assert not transport.disconnecting
    commands.deferred.callback(None)
    assert sent(transport) == [STARTED, END_OK]


# --- malformed requests ---


@pytest.mark.parametrize(
    "line, detail",
    [
        (b"[1, 2]", "not an object"),
        (b'"list"', "not an object"),
        (b"null", "not an object"),
        (b"{}", "command must be text and wait true or false"),
        (b'{"command": 1}', "command must be text and wait true or false"),
        (b'{"command": ["list"]}', "command must be text and wait true or false"),
        (b'{"command": "list", "wait": "yes"}', "command must be text and wait true or false"),
        (b'{"command": "list", "wait": 1}', "command must be text and wait true or false"),
        (b'{"command": "list", "wait": null}', "command must be text and wait true or false"),
    ],
)
def test_malformed_request(feed, line, detail):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, line + b"\n")
    assert commands.lines == []
    assert sent(transport) == [malformed_error(detail), END_FAILED]
    assert transport.disconnecting


@pytest.mark.parametrize("line", [b"list", b"{command: list}", b'{"command": "list"', b""])
def test_request_not_json(feed, line):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, line + b"\n")
    assert commands.lines == []
    [error, end] = sent(transport)
    assert error["event"] == "error"
    assert error["message"].startswith("a request must be a JSON object with a command (")
    assert "Expecting" in error["message"]
    assert end == END_FAILED
    assert transport.disconnecting


def test_request_not_utf8(feed):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, b'{"command": "download caf\xe9.txt"}\n')
    assert commands.lines == []
    [error, end] = sent(transport)
    assert error["event"] == "error"
    assert error["message"].startswith("a request must be a JSON object with a command (")
    assert "can't decode byte 0xe9" in error["message"]
    assert end == END_FAILED
    assert transport.disconnecting


# --- limits ---


def test_over_long_line_drops_the_connection(feed):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, b"x" * (protocol.MAX_LENGTH + 1) + b"\n")
    assert commands.lines == []
    assert transport.value() == b""
    assert transport.disconnecting


def test_over_long_line_without_newline_drops_the_connection(feed):
    """
    A client that never sends a newline cannot make the peer buffer forever.
    """
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, b"x" * (protocol.MAX_LENGTH + 1))
    assert commands.lines == []
    assert transport.value() == b""
    assert transport.disconnecting


def test_longest_request_is_accepted(feed):
    """
    A request line of exactly MAX_LENGTH bytes still counts, and the limit
    leaves room for the longest console command in its JSON envelope.
    """
    commands = FakeCommands(fire_at_once=True)
    protocol, transport = connect(commands)
    envelope = len(request("", wait=True))  # includes the newline
    command = "x" * (protocol.MAX_LENGTH - envelope + 1)
    line = request(command, wait=True)
    assert len(line) == protocol.MAX_LENGTH + 1
    assert len(command) >= control.MAX_COMMAND_LINE
    feed(protocol, line)
    assert commands.lines == [command]
    assert sent(transport) == [END_OK]


def test_second_request_on_a_connection_is_ignored(feed):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, request("download big.bin", wait=True) + request("stop"))
    assert commands.lines == ["download big.bin"]
    commands.emit(DONE)
    feed(protocol, request("stop"))
    assert commands.lines == ["download big.bin"]
    commands.deferred.callback(None)
    assert sent(transport) == [DONE, END_OK]


def test_second_request_after_a_finished_one_is_ignored(feed):
    commands = FakeCommands(fire_at_once=True)
    protocol, transport = connect(commands)
    feed(protocol, request("list") + request("stop"))
    assert commands.lines == ["list"]
    assert sent(transport) == [END_OK]


def test_second_request_after_a_malformed_one_is_ignored(feed):
    commands = FakeCommands(fire_at_once=True)
    protocol, transport = connect(commands)
    feed(protocol, b"nonsense\n" + request("stop"))
    assert commands.lines == []
    assert [line["event"] for line in sent(transport)] == ["error", "end"]


# --- timeout ---


def test_no_request_in_time_aborts():
    clock = task.Clock()
    commands = FakeCommands()
    protocol, transport = connect(commands, clock)
    clock.advance(control.REQUEST_TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnected  # aborted, not closed politely
    assert transport.value() == b""
    assert commands.lines == []


def test_partial_request_in_time_still_aborts():
    """
    Trickling bytes does not keep a connection alive: the whole request must
    arrive within the timeout.
    """
    clock = task.Clock()
    protocol, transport = connect(FakeCommands(), clock)
    for byte in b'{"command": "download big.bin", "wait"':
        protocol.dataReceived(bytes([byte]))
        clock.advance(control.REQUEST_TIMEOUT / 20)
    assert transport.disconnected
    assert transport.value() == b""


def test_idle_connections_past_the_cap_close_the_longest_waiting():
    """
    Many idle connections cannot keep p2ppeer-ctl out: past
    L{MAX_CONTROL_WAITING} the one that waited longest goes, and one that
    sent its request (a watch, a download with --wait) is never counted.
    """
    commands = FakeCommands(fire_at_once=True)
    factory = control.ControlFactory(commands)
    clock = task.Clock()

    def client():
        protocol = factory.buildProtocol(None)
        protocol.callLater = clock.callLater
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    watching = client()
    watching[0].dataReceived(request("status", wait=True))
    idle = [client() for _ in range(MAX_CONTROL_WAITING)]
    assert not any(t.disconnecting for _, t in idle)
    ctl_protocol, ctl_transport = client()
    assert idle[0][1].disconnected and not idle[1][1].disconnecting
    assert not watching[1].disconnected
    ctl_protocol.dataReceived(request("status"))
    assert sent(ctl_transport)[-1] == END_OK
    assert factory.closed_waiting == 1
    # A connection that went away is not counted any more.
    for protocol, _ in idle[1:]:
        protocol.connectionLost(None)
    assert len(factory._waiting) == 0


def test_request_in_time_cancels_the_timeout():
    """
    Once the request is in, a long download with --wait is not cut off.
    """
    clock = task.Clock()
    commands = FakeCommands()
    protocol, transport = connect(commands, clock)
    clock.advance(control.REQUEST_TIMEOUT - 1)
    protocol.dataReceived(request("download big.bin", wait=True))
    assert clock.getDelayedCalls() == []
    clock.advance(control.REQUEST_TIMEOUT * 100)
    assert not transport.disconnecting
    commands.deferred.callback(None)
    assert sent(transport) == [END_OK]


def test_connection_lost_cancels_the_timeout_and_silences_events():
    clock = task.Clock()
    commands = FakeCommands()
    protocol, transport = connect(commands, clock)
    protocol.dataReceived(request("download big.bin", wait=True))
    protocol.connectionLost(None)
    commands.emit(PROGRESS)
    commands.deferred.callback(None)
    assert transport.value() == b""
    assert clock.getDelayedCalls() == []

    protocol, transport = connect(FakeCommands(), clock)
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


# --- a real UNIX socket ---


def socket_dir(tmp_path):
    """
    A folder whose control socket path fits in a sockaddr_un.
    """
    if len(str(tmp_path / control.SOCKET_NAME)) < 100:
        return tmp_path
    import tempfile

    return tempfile.mkdtemp(prefix="p2pctl")


@pytest_twisted.ensureDeferred
async def test_real_unix_socket(tmp_path):
    from twisted.internet import reactor

    path = os.path.join(socket_dir(tmp_path), control.SOCKET_NAME)
    commands = FakeCommands([LIST], fire_at_once=True)
    endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
    port = await endpoint.listen(control.ControlFactory(commands))
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        # wantPID: a lock (a symlink naming our pid) tells a live socket from a stale one.
        assert os.readlink(path + ".lock") == str(os.getpid())

        out, err = io.StringIO(), io.StringIO()
        status = await deferToThread(ctl.run, ["--socket", path, "--json", "list"], out, err)
        assert (status, err.getvalue()) == (0, "")
        assert [json.loads(line) for line in out.getvalue().splitlines()] == [LIST]
        assert commands.lines == ["list"]
    finally:
        await port.stopListening()
    assert not os.path.lexists(path)
    assert not os.path.lexists(path + ".lock")


def test_download_of_several_files_without_wait_ends_when_all_started(feed):
    commands = FakeCommands()
    protocol, transport = connect(commands)
    feed(protocol, request("download *.jpg"))
    asked = events.event("download-requested", files=[
        {"file": "a.jpg", "id": "a1", "sources": 1}, {"file": "b.jpg", "id": "b1", "sources": 1},
    ])
    commands.emit(asked)
    commands.emit(events.event("download-started", file="a.jpg", id="a1"))
    assert not transport.disconnecting
    commands.emit(events.event("download-failed", file="b.jpg", id="b1", reason="no"))
    assert transport.disconnecting
    assert sent(transport)[-1] == END_FAILED


def test_the_command_layer_is_told_which_face_asks(feed):
    commands = FakeCommands()
    seen = []
    commands.run = lambda line, emit, origin=None: seen.append(origin) or defer.succeed(None)
    protocol, _ = connect(commands)
    feed(protocol, request("status"))
    assert seen == [protocol]
    assert protocol.face == "p2ppeer-ctl" and not protocol.interactive


def test_watch_streams_the_hub_until_the_client_leaves(feed):
    hub = events.EventHub()
    commands = FakeCommands()
    protocol, transport = connect(commands, hub=hub)
    feed(protocol, b'{"watch": true}\n')
    joined = events.event("peer-joined", peer="192.0.2.2:7000", name=None, id="a" * 32)
    hub.publish(joined)
    hub.publish(PROGRESS)
    assert sent(transport) == [joined, PROGRESS]
    assert not transport.disconnecting
    assert commands.lines == []
    protocol.connectionLost(None)
    assert len(hub) == 0


def test_watch_without_a_hub(feed):
    protocol, transport = connect(FakeCommands())
    feed(protocol, b'{"watch": true}\n')
    assert [e["event"] for e in sent(transport)] == ["error", "end"]
