"""
Peers on separate hosts: network namespaces that this test creates and
removes itself, joined by veth pairs to a bridge inside a namespace of its
own.  Nothing here reaches the machine's real network: every address is in
198.18.0.0/15 (set aside for network tests) on links that exist only inside
these namespaces.

Checks what loopback cannot: discovery by subnet broadcast across a switch,
peers bound to --host on a real interface, and chunk data sent back to the
address a request came from.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from .ctl import ctl, ctl_json
from .peers import TWISTD, peer_env

pytestmark = pytest.mark.e2e

IP = shutil.which("ip")


def sh(*args, check=True):
    return subprocess.run(args, capture_output=True, text=True, check=check)


class Lab:
    """
    A bridge namespace and host namespaces hanging off it, all named after
    one random tag so that concurrent runs never meet.
    """

    def __init__(self, hosts):
        self.tag = f"p2p{random.randrange(16**6):06x}"
        # The namespace subnet: 198.18.<third>.0/24, picked per run.
        self.third = random.randrange(256)
        self.switch = f"{self.tag}-sw"
        self.hosts = [f"{self.tag}-h{i}" for i in range(1, hosts + 1)]
        self.procs = []

    def address(self, index):
        """The namespace address of host C{index} (from 1)."""
        return f"198.18.{self.third}.{index}"

    @property
    def broadcast(self):
        """The namespace subnet's broadcast address."""
        return f"198.18.{self.third}.255"

    def up(self):
        sh(IP, "netns", "add", self.switch)
        sh(IP, "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh(IP, "-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts, 1):
            sh(IP, "netns", "add", host)
            sh(IP, "-n", host, "link", "set", "lo", "up")
            # Created inside the host namespace, one end moved to the switch.
            sh(IP, "-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}")
            sh(IP, "-n", host, "link", "set", f"port{i}", "netns", self.switch)
            sh(IP, "-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
            sh(IP, "-n", host, "addr", "add", f"{self.address(i)}/24", "brd", self.broadcast, "dev", "eth0")
            sh(IP, "-n", host, "link", "set", "eth0", "up")

    def run(self, index, folder, argv):
        proc = subprocess.Popen(
            [IP, "netns", "exec", self.hosts[index - 1], *argv],
            cwd=folder,
            env=peer_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "stderr.txt", "wb"),
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def down(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for ns in [*self.hosts, self.switch]:
            pids = sh(IP, "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh(IP, "netns", "del", ns, check=False)


@pytest.fixture
def lab():
    if IP is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 to make network namespaces")
    lab = Lab(hosts=3)
    try:
        lab.up()
    except subprocess.CalledProcessError as e:
        lab.down()
        pytest.skip(f"cannot make network namespaces here: {e.stderr.strip()}")
    try:
        yield lab
    finally:
        lab.down()
        assert not set(sh(IP, "netns", "list").stdout.split()) & {*lab.hosts, lab.switch}


def peer_argv(lab, index, folder, discovery_port):
    return [
        TWISTD, "-n", "--pidfile", str(folder / "twistd.pid"), "p2ppeer",
        "--transfer-port", "27101",
        "--discovery-port", str(discovery_port),
        "--host", lab.address(index),
        "--broadcast", lab.broadcast,
        "--announce-interval", "0.5",
        "--console", "off",
        "--log-file", str(folder / "peer.log"),
    ]


def wait(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_three_hosts_find_each_other_and_share(lab, tmp_path):
    # Each host has its own network stack, so all may use the same ports.
    discovery_port = 27000
    folders = []
    payload = os.urandom(5 * 1024 * 1024 + 3)
    for i in (1, 2, 3):
        folder = tmp_path / f"h{i}"
        (folder / "shared").mkdir(parents=True)
        folders.append(folder)
    (folders[1] / "shared" / "photos.bin").write_bytes(payload)
    (folders[2] / "shared" / "notes.txt").write_text("from host 3\n")
    for i, folder in enumerate(folders, 1):
        lab.run(i, folder, peer_argv(lab, i, folder, discovery_port))

    state = folders[0] / ".p2ppeer"
    wait(lambda: (folders[0] / ".p2ppeer" / "control.sock").exists(), 20)

    def peers():
        result = ctl(state, "--json", "peers")
        if result.returncode != 0:
            return set()
        [event] = [json.loads(line) for line in result.stdout.splitlines()]
        return {p["peer"] for p in event["peers"]}

    wait(lambda: peers() == {f"{lab.address(2)}:27101", f"{lab.address(3)}:27101"}, 15)

    def listing():
        [event] = ctl_json(state, "list")
        return {f["name"]: f["where"] for f in event["files"]}

    wait(lambda: {"photos.bin", "notes.txt"} <= set(listing()), 10)
    assert listing()["photos.bin"] == [f"{lab.address(2)}:27101"]

    # The sender on host 2 connects back to host 1's receiver port at the
    # address the request came from.
    result = ctl(state, "download", "--wait", "photos.bin")
    assert result.returncode == 0, (result.stdout, result.stderr)
    got = (folders[0] / "downloads" / "photos.bin").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

    # A peer that stops says goodbye across the switch.
    ctl(folders[2] / ".p2ppeer", "stop")
    wait(lambda: peers() == {f"{lab.address(2)}:27101"}, 1.5)
