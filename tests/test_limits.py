"""
Every limit has one home (issue 11): each limit PROTOCOL.md names is a
constant of limits.py, each constant there says why it is what it is, and
limits.py stays the bottom of the house (it imports nothing).
"""

import ast
import re
from pathlib import Path

import twisted_p2p.limits as limits

PACKAGE = Path(limits.__file__).parent


def test_every_limit_the_protocol_names_is_in_limits_py():
    text = (PACKAGE / "PROTOCOL.md").read_text(encoding="utf-8")
    named = {n for n in re.findall(r"`([A-Z][A-Z0-9_]{3,})`", text)
             if not n.startswith(("SO_", "TLS_"))}
    assert named
    missing = sorted(n for n in named if not hasattr(limits, n))
    assert missing == []


def test_every_limit_has_its_reason():
    source = (PACKAGE / "limits.py").read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id.isupper():
            # A "#:" comment right above it, or above the group it starts.
            above = node.lineno - 2
            while above >= 0 and re.match(r"^[A-Z][A-Z0-9_]* = ", lines[above]):
                above -= 1
            assert lines[above].startswith("#:") or lines[above].startswith("#"), node.targets[0].id


def test_limits_py_imports_nothing():
    tree = ast.parse((PACKAGE / "limits.py").read_text(encoding="utf-8"))
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
