"""
Logs for machines: JSON lines with structured fields, and SIGHUP for
logrotate (reopen the file) and for an at-once re-scan of shared/.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from .ctl import ctl_json
from .peers import BROADCAST, HOST, TWISTD, free_transfer_port, free_udp_port, peer_env

pytestmark = pytest.mark.e2e


def start(folder, discovery, *extra):
    (folder / "shared").mkdir(parents=True)
    port = free_transfer_port()
    proc = subprocess.Popen(
        [
            TWISTD, "-n", "--pidfile", str(folder / "twistd.pid"), "p2ppeer",
            "--transfer-port", str(port), "--discovery-port", str(discovery),
            "--host", HOST, "--broadcast", BROADCAST, "--announce-interval", "0.5",
            "--console", "off", *extra,
        ],
        cwd=folder,
        env=peer_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, port


def json_events(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_json_logs_and_sighup(tmp_path):
    discovery = free_udp_port()
    log = tmp_path / "a" / "peer.log"
    a, _ = start(tmp_path / "a", discovery, "--log-file", str(log), "--log-format", "json")
    b, b_port = start(tmp_path / "b", discovery)
    try:
        # A structured event, every field kept.
        joined = wait(
            lambda: [e for e in json_events(log) if e.get("event") == "peer-joined"]
        )
        assert joined[0]["peer"] == f"{HOST}:{b_port}"
        assert len(joined[0]["peer_id"]) == 32

        # logrotate moves the file away, then sends SIGHUP: the peer reopens
        # the path, and re-scans shared/ at once (not in 10 s).
        os.rename(log, tmp_path / "a" / "peer.log.1")
        (tmp_path / "a" / "shared" / "late.txt").write_text("arrived late\n")
        a.send_signal(signal.SIGHUP)
        wait(lambda: log.exists() and any(e.get("event") == "hangup" for e in json_events(log)), 5)

        def listed():
            [event] = ctl_json(tmp_path / "a" / ".p2ppeer", "list")
            return [f["name"] for f in event["files"]]

        started = time.monotonic()
        wait(lambda: "late.txt" in listed(), timeout=5)
        assert time.monotonic() - started < 5  # the periodic re-scan is every 10 s
        assert a.poll() is None, "SIGHUP must not stop the peer"

        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=10) == 0
        left = wait(lambda: [e for e in json_events(log) if e.get("event") == "peer-left"])
        assert left[0]["reason"] == "said goodbye"
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
