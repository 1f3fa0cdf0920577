"""
Two peers under a real supervisord, configured from config/'s examples,
driven the way an admin would: p2ppeer-ctl and supervisorctl.
"""

import configparser
import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .ctl import ctl, ctl_json
from .peers import BROADCAST, HOST, REPO_ROOT, TWISTD, free_transfer_port, free_udp_port, peer_env

pytestmark = pytest.mark.e2e

SUPERVISORD = os.path.join(os.path.dirname(sys.executable), "supervisord")
SUPERVISORCTL = os.path.join(os.path.dirname(sys.executable), "supervisorctl")

if not os.path.exists(SUPERVISORD):
    pytest.skip("supervisor is not installed (pip install -e '.[test]')", allow_module_level=True)


def peer_settings(folder, transfer_port, discovery_port):
    """
    config/peer.example.toml with this test's ports and loopback addresses.
    """
    text = (REPO_ROOT / "config" / "peer.example.toml").read_text()
    replacements = {
        "transfer-port": str(transfer_port),
        "discovery-port": str(discovery_port),
        "host": f'"{HOST}"',
        "broadcast": f'"{BROADCAST}"',
        "announce-interval": "0.5",
        "peer-timeout": "2",
    }
    for key, value in replacements.items():
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert count == 1, key
    path = folder / "peer.toml"
    path.write_text(text)
    return path


def program_section(name, folder, settings):
    """
    config/supervisor/p2ppeer.conf's program, pointed at this test's folders.
    """
    example = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    example.read(REPO_ROOT / "config" / "supervisor" / "p2ppeer.conf")
    program = dict(example["program:p2ppeer"])
    command = program["command"]
    assert command.startswith("/opt/twisted-p2p/bin/twistd ")
    command = command.replace("/opt/twisted-p2p/bin/twistd", TWISTD, 1)
    command = command.replace("/etc/p2ppeer/peer.toml", str(settings))
    program.update(
        command=command,
        directory=str(folder),
        stdout_logfile=str(folder / "supervisor-stdout.log"),
        environment='PYTHONPATH="{}"'.format(peer_env()["PYTHONPATH"]),
        startsecs="1",
    )
    program.pop("user", None)  # the test runs as whoever runs it
    lines = [f"[program:{name}]"] + [f"{k}={v}" for k, v in program.items()]
    return "\n".join(lines)


class Supervisor:
    def __init__(self, folder, programs):
        self.folder = folder
        self.conf = folder / "supervisord.conf"
        sock = folder / "supervisor.sock"
        self.conf.write_text(
            "\n".join(
                [
                    "[unix_http_server]",
                    f"file={sock}",
                    "[supervisord]",
                    f"logfile={folder / 'supervisord.log'}",
                    f"pidfile={folder / 'supervisord.pid'}",
                    f"childlogdir={folder}",
                    "[rpcinterface:supervisor]",
                    "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
                    "[supervisorctl]",
                    f"serverurl=unix://{sock}",
                    *programs,
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen(
            [SUPERVISORD, "-n", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def ctl(self, *args):
        return subprocess.run(
            [SUPERVISORCTL, "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def wait_running(self, *names, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.ctl("status").stdout
            states = dict(re.findall(r"(?m)^(\S+)\s+(\S+)", out))
            if all(states.get(n) == "RUNNING" for n in names):
                return
            time.sleep(0.2)
        raise AssertionError(f"not all of {names} running:\n{out}\n{self.diagnostics()}")

    def diagnostics(self):
        parts = []
        for path in sorted(self.folder.rglob("*.log")):
            parts.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def shutdown(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def poll(condition, timeout, step=0.05):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError("condition not met in time")


def peer_labels(state_dir):
    [event] = ctl_json(state_dir, "peers")
    return {p["peer"] for p in event["peers"]}


@pytest.fixture
def supervised(tmp_path):
    discovery = free_udp_port()
    peers = {}
    programs = []
    for name in ("alpha", "beta"):
        folder = tmp_path / name
        (folder / "shared").mkdir(parents=True)
        port = free_transfer_port()
        settings = peer_settings(folder, port, discovery)
        programs.append(program_section(name, folder, settings))
        peers[name] = (folder, port)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "beta" / "shared" / "archive.bin").write_bytes(payload)
    (tmp_path / "alpha" / "shared" / "alpha.txt").write_text("from alpha\n")
    supervisor = Supervisor(tmp_path, programs)
    supervisor.payload = payload
    supervisor.peers = peers
    try:
        supervisor.wait_running("alpha", "beta")
        # RUNNING means up for startsecs (1 s), not ready: a peer busy
        # importing on a loaded machine opens its control socket later.
        poll(lambda: all((f / ".p2ppeer" / "control.sock").exists() for f, _ in peers.values()),
             timeout=30)
        yield supervisor
    finally:
        supervisor.shutdown()


def test_supervised_peers(supervised):
    (alpha, _), (beta, beta_port) = supervised.peers["alpha"], supervised.peers["beta"]
    alpha_state = alpha / ".p2ppeer"
    beta_label = f"{HOST}:{beta_port}"

    # p2ppeer-ctl lists the other peer's files.
    def listed():
        [event] = ctl_json(alpha_state, "list")
        return {f["name"]: f for f in event["files"]}

    poll(lambda: "archive.bin" in listed(), timeout=10)
    assert listed()["archive.bin"]["where"] == [beta_label]
    text = ctl(alpha_state, "list")
    assert text.returncode == 0
    # The WHERE column names the peer and gives its address: "beta (host:port)".
    assert re.search(
        rf"(?m)^archive\.bin\s+3\.0 MiB\s+[0-9a-f]{{8}}\s+(\S+ \()?{re.escape(beta_label)}\)?$",
        text.stdout,
    )

    # download --wait gives a byte-identical file.
    result = ctl(alpha_state, "download", "--wait", "archive.bin")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "downloaded archive.bin to downloads/archive.bin" in result.stdout
    got = (alpha / "downloads" / "archive.bin").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(supervised.payload).digest()

    # supervisorctl stop: the goodbye makes alpha drop beta within a second.
    assert beta_label in peer_labels(alpha_state)
    stopped = supervised.ctl("stop", "beta")
    assert "beta: stopped" in stopped.stdout, stopped
    waited = poll(lambda: beta_label not in peer_labels(alpha_state), timeout=1.0)
    assert waited < 1.0
    # A clean stop is exit status 0, which the program section expects.
    assert "EXITED" not in supervised.ctl("status", "beta").stdout
    assert "STOPPED" in supervised.ctl("status", "beta").stdout

    # supervisorctl start brings it back, with its files.
    started = supervised.ctl("start", "beta")
    assert "beta: started" in started.stdout, started
    poll(lambda: beta_label in peer_labels(alpha_state), timeout=5)
    poll(lambda: "archive.bin" in [n for n, f in listed().items() if beta_label in f["where"]], timeout=5)

    # The logs went to supervisor, and say why beta left.
    alpha_log = (alpha / "supervisor-stdout.log").read_text()
    assert f"Peer {beta_label} left: said goodbye" in alpha_log
    for folder in (alpha, beta):
        assert "Traceback" not in (folder / "supervisor-stdout.log").read_text()
