"""
A transfer port below 1024 without the privilege to bind it: one sentence
that names the port and the fix, exit status 1, no traceback.
"""

import os
import shutil
import subprocess

import pytest

from .peers import TWISTD, peer_env

pytestmark = pytest.mark.e2e


def test_low_port_without_privilege(tmp_path):
    (tmp_path / "shared").mkdir()
    argv = [
        TWISTD, "-n", "--pidfile", str(tmp_path / "twistd.pid"),
        "p2ppeer", "--transfer-port", "1001", "--host", "127.0.0.1",
    ]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, and setpriv is missing to drop the privilege")
        # Root without CAP_NET_BIND_SERVICE, as a normal user would be.
        argv = [setpriv, "--bounding-set", "-net_bind_service", *argv]
    result = subprocess.run(
        argv, cwd=tmp_path, env=peer_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr == (
        "twistd p2ppeer: error: port 1001 is below 1024 and needs privilege: pass a "
        "--transfer-port of 1024 or more, or run as root / with CAP_NET_BIND_SERVICE\n"
    )
    assert result.stdout == ""
