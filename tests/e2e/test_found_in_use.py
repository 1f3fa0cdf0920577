"""
Defects found by using the peer as a new user would, each with real
processes: a source killed before a download, a second peer started in the
same folder, a console whose input closes, and Ctrl-C in the demo.
"""

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .peers import BROADCAST, HOST, REPO_ROOT, TWISTD, Peer, free_transfer_port, free_udp_port, peer_env
from .terminal import Screen, open_pty, read_into, wait_for

pytestmark = pytest.mark.e2e

#: Log lines that mean something went wrong inside a peer.
LOG_ERRORS = ("Traceback", "Unhandled Error", "#critical]", "unhashable")


def make_folder(base, name, files=()):
    path = base / name
    (path / "shared").mkdir(parents=True)
    for filename, content in files:
        (path / "shared" / filename).write_bytes(content)
    return path


class Peers(list):
    def diagnostics(self):
        return "\n\n".join(p.diagnostics() for p in self)


@pytest.fixture
def peers():
    started = Peers()
    yield started
    for p in started:
        p.cleanup()


def test_a_killed_source_is_named_with_the_likely_cause(tmp_path, peers):
    discovery = free_udp_port()
    # A long timeout: the dead peer stays in the table while we download.
    me = Peer("me", make_folder(tmp_path, "me"), free_transfer_port(), discovery,
              peer_timeout=30.0)
    dead = Peer("dead", make_folder(tmp_path, "dead", [("d-only.txt", b"only here\n")]),
                free_transfer_port(), discovery)
    peers.extend([me, dead])
    me.start()
    dead.start()
    me.ready()
    dead.ready()
    wait_for(lambda: any(line.startswith("d-only.txt ") for line in me.ask("list")), 10,
             "me never listed d-only.txt", peers.diagnostics)
    dead.kill()
    line = me.command("download d-only.txt", until=r"^error: ", timeout=15)
    print(f"\ne2e: {line}")
    assert "could not connect" in line
    assert "firewall" in line and "--host" in line
    assert dead.label in line
    log = me.log_path.read_text()
    assert not [word for word in LOG_ERRORS if word in log], log


def test_a_second_peer_in_the_same_folder_stops_before_announcing(tmp_path, peers):
    discovery = free_udp_port()
    first = Peer("first", make_folder(tmp_path, "first", [("a.txt", b"a\n")]),
                 free_transfer_port(), discovery)
    watcher = Peer("watcher", make_folder(tmp_path, "watcher"), free_transfer_port(), discovery)
    peers.extend([first, watcher])
    first.start()
    watcher.start()
    first.ready()
    watcher.ready()
    wait_for(lambda: any(line.startswith(first.label) for line in watcher.ask("peers")), 10,
             "the watcher never heard the first peer", peers.diagnostics)
    # The same folder, by mistake, with another transfer port.
    second_port = free_transfer_port()
    argv = [
        TWISTD, "-n", "--pidfile", str(first.folder / "second.pid"), "p2ppeer",
        "--transfer-port", str(second_port), "--discovery-port", str(discovery),
        "--host", HOST, "--broadcast", BROADCAST, "--announce-interval", "0.5",
    ]
    started = time.monotonic()
    second = subprocess.run(argv, cwd=first.folder, env=peer_env(), stdin=subprocess.PIPE,
                            capture_output=True, timeout=30)
    elapsed = time.monotonic() - started
    err = second.stderr.decode()
    print(f"\ne2e: the second peer exited {second.returncode} after {elapsed:.2f} s: {err.strip()}")
    assert second.returncode == 1
    assert err == (
        f"twistd p2ppeer: error: another peer (pid {first.proc.pid}) is running with the "
        f"state dir {first.folder / '.p2ppeer'}; stop it, or start this one in its own folder "
        "or with its own --state-dir\n"
    )
    # It bound nothing and announced nothing: the watcher never heard the
    # first one's id with its port (a peer's label is its transfer port).
    time.sleep(1.0)
    log = watcher.log_path.read_text()
    assert f"{HOST}:{second_port}" not in log
    assert any(line.startswith(first.label) for line in watcher.ask("peers"))
    assert first.alive()


def test_a_console_whose_input_closes_says_so(tmp_path, peers):
    me = Peer("me", make_folder(tmp_path, "me"), free_transfer_port(), free_udp_port())
    peers.append(me)
    me.start()
    me.ready()
    me.mark()
    me.close_stdin()
    line = me.expect(r"console input closed")
    print(f"\ne2e: {line}")
    assert "the peer keeps running" in line
    assert f"--state-dir {me.folder / '.p2ppeer'} stop" in line
    assert f"kill {me.proc.pid}" in line
    time.sleep(0.5)
    assert me.alive()
    assert me.terminate() == 0


@pytest.fixture
def demo(tmp_path):
    """
    A copy of the demo sandbox on free ports, and the demo script run in a
    pseudo-terminal: C{(process, screen, master fd)}.
    """
    sandbox = tmp_path / "sandbox"
    for name in ("peer1", "peer2", "peer3"):
        shutil.copytree(REPO_ROOT / "sandbox" / name, sandbox / name,
                        ignore=shutil.ignore_patterns(".p2ppeer", "*.pid", "*.log", "random-*"))
    env = dict(
        peer_env(),
        TERM="xterm",
        DEMO_SANDBOX=str(sandbox),
        DEMO_DISCOVERY_PORT=str(free_udp_port()),
        DEMO_PEER1_PORT=str(free_transfer_port()),
        DEMO_PEER2_PORT=str(free_transfer_port()),
        DEMO_PEER3_PORT=str(free_transfer_port()),
    )
    demo_script = REPO_ROOT / "sandbox" / "demo.sh"
    venv_twistd = REPO_ROOT / ".venv" / "bin" / "twistd"
    if not venv_twistd.exists() or Path(TWISTD).resolve() != venv_twistd.resolve():
        pytest.skip("the demo runs the checkout's .venv, which is not the one testing")
    master, slave = open_pty()
    screen = Screen()
    done = threading.Event()
    proc = subprocess.Popen(["bash", str(demo_script)], stdin=slave, stdout=slave, stderr=slave,
                            env=env, start_new_session=True)
    os.close(slave)
    reader = threading.Thread(target=read_into, args=(master, screen, done),
                                            daemon=True)
    reader.start()
    try:
        yield proc, screen, master
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for name in ("peer2", "peer3"):
            pid_file = sandbox / name / "twistd.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ValueError, OSError):
                    pass
        os.close(master)
        reader.join(5)


def test_ctrl_c_in_the_demo_says_bye_and_exits_0(demo):
    proc, screen, master = demo
    wait_for(lambda: screen.lines() and screen.lines()[-1].startswith("p2p>"), 30,
             "the demo's console never showed its prompt", lambda: "\n".join(screen.lines()))
    time.sleep(0.5)  # the background peers are up before peer1 starts
    os.write(master, b"\x03")
    assert proc.wait(20) == 0, "\n".join(screen.lines())
    lines = screen.lines()
    print("\ne2e demo: " + " / ".join(lines[-3:]))
    assert "bye" in lines[-3:]
    assert not any("Error 130" in line or "Traceback" in line for line in lines)
