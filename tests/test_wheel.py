"""
The built wheel ships the twistd plugin, so `twistd p2ppeer` works after a
plain `pip install`.

setuptools drops C{twisted.plugins} unless it is listed explicitly, and an
C{__init__.py} there would shadow Twisted's own plugin package; both mistakes
pass every unit test and only show up in an installed copy, so check one.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600

# Left out of the copy that is built: local state, and an in-tree build/ that
# could carry stale modules into the wheel.
_TOP_LEVEL_STATE = {".git", ".venv", "build", "dist", ".pytest_cache", ".hypothesis", "sandbox"}
_ANYWHERE_STATE = {"__pycache__", "dropin.cache"}


def _not_source(directory, names):
    ignored = {n for n in names if n in _ANYWHERE_STATE or n.endswith(".egg-info")}
    if Path(directory) == REPO_ROOT:
        ignored |= _TOP_LEVEL_STATE & set(names)
    return ignored


def _run(args, cwd, env):
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, timeout=TIMEOUT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}"
    return result.stdout


@pytest.mark.slow
def test_wheel_ships_plugin(tmp_path):
    # Run away from the checkout so its twisted/plugins is not on sys.path.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=_not_source)
    wheels = tmp_path / "wheels"

    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheels, source],
         cwd=tmp_path, env=env)
    [wheel] = wheels.glob("twisted_p2p-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/p2ppeer_plugin.py" in names
    assert "twisted_p2p/PROTOCOL.md" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    # Every module of the package, subpackages included (setup.cfg lists
    # them one by one: a subpackage left out would be missing here).
    package = REPO_ROOT / "twisted_p2p"
    modules = {str(p.relative_to(REPO_ROOT)) for p in package.rglob("*.py")}
    assert modules <= names, sorted(modules - names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
    _run([venv / "bin" / "python", "-m", "pip", "install", wheel], cwd=tmp_path, env=env)
    help_text = _run([venv / "bin" / "twistd", "--help"], cwd=tmp_path, env=env)
    assert "p2ppeer" in help_text
    # The plugin's options import the whole peer.
    peer_help = _run([venv / "bin" / "twistd", "p2ppeer", "--help"], cwd=tmp_path, env=env)
    assert "--transfer-port" in peer_help
