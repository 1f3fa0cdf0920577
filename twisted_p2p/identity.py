"""
A peer's identity: an Ed25519 key pair kept in its state dir, and the peer
id and fingerprint derived from the public key.

Because the peer id is a hash of the public key, a peer can prove it is
the peer it announces: in a private group every connection shows a
certificate for that key, and a host that claims another's id cannot
complete one (see C{tls.py}).
"""

import hashlib
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

#: The key file in the state dir (PKCS #8 PEM, mode 0600).
KEY_FILE = "identity.key"


class IdentityError(Exception):
    """
    The key file exists but cannot be used; the message says which and what
    to do.
    """


def peer_id_of(public_bytes):
    """
    The peer id of a raw 32-byte Ed25519 public key: the first 128 bits of
    its SHA-256, in hex (the 32 hex digits of the wire format).
    """
    return hashlib.sha256(b"twisted-p2p peer id\n" + public_bytes).hexdigest()[:32]


def fingerprint_of(public_bytes):
    """
    A short fingerprint of a raw public key, for people to compare over the
    phone: the first 64 bits of its SHA-256, as four groups of four hex
    digits.
    """
    digest = hashlib.sha256(public_bytes).hexdigest()
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


def public_bytes_of(public_key):
    """
    The raw bytes of an Ed25519 public key, or C{None} for another kind.
    """
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        return None
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Identity:
    """
    Our key pair.

    @ivar private_key: the L{ed25519.Ed25519PrivateKey}.
    @ivar public_bytes: its raw public key.
    @ivar peer_id: our peer id (L{peer_id_of}).
    @ivar fingerprint: our fingerprint (L{fingerprint_of}).
    """

    def __init__(self, private_key):
        self.private_key = private_key
        self.public_bytes = public_bytes_of(private_key.public_key())
        self.peer_id = peer_id_of(self.public_bytes)
        self.fingerprint = fingerprint_of(self.public_bytes)

    @classmethod
    def generate(cls):
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, state_dir):
        """
        The identity kept in C{state_dir}, made (and kept, mode 0600) on
        the first start.

        @raise IdentityError: the file is there but is not a key of ours.
        """
        path = os.path.join(state_dir, KEY_FILE)
        try:
            with open(path, "rb") as f:
                data = f.read(64 * 1024)
        except FileNotFoundError:
            return cls._create(path)
        except OSError as e:
            raise IdentityError(f"cannot read the peer's key {path}: {e.strerror}")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            key = None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise IdentityError(
                f"{path} is not an Ed25519 private key; remove it to give this "
                "peer a new identity (and a new peer id)"
            )
        return cls(key)

    @classmethod
    def _create(cls, path):
        identity = cls.generate()
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        temporary = path + ".tmp"
        try:
            # A leftover from a crash may have another mode: start afresh.
            if os.path.lexists(temporary):
                os.unlink(temporary)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except OSError as e:
            raise IdentityError(f"cannot write the peer's key {path}: {e.strerror}")
        return identity
