"""
The consoles: L{LineConsole} on a StringTransport, fed all at once and one
byte at a time; L{TerminalConsole} on an in-memory terminal
(L{insults.helper.TerminalBuffer}), keystroke by keystroke, checked by what
the screen shows rather than by escape sequences.
"""

from hypothesis import given
from hypothesis import strategies as st
from support import CommandParts
from twisted.conch.insults import helper
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_p2p import events
from twisted_p2p.catalog import Offer
from twisted_p2p.console import PLAIN_PROGRESS_INTERVAL, LineConsole, TerminalConsole
from twisted_p2p.limits import MAX_COMMAND_LINE
from twisted_p2p.manifest import Manifest
from twisted_p2p.peers import Peer
from twisted_p2p.render import progress_bar
from twisted_p2p.version import version

TOO_LONG = f"error: a command is at most {MAX_COMMAND_LINE} bytes"


class FakeCommands:
    """
    Records each command line and answers it with one line.
    """

    def __init__(self):
        self.lines = []

    def run(self, line, say, origin=None):
        self.lines.append(line)
        say({"event": "test", "text": f"ran {line}"})
        return defer.succeed(None)


def console(commands=None, **kwargs):
    commands = commands or FakeCommands()
    protocol = LineConsole(commands, **kwargs)
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


def test_with_real_commands(feed):
    parts = CommandParts()
    protocol, transport, _ = console(parts.commands)
    feed(protocol, b"bogus\r\ndownload\nexit\n")
    assert output(transport) == [
        "error: unknown command 'bogus'; type 'help' for the list",
        "error: download needs an argument: download FILE... [--folder] [--from PEER]",
        "bye",
    ]
    assert parts.shutdowns == 1


def test_end_of_input_says_so_and_does_not_shut_down():
    parts = CommandParts()
    protocol, transport, _ = console(parts.commands, stop_hint=("p2ppeer-ctl --state-dir /s stop", 4321))
    protocol.dataReceived(b"help")  # no newline before the end of input
    protocol.readConnectionLost()
    assert parts.shutdowns == 0
    assert output(transport) == [
        "console input closed; the peer keeps running: stop it with "
        "'p2ppeer-ctl --state-dir /s stop' or kill 4321"
    ]




# -- what the peer says on its own ------------------------------------------------


def progress(percent, file_id="f1", name="big.bin", rate=1 << 20, eta=7):
    return events.event(
        "download-progress", file=name, id=file_id, percent=percent, rate=rate,
        bytes=(64 << 20) * percent // 100, size=64 << 20, sources=2, eta=eta,
    )


JOINED = events.event("peer-joined", peer="192.0.2.2:7000", name="alice", id="a" * 32)
UPLOAD = events.event("upload-finished", peer="192.0.2.2:7000", file="big.bin",
                      bytes=64 << 20, seconds=4.0)


def test_hub_events_are_lines_on_a_pipe():
    hub = events.EventHub()
    protocol, transport, _ = console(hub=hub)
    hub.publish(JOINED)
    hub.publish(UPLOAD)
    hub.publish(events.event("peer-left", peer="192.0.2.2:7000", name="alice", reason="said goodbye"))
    assert output(transport) == [
        "peer alice (192.0.2.2:7000) joined",
        "sent big.bin to 192.0.2.2:7000: 64.0 MiB in 4.00 s (16.0 MiB/s)",
        "peer alice (192.0.2.2:7000) left (said goodbye)",
    ]


def test_quiet_leaves_out_the_notices():
    hub = events.EventHub()
    protocol, transport, _ = console(hub=hub, quiet=True)
    hub.publish(JOINED)
    hub.publish(UPLOAD)
    hub.publish(events.event("upload-started", peer="192.0.2.2:7000", file="big.bin"))
    hub.publish(events.event("download-finished", file="x", id="i", path="downloads/x",
                             size=10, seconds=1.0, rate=10))
    assert output(transport) == ["downloaded x to downloads/x: 10 B in 1.00 s (10 B/s)"]


def test_a_console_that_went_away_stops_listening():
    hub = events.EventHub()
    protocol, transport, _ = console(hub=hub)
    assert len(hub) == 1
    protocol.connectionLost(Failure(ConnectionDone()))
    assert len(hub) == 0


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
    assert lines[0] == "download big.bin: 0% (0 B of 64.0 MiB) at 1.0 MiB/s from 2 peers, 7 s left"
    assert b"\x1b" not in transport.value()


def test_progress_says_waiting_rather_than_zero_bytes_a_second():
    from twisted_p2p.render import render

    first = progress(0, rate=0, eta=None)
    assert render(first) == ["download big.bin: 0% (0 B of 64.0 MiB), waiting for data from 2 peers"]
    assert "waiting" in progress_bar([first])


def test_progress_bar_text():
    assert progress_bar([progress(50, eta=90)], 200) == (
        "big.bin [############------------] 50% 32.0 MiB/64.0 MiB 1.0 MiB/s from 2 peers, "
        "1 min 30 s left"
    )
    assert progress_bar([progress(5, "f1"), progress(80, "f2", "other.iso")]) == (
        "big.bin 5% 1.0 MiB/s | other.iso 80% 1.0 MiB/s"
    )
    assert len(progress_bar([progress(50)], 40)) == 40


# -- the terminal console ----------------------------------------------------------


def manifest_of(size, seed):
    count = (size + 256 * 1024 - 1) // (256 * 1024)
    return Manifest.build(size, [bytes([seed, i]) * 16 for i in range(count)])


ALICE = Peer("a1" * 16, "0" * 16, "192.0.2.2", 27000, 7000, "0" * 16, last_seen=97.0)
FILES = {
    "my holiday photo.jpg": manifest_of(3000, 1),
    "my holiday video.mp4": manifest_of(9000, 2),
    "notes.txt": manifest_of(100, 3),
    "beach.jpg": manifest_of(5000, 4),
}


def parts():
    return CommandParts(
        offers=[Offer(m.file_id, name, m.size, (ALICE,)) for name, m in FILES.items()],
        peers=[ALICE],
    )


class Screen:
    """
    A L{TerminalConsole} on an in-memory terminal, and what it shows.
    """

    def __init__(self, parts=None, **kwargs):
        self.parts = parts or globals()["parts"]()
        self.terminal = helper.TerminalBuffer()
        self.terminal.width = 160  # every line here fits on one row
        self.terminal.connectionMade()
        kwargs.setdefault("size", lambda: (self.terminal.width, self.terminal.height))
        self.console = TerminalConsole(self.parts.commands, **kwargs)
        self.console.makeConnection(self.terminal)

    def type(self, text):
        for byte in text.encode("utf-8"):
            self.console.keystrokeReceived(bytes([byte]), None)

    def key(self, name):
        self.console.keystrokeReceived(getattr(self.terminal, name), None)

    def enter(self, text=""):
        self.type(text)
        self.console.keystrokeReceived(b"\r", None)

    def lines(self):
        """The screen's lines, down to the cursor's, without trailing blanks."""
        shown = bytes(self.terminal).decode("utf-8").split("\n")
        return [line.rstrip() for line in shown[: self.terminal.y + 1]]

    @property
    def input_line(self):
        return self.lines()[-1]

    @property
    def typed(self):
        """What the line being edited holds, trailing spaces and all."""
        return b"".join(self.console.lineBuffer).decode("utf-8")

    def started(self):
        return [s[0] for s in self.parts.downloads.started]


def test_greeting_then_the_prompt():
    screen = Screen(greeting=["hello", "logs go to x"])
    assert screen.lines() == ["hello", "logs go to x", "p2p>"]


def test_a_command_and_its_answer_stay_on_the_screen():
    screen = Screen()
    screen.enter("version")
    lines = screen.lines()
    assert lines[-3:-1] == ["p2p> version", f"twisted-p2p {version()}"]
    assert lines[-1] == "p2p>"


def test_history_with_the_arrow_keys():
    screen = Screen()
    screen.enter("peers")
    screen.enter("list *.jpg")
    screen.key("UP_ARROW")
    assert screen.input_line == "p2p> list *.jpg"
    screen.key("UP_ARROW")
    assert screen.input_line == "p2p> peers"
    screen.key("DOWN_ARROW")
    assert screen.input_line == "p2p> list *.jpg"
    screen.enter()
    # The recalled command ran again.
    assert screen.lines()[-4:-1] == [
        "NAME                  SIZE     ID        WHERE",
        f"beach.jpg             4.9 KiB  {FILES['beach.jpg'].file_id[:8]}  192.0.2.2:7000",
        f"my holiday photo.jpg  2.9 KiB  {FILES['my holiday photo.jpg'].file_id[:8]}  192.0.2.2:7000",
    ]


def test_tab_completes_a_command():
    screen = Screen()
    screen.type("dow")
    screen.key("TAB")
    assert screen.input_line == "p2p> download"


def test_tab_completes_a_file_name_and_quotes_it():
    screen = Screen()
    screen.type("download my")
    screen.key("TAB")
    # Both names start "my holiday ": completed as far as they agree.
    assert screen.typed == "download 'my holiday "
    screen.key("TAB")
    # Still two: they are listed above the prompt.
    assert screen.lines()[-2] == "'my holiday photo.jpg'  'my holiday video.mp4'"
    assert screen.typed == "download 'my holiday "
    screen.type("p")
    screen.key("TAB")
    assert screen.typed == "download 'my holiday photo.jpg' "
    screen.enter()
    assert screen.started() == ["my holiday photo.jpg"]


def test_tab_completes_a_plain_name():
    screen = Screen()
    screen.type("download be")
    screen.key("TAB")
    assert screen.typed == "download beach.jpg "


def test_a_quoted_name_with_spaces():
    screen = Screen()
    screen.enter('download "my holiday video.mp4"')
    assert screen.started() == ["my holiday video.mp4"]


def test_a_pattern_download():
    screen = Screen()
    screen.enter("download *.jpg")
    assert screen.started() == ["beach.jpg", "my holiday photo.jpg"]
    assert screen.lines()[-2] == "downloading 2 files: beach.jpg, my holiday photo.jpg"


def test_list_pattern():
    screen = Screen()
    screen.enter("list video")
    assert screen.lines()[-3:] == [
        "NAME                  SIZE     ID        WHERE",
        f"my holiday video.mp4  8.8 KiB  {FILES['my holiday video.mp4'].file_id[:8]}  192.0.2.2:7000",
        "p2p>",
    ]


def test_a_line_that_arrives_while_typing_goes_above_the_prompt():
    hub = events.EventHub()
    screen = Screen(hub=hub)
    screen.type("downl")
    hub.publish(JOINED)
    assert screen.lines()[-2:] == ["peer alice (192.0.2.2:7000) joined", "p2p> downl"]
    screen.type("oad beach.jpg")
    screen.enter()
    assert screen.started() == ["beach.jpg"]


def test_the_bar_is_above_the_prompt_and_redrawn_in_place():
    screen = Screen()
    screen.type("sta")
    screen.console.emit(progress(10))
    assert screen.lines()[-2:] == [progress_bar([progress(10)], 159), "p2p> sta"]
    height = len(screen.lines())
    screen.console.emit(progress(20))
    assert screen.lines()[-2:] == [progress_bar([progress(20)], 159), "p2p> sta"]
    assert len(screen.lines()) == height
    # A line for the user goes above the bar.
    screen.console.emit(events.event("peer-banned", peer="192.0.2.9:7000", strikes=3))
    assert screen.lines()[-3:] == [
        "192.0.2.9:7000 sent bad data 3 times and is banned for this session",
        progress_bar([progress(20)], 159),
        "p2p> sta",
    ]
    # The end of the download takes the bar away.
    screen.console.emit(events.event("download-finished", file="big.bin", id="f1",
                                     path="downloads/big.bin", size=64 << 20, seconds=3.0,
                                     rate=(64 << 20) // 3))
    assert screen.lines()[-2:] == [
        "downloaded big.bin to downloads/big.bin: 64.0 MiB in 3.00 s (21.3 MiB/s)", "p2p> sta"
    ]


def test_the_cursor_stays_where_the_user_left_it():
    screen = Screen()
    screen.type("lst")
    screen.key("LEFT_ARROW")
    screen.key("LEFT_ARROW")
    screen.console.emit(progress(10))
    screen.type("i")
    assert screen.input_line == "p2p> list"


def test_ctrl_c_leaves_at_once():
    screen = Screen()
    screen.parts.uploads = 3
    screen.type("peer")
    screen.console.keystrokeReceived(b"\x03", None)
    assert screen.lines()[-3:] == ["p2p> ^C", "bye", ""]
    assert screen.parts.shutdowns == 1


def test_exit_asks_first_while_uploading():
    screen = Screen()
    screen.parts.uploads = 1
    screen.enter("exit")
    assert screen.lines()[-2].startswith("leaving now interrupts 1 upload")
    assert screen.parts.shutdowns == 0
    screen.enter("exit")
    assert screen.parts.shutdowns == 1


def test_ctrl_d_on_an_empty_line_says_how_to_leave():
    screen = Screen()
    screen.console.keystrokeReceived(b"\x04", None)
    assert screen.lines()[-2:] == [
        "Ctrl-D: this console stays open and the peer keeps running; type exit (or press "
        "Ctrl-C) to stop it",
        "p2p>",
    ]
    assert screen.parts.shutdowns == 0


def test_utf8_is_typed_whole():
    screen = Screen()
    names = []
    screen.parts.commands.run = lambda line, emit, origin=None: names.append(line) or defer.succeed(None)
    screen.enter("download café.txt")
    assert names == ["download café.txt"]


def test_tab_after_resume_offers_the_stopped_downloads_only(tmp_path):
    from twisted_p2p.partials import PartialDownloads

    record = PartialDownloads()
    m = FILES["my holiday video.mp4"]
    record.observe(events.event("download-started", file="my holiday video.mp4", id=m.file_id,
                                size=m.size, chunks=1, sources=1, resumed=0))
    record.observe(events.event("download-progress", file="my holiday video.mp4", id=m.file_id,
                                percent=40))
    record.observe(events.event("download-stopped", file="my holiday video.mp4", id=m.file_id))
    p = parts()
    p.commands._partials = record
    screen = Screen(p)
    screen.type("resume my")
    screen.key("TAB")
    assert screen.typed == "resume 'my holiday video.mp4' "
    screen.console.keystrokeReceived(b"\x15", None)
    screen.type("cancel ")
    screen.key("TAB")
    assert screen.typed == "cancel "  # nothing is being downloaded


def test_a_resumed_download_closes_with_the_rate_of_what_was_fetched():
    from twisted_p2p.render import render

    finished = events.event("download-finished", file="big.bin", id="i", path="downloads/big.bin",
                            size=32 << 20, seconds=2.0, rate=16 << 20, resumed=16 << 20)
    assert render(finished) == [
        "downloaded big.bin to downloads/big.bin: 32.0 MiB in 2.00 s "
        "(8.0 MiB/s; 16.0 MiB was already here)"
    ]


# -- folders ---------------------------------------------------------------------

TREE = {
    "photos/2026/a b.jpg": manifest_of(1000, 11),
    "photos/2026/été.jpg": manifest_of(2000, 12),
    "photos/old/c.jpg": manifest_of(3000, 13),
    "phone.txt": manifest_of(10, 14),
}


def tree_parts():
    return CommandParts(
        offers=[Offer(m.file_id, name, m.size, (ALICE,)) for name, m in TREE.items()],
        peers=[ALICE],
    )


def test_tab_completes_a_folder_then_goes_into_it():
    screen = Screen(tree_parts())
    screen.type("download pho")
    screen.key("TAB")
    # "phone.txt" and "photos/": as far as they agree.
    assert screen.typed == "download phon" or screen.typed == "download pho"
    screen.type("t")
    screen.key("TAB")
    assert screen.typed == "download photos/"
    screen.key("TAB")
    assert screen.lines()[-2] == "photos/2026/  photos/old/"
    screen.type("2")
    screen.key("TAB")
    assert screen.typed == "download photos/2026/"
    screen.type("a")
    screen.key("TAB")
    assert screen.typed == "download 'photos/2026/a b.jpg' "


def test_a_folder_download_from_the_console():
    screen = Screen(tree_parts())
    screen.enter("download photos/")
    assert sorted(screen.started()) == ["photos/2026/a b.jpg", "photos/2026/été.jpg",
                                        "photos/old/c.jpg"]
    assert screen.lines()[-2] == "downloading folder photos/ (3 files, 5.9 KiB) into photos/"


def _next_parts_walked(candidates, typed):
    """What completion gave before it bisected: a walk of every path."""
    found = set()
    for name in candidates:
        if name.startswith(typed):
            slash = name.find("/", len(typed))
            found.add(name if slash < 0 else name[: slash + 1])
    return found


_PATH_CHARS = "ab/.0-_ é\U0001f600"


@given(
    st.lists(st.text(_PATH_CHARS, min_size=1, max_size=8), max_size=40),
    st.text(_PATH_CHARS, max_size=4),
)
def test_completion_by_bisection_finds_what_a_walk_finds(paths, typed):
    from twisted_p2p.names import next_parts

    candidates = sorted(set(paths))
    assert next_parts(candidates, typed) == _next_parts_walked(candidates, typed)


def test_completion_over_the_network_catalog_uses_its_sorted_paths():
    from twisted_p2p.catalog import NetworkCatalog
    from twisted_p2p.peers import PeerTable
    from twisted_p2p.wire import Announce

    clock = task.Clock()
    table = PeerTable(clock, 30.0)
    listed = [("a" * 64, "photos/2026/b.jpg", 1), ("b" * 64, "photos/c.jpg", 1),
              ("c" * 64, "notes.txt", 1), ("a" * 64, "copy of b.jpg", 1)]
    catalog = NetworkCatalog(table, lambda peer: defer.succeed(("1" * 16, listed)), clock)
    table.heard(Announce("a1" * 16, "0" * 16, 7000, "1" * 16), "192.0.2.2", 27000)
    parts = CommandParts(catalog=catalog, table=table)
    names = parts.commands.file_names("download")
    assert names == sorted({o.name for o in catalog.paths()})
    assert names is catalog.path_names()  # kept, not made again per Tab
