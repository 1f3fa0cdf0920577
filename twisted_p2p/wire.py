"""
Wire formats: discovery datagrams and transfer frames.

Pure functions, no reactor.  Every decoder raises L{ProtocolError} (or a
subclass) for anything it does not accept; callers drop the message or the
connection.  The formats are written down in C{PROTOCOL.md}.
"""

import hashlib
import hmac
import ipaddress
import json
import re
import struct
import unicodedata
from dataclasses import dataclass

from twisted_p2p.limits import (
    MAX_DATAGRAM,
    MAX_EXCHANGE_PEERS,
    MAX_HEADER,
    MAX_PEER_NAME,
    PROTOCOL_VERSION,
)
from twisted_p2p.names import UNSAFE_CATEGORIES

_PEER_ID = re.compile(r"\A[0-9a-f]{32}\Z")
_INSTANCE_ID = re.compile(r"\A[0-9a-f]{16}\Z")
_REVISION = re.compile(r"\A[0-9a-f]{16}\Z")
_FILE_ID = re.compile(r"\A[0-9a-f]{64}\Z")
_TOKEN = re.compile(r"\A[0-9a-f]{32}\Z")


class ProtocolError(ValueError):
    """
    A message that breaks the wire protocol.
    """


class Oversized(ProtocolError):
    """
    A message over its size limit.
    """


class WrongVersion(ProtocolError):
    """
    A message of a protocol version we do not speak.
    """


# -- field checks ----------------------------------------------------------


def _field(message, key, kind):
    value = message.get(key)
    # bool is an int subclass; a port of "true" is still wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {key!r} is missing or not {kind.__name__}")
    return value


def text_field(message, key, pattern=None, max_length=1024):
    value = _field(message, key, str)
    if len(value) > max_length:
        raise ProtocolError(f"field {key!r} is too long")
    if pattern is not None and not pattern.match(value):
        raise ProtocolError(f"field {key!r} is malformed")
    return value


def int_field(message, key, low, high):
    value = _field(message, key, int)
    if not low <= value <= high:
        raise ProtocolError(f"field {key!r} is out of range")
    return value


def port_field(message, key):
    return int_field(message, key, 1, 65535)


def file_id_field(message, key="id"):
    return text_field(message, key, _FILE_ID)


def token_field(message, key="token"):
    return text_field(message, key, _TOKEN)


def revision_field(message, key="rev"):
    return text_field(message, key, _REVISION)


def list_field(message, key, max_items):
    value = _field(message, key, list)
    if len(value) > max_items:
        raise ProtocolError(f"field {key!r} has too many items")
    return value


# -- discovery datagrams ---------------------------------------------------


@dataclass(frozen=True)
class Announce:
    """
    "I am here": who, which run of it, where its transfer ports are, and the
    revision of what it offers.

    @ivar name: a name for people (the host name by default), cleaned of
        control characters and cut to L{MAX_PEER_NAME}; or C{None}.
    @ivar host: the address others should reach its transfer ports at
        (C{--advertise-host}), or C{None} for the datagram's source address.
    @ivar peers: other peers it knows, as C{(host, udp_port)} pairs: where
        their datagrams come from (peer exchange; at most
        L{MAX_EXCHANGE_PEERS}).
    """

    peer_id: str
    instance_id: str
    transfer_port: int
    revision: str
    name: object = None
    host: object = None
    peers: tuple = ()


@dataclass(frozen=True)
class Goodbye:
    """
    "I am leaving."
    """

    peer_id: str
    instance_id: str


def _dumps(body):
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_datagram(message, limit=MAX_DATAGRAM):
    """
    Bytes of an L{Announce} or L{Goodbye}.  An announce carries as many of
    its C{peers}, in order, as fit in C{limit} bytes (the rest are left
    out: discovery passes on a different slice each time).

    @param limit: at most L{MAX_DATAGRAM}; less for a datagram that will be
        sealed (see L{seal_datagram}).
    """
    if isinstance(message, Announce):
        body = {
            "p2p": PROTOCOL_VERSION,
            "type": "announce",
            "peer": message.peer_id,
            "instance": message.instance_id,
            "port": message.transfer_port,
            "rev": message.revision,
        }
        if message.name:
            body["name"] = clean_peer_name(message.name)
        if message.host is not None:
            body["host"] = message.host
        data = _dumps(body)
        if message.peers:
            entries = []
            # '"peers":[' + ']' + a comma before it: 12 bytes.
            room = limit - len(data) - 12
            for host, port in message.peers[:MAX_EXCHANGE_PEERS]:
                entry = _dumps([host, port])
                if len(entry) + 1 > room:
                    break
                room -= len(entry) + 1
                entries.append([host, port])
            if entries:
                body["peers"] = entries
                data = _dumps(body)
    elif isinstance(message, Goodbye):
        data = _dumps({
            "p2p": PROTOCOL_VERSION,
            "type": "goodbye",
            "peer": message.peer_id,
            "instance": message.instance_id,
        })
    else:
        raise TypeError(f"not a datagram: {message!r}")
    assert len(data) <= limit
    return data


def decode_datagram(data):
    """
    The L{Announce} or L{Goodbye} in C{data}.

    @raise Oversized: over L{MAX_DATAGRAM}.
    @raise WrongVersion: a version other than ours.
    @raise ProtocolError: anything else that is not a well-formed message.
    """
    if len(data) > MAX_DATAGRAM:
        raise Oversized(f"datagram of {len(data)} bytes")
    if data.startswith(SEAL_MAGIC):
        raise Sealed("a datagram of a private group")
    message = _json_object(data)
    version = message.get("p2p")
    # JSON true and 1.0 compare equal to 1 in Python but are not version 1.
    if version != PROTOCOL_VERSION or not _is_int(version):
        if _is_int(version):
            raise WrongVersion(f"version {version}")
        raise ProtocolError("not a twisted-p2p datagram")
    kind = message.get("type")
    peer_id = text_field(message, "peer", _PEER_ID)
    instance_id = text_field(message, "instance", _INSTANCE_ID)
    if kind == "announce":
        name = None
        if "name" in message:
            name = clean_peer_name(text_field(message, "name", max_length=MAX_DATAGRAM)) or None
        host = None
        if "host" in message:
            host = address_field(message, "host")
        peers = ()
        if "peers" in message:
            peers = tuple(
                _exchange_entry(entry) for entry in list_field(message, "peers", MAX_EXCHANGE_PEERS)
            )
        return Announce(
            peer_id,
            instance_id,
            port_field(message, "port"),
            revision_field(message),
            name,
            host,
            peers,
        )
    if kind == "goodbye":
        return Goodbye(peer_id, instance_id)
    raise ProtocolError(f"unknown datagram type {kind!r}")


# -- sealed datagrams (private groups) ----------------------------------------
#
# A private group's datagram is the JSON datagram above in an envelope:
#
#   "p2pG" | version 1 | group id (8) | time, ms (8) | counter (8) | JSON | tag (32)
#
# the tag being HMAC-SHA256, under the group's discovery key, of everything
# before it.  The magic cannot begin a JSON text, so an open peer knows the
# datagram for a private group's.

#: The first bytes of a sealed datagram, and its version.
SEAL_MAGIC = b"p2pG"
SEAL_VERSION = 1

_SEAL_HEADER = struct.Struct(">4sB8sQQ")
_TAG_BYTES = 32

#: Bytes a seal adds to a datagram.
SEAL_OVERHEAD = _SEAL_HEADER.size + _TAG_BYTES


class Sealed(ProtocolError):
    """
    A sealed datagram, for a peer that holds no group key.
    """


class NotSealed(ProtocolError):
    """
    A datagram without a seal, for a peer of a private group: from a peer
    that holds no key (or not a datagram of ours at all).
    """


class OtherGroup(ProtocolError):
    """
    A sealed datagram of another group (or of another seal version).
    """


class Forged(ProtocolError):
    """
    A sealed datagram of our group whose tag is wrong: forged, or damaged.
    """


def seal_datagram(body, group_id, key, stamp, counter):
    """
    C{body} in a sealed envelope: C{group_id} (8 bytes), the time C{stamp}
    (ms since the epoch) and C{counter}, and an HMAC-SHA256 tag under
    C{key} over all of it.
    """
    head = _SEAL_HEADER.pack(SEAL_MAGIC, SEAL_VERSION, group_id, stamp, counter)
    sealed = head + body
    return sealed + hmac.digest(key, sealed, hashlib.sha256)


def open_datagram(data, group_id, key):
    """
    The C{(stamp, counter, body)} of a sealed datagram of the group
    C{group_id}, whose tag under C{key} is right.

    @raise Oversized: over L{MAX_DATAGRAM}.
    @raise NotSealed: no envelope.
    @raise OtherGroup: another group's, or another seal version's.
    @raise Forged: the tag is wrong.
    """
    if len(data) > MAX_DATAGRAM:
        raise Oversized(f"datagram of {len(data)} bytes")
    if not data.startswith(SEAL_MAGIC) or len(data) < SEAL_OVERHEAD:
        raise NotSealed("not a sealed datagram")
    magic, version, group, stamp, counter = _SEAL_HEADER.unpack_from(data)
    if version != SEAL_VERSION or group != group_id:
        raise OtherGroup(f"group {group.hex()}, seal version {version}")
    tag = hmac.digest(key, data[:-_TAG_BYTES], hashlib.sha256)
    if not hmac.compare_digest(tag, data[-_TAG_BYTES:]):
        raise Forged("wrong tag")
    return stamp, counter, data[_SEAL_HEADER.size : -_TAG_BYTES]


def clean_peer_name(name):
    """
    A peer's name made safe to show: every character of an unsafe category
    (controls, format characters, line separators...; see
    L{twisted_p2p.names.UNSAFE_CATEGORIES}) becomes C{?}, spaces at either
    end go, and it is cut to L{MAX_PEER_NAME} characters.
    """
    cleaned = "".join("?" if unicodedata.category(ch) in UNSAFE_CATEGORIES else ch for ch in name)
    return cleaned.strip()[:MAX_PEER_NAME].strip()


def parse_address(text):
    """
    C{text} as an IP address in its usual form, or C{None} if it is not a
    unicast address another peer could reach: scoped, unspecified,
    multicast or broadcast addresses are none.
    """
    if not isinstance(text, str) or "%" in text or len(text) > 45:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.is_unspecified or address.is_multicast:
        return None
    if address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255"):
        return None
    return str(address)


def address_group(host):
    """
    What C{host} counts as for per-address limits: an IPv4 address itself,
    an IPv6 address its /64 (one host may use any address of its /64, as
    privacy addresses do), anything else as it is.
    """
    if isinstance(host, str) and ":" in host:
        try:
            address = ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return host
        if not address.is_link_local and not address.is_loopback:
            return str(ipaddress.IPv6Network((address, 64), strict=False))
    return host


def address_field(message, key):
    """
    A unicast IP address (see L{parse_address}).
    """
    address = parse_address(_field(message, key, str))
    if address is None:
        raise ProtocolError(f"field {key!r} is not a unicast IP address")
    return address


def _exchange_entry(entry):
    if (
        not isinstance(entry, list)
        or len(entry) != 2
        or not _is_int(entry[1])
        or not 1 <= entry[1] <= 65535
    ):
        raise ProtocolError("a peers entry is not [address, port]")
    host = parse_address(entry[0])
    if host is None:
        raise ProtocolError("a peers entry is not a unicast IP address")
    return host, entry[1]


# -- transfer frames -------------------------------------------------------
#
# A frame is what Int32StringReceiver delivers: a JSON object header,
# a newline, then an optional binary body.


def encode_frame(header, body=b""):
    """
    One frame: C{header} as JSON, a newline, then C{body}.
    """
    return json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n" + body


def decode_frame(frame):
    """
    The C{(header, body)} of a frame.  The header must carry a string C{t}.
    """
    newline = frame.find(b"\n", 0, MAX_HEADER + 1)
    if newline < 0:
        raise ProtocolError("frame header is missing or too long")
    return decode_header(frame[:newline]), frame[newline + 1 :]


def decode_header(line):
    """
    The header of a frame from its JSON line (without the newline): an
    object with a string C{t}.
    """
    header = _json_object(line)
    text_field(header, "t", max_length=32)
    return header


def request(kind, **fields):
    """
    A request header of type C{kind}, stamped with our protocol version.
    """
    return dict(t=kind, v=PROTOCOL_VERSION, **fields)


def check_version(header):
    """
    Raise L{WrongVersion} unless a request header carries our version.
    """
    version = header.get("v")
    if version != PROTOCOL_VERSION or not _is_int(version):
        raise WrongVersion(f"protocol version {version!r}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _json_object(data):
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("not JSON")
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message


# -- chunk maps ------------------------------------------------------------
#
# A chunk map on the wire (the "have" answer) and on disk is a bitmap: chunk
# i is bit i % 8 (least significant first) of byte i // 8.

_BITS = [bytes((byte >> bit) & 1 for bit in range(8)) for byte in range(256)]


def expand_bits(bitmap, count):
    """
    One byte per chunk (1 held, 0 not) for the first C{count} chunks of
    C{bitmap}; bits past C{count} are ignored.
    """
    return bytearray(b"".join(_BITS[b] for b in bitmap)[:count])


def pack_bits(flags):
    """
    The bitmap of C{flags}, one byte (0 or 1) per chunk.
    """
    flags = bytes(flags)
    out = bytearray((len(flags) + 7) // 8)
    for i in range(0, len(flags), 8):
        group = flags[i : i + 8]
        out[i // 8] = sum(1 << bit for bit, flag in enumerate(group) if flag)
    return bytes(out)
