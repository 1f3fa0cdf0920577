"""
Tests for L{twisted_p2p.group}: key files, derived keys, and the seal on
discovery datagrams (MAC, time window, replay window).
"""

import io
import os
import stat

import pytest

from twisted_p2p import group, wire
from twisted_p2p.limits import DATAGRAM_TIME_WINDOW, MAX_REPLAY_RECORDS, REPLAY_WINDOW

SECRET = bytes(range(32))


# -- key files -----------------------------------------------------------------


def test_a_new_key_file_is_private_and_loads(tmp_path):
    path = tmp_path / "group.key"
    written = group.write_new_key(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = group.load_key_file(str(path))
    assert loaded.group_id == written.group_id
    assert loaded.discovery_key == written.discovery_key
    # Fresh randomness every time.
    assert group.write_new_key(str(tmp_path / "other.key")).group_id != written.group_id


def test_a_key_file_is_never_replaced(tmp_path):
    path = tmp_path / "group.key"
    group.write_new_key(str(path))
    before = path.read_bytes()
    with pytest.raises(group.GroupKeyError, match="exists already"):
        group.write_new_key(str(path))
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o666])
def test_a_key_file_open_to_others_is_refused(tmp_path, mode):
    path = tmp_path / "group.key"
    path.write_text(group.encode_key(SECRET))
    path.chmod(mode)
    with pytest.raises(group.GroupKeyError, match=f"mode {mode:04o}.*chmod 600"):
        group.load_key_file(str(path))


def test_a_key_file_readable_by_its_group_is_taken(tmp_path):
    path = tmp_path / "group.key"
    path.write_text(group.encode_key(SECRET))
    path.chmod(0o640)
    assert group.load_key_file(str(path)).group_id == group.GroupKey(SECRET).group_id


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "abc\n", SECRET.hex()[:-2] + "\n", SECRET.hex() + "\n" + SECRET.hex() + "\n",
     "zz" * 32 + "\n"],
)
def test_a_bad_key_file_is_refused(tmp_path, text):
    path = tmp_path / "group.key"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(group.GroupKeyError, match="group.key is not usable"):
        group.load_key_file(str(path))


def test_missing_and_binary_key_files(tmp_path):
    with pytest.raises(group.GroupKeyError, match="cannot read"):
        group.load_key_file(str(tmp_path / "nothing"))
    path = tmp_path / "binary"
    path.write_bytes(b"\xff" * 64)
    path.chmod(0o600)
    with pytest.raises(group.GroupKeyError, match="not a twisted-p2p group key"):
        group.load_key_file(str(path))
    with pytest.raises(group.GroupKeyError, match="not a regular file"):
        group.load_key_file(str(tmp_path))


def test_a_key_file_keeps_its_comments_and_spaces():
    assert group.decode_key(f"# hello\n\n   {SECRET.hex().upper()}  \n# bye\n") == SECRET


def test_derived_keys_are_distinct_and_never_shown():
    key = group.GroupKey(SECRET)
    assert len({key.group_id, key.discovery_key, key.ca_seed}) == 3
    assert key.discovery_key != SECRET and key.ca_seed != SECRET
    assert group.GroupKey(SECRET).ca_seed == key.ca_seed
    assert SECRET.hex() not in repr(key) and key.group_id_hex in repr(key)


def test_new_group_key_command(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "team.key"
    assert group.new_group_key_main([str(path)], out, err) == 0
    assert f"Wrote a new group key to {path} (mode 0600" in out.getvalue()
    assert "--group-key-file" in out.getvalue()
    assert group.load_key_file(str(path))
    # Never over an existing key.
    assert group.new_group_key_main([str(path)], io.StringIO(), err) == 1
    assert "exists already" in err.getvalue()
    assert group.new_group_key_main(["a", "b"], io.StringIO(), err) == 1
    assert "usage: p2ppeer-ctl new-group-key [PATH]" in err.getvalue()


def test_new_group_key_command_default_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert group.new_group_key_main([], io.StringIO(), io.StringIO()) == 0
    assert stat.S_IMODE(os.stat(tmp_path / group.DEFAULT_KEY_FILE).st_mode) == 0o600


# -- the discovery seal --------------------------------------------------------

NOW = 1_700_000_000.0
SENDER = ("0123456789abcdef0123456789abcdef", "fedcba9876543210")


def test_seal_and_open():
    seal = group.DiscoverySeal(group.GroupKey(SECRET))
    first, second = seal.seal(b"{}", NOW), seal.seal(b"{}", NOW)
    other = group.DiscoverySeal(group.GroupKey(SECRET))
    assert other.open(first, NOW + 1) == (1, b"{}")
    assert other.open(second, NOW + 1) == (2, b"{}")
    assert seal.room == wire.MAX_DATAGRAM - wire.SEAL_OVERHEAD


def test_another_groups_seal():
    sealed = group.DiscoverySeal(group.GroupKey(SECRET)).seal(b"{}", NOW)
    with pytest.raises(wire.OtherGroup):
        group.DiscoverySeal(group.GroupKey(bytes(32))).open(sealed, NOW)


@pytest.mark.parametrize("skew", [DATAGRAM_TIME_WINDOW + 1, -DATAGRAM_TIME_WINDOW - 1])
def test_a_datagram_outside_the_time_window_is_stale(skew):
    seal = group.DiscoverySeal(group.GroupKey(SECRET))
    sealed = seal.seal(b"{}", NOW)
    with pytest.raises(group.Stale):
        seal.open(sealed, NOW + skew)
    assert seal.open(sealed, NOW + skew * 0.9)[1] == b"{}"


def test_counters_in_order_are_fresh_and_repeats_are_not():
    seal = group.DiscoverySeal(group.GroupKey(SECRET))
    assert all(seal.fresh(SENDER, n) for n in range(1, 200))
    assert not seal.fresh(SENDER, 199)
    assert not seal.fresh(SENDER, 150)
    # Another run of the same peer counts on its own.
    assert seal.fresh((SENDER[0], "0" * 16), 1)


def test_reordered_counters_within_the_window_are_fresh_once():
    seal = group.DiscoverySeal(group.GroupKey(SECRET))
    assert seal.fresh(SENDER, 100)
    assert seal.fresh(SENDER, 99)
    assert seal.fresh(SENDER, 100 - REPLAY_WINDOW + 1)
    assert not seal.fresh(SENDER, 99)
    assert not seal.fresh(SENDER, 100 - REPLAY_WINDOW)  # too far behind to tell
    assert seal.fresh(SENDER, 100 + REPLAY_WINDOW * 3)  # a jump forgets the old bits
    assert not seal.fresh(SENDER, 100)


def test_a_huge_jump_of_the_counter_costs_nothing():
    seal = group.DiscoverySeal(group.GroupKey(SECRET))
    assert seal.fresh(SENDER, 1)
    assert seal.fresh(SENDER, 2**64 - 1)
    assert seal._seen[SENDER] == [2**64 - 1, 1]
    assert not seal.fresh(SENDER, 2**64 - 1)
    assert seal.fresh(SENDER, 2**64 - 2)


def test_replay_records_are_bounded():
    seal = group.DiscoverySeal(group.GroupKey(SECRET))
    senders = [(f"{n:032x}", "0" * 16) for n in range(MAX_REPLAY_RECORDS + 1)]
    for sender in senders:
        assert seal.fresh(sender, 5)
    assert len(seal._seen) == MAX_REPLAY_RECORDS
    # The least recently heard was forgotten; the others are remembered.
    assert not seal.fresh(senders[-1], 5)
    assert seal.fresh(senders[0], 5)
