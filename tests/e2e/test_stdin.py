"""
A peer with no console: stdin at /dev/null (systemd), closed, or an open
pipe that never sends anything (supervisor).  In each case it keeps serving,
writes nothing to stdout, answers p2ppeer-ctl, and stops cleanly on SIGTERM.
"""

import os
import select
import signal
import socket
import subprocess
import time

import pytest

from .ctl import ctl_json
from .peers import BROADCAST, HOST, TWISTD, free_transfer_port, free_udp_port, peer_env

pytestmark = pytest.mark.e2e


def start(folder, stdin_mode):
    (folder / "shared").mkdir(parents=True)
    (folder / "shared" / "hello.txt").write_text("hello\n")
    port = free_transfer_port()
    argv = [
        TWISTD, "-n", "--pidfile", str(folder / "twistd.pid"), "p2ppeer",
        "--transfer-port", str(port),
        "--discovery-port", str(free_udp_port()),
        "--host", HOST, "--broadcast", BROADCAST,
        "--log-file", str(folder / "peer.log"),
    ]
    stdin = {"null": subprocess.DEVNULL, "pipe": subprocess.PIPE, "closed": None}[stdin_mode]
    # The shell closes fd 0 and then becomes twistd.
    if stdin_mode == "closed":
        argv = ["/bin/sh", "-c", 'exec "$0" "$@" <&-', *argv]
    proc = subprocess.Popen(
        argv,
        cwd=folder,
        env=peer_env(),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    return proc, port


def wait_for_port(port, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            with socket.create_connection((HOST, port + 1), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the sender port {port + 1} never opened")


@pytest.mark.parametrize("stdin_mode", ["null", "closed", "pipe"])
def test_peer_without_console_keeps_serving(tmp_path, stdin_mode):
    proc, port = start(tmp_path, stdin_mode)
    try:
        wait_for_port(port, proc)
        time.sleep(1.0)  # long enough for an EOF on stdin to have been acted on
        assert proc.poll() is None, "the peer stopped when it found no console"
        with socket.create_connection((HOST, port + 1), timeout=5):
            pass
        [listing] = ctl_json(tmp_path / ".p2ppeer", "list")
        assert [f["name"] for f in listing["files"]] == ["hello.txt"]
        # No prompt, greeting or log line on stdout: nobody reads it.
        ready, _, _ = select.select([proc.stdout], [], [], 0)
        assert not ready or proc.stdout.read1(4096) == b""
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == b""
        assert b"Traceback" not in proc.stderr.read()
        log = (tmp_path / "peer.log").read_text()
        assert "Traceback" not in log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
