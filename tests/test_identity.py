"""
Tests for L{twisted_p2p.identity}: the key pair in the state dir, and the
peer id and fingerprint derived from it.
"""

import os
import stat

import pytest

from twisted_p2p import wire
from twisted_p2p.identity import KEY_FILE, Identity, IdentityError, fingerprint_of, peer_id_of


def test_an_identity_is_made_once_and_kept_private(tmp_path):
    first = Identity.load_or_create(str(tmp_path))
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Identity.load_or_create(str(tmp_path))
    assert again.peer_id == first.peer_id
    assert again.fingerprint == first.fingerprint
    assert not list(tmp_path.glob("*.tmp"))


def test_a_leftover_temporary_file_is_replaced(tmp_path):
    leftover = tmp_path / (KEY_FILE + ".tmp")
    leftover.write_text("half a key")
    leftover.chmod(0o644)
    Identity.load_or_create(str(tmp_path))
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600


def test_the_peer_id_fits_the_wire_and_follows_the_key():
    identity = Identity.generate()
    assert wire._PEER_ID.match(identity.peer_id)
    assert peer_id_of(identity.public_bytes) == identity.peer_id
    assert Identity.generate().peer_id != identity.peer_id
    assert peer_id_of(bytes(32)) == peer_id_of(bytes(32))


def test_the_fingerprint_is_short_and_grouped():
    fingerprint = fingerprint_of(bytes(32))
    assert len(fingerprint) == 19 and fingerprint.count("-") == 3
    assert fingerprint != fingerprint_of(bytes(31) + b"\x01")


def test_a_damaged_key_file_is_an_error_that_says_what_to_do(tmp_path):
    (tmp_path / KEY_FILE).write_text("not a key")
    with pytest.raises(IdentityError, match="remove it to give this peer a new identity"):
        Identity.load_or_create(str(tmp_path))
