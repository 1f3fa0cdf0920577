"""
L{PartialFile}: a download's bytes on disk until they are complete.
"""

import os

from twisted_p2p.index import file_signature
from twisted_p2p.storage import PARTIAL_PREFIX, PARTIAL_SUFFIX, PartialFile

FILE_ID = "0123456789abcdef" * 4


def listing(folder):
    return sorted(os.listdir(folder))


def test_partial_file_is_hidden_and_sized(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(1000)
    name = os.path.basename(partial.path)
    assert name == f"{PARTIAL_PREFIX}{FILE_ID[:32]}{PARTIAL_SUFFIX}"
    assert name.startswith(".")
    assert os.path.dirname(partial.path) == str(tmp_path)
    assert os.path.getsize(partial.path) == 1000
    partial.discard()


def test_write_at_offsets(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(10)
    partial.write(6, b"6789")
    partial.write(0, memoryview(b"012"))
    partial.write(3, b"345")
    final, signature = partial.complete("digits.txt")
    assert final == "digits.txt"
    path = tmp_path / "digits.txt"
    assert path.read_bytes() == b"0123456789"
    assert signature == file_signature(os.stat(path))
    assert listing(tmp_path) == ["digits.txt"]


def test_unwritten_ranges_are_zero(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(6)
    partial.write(2, b"ab")
    partial.complete("holes")
    assert (tmp_path / "holes").read_bytes() == b"\0\0ab\0\0"


def test_reopen_keeps_what_was_written(tmp_path):
    first = PartialFile(str(tmp_path), FILE_ID)
    first.open(4)
    first.write(0, b"ab")
    again = PartialFile(str(tmp_path), FILE_ID)
    again.open(4)
    again.write(2, b"cd")
    again.complete("resumed")
    first.discard()  # its fd only; the partial file was already renamed
    assert (tmp_path / "resumed").read_bytes() == b"abcd"


def test_complete_never_overwrites(tmp_path):
    (tmp_path / "report.pdf").write_bytes(b"mine")
    (tmp_path / "report (1).pdf").write_bytes(b"mine too")
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(3)
    partial.write(0, b"new")
    final, _ = partial.complete("report.pdf")
    assert final == "report (2).pdf"
    assert (tmp_path / "report.pdf").read_bytes() == b"mine"
    assert (tmp_path / "report (1).pdf").read_bytes() == b"mine too"
    assert (tmp_path / "report (2).pdf").read_bytes() == b"new"
    assert listing(tmp_path) == ["report (1).pdf", "report (2).pdf", "report.pdf"]


def test_complete_an_empty_file(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(0)
    final, signature = partial.complete("empty")
    assert final == "empty"
    assert (tmp_path / "empty").read_bytes() == b""
    assert signature[0] == 0


def test_discard_removes_the_partial(tmp_path):
    partial = PartialFile(str(tmp_path), FILE_ID)
    partial.open(100)
    partial.write(0, b"x" * 100)
    assert listing(tmp_path) == [os.path.basename(partial.path)]
    partial.discard()
    assert listing(tmp_path) == []
    # Twice, or never opened: nothing to do, no error.
    partial.discard()
    PartialFile(str(tmp_path), "f" * 64).discard()
    assert listing(tmp_path) == []
