"""
C{p2ppeer-ctl} (L{ctl.run}) against a small blocking UNIX socket server in a
thread that reads one request line and answers canned lines: what the user
sees on stdout and stderr, the exit status, and the request it sends.
"""

import io
import json
import os
import socket
import tempfile
import threading

import pytest

from twisted_p2p import ctl

LIST = {"event": "list", "text": "NAME      SIZE\nbig.bin   1 MiB", "files": [{"name": "big.bin"}]}
INFO = {"event": "info", "text": "asking 2 peers"}
ERROR = {"event": "error", "text": "error: no known peer offers 'x'", "message": "no known peer offers 'x'"}
BYE = {"event": "bye", "text": "bye"}
END_OK = {"event": "end", "ok": True}
END_FAILED = {"event": "end", "ok": False}

CLOSED_EARLY = "p2ppeer-ctl: the peer closed the connection before answering (is it stopping?)\n"


def line(event):
    return json.dumps(event).encode("utf-8") + b"\n"


class CannedPeer:
    """
    A one-connection server on a UNIX socket: reads one request line, sends
    C{replies} (bytes), then closes -- or, with C{hold}, waits for the client
    to close first (a peer that never answers).
    """

    def __init__(self, path, replies, hold=False):
        self.path = path
        self.raw_request = None
        self._replies = replies
        self._hold = hold
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._listener.settimeout(10)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        finally:
            self._listener.close()
        with conn:
            conn.settimeout(10)
            with conn.makefile("rb") as reader:
                self.raw_request = reader.readline()
            try:
                for reply in self._replies:
                    conn.sendall(reply)
                if self._hold:
                    while conn.recv(4096):
                        pass
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped listening: some tests want that

    @property
    def request(self):
        return json.loads(self.raw_request)

    def join(self):
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the canned peer is still serving"


@pytest.fixture
def state_dir(tmp_path):
    """
    A state dir whose control socket path fits in a sockaddr_un.
    """
    base = tmp_path
    if len(str(base / ".p2ppeer" / "control.sock")) >= 100:
        base = tempfile.mkdtemp(prefix="p2pctl")
    path = os.path.join(base, ".p2ppeer")
    os.mkdir(path)
    return path


@pytest.fixture
def peer(state_dir):
    """
    Start a L{CannedPeer} on C{state_dir}'s control socket; joined after the
    test.
    """
    started = []

    def start(*replies, hold=False):
        canned = CannedPeer(os.path.join(state_dir, "control.sock"), replies, hold=hold)
        started.append(canned)
        return canned

    yield start
    for canned in started:
        canned.join()


def run(*argv):
    """
    C{p2ppeer-ctl ARGV}: (exit status, stdout, stderr).
    """
    out, err = io.StringIO(), io.StringIO()
    status = ctl.run(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


# --- output ---


def test_text_output(peer, state_dir):
    canned = peer(line(INFO), line(LIST), line(END_OK))
    assert run("--state-dir", state_dir, "list") == (
        0,
        "asking 2 peers\nNAME      SIZE\nbig.bin   1 MiB\n",
        "",
    )
    canned.join()
    assert canned.request == {"command": "list", "wait": False}


def test_json_output(peer, state_dir):
    peer(line(INFO), line(LIST), line(END_OK))
    status, out, err = run("--state-dir", state_dir, "--json", "list")
    assert (status, err) == (0, "")
    assert [json.loads(text) for text in out.splitlines()] == [INFO, LIST]


def test_replies_in_one_packet_or_many(peer, state_dir):
    """
    Lines split across reads, and several in one read, come out the same;
    blank lines are skipped.
    """
    data = line(INFO) + b"\n" + line(LIST) + line(END_OK)
    peer(*[data[i : i + 7] for i in range(0, len(data), 7)])
    assert run("--state-dir", state_dir, "--json", "list")[:2] == (
        0,
        json.dumps(INFO) + "\n" + json.dumps(LIST) + "\n",
    )


def test_an_unknown_event_without_text_prints_its_fields(peer, state_dir):
    peer(line({"event": "odd", "n": 1}), line(END_OK))
    assert run("--state-dir", state_dir, "status") == (0, 'odd: {"n": 1}\n', "")


# --- exit status ---


def test_exit_1_when_the_command_failed(peer, state_dir):
    peer(line(ERROR), line(END_FAILED))
    assert run("--state-dir", state_dir, "download", "x") == (1, "error: no known peer offers 'x'\n", "")


def test_exit_1_when_end_has_no_ok(peer, state_dir):
    peer(line({"event": "end"}))
    assert run("--state-dir", state_dir, "status") == (1, "", "")


def test_exit_2_when_the_socket_is_missing(tmp_path):
    state = str(tmp_path / "nowhere")
    assert run("--state-dir", state, "list") == (
        2,
        "",
        f"p2ppeer-ctl: no control socket at {state}/control.sock: is the peer running, "
        f"and is its state dir {state}? (pass --state-dir or --socket)\n",
    )


def test_default_state_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("peers") == (
        2,
        "",
        "p2ppeer-ctl: no control socket at .p2ppeer/control.sock: is the peer running, "
        "and is its state dir .p2ppeer? (pass --state-dir or --socket)\n",
    )


def test_default_state_dir_reaches_the_peer(peer, state_dir, monkeypatch):
    monkeypatch.chdir(os.path.dirname(state_dir))
    peer(line(BYE), line(END_OK))
    assert run("stop") == (0, "bye\n", "")


def test_exit_2_when_the_socket_option_names_nothing(tmp_path):
    """
    With --socket the state dir is irrelevant, and the message says so.
    """
    path = str(tmp_path / "peer.sock")
    assert run("--socket", path, "list") == (
        2,
        "",
        f"p2ppeer-ctl: no control socket at {path}: is the peer running? (check --socket)\n",
    )


def stale_socket(path):
    """
    A socket file nobody listens on, as a killed peer leaves behind.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def test_exit_2_when_the_socket_is_stale(state_dir):
    path = os.path.join(state_dir, "control.sock")
    stale_socket(path)
    assert run("--state-dir", state_dir, "list") == (
        2,
        "",
        f"p2ppeer-ctl: the control socket {path} is stale: no peer is running on it "
        f"(start the peer, or check --state-dir {state_dir})\n",
    )


def test_exit_2_when_the_socket_option_is_stale(state_dir):
    path = os.path.join(state_dir, "control.sock")
    stale_socket(path)
    assert run("--socket", path, "list") == (
        2,
        "",
        f"p2ppeer-ctl: the control socket {path} is stale: no peer is running on it "
        "(start the peer, or check --socket)\n",
    )


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_exit_2_when_the_path_is_not_a_socket(state_dir, kind):
    path = os.path.join(state_dir, "control.sock")
    if kind == "file":
        open(path, "w").close()
    else:
        os.mkdir(path)
    assert run("--socket", path, "list") == (2, "", f"p2ppeer-ctl: {path} is not a socket\n")


def test_exit_2_when_the_path_is_too_long(tmp_path):
    path = str(tmp_path / ("x" * 120) / "control.sock")
    assert run("--socket", path, "list") == (
        2,
        "",
        f"p2ppeer-ctl: cannot connect to {path}: AF_UNIX path too long\n",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores the socket's permissions")
def test_exit_2_when_permission_is_denied(peer, state_dir):
    path = os.path.join(state_dir, "control.sock")
    canned = peer(line(END_OK))
    os.chmod(path, 0)
    assert run("--state-dir", state_dir, "list") == (
        2,
        "",
        f"p2ppeer-ctl: permission denied on {path}: run p2ppeer-ctl as the peer's user\n",
    )
    os.chmod(path, 0o600)
    run("--state-dir", state_dir, "list")  # let the canned peer finish
    canned.join()


def test_exit_2_when_the_peer_closes_without_end(peer, state_dir):
    peer(line(INFO))
    assert run("--state-dir", state_dir, "list") == (2, "asking 2 peers\n", CLOSED_EARLY)


def test_exit_2_when_the_peer_closes_without_a_word(peer, state_dir):
    peer()
    assert run("--state-dir", state_dir, "status") == (2, "", CLOSED_EARLY)


def test_stop_without_end_is_success(peer, state_dir):
    """
    A peer told to stop may be gone before it says "end": that is what was
    asked for.
    """
    peer(line(BYE))
    assert run("--state-dir", state_dir, "stop") == (0, "bye\n", "")


def test_stop_that_failed(peer, state_dir):
    peer(line(ERROR), line(END_FAILED))
    assert run("--state-dir", state_dir, "stop")[0] == 1


def test_exit_2_on_a_reply_that_is_not_json(peer, state_dir):
    peer(line(INFO), b"<html>\n", line(END_OK))
    assert run("--state-dir", state_dir, "list") == (
        2,
        "asking 2 peers\n",
        "p2ppeer-ctl: the connection to the peer broke: Expecting value: line 1 column 1 (char 0)\n",
    )


def test_exit_2_on_a_reply_that_is_not_an_object(peer, state_dir):
    peer(b"[1, 2]\n", line(END_OK))
    assert run("--state-dir", state_dir, "list") == (
        2,
        "",
        "p2ppeer-ctl: the connection to the peer broke: not an event: b'[1, 2]'\n",
    )


def test_exit_2_when_the_peer_does_not_answer(peer, state_dir, monkeypatch):
    monkeypatch.setattr(ctl, "ANSWER_TIMEOUT", 0.2)
    peer(hold=True)
    assert run("--state-dir", state_dir, "list") == (
        2,
        "",
        "p2ppeer-ctl: the peer did not answer within 0 s\n",
    )


def test_exit_2_when_the_send_breaks(monkeypatch):
    """
    A peer that closes before the request is sent is a message, not a
    traceback.
    """
    ours, theirs = socket.socketpair()
    theirs.close()
    monkeypatch.setattr(ctl, "connect", lambda path, state_dir: ours)
    assert run("list") == (
        2,
        "",
        "p2ppeer-ctl: the connection to the peer broke: [Errno 32] Broken pipe\n",
    )


@pytest.mark.parametrize(
    "argv, timeout",
    [(["list"], ctl.ANSWER_TIMEOUT), (["download", "x"], ctl.ANSWER_TIMEOUT), (["download", "--wait", "x"], None)],
)
def test_only_a_waited_download_waits_forever(monkeypatch, argv, timeout):
    ours, theirs = socket.socketpair()
    theirs.sendall(line(END_OK))
    theirs.shutdown(socket.SHUT_WR)
    monkeypatch.setattr(ctl, "connect", lambda path, state_dir: ours)
    try:
        assert run(*argv) == (0, "", "")
        assert ours.gettimeout() == timeout
    finally:
        theirs.close()


# --- the request ---


def test_request_line(peer, state_dir):
    canned = peer(line(END_OK))
    run("--state-dir", state_dir, "download", "--wait", "x", "y")
    canned.join()
    assert canned.raw_request.endswith(b"\n")
    assert canned.raw_request.count(b"\n") == 1
    assert canned.request == {"command": "download x y", "wait": True}


@pytest.mark.parametrize(
    "argv, sent",
    [
        (["download", "--wait", "big.bin"], {"command": "download big.bin", "wait": True}),
        (["--wait", "download", "big.bin"], {"command": "download big.bin", "wait": True}),
        (["download", "big.bin", "--wait"], {"command": "download big.bin", "wait": True}),
        (["download", "big.bin"], {"command": "download big.bin", "wait": False}),
        (["cancel", "big.bin"], {"command": "cancel big.bin", "wait": False}),
        (["--json", "status"], {"command": "status", "wait": False}),
        (["download", "café ✓.txt"], {"command": "download 'café ✓.txt'", "wait": False}),
        (["download", "a b.jpg", "*.png", "--from", "alice"],
         {"command": "download 'a b.jpg' '*.png' --from alice", "wait": False}),
        (["resume", "--wait", "big.bin"], {"command": "resume big.bin", "wait": True}),
        (["list", "*.jpg"], {"command": "list '*.jpg'", "wait": False}),
    ],
)
def test_intermixed_arguments(peer, state_dir, argv, sent):
    canned = peer(line(END_OK))
    assert run("--state-dir", state_dir, *argv)[0] == 0
    canned.join()
    assert canned.request == sent


def test_socket_option(peer, state_dir):
    canned = peer(line(LIST), line(END_OK))
    assert run("--socket", os.path.join(state_dir, "control.sock"), "list")[0] == 0
    canned.join()
    assert canned.request == {"command": "list", "wait": False}


# --- argument errors ---


@pytest.mark.parametrize(
    "argv, message",
    [
        (["download"], "p2ppeer-ctl: error: download needs a file name or id"),
        (["cancel"], "p2ppeer-ctl: error: cancel needs a file name or id"),
        (["peers", "x"], "p2ppeer-ctl: error: peers takes no argument"),
        (["list", "x", "y"], "p2ppeer-ctl: error: list takes one argument"),
        (["status", "--from", "alice"], "p2ppeer-ctl: error: --from goes with download"),
        (["stop", "now"], "p2ppeer-ctl: error: stop takes no argument"),
        (["--wait", "list"], "p2ppeer-ctl: error: --wait goes with download"),
        (["status", "--wait"], "p2ppeer-ctl: error: --wait goes with download"),
        (["frobnicate"], "p2ppeer-ctl: error: argument command: invalid choice: 'frobnicate'"),
        ([], "p2ppeer-ctl: error: the following arguments are required: command"),
        (
            ["--state-dir", "a", "--socket", "b", "list"],
            "p2ppeer-ctl: error: argument --socket: not allowed with argument --state-dir",
        ),
    ],
)
def test_argument_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as raised:
        ctl.run(argv, io.StringIO(), io.StringIO())
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: p2ppeer-ctl ")
    assert message in captured.err


# --- reading events ---


class ChunkedSocket:
    """
    A socket whose C{recv} returns the given chunks, then end of file.
    """

    def __init__(self, chunks):
        self._chunks = list(chunks)

    def recv(self, size):
        return self._chunks.pop(0) if self._chunks else b""


def test_events_one_byte_at_a_time():
    data = line(INFO) + b"\n  \n" + line(LIST) + line(END_OK)
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert list(ctl.events_from(ChunkedSocket(chunks))) == [INFO, LIST, END_OK]


def test_events_all_at_once():
    data = line(INFO) + line(LIST) + line(END_OK)
    assert list(ctl.events_from(ChunkedSocket([data]))) == [INFO, LIST, END_OK]


# --- rendering, watching, the version ---


def test_text_is_rendered_from_the_fields(peer, state_dir):
    listing = {"event": "list", "files": [
        {"name": "big.bin", "size": 1 << 20, "id": "ab" * 32, "here": False,
         "sources": [{"peer": "192.0.2.2:7000", "name": "alice"}]},
    ], "pattern": None, "peers": 1}
    peer(line(listing), line(END_OK))
    status, out, _ = run("--state-dir", state_dir, "list")
    assert status == 0
    assert out.splitlines() == [
        "NAME     SIZE     ID        WHERE",
        "big.bin  1.0 MiB  abababab  alice (192.0.2.2:7000)",
    ]


class TerminalOut(io.StringIO):
    def isatty(self):
        return True


PROGRESS = {"event": "download-progress", "file": "big.bin", "id": "i", "percent": 50,
            "bytes": 1 << 19, "size": 1 << 20, "rate": 1 << 18, "sources": 1, "eta": 2}
FINISHED = {"event": "download-finished", "file": "big.bin", "id": "i", "path": "downloads/big.bin",
            "size": 1 << 20, "seconds": 4.0, "rate": 1 << 18}


def test_waited_progress_redraws_one_line_on_a_terminal(peer, state_dir):
    peer(line(PROGRESS), line(PROGRESS), line(FINISHED), line(END_OK))
    out = TerminalOut()
    assert ctl.run(["--state-dir", state_dir, "download", "--wait", "big.bin"], out, io.StringIO()) == 0
    progress = "download big.bin: 50% (512.0 KiB of 1.0 MiB) at 256.0 KiB/s from 1 peer, 2 s left"
    assert out.getvalue() == (
        f"\r{progress}\x1b[K\r{progress}\x1b[K\n"
        "downloaded big.bin to downloads/big.bin: 1.0 MiB in 4.00 s (256.0 KiB/s)\n"
    )


def test_waited_progress_is_lines_elsewhere(peer, state_dir):
    peer(line(PROGRESS), line(FINISHED), line(END_OK))
    status, out, _ = run("--state-dir", state_dir, "download", "--wait", "big.bin")
    assert status == 0
    assert len(out.splitlines()) == 2 and "\x1b" not in out


def test_watch_asks_for_events_and_ends_when_the_peer_stops(peer, state_dir):
    joined = {"event": "peer-joined", "peer": "192.0.2.2:7000", "name": "alice", "id": "a" * 32}
    canned = peer(line(joined))
    status, out, err = run("--state-dir", state_dir, "watch")
    canned.join()
    assert canned.request == {"watch": True}
    assert (status, out, err) == (0, "peer alice (192.0.2.2:7000) joined\n", "p2ppeer-ctl: the peer stopped\n")


def test_version(capsys):
    from twisted_p2p.version import version

    with pytest.raises(SystemExit) as e:
        ctl.run(["--version"], io.StringIO(), io.StringIO())
    assert e.value.code == 0
    assert capsys.readouterr().out == f"p2ppeer-ctl (twisted-p2p) {version()}\n"
