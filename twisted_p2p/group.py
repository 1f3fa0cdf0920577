"""
The group key of a private group, and what is derived from it.

A private group is the set of peers that hold the same 32-byte random key
(C{--group-key-file}).  Nothing here is a cipher of our own: every key a
part of the peer uses is derived from the group key with HKDF-SHA256
(from C{cryptography}), one label per use, so that no two uses share a
key:

 - the I{group id}, a public 8-byte name for the group, carried by its
   discovery datagrams so that a peer can tell another group's datagram
   from a forged one;
 - the I{discovery key}, which authenticates announces and goodbyes with
   HMAC-SHA256 (L{DiscoverySeal});
 - the seed of the group's I{certificate authority}, an Ed25519 key that
   every member derives alike and signs its own certificate with (see
   C{tls.py}); a stranger cannot make a certificate the members accept.

Also here: writing a new key file for C{p2ppeer-ctl new-group-key}.

Pure: no reactor.  The discovery seal takes the time as an argument.
"""

import binascii
import os
import secrets
import stat
import sys
from collections import OrderedDict

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from twisted_p2p import wire
from twisted_p2p.limits import (
    DATAGRAM_TIME_WINDOW,
    MAX_DATAGRAM,
    MAX_REPLAY_RECORDS,
    REPLAY_WINDOW,
)

#: Bytes of random key.
KEY_BYTES = 32

#: The default file C{p2ppeer-ctl new-group-key} writes.
DEFAULT_KEY_FILE = "group.key"

#: Lines of a key file that start with this are comments.
_COMMENT = "#"

#: HKDF salt: fixes the derivations to this protocol and version.
_SALT = b"twisted-p2p group v1"


class GroupKeyError(ValueError):
    """
    A group key file that cannot be used; the message says why and what to
    do, in one sentence.
    """


class GroupKey:
    """
    The group key, and the keys derived from it.

    @ivar group_id: the group's public id, 8 bytes.
    @ivar discovery_key: the HMAC key of discovery datagrams.
    @ivar ca_seed: the 32-byte seed of the group's Ed25519 certificate
        authority key.
    """

    def __init__(self, secret):
        if len(secret) != KEY_BYTES:
            raise GroupKeyError(f"a group key is {KEY_BYTES} bytes, not {len(secret)}")
        self.group_id = _derive(secret, b"group id", 8)
        self.discovery_key = _derive(secret, b"discovery mac", 32)
        self.ca_seed = _derive(secret, b"certificate authority", 32)

    @property
    def group_id_hex(self):
        return self.group_id.hex()

    def __repr__(self):
        # Never the key itself: a repr ends up in logs and tracebacks.
        return f"<GroupKey {self.group_id_hex}>"


def _derive(secret, label, length):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=label).derive(secret)


def encode_key(secret):
    """
    The text of a key file holding C{secret}: a comment for whoever finds
    the file, then the key as 64 hex digits.
    """
    return (
        "# twisted-p2p group key. Anyone holding this file can join the group\n"
        "# and read everything its members share: keep it secret (mode 0600).\n"
        f"{secret.hex()}\n"
    )


def decode_key(text):
    """
    The key in the text of a key file: the one line that is not blank or
    a comment, 64 hex digits.

    @raise GroupKeyError: anything else.
    """
    lines = [
        line.strip() for line in text.splitlines()
        if line.strip() and not line.strip().startswith(_COMMENT)
    ]
    if len(lines) != 1:
        raise GroupKeyError("it must hold one line of 64 hex digits (make one with p2ppeer-ctl new-group-key)")
    try:
        secret = binascii.unhexlify(lines[0])
    except (binascii.Error, ValueError):
        secret = b""
    if len(secret) != KEY_BYTES:
        raise GroupKeyError("its key is not 64 hex digits (make one with p2ppeer-ctl new-group-key)")
    return secret


def load_key_file(path):
    """
    The L{GroupKey} in the file at C{path}.

    The file must not be open to other users (as ssh insists of a private
    key): readable by others, or writable by anyone but its owner, and it
    is refused.

    @raise GroupKeyError: one sentence naming the file and the fix.
    """
    try:
        # Non-blocking, so that a FIFO there cannot hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise GroupKeyError(f"cannot read the group key file {path}: {e.strerror}")
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise GroupKeyError(f"the group key file {path} is not a regular file")
        try:
            data = os.read(fd, 4096)
        except OSError as e:
            raise GroupKeyError(f"cannot read the group key file {path}: {e.strerror}")
    finally:
        os.close(fd)
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise GroupKeyError(
            f"the group key file {path} is open to other users (mode "
            f"{stat.S_IMODE(mode):04o}); make it private: chmod 600 {path}"
        )
    try:
        secret = decode_key(data.decode("ascii"))
    except UnicodeDecodeError:
        raise GroupKeyError(f"the group key file {path} is not a twisted-p2p group key")
    except GroupKeyError as e:
        raise GroupKeyError(f"the group key file {path} is not usable: {e}")
    return GroupKey(secret)


def write_new_key(path):
    """
    Write a fresh random key to a new file at C{path}, mode 0600.  An
    existing file is never replaced: that would cut its peers off their
    group.

    @raise GroupKeyError: the file exists or cannot be written.
    """
    secret = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise GroupKeyError(
            f"{path} exists already; a new key there would cut its peers off "
            "their group. Choose another file, or remove it first"
        )
    except OSError as e:
        raise GroupKeyError(f"cannot create {path}: {e.strerror}")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(encode_key(secret))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        os.unlink(path)
        raise GroupKeyError(f"cannot write {path}: {e.strerror}")
    return GroupKey(secret)


def new_group_key_main(argv, out=sys.stdout, err=sys.stderr):
    """
    C{p2ppeer-ctl new-group-key [PATH]}: write a new key and say how to
    share it.  Returns the exit status.
    """
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        err.write("usage: p2ppeer-ctl new-group-key [PATH]  (default PATH: group.key)\n")
        return 1
    path = argv[0] if argv else DEFAULT_KEY_FILE
    try:
        key = write_new_key(path)
    except GroupKeyError as e:
        err.write(f"p2ppeer-ctl: {e}\n")
        return 1
    out.write(
        f"Wrote a new group key to {path} (mode 0600; group id {key.group_id_hex}).\n"
        "Start every peer of the group with --group-key-file PATH (or\n"
        'group-key-file = "PATH" in its settings file).\n'
        "Give each member a copy over a channel you trust: scp, a USB stick,\n"
        "a password manager; not chat or e-mail in the clear. Anyone who has\n"
        "the file can join the group and read everything it shares; to shut\n"
        "someone out, make a new key and give it to the others.\n"
    )
    return 0


# -- discovery datagrams -------------------------------------------------------


class DiscoverySeal:
    """
    Seals our discovery datagrams with the group key, and checks others':
    the MAC, the time, and that none is replayed.

    Every datagram we send carries the time and a counter that grows by one
    with each datagram of this run.  One that arrives is taken if its MAC is
    right, its time is within L{DATAGRAM_TIME_WINDOW} of ours, and its
    counter was not seen before from its sender's run: above the highest
    seen, or among the L{REPLAY_WINDOW} below it and not seen yet (as IPsec
    and DTLS do, so that datagrams reordered between links are not lost).

    The counters of at most L{MAX_REPLAY_RECORDS} runs are kept, the least
    recently heard forgotten first: only members can add one.

    @ivar room: bytes of JSON a sealed datagram can carry.
    """

    room = MAX_DATAGRAM - wire.SEAL_OVERHEAD

    def __init__(self, key):
        self._key = key
        self._counter = 0
        self._seen = OrderedDict()

    @property
    def group_id(self):
        return self._key.group_id

    def seal(self, body, now):
        """
        C{body} (an encoded datagram) sealed, stamped with C{now}.
        """
        self._counter += 1
        return wire.seal_datagram(
            body, self._key.group_id, self._key.discovery_key, int(now * 1000), self._counter
        )

    def open(self, data, now):
        """
        The C{(counter, body)} of a sealed datagram whose MAC and time are
        right.

        @raise wire.NotSealed, wire.OtherGroup, wire.Forged: see
            L{wire.open_datagram}.
        @raise Stale: its time is too far from C{now}.
        """
        stamp, counter, body = wire.open_datagram(
            data, self._key.group_id, self._key.discovery_key
        )
        if abs(stamp / 1000 - now) > DATAGRAM_TIME_WINDOW:
            raise Stale(f"sent {stamp / 1000 - now:+.0f} s from now")
        return counter, body

    def fresh(self, sender, counter):
        """
        Whether C{counter} is new from C{sender} (a peer id and instance id),
        recording it if so.
        """
        record = self._seen.get(sender)
        if record is None:
            self._seen[sender] = [counter, 1]
            while len(self._seen) > MAX_REPLAY_RECORDS:
                self._seen.popitem(last=False)
            return True
        self._seen.move_to_end(sender)
        highest, bits = record
        if counter > highest:
            shift = counter - highest
            record[0] = counter
            # Never shift by the jump itself: a counter may leap by 2**63.
            kept = bits << shift if shift < REPLAY_WINDOW else 0
            record[1] = (kept | 1) & ((1 << REPLAY_WINDOW) - 1)
            return True
        behind = highest - counter
        if behind >= REPLAY_WINDOW or bits >> behind & 1:
            return False
        record[1] = bits | 1 << behind
        return True


class Stale(wire.ProtocolError):
    """
    A sealed datagram whose time is outside the window: replayed later, or
    from a peer whose clock is wrong.
    """

