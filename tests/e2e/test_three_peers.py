"""
Three real peers on 127.0.0.1, driven through peer1's console: discovery,
the network listing, a 64 MiB download, goodbye, expiry of a killed peer,
and a console that goes away.

The tests share one set of peers (the C{network} fixture) and run in file
order, each a later stage of the same story; each waits for the state it
needs rather than trusting the one before, so that a failure points at one
stage.  Timings are printed (run with C{-s} to see them).
"""

import hashlib
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from .peers import HOST, TWISTD, Peer, free_transfer_port, free_udp_port, peer_env

pytestmark = pytest.mark.e2e

ANNOUNCE_INTERVAL = 0.5
PEER_TIMEOUT = 2.0
MiB = 1 << 20
BIG_SIZE = 64 * MiB

#: Log lines that mean something went wrong inside a peer.
LOG_ERRORS = ("Traceback", "Unhandled Error", "Unhandled error", "#critical]", "#error]")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(MiB), b""):
            digest.update(piece)
    return digest.hexdigest()


def write_random(path, size):
    """Write C{size} random bytes, 1 MiB at a time; their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            piece = os.urandom(min(MiB, left))
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def poll(check, timeout, interval=0.1):
    """
    Call C{check()} every C{interval} s until it returns something true, or
    C{timeout} s have passed; C{(result, seconds waited)}.
    """
    start = time.monotonic()
    while True:
        result = check()
        elapsed = time.monotonic() - start
        if result or elapsed >= timeout:
            return result, elapsed
        time.sleep(interval)


def listed(peer, label):
    """Whether C{peer}'s C{peers} answer has a row for C{label}."""
    pattern = re.compile(rf"^{re.escape(label)}\s")
    return any(pattern.match(line) for line in peer.ask("peers"))


def listing(peer):
    """
    C{peer}'s C{list} answer as C{{name: where}}, C{where} being the text
    of the WHERE column with each peer given by its address only (the
    column says C{name (address)}).
    """
    rows = {}
    for line in peer.ask("list")[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 4:
            places = [re.sub(r"^.* \((.+)\)$", r"\1", w.strip()) for w in cells[-1].split(",")]
            rows[cells[0]] = ", ".join(places)
    return rows


@dataclass
class Network:
    peer1: Peer
    peer2: Peer
    peer3: Peer
    folder: object
    originals: dict = field(default_factory=dict)
    #: Seconds from the last peer's console answering until peer1's
    #: C{peers} named both others, or None if it never did.
    discovery_latency: float = None
    timings: dict = field(default_factory=dict)

    @property
    def peers(self):
        return [self.peer1, self.peer2, self.peer3]

    def diagnostics(self):
        return "\n\n".join(p.diagnostics() for p in self.peers)


def _make_folder(base, name, files):
    folder = base / name
    (folder / "shared").mkdir(parents=True)
    (folder / "downloads").mkdir()
    digests = {}
    for filename, content in files.items():
        path = folder / "shared" / filename
        if isinstance(content, int):
            digests[filename] = write_random(path, content)
        else:
            path.write_bytes(content)
            digests[filename] = hashlib.sha256(content).hexdigest()
    return folder, digests


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    base = tmp_path_factory.mktemp("three-peers")
    folder1, _ = _make_folder(base, "peer1", {"hello.txt": b"hello from peer1\n"})
    folder2, originals = _make_folder(base, "peer2", {
        "report.txt": b"quarterly report\n" * 100,
        "big.bin": BIG_SIZE,
    })
    folder3, _ = _make_folder(base, "peer3", {
        "photo.bin": 300 * 1024,
        "notes.txt": b"notes of peer3\n",
    })
    discovery = free_udp_port()

    def peer(name, folder):
        return Peer(name, folder, free_transfer_port(), discovery,
                    announce_interval=ANNOUNCE_INTERVAL, peer_timeout=PEER_TIMEOUT)

    net = Network(peer("peer1", folder1), peer("peer2", folder2), peer("peer3", folder3),
                  base, originals)
    try:
        net.peer1.start()
        net.peer1.ready()
        net.peer2.start()
        net.peer3.start()
        came_up = [p.ready() for p in (net.peer2, net.peer3)]
        last_up = max(came_up)
        both, _ = poll(
            lambda: listed(net.peer1, net.peer2.label) and listed(net.peer1, net.peer3.label),
            timeout=10,
        )
        if both:
            net.discovery_latency = time.monotonic() - last_up
        net.timings["start to console up, peer2 (shares 64 MiB)"] = (
            came_up[0] - net.peer2.started_at
        )
        net.timings["start to console up, peer3"] = came_up[1] - net.peer3.started_at
        yield net
    finally:
        print()
        for name, seconds in net.timings.items():
            print(f"e2e timing: {name}: {seconds:.3f} s")
        for p in net.peers:
            p.cleanup()
        # pytest keeps the last runs' temporary folders: not 128 MiB each.
        for path in (folder2 / "shared" / "big.bin", folder1 / "downloads" / "big.bin"):
            path.unlink(missing_ok=True)


def test_peers_discover_each_other_within_a_second(network):
    latency = network.discovery_latency
    assert latency is not None, "peer1 never listed both other peers within 10 s"
    network.timings["discovery (last console up to both in peer1's peers)"] = latency
    assert latency < 1.0


def test_list_shows_files_of_both_peers(network):
    p1, p2, p3 = network.peers
    wanted = {
        "hello.txt": "here",
        "report.txt": p2.label,
        "big.bin": p2.label,
        "photo.bin": p3.label,
        "notes.txt": p3.label,
    }
    rows, waited = poll(
        lambda: (lambda r: r if all(r.get(n) == w for n, w in wanted.items()) else None)(
            listing(p1)
        ),
        timeout=10,
    )
    network.timings["catalog (list shows every file)"] = waited
    assert rows, f"peer1's list never showed {wanted}; last answer: {p1.ask('list')}"
    big = [line for line in p1.ask("list") if line.startswith("big.bin ")]
    assert len(big) == 1 and "64.0 MiB" in big[0], big


def test_download_64_mib(network):
    p1, p2 = network.peer1, network.peer2
    offered, _ = poll(lambda: listing(p1).get("big.bin") == p2.label, timeout=10)
    assert offered, "peer1 does not list big.bin from peer2"

    started = time.monotonic()
    closing = p1.command("download big.bin", until=r"^downloaded big\.bin\b",
                         timeout=120, fail=r"^error:")
    network.timings["download of 64 MiB (command to closing line)"] = (
        time.monotonic() - started
    )
    print(f"\ne2e: {closing}")
    assert re.fullmatch(
        r"downloaded big\.bin to downloads/big\.bin: 64\.0 MiB in \d+(\.\d+)? s "
        r"\(\d+(\.\d)? (B|KiB|MiB|GiB)/s\)",
        closing,
    ), closing

    downloaded = p1.downloads / "big.bin"
    assert downloaded.stat().st_size == BIG_SIZE
    original = network.peer2.shared / "big.bin"
    assert sha256_of(original) == network.originals["big.bin"]
    assert sha256_of(downloaded) == network.originals["big.bin"]
    leftovers = [n for n in os.listdir(p1.downloads)
                 if n.startswith(".p2ppeer-") and n.endswith(".part")]
    assert leftovers == []
    assert sorted(os.listdir(p1.downloads)) == ["big.bin"]


def test_exit_says_goodbye(network):
    p1, p2 = network.peer1, network.peer2
    known, _ = poll(lambda: listed(p1, p2.label), timeout=5)
    assert known, "peer1 does not list peer2 before it exits"

    p2.mark()
    sent = time.monotonic()
    p2.send("exit")
    gone, _ = poll(lambda: not listed(p1, p2.label), timeout=5)
    latency = time.monotonic() - sent
    network.timings["goodbye drop (exit command to gone from peer1's peers)"] = latency
    p2.expect(r"^bye$", timeout=5)
    code = p2.wait(10)
    network.timings["exit command to peer2's process exit"] = time.monotonic() - sent
    assert code == 0
    assert gone, "peer1 still lists peer2 5 s after its exit"
    assert latency < 1.0
    assert "left: said goodbye" in p1.log_path.read_text(), "peer1's log has no goodbye"


def test_killed_peer_is_forgotten_after_timeout(network):
    p1, p3 = network.peer1, network.peer3
    known, _ = poll(lambda: listed(p1, p3.label), timeout=5)
    assert known, "peer1 does not list peer3 before it is killed"

    p3.kill()
    killed = time.monotonic()
    early_listed = listed(p1, p3.label)
    early = time.monotonic() - killed
    gone, latency = poll(lambda: not listed(p1, p3.label), timeout=PEER_TIMEOUT + 5)
    network.timings["kill drop (SIGKILL to gone from peer1's peers)"] = latency
    assert gone, f"peer1 still lists peer3 {PEER_TIMEOUT + 5} s after SIGKILL"
    assert latency < PEER_TIMEOUT + 1.5
    # Its last announce was at most one interval before the kill, so it
    # cannot expire sooner than PEER_TIMEOUT - ANNOUNCE_INTERVAL after it.
    if early < PEER_TIMEOUT - ANNOUNCE_INTERVAL - 0.5:
        assert early_listed, f"peer3 was gone {early:.2f} s after SIGKILL, before any timeout"
    assert "left: timed out" in p1.log_path.read_text(), "peer1's log has no timeout"


def test_console_eof_keeps_peer_running(network):
    p1 = network.peer1
    assert p1.alive()
    p1.close_stdin()
    time.sleep(1.0)
    assert p1.alive(), "peer1 stopped when its stdin closed"
    # Still serving: its sender port takes connections.
    with socket.create_connection((HOST, p1.transfer_port + 1), timeout=5):
        pass
    assert "Console input closed" in p1.log_path.read_text()

    code = p1.terminate(10)
    # A clean stop by SIGTERM exits 0, as supervisor and systemd expect.
    assert code == 0, code
    log = p1.log_path.read_text()
    assert "Received SIGTERM, shutting down." in log
    assert "Server Shut Down." in log


def test_no_errors_in_logs(network):
    for p in network.peers:
        assert not p.alive()
        log = p.log_path.read_text()
        found = [marker for marker in LOG_ERRORS if marker in log]
        assert not found, f"{p.name}'s log has {found}"
        assert "Traceback" not in p.stderr_path.read_text()


# A bad command line: one sentence on stderr, a non-zero exit, no traceback.


def _hold_tcp(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, port))
    sock.listen(1)
    return sock


def _hold_udp(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("", port))
    return sock


BAD_COMMAND_LINES = {
    # case: (args given the free ports t and d, what the error names, hold)
    "transfer port out of range": (lambda t, d: ["--transfer-port", "70000"], "70000", None),
    "transfer port not a number": (lambda t, d: ["--transfer-port", "x"], "--transfer-port", None),
    "no shared folder": (lambda t, d: ["--transfer-port", str(t)], "shared", None),
    "transfer port in use": (lambda t, d: ["--transfer-port", str(t)], "{busy}", "tcp"),
    "discovery port in use": (lambda t, d: ["--transfer-port", str(t)], "{busy}", "udp"),
    "discovery port clashes": (
        lambda t, d: ["--transfer-port", str(t), "--discovery-port", str(t + 2)],
        "--discovery-port", None,
    ),
    "peer timeout too short": (
        lambda t, d: ["--transfer-port", str(t), "--peer-timeout", "0.5"],
        "--peer-timeout", None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_COMMAND_LINES))
def test_bad_command_line(case, tmp_path):
    make_args, named, hold = BAD_COMMAND_LINES[case]
    if case != "no shared folder":
        (tmp_path / "shared").mkdir()
    t, d = free_transfer_port(), free_udp_port()
    held = None
    if hold == "tcp":
        held, named = _hold_tcp(t + 1), str(t + 1)
    elif hold == "udp":
        held, named = _hold_udp(d), str(d)
    argv = [TWISTD, "-n", "--pidfile", str(tmp_path / "twistd.pid"), "p2ppeer",
            "--discovery-port", str(d), "--host", HOST, "--broadcast", "127.255.255.255",
            "--announce-interval", "1"] + make_args(t, d)
    try:
        result = subprocess.run(argv, cwd=tmp_path, env=peer_env(), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=30)
    finally:
        if held is not None:
            held.close()
    shown = f"argv: {argv}\nexit: {result.returncode}\nstdout: {result.stdout!r}\n" \
            f"stderr: {result.stderr!r}"
    assert result.returncode != 0, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith("twistd p2ppeer: error: "), shown
    assert named in lines[0], shown
    print(f"\n{case}: {lines[0]}")
