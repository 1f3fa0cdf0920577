"""
Running C{p2ppeer-ctl} from end-to-end tests, the way an admin would.
"""

import json
import os
import subprocess
import sys

from .peers import peer_env

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "p2ppeer-ctl")


def ctl_command():
    """
    The installed C{p2ppeer-ctl} script when there is one (as after
    C{make test}), else the same entry point through the interpreter.
    """
    if os.path.exists(_SCRIPT):
        return [_SCRIPT]
    return [sys.executable, "-m", "twisted_p2p.ctl"]


def ctl(state_dir, *args, timeout=60):
    """
    Run C{p2ppeer-ctl --state-dir STATE_DIR ARGS}; the CompletedProcess.
    """
    return subprocess.run(
        [*ctl_command(), "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=peer_env(),
    )


def ctl_json(state_dir, *args, timeout=60):
    """
    The events of C{p2ppeer-ctl --json ARGS}, checking it succeeded.
    """
    result = ctl(state_dir, "--json", *args, timeout=timeout)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
