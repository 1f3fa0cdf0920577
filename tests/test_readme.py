"""
The README's commands for running and controlling a peer work as written in
a new shell: every program they name is found, on the PATH a shell starts
with, or through the venv the README tells the reader to activate.
"""

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: The README sections a new user copies commands from.
SECTIONS = (
    "Running a peer by hand",
    "Controlling a running peer: `p2ppeer-ctl`",
    "Several machines",
)

#: A new shell's PATH: the system's, without the project's venv.
SYSTEM_PATH = os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"])

#: Shell builtins and keywords, which are not looked up on the PATH.
BUILTINS = {"cd", "export", ".", "source"}


def section(title):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^##+ {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"the README has no section {title!r}"
    return match.group(1)


def shell_blocks(text):
    return re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)


def commands(block):
    """
    Each simple command of a shell block, as words, in order.
    """
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        command = []
        for word in words + ["&&"]:
            if word in ("&&", "||", ";", "|"):
                if command:
                    yield command
                command = []
            else:
                command.append(word)


@pytest.mark.parametrize("title", SECTIONS)
def test_every_program_is_found_as_written(title):
    blocks = shell_blocks(section(title))
    assert blocks, f"no shell commands in {title!r}"
    for block in blocks:
        path = SYSTEM_PATH
        for words in commands(block):
            program = words[0]
            if program in (".", "source") and words[1].endswith(".venv/bin/activate"):
                path = os.pathsep.join([str(REPO / ".venv" / "bin"), path])
                continue
            if program in BUILTINS or "=" in program:
                continue
            if "/" in program:
                # Relative to the checkout, where the README's reader is.
                found = (REPO / program).exists() or Path(program).is_absolute()
            else:
                found = shutil.which(program, path=path) is not None
            assert found, f"{title}: {' '.join(words)!r} fails with '{program}: command not found'"
