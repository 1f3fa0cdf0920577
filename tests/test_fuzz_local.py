"""
Fuzzing what comes from the console, the control socket, the settings and
the state dir (issue 11): command lines, control-socket lines (fed whole and
one byte at a time), settings files and option values, group key files,
and every file the peer reads back from its state dir (chunk maps, the hash
cache, the record of partial downloads, cached manifests), damaged at
random.  Nothing raises but the documented error, and nothing damaged is
ever taken for good.
"""

import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import CommandParts
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.python import usage

from twisted_p2p import cache, control, events, group, index, names, partials, tap, units
from twisted_p2p.limits import CHUNK_SIZE, MAX_COMMAND_LINE, MAX_NAME_BYTES
from twisted_p2p.manifest import Manifest
from twisted_p2p.render import render
from twisted_p2p.storage import MAP_MAGIC, ChunkMap

_tmp = tempfile.mkdtemp(prefix="fuzz-local-")

#: Text that tries to get somewhere: paths, escapes, NUL, separators, long.
sneaky = st.sampled_from([
    "../x", "..", ".", "/etc/passwd", "a/b", "..\\x", "x\x00y", "\x1b[2J\x1b[H", "\x1b]0;owned\x07",
    "\u202ertl", "a\u2028b", ".p2ppeer-0123.part", ".hidden", "x" * 300, "é" * 128, "name ",
    "name.", " ", "\ud800", "~", "$HOME", "*", "-rf",
])
text = st.one_of(sneaky, st.text(max_size=60), st.lists(sneaky, max_size=4).map("".join))


# -- names -----------------------------------------------------------------------


@given(text)
def test_a_legal_name_is_one_plain_child_of_its_folder(name):
    try:
        path = names.path_in(_tmp, name)
    except names.BadName:
        assert not names.is_legal_name(name)
        return
    assert os.path.dirname(path) == _tmp
    assert os.path.basename(path) == name
    assert not name.startswith(".")
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
    assert "\x00" not in name and "\x1b" not in name


@given(st.lists(text, min_size=1, max_size=5).map("/".join) | text)
def test_a_legal_path_stays_below_its_folder(path):
    try:
        where = names.local_path(_tmp, path)
    except names.BadName:
        assert not names.is_legal_path(path)
        return
    assert os.path.commonpath([_tmp, os.path.abspath(where)]) == _tmp
    assert os.path.abspath(where) != _tmp
    assert all(not part.startswith(".") for part in path.split("/"))


@given(text.filter(names.is_legal_name), st.integers(0, 3))
def test_a_free_name_is_legal_and_free(name, taken):
    used = {name} | {f"{os.path.splitext(name)[0]} ({n}){os.path.splitext(name)[1]}"
                     for n in range(1, taken + 1)}
    free = names.free_name(_tmp, name, exists=lambda p: os.path.basename(p) in used)
    assert names.is_legal_name(free)
    assert free not in used


# -- option values and settings files -------------------------------------------------


@given(text)
def test_sizes_and_rates_parse_or_are_usage_errors(value):
    try:
        assert units.parse_size(value) >= 0
    except ValueError:
        pass
    try:
        tap.parse_rate(value)
    except usage.UsageError:
        pass


@given(st.one_of(text, st.from_regex(r"\A\[?[0-9a-f:.]{0,40}\]?(:[0-9]{0,6})?\Z")))
def test_a_peer_target_parses_or_is_a_usage_error(value):
    try:
        host, port = tap.parse_peer(value)
    except usage.UsageError:
        return
    assert port is None or 1 <= port <= 65535
    assert "/" not in host and " " not in host


_setting_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '""'
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


@settings(max_examples=150)
@given(
    st.dictionaries(st.sampled_from(list(tap.SETTINGS) + ["bogus"]), _setting_values, max_size=4)
    .map(lambda d: "".join(f"{k} = {_toml_value(v)}\n" for k, v in d.items()).encode())
    | st.binary(max_size=200)
)
def test_a_settings_file_loads_or_is_one_usage_error(data):
    path = os.path.join(_tmp, "settings.toml")
    with open(path, "wb") as f:
        f.write(data)
    try:
        loaded = tap.load_settings(path)
    except usage.UsageError as e:
        assert "\n" not in str(e).strip() or path in str(e)
        return
    assert set(loaded) <= set(tap.SETTINGS)


@given(st.binary(max_size=300) | text.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_a_group_key_file_loads_or_is_one_group_key_error(data):
    path = os.path.join(_tmp, "group.key")
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    try:
        key = group.load_key_file(path)
    except group.GroupKeyError:
        return
    assert len(key.group_id) == 8


# -- command lines and the control socket ------------------------------------------------


@settings(max_examples=200)
@given(st.one_of(text, st.lists(st.sampled_from(
    ["download", "get", "resume", "cancel", "list", "ls", "peers", "status", "help", "exit",
     "quit", "version", "--from", "'", '"', "\\"]) | text, max_size=5).map(" ".join)))
def test_any_command_line_is_answered_with_events(line):
    parts = CommandParts()
    said = []
    d = parts.commands.run(line, said.append)
    failures = []
    d.addErrback(failures.append)
    assert failures == []
    for event in said:
        for rendered in render(event):
            assert "\x1b" not in rendered and "\x00" not in rendered


class _Commands:
    def __init__(self):
        self.lines = []

    def run(self, line, emit, origin=None):
        self.lines.append(line)
        emit(events.event("list", "NAME SIZE", files=[]))
        return defer.succeed(None)


def _control(data, pieces):
    commands = _Commands()
    factory = control.ControlFactory(commands)
    protocol = factory.buildProtocol(None)
    protocol.callLater = task.Clock().callLater
    transport = StringTransport()
    protocol.makeConnection(transport)
    for i in range(0, len(data), pieces):
        protocol.dataReceived(data[i : i + pieces])
    out = transport.value()
    for line in out.splitlines():
        json.loads(line)  # every line out is JSON
    return out, transport.disconnecting, commands.lines


control_lines = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda command, wait, extra: json.dumps({"command": command, "wait": wait, **extra}).encode(),
        _setting_values,
        _setting_values,
        st.dictionaries(st.sampled_from(["watch", "x"]), _setting_values, max_size=2),
    ),
)


@settings(max_examples=200)
@given(st.lists(control_lines, min_size=1, max_size=3).map(lambda ls: b"\n".join(ls) + b"\n"))
def test_the_control_socket_answers_alike_whole_and_bytewise(data):
    whole = _control(data, len(data))
    assert _control(data, 1) == whole
    out, closed, lines = whole
    assert len(lines) <= 1  # one request per connection
    if out:
        assert json.loads(out.splitlines()[-1])["event"] in ("end", "list", "error")


def test_a_huge_control_line_closes_and_is_not_kept():
    commands = _Commands()
    protocol = control.ControlFactory(commands).buildProtocol(None)
    protocol.callLater = task.Clock().callLater
    transport = StringTransport()
    protocol.makeConnection(transport)
    for _ in range(64):
        protocol.dataReceived(b"x" * (MAX_COMMAND_LINE // 2))
    assert transport.disconnecting
    assert commands.lines == []
    assert len(protocol._buffer) <= MAX_COMMAND_LINE + 256


# -- the state dir, damaged ----------------------------------------------------------------

_MANIFEST = Manifest.build(5 * CHUNK_SIZE + 3, [bytes([i]) * 32 for i in range(6)])


@st.composite
def damaged(draw, data):
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "grow", "truncate"]))
        if kind == "grow" or not data:
            data += draw(st.binary(min_size=1, max_size=20))
            continue
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


def _good_map():
    header = MAP_MAGIC + bytes.fromhex(_MANIFEST.file_id) + _MANIFEST.size.to_bytes(8, "big")
    return header + bytes([0b101101])


@settings(max_examples=150)
@given(st.one_of(damaged(_good_map()), st.binary(max_size=100)))
def test_a_damaged_chunk_map_counts_as_empty_or_as_what_it_says(data):
    path = os.path.join(_tmp, "map")
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDWR)
    try:
        chunks = ChunkMap(_MANIFEST.chunk_count)
        chunks.load(fd, _MANIFEST.file_id, _MANIFEST.size)
        held = list(chunks.indexes())
        assert all(0 <= i < _MANIFEST.chunk_count for i in held)
        assert chunks.verified == len(held)
    finally:
        os.close(fd)
    # Whatever it held, it is rewritten whole.
    with open(path, "rb") as f:
        assert len(f.read()) == len(_good_map())


def _good_cache():
    return json.dumps({
        "key": {"signature": [_MANIFEST.size, 1, 2], "id": _MANIFEST.file_id,
                "hashes": b"".join(_MANIFEST.chunk_hashes).hex()},
    }).encode()


@settings(max_examples=150)
@given(st.one_of(damaged(_good_cache()), st.binary(max_size=100)))
def test_a_damaged_hash_cache_gives_the_right_manifest_or_none(data):
    path = os.path.join(_tmp, "hashes.json")
    with open(path, "wb") as f:
        f.write(data)
    loaded = index._load_cache(path)
    assert isinstance(loaded, dict)
    manifest = index._cached_manifest(loaded.get("key"), (_MANIFEST.size, 1, 2))
    assert manifest is None or manifest == _MANIFEST


def _good_record():
    return json.dumps([
        {"file": "a.bin", "id": "ab" * 32, "size": 10, "percent": 50, "reason": "stopped"},
    ]).encode()


@settings(max_examples=100)
@given(st.one_of(damaged(_good_record()), st.binary(max_size=100)))
def test_a_damaged_record_of_partial_downloads_loads_what_is_whole(data):
    path = os.path.join(_tmp, "partial-downloads.json")
    with open(path, "wb") as f:
        f.write(data)
    record = partials._load(path)
    for entry in record.values():
        assert isinstance(entry["file"], str) and isinstance(entry["id"], str)


_folder = tempfile.mkdtemp(dir=_tmp)
_folder_fd = os.open(_folder, os.O_RDONLY | os.O_DIRECTORY)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_damaged_cached_manifest_is_refused(data):
    good = cache._encode_manifest(_MANIFEST, "a.bin")
    _write(good)
    assert cache._read_manifest(_folder_fd, _MANIFEST.file_id)[:2] == (_MANIFEST, "a.bin")
    _write(data.draw(damaged(good)))
    try:
        manifest, name, _ = cache._read_manifest(_folder_fd, _MANIFEST.file_id)
    except (ValueError, OSError):
        return
    # Cached files keep their shared path (folders), so "a/bin" is legal;
    # "../a", "/a" or an empty part never is.
    assert manifest == _MANIFEST and names.is_legal_path(name)


@pytest.mark.parametrize("name, legal", [
    ("a.bin", True), ("photos/a.bin", True),
    ("../a.bin", False), ("/a.bin", False), ("photos//a.bin", False), ("a/./b", False),
])
def test_a_cached_manifest_keeps_a_shared_path_and_never_one_that_climbs(name, legal):
    good = cache._encode_manifest(_MANIFEST, "a.bin")
    _write(good.replace(b'"a.bin"', json.dumps(name).encode(), 1))
    if legal:
        assert cache._read_manifest(_folder_fd, _MANIFEST.file_id)[:2] == (_MANIFEST, name)
    else:
        with pytest.raises(ValueError):
            cache._read_manifest(_folder_fd, _MANIFEST.file_id)


def _write(data):
    path = os.path.join(_folder, cache._MANIFEST)
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)
