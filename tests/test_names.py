"""
Tests for L{twisted_p2p.names}: what a legal shared name is, and where it may
be written.
"""

import os

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from twisted_p2p.limits import MAX_NAME_BYTES
from twisted_p2p.names import BadName, check_name, free_name, is_legal_name, path_in

LEGAL = [
    "report.pdf",
    "a",
    "x.tar.gz",
    "with space.txt",
    "caf\u00e9 \u00fcber.txt",
    "\u65e5\u672c\u8a9e.txt",
    "a..b",
    "~",
    "-rf",
]

ILLEGAL = [
    "",
    ".",
    "..",
    ".hidden",
    ".partial-abc",
    "a/b",
    "/etc/passwd",
    "../x",
    "a\\b",
    "..\\x",
    "a\x00b",
    "\x00",
    "a\nb",
    "a\tb",
    "a\x7fb",
    "a\u200bb",  # zero-width space: format character
    "a\u202eb",  # right-to-left override
    "a\u2028b",  # line separator: would break a listing's line
    "a\u2029b",  # paragraph separator
    "\ue000",  # private use
    "a\ud800b",  # lone surrogate: not UTF-8
    "trailing ",
    " leading",
    "trailing.",
    "ends.in.dot.",
    "x" * (MAX_NAME_BYTES + 1),
    "\u00e9" * 128,  # 128 characters, 256 UTF-8 bytes
]


@pytest.mark.parametrize("name", LEGAL)
def test_legal(name):
    assert check_name(name) == name
    assert is_legal_name(name)


@pytest.mark.parametrize("name", ILLEGAL)
def test_illegal(name):
    with pytest.raises(BadName):
        check_name(name)
    assert not is_legal_name(name)


@pytest.mark.parametrize("name", [None, b"bytes.txt", 42, ["a"]])
def test_not_text(name):
    with pytest.raises(BadName):
        check_name(name)
    assert not is_legal_name(name)


def test_every_character_is_judged_by_its_category():
    """
    Whatever shortcut check_name takes, a character inside a name is
    refused exactly when its Unicode category is an unsafe one: every
    character of the Basic Multilingual Plane, and the planes' ends.
    """
    import sys
    import unicodedata

    from twisted_p2p.names import UNSAFE_CATEGORIES

    for code in [*range(0x10000), 0x1F600, 0xE0001, 0xF0000, 0x10FFFF, sys.maxunicode]:
        ch = chr(code)
        if ch in "/\\":
            continue
        unsafe = unicodedata.category(ch) in UNSAFE_CATEGORIES
        assert is_legal_name(f"a{ch}b") is not unsafe, hex(code)


def test_byte_limit():
    assert check_name("x" * MAX_NAME_BYTES)
    with pytest.raises(BadName):
        check_name("x" * (MAX_NAME_BYTES + 1))
    # The limit counts UTF-8 bytes, not characters.
    assert check_name("\u00e9" * (MAX_NAME_BYTES // 2))
    assert len("\u00e9" * 128) == 128 < MAX_NAME_BYTES


def test_bad_name_is_value_error():
    assert issubclass(BadName, ValueError)


# -- path_in ---------------------------------------------------------------


def test_path_in(tmp_path):
    assert path_in(str(tmp_path), "report.pdf") == os.path.join(str(tmp_path), "report.pdf")


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "a\\b", "", ".x"])
def test_path_in_refuses(tmp_path, name):
    with pytest.raises(BadName):
        path_in(str(tmp_path), name)


def test_path_in_relative_folder():
    path = path_in("shared", "a.txt")
    assert os.path.dirname(os.path.abspath(path)) == os.path.abspath("shared")


_sneaky = st.lists(
    st.sampled_from(["..", ".", "/", "\\", "a", "\x00", " ", "~", "\u00e9"]) | st.text(max_size=5),
    max_size=8,
).map("".join)


@given(st.one_of(_sneaky, st.text()))
@example("..")
@example("../..")
@example("a/../../b")
@example("..\\..")
@example("/")
def test_path_in_never_escapes(name):
    """
    Every name path_in accepts is a direct child of the folder; every name it
    refuses is one check_name refuses.
    """
    folder = "/srv/p2p/shared"
    try:
        path = path_in(folder, name)
    except BadName:
        assert not is_legal_name(name)
        return
    assert is_legal_name(name)
    assert os.path.dirname(os.path.abspath(path)) == folder
    assert os.path.basename(path) == name
    assert os.path.normpath(path) == path


# -- free_name -------------------------------------------------------------


def test_free_name_unused(tmp_path):
    assert free_name(str(tmp_path), "x.txt") == "x.txt"


def test_free_name_counts_up(tmp_path):
    folder = str(tmp_path)
    (tmp_path / "x.txt").write_bytes(b"0")
    assert free_name(folder, "x.txt") == "x (1).txt"
    (tmp_path / "x (1).txt").write_bytes(b"1")
    assert free_name(folder, "x.txt") == "x (2).txt"
    (tmp_path / "x (2).txt").write_bytes(b"2")
    (tmp_path / "x (4).txt").write_bytes(b"4")
    assert free_name(folder, "x.txt") == "x (3).txt"


def test_free_name_without_extension(tmp_path):
    (tmp_path / "README").write_bytes(b"")
    assert free_name(str(tmp_path), "README") == "README (1)"


def test_free_name_double_extension(tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(b"")
    assert free_name(str(tmp_path), "a.tar.gz") == "a.tar (1).gz"


def test_free_name_sees_directories_and_dangling_links(tmp_path):
    (tmp_path / "d.txt").mkdir()
    os.symlink(str(tmp_path / "nowhere"), str(tmp_path / "l.txt"))
    assert free_name(str(tmp_path), "d.txt") == "d (1).txt"
    assert free_name(str(tmp_path), "l.txt") == "l (1).txt"


def test_free_name_refuses_bad_names(tmp_path):
    for name in ["..", "a/b", ".hidden", ""]:
        with pytest.raises(BadName):
            free_name(str(tmp_path), name)


def test_free_name_long_name(tmp_path):
    name = "s" * (MAX_NAME_BYTES - 4) + ".txt"
    (tmp_path / name).write_bytes(b"")
    result = free_name(str(tmp_path), name)
    assert result == "s" * (MAX_NAME_BYTES - 8) + " (1).txt"
    assert len(result.encode("utf-8")) == MAX_NAME_BYTES
    assert is_legal_name(result)


def test_free_name_long_extension():
    """
    An extension that leaves no room for a stem must neither loop forever nor
    give a name that starts with a space.
    """
    for ext_length in (MAX_NAME_BYTES - 5, MAX_NAME_BYTES - 2):
        name = "a." + "b" * ext_length
        assert is_legal_name(name)
        taken = {name}
        result = free_name("/f", name, exists=lambda p: os.path.basename(p) in taken)
        assert result != name
        assert is_legal_name(result)
        assert result.endswith(" (1)")


@given(
    st.text(min_size=1, max_size=300).filter(is_legal_name),
    st.integers(min_value=0, max_value=3),
)
def test_free_name_always_legal_and_free(name, taken_count):
    """
    Whatever the name and however many variants are taken, free_name gives a
    legal name that is not taken.
    """
    taken = {name}
    for _ in range(taken_count):
        taken.add(free_name("/f", name, exists=lambda p: os.path.basename(p) in taken))
    assume(len(taken) == taken_count + 1)
    result = free_name("/f", name, exists=lambda p: os.path.basename(p) in taken)
    assert result not in taken
    assert is_legal_name(result)


# -- the path rule -----------------------------------------------------------

from twisted_p2p.limits import MAX_PATH_BYTES, MAX_PATH_DEPTH  # noqa: E402
from twisted_p2p.names import check_path, is_legal_path, leaf, local_path  # noqa: E402

LEGAL_PATHS = ["a", "photos/2026/a.jpg", "my photos/été 2026/日本語.txt", "a..b/c..d", "~/x"]
ILLEGAL_PATHS = [
    "", "/", "/etc/passwd", "a/", "a//b", "../a", "a/..", "a/../b", "./a", "a/./b",
    "a\\b", "a/.hidden/b", "a/b ", "a/ b", "a/b.", "a/\x00", "a/\u202e", "C:\\x",
    "/".join(["d"] * (MAX_PATH_DEPTH + 1)),
    "/".join(["\u00e9" * 100] * 6),  # 1,205 bytes, each part legal
]


@pytest.mark.parametrize("path", LEGAL_PATHS)
def test_legal_paths(path):
    assert check_path(path) == path and is_legal_path(path)


@pytest.mark.parametrize("path", ILLEGAL_PATHS)
def test_illegal_paths(path):
    with pytest.raises(BadName):
        check_path(path)
    assert not is_legal_path(path)


def test_leaf():
    assert leaf("photos/2026/a.jpg") == "a.jpg" and leaf("a.jpg") == "a.jpg"


_legal_names = st.text(min_size=1, max_size=20).filter(is_legal_name)


@given(st.lists(_legal_names, min_size=1, max_size=MAX_PATH_DEPTH))
def test_legal_names_joined_are_a_legal_path(parts):
    path = "/".join(parts)
    assume(len(path.encode("utf-8")) <= MAX_PATH_BYTES)
    assert check_path(path) == path


@given(
    st.lists(_legal_names, min_size=0, max_size=5),
    st.lists(_legal_names, min_size=0, max_size=5),
    st.sampled_from(["..", ".", "", ".git", "a\\b", "x\n"]),
)
def test_one_bad_part_spoils_a_path(before, after, bad):
    assert not is_legal_path("/".join(before + [bad] + after))


@given(st.lists(_legal_names, min_size=1, max_size=5))
def test_an_absolute_path_is_refused(parts):
    assert not is_legal_path("/" + "/".join(parts))


_sneaky_paths = st.lists(
    st.sampled_from(["..", ".", "/", "//", "\\", "a", "b c", "\x00", " ", "~", "\u00e9", "\u202e"])
    | st.text(max_size=4),
    max_size=12,
).map("".join)


@given(st.one_of(_sneaky_paths, st.text()))
@example("../../etc/passwd")
@example("a/../../b")
@example("/etc/passwd")
@example("a/b/../../..")
def test_a_legal_path_stays_below_its_folder(path):
    """
    Whatever the text, a path the rule accepts is below the folder, names
    the same parts, and needs no normalising: nothing in it could climb.
    """
    folder = "/srv/p2p/downloads"
    try:
        where = local_path(folder, path)
    except BadName:
        assert not is_legal_path(path)
        return
    assert is_legal_path(path)
    assert where.startswith(folder + "/")
    assert os.path.normpath(where) == where
    assert where[len(folder) + 1 :].split(os.sep) == path.split("/")
    parts = path.split("/")
    assert all(p not in ("", ".", "..") and not p.startswith(".") for p in parts)
    assert len(parts) <= MAX_PATH_DEPTH and len(path.encode("utf-8")) <= MAX_PATH_BYTES
