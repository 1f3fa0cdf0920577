"""
Tests for L{twisted_p2p.wire}: discovery datagrams and transfer frames.
"""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_p2p import wire
from twisted_p2p.limits import (
    MAX_DATAGRAM,
    MAX_EXCHANGE_PEERS,
    MAX_HEADER,
    MAX_PEER_NAME,
    PROTOCOL_VERSION,
)

PEER = "0123456789abcdef0123456789abcdef"
INSTANCE = "fedcba9876543210"
REVISION = "00112233aabbccdd"


def _datagram(**changes):
    """
    The bytes of a well-formed announce, with C{changes} applied to its JSON
    object (a value of C{None} removes the key).
    """
    body = {
        "p2p": PROTOCOL_VERSION,
        "type": "announce",
        "peer": PEER,
        "instance": INSTANCE,
        "port": 4000,
        "rev": REVISION,
    }
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return json.dumps(body).encode("utf-8")


# -- datagrams -------------------------------------------------------------


class TestDatagramRoundTrip:
    def test_announce(self):
        message = wire.Announce(PEER, INSTANCE, 4000, REVISION)
        data = wire.encode_datagram(message)
        assert wire.decode_datagram(data) == message

    def test_goodbye(self):
        message = wire.Goodbye(PEER, INSTANCE)
        data = wire.encode_datagram(message)
        assert wire.decode_datagram(data) == message

    def test_announce_port_limits(self):
        for port in (1, 65535):
            message = wire.Announce(PEER, INSTANCE, port, REVISION)
            assert wire.decode_datagram(wire.encode_datagram(message)).transfer_port == port

    def test_encoded_fields(self):
        data = wire.encode_datagram(wire.Announce(PEER, INSTANCE, 4000, REVISION))
        assert json.loads(data) == {
            "p2p": PROTOCOL_VERSION,
            "type": "announce",
            "peer": PEER,
            "instance": INSTANCE,
            "port": 4000,
            "rev": REVISION,
        }
        assert len(data) <= MAX_DATAGRAM

    def test_encode_rejects_other_objects(self):
        with pytest.raises(TypeError):
            wire.encode_datagram({"type": "announce"})

    def test_hand_written_datagram(self):
        assert wire.decode_datagram(_datagram()) == wire.Announce(
            PEER, INSTANCE, 4000, REVISION
        )


class TestDatagramRejects:
    def test_oversized(self):
        data = _datagram(pad="x" * MAX_DATAGRAM)
        assert len(data) > MAX_DATAGRAM
        with pytest.raises(wire.Oversized):
            wire.decode_datagram(data)

    def test_exactly_max_size_is_not_oversized(self):
        base = len(_datagram(pad=""))
        data = _datagram(pad="x" * (MAX_DATAGRAM - base))
        assert len(data) == MAX_DATAGRAM
        assert wire.decode_datagram(data).peer_id == PEER

    def test_oversized_garbage_is_oversized_not_malformed(self):
        with pytest.raises(wire.Oversized):
            wire.decode_datagram(b"\xff" * (MAX_DATAGRAM + 1))

    @pytest.mark.parametrize("version", [0, 2, 99, -1])
    def test_wrong_version(self, version):
        with pytest.raises(wire.WrongVersion):
            wire.decode_datagram(_datagram(p2p=version))

    @pytest.mark.parametrize("version", ["1", True, 1.0, [1], None])
    def test_version_not_an_int_is_not_ours(self, version):
        # JSON true and 1.0 compare equal to 1 in Python.
        with pytest.raises(wire.ProtocolError) as info:
            wire.decode_datagram(_datagram(p2p=version))
        assert not isinstance(info.value, wire.WrongVersion)

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"hello",
            b"{",
            b"\xff\xfe\x00",
            b"[" * 900 + b"]" * 90,
        ],
    )
    def test_not_json(self, data):
        with pytest.raises(wire.ProtocolError):
            wire.decode_datagram(data)

    @pytest.mark.parametrize("data", [b"[]", b"1", b'"p2p"', b"null", b"[1, 2]"])
    def test_not_an_object(self, data):
        with pytest.raises(wire.ProtocolError) as info:
            wire.decode_datagram(data)
        assert type(info.value) is wire.ProtocolError

    @pytest.mark.parametrize(
        "peer",
        [
            PEER[:-1],
            PEER + "0",
            PEER.upper(),
            "g" * 32,
            PEER[:-1] + "\n",
            " " + PEER[1:],
            42,
            None,
        ],
    )
    def test_bad_peer_id(self, peer):
        with pytest.raises(wire.ProtocolError) as info:
            wire.decode_datagram(_datagram(peer=peer))
        assert type(info.value) is wire.ProtocolError

    def test_trailing_newline_after_peer_id(self):
        # "$" would accept a trailing newline; the pattern must not.
        with pytest.raises(wire.ProtocolError):
            wire.decode_datagram(_datagram(peer=PEER + "\n"))

    @pytest.mark.parametrize("instance", [INSTANCE[:-1], INSTANCE + "a", "X" * 16, 7])
    def test_bad_instance_id(self, instance):
        with pytest.raises(wire.ProtocolError):
            wire.decode_datagram(_datagram(instance=instance))

    @pytest.mark.parametrize("rev", [REVISION[:-1], "z" * 16, 5])
    def test_bad_revision(self, rev):
        with pytest.raises(wire.ProtocolError):
            wire.decode_datagram(_datagram(rev=rev))

    @pytest.mark.parametrize("port", [True, False, 0, 65536, -1, "4000", 4000.0, [4000]])
    def test_bad_port(self, port):
        with pytest.raises(wire.ProtocolError) as info:
            wire.decode_datagram(_datagram(port=port))
        assert type(info.value) is wire.ProtocolError

    @pytest.mark.parametrize("missing", ["peer", "instance", "port", "rev", "type"])
    def test_missing_field(self, missing):
        with pytest.raises(wire.ProtocolError):
            wire.decode_datagram(_datagram(**{missing: None}))

    @pytest.mark.parametrize("kind", ["hello", "Announce", "", 1])
    def test_unknown_type(self, kind):
        with pytest.raises(wire.ProtocolError) as info:
            wire.decode_datagram(_datagram(type=kind))
        assert type(info.value) is wire.ProtocolError

    def test_goodbye_ignores_announce_fields(self):
        assert wire.decode_datagram(
            _datagram(type="goodbye", port=None, rev=None)
        ) == wire.Goodbye(PEER, INSTANCE)

    def test_error_classes(self):
        assert issubclass(wire.Oversized, wire.ProtocolError)
        assert issubclass(wire.WrongVersion, wire.ProtocolError)
        assert issubclass(wire.ProtocolError, ValueError)


@given(st.binary(max_size=MAX_DATAGRAM + 64))
def test_decode_datagram_fuzz(data):
    """
    Whatever arrives, decode_datagram gives a message or a ProtocolError.
    """
    try:
        message = wire.decode_datagram(data)
    except wire.ProtocolError:
        return
    assert isinstance(message, (wire.Announce, wire.Goodbye))


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
_json_values = _json_scalars | st.lists(_json_scalars, max_size=3)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "p2p": st.sampled_from([1, 2, True, 1.0, "1"]) | _json_values,
            "type": st.sampled_from(["announce", "goodbye", "x"]) | _json_values,
            "peer": st.just(PEER) | _json_values,
            "instance": st.just(INSTANCE) | _json_values,
            "port": st.integers(-5, 70000) | _json_values,
            "rev": st.just(REVISION) | _json_values,
            "name": st.text(max_size=80) | _json_values,
            "host": st.sampled_from(["192.0.2.1", "2001:db8::1", "fe80::1%eth0", "x"])
            | _json_values,
            "peers": st.lists(
                st.lists(st.sampled_from(["192.0.2.1", "2001:db8::1", "::", 7]) | st.integers(-1, 70000),
                         max_size=3),
                max_size=40,
            )
            | _json_values,
        },
    )
)
def test_decode_datagram_structured_fuzz(body):
    """
    Near-miss JSON objects give a well-typed message or a ProtocolError.
    """
    data = json.dumps(body).encode("utf-8")
    try:
        message = wire.decode_datagram(data)
    except wire.ProtocolError:
        return
    assert body["p2p"] == 1 and type(body["p2p"]) is int
    assert message.peer_id == PEER
    assert message.instance_id == INSTANCE
    if isinstance(message, wire.Announce):
        assert type(message.transfer_port) is int
        assert 1 <= message.transfer_port <= 65535
        assert message.revision == REVISION
        assert message.name is None or (
            isinstance(message.name, str) and 0 < len(message.name) <= MAX_PEER_NAME
            and "\n" not in message.name
        )
        assert message.host is None or wire.parse_address(message.host) == message.host
        assert len(message.peers) <= MAX_EXCHANGE_PEERS
        for host, port in message.peers:
            assert wire.parse_address(host) == host and 1 <= port <= 65535


class TestAnnounceExtras:
    """The name, advertised host and peer exchange of an announce."""

    def test_round_trip(self):
        message = wire.Announce(
            PEER, INSTANCE, 4000, REVISION, name="lab-1", host="2001:db8::7",
            peers=(("198.18.0.2", 40000), ("fd00::2", 40001)),
        )
        data = wire.encode_datagram(message)
        assert json.loads(data)["peers"] == [["198.18.0.2", 40000], ["fd00::2", 40001]]
        assert wire.decode_datagram(data) == message

    def test_left_out_when_empty(self):
        data = wire.encode_datagram(wire.Announce(PEER, INSTANCE, 4000, REVISION, name=""))
        assert set(json.loads(data)) == {"p2p", "type", "peer", "instance", "port", "rev"}

    def test_name_is_cleaned_and_cut(self):
        raw = "\x1b[31mred\u202e\nline " + "x" * 100
        decoded = wire.decode_datagram(_datagram(name=raw)).name
        assert decoded == ("?[31mred??line " + "x" * 100)[:MAX_PEER_NAME]
        assert all(ch.isprintable() for ch in decoded)
        assert wire.decode_datagram(_datagram(name="\x00\x07 ")).name == "??"
        # Only spaces: no name at all.
        assert wire.decode_datagram(_datagram(name="   ")).name is None

    def test_non_ascii_name(self):
        message = wire.Announce(PEER, INSTANCE, 4000, REVISION, name="Küche-Ω")
        assert wire.decode_datagram(wire.encode_datagram(message)).name == "Küche-Ω"

    @pytest.mark.parametrize(
        "host", ["0.0.0.0", "::", "255.255.255.255", "224.0.0.1", "ff02::1", "fe80::1%eth0",
                 "example.org", "", 7]
    )
    def test_bad_advertised_host(self, host):
        with pytest.raises(wire.ProtocolError):
            wire.decode_datagram(_datagram(host=host))

    @pytest.mark.parametrize(
        "entry",
        [["192.0.2.1"], ["192.0.2.1", 0], ["192.0.2.1", 65536], ["192.0.2.1", True],
         ["192.0.2.1", 1.0], ["::", 1], ["ff02::1", 1], "192.0.2.1:5", [7, 7]],
    )
    def test_bad_exchange_entry(self, entry):
        with pytest.raises(wire.ProtocolError):
            wire.decode_datagram(_datagram(peers=[entry]))

    def test_too_many_exchange_entries(self):
        entries = [["192.0.2.1", n] for n in range(1, MAX_EXCHANGE_PEERS + 2)]
        with pytest.raises(wire.ProtocolError):
            wire.decode_datagram(_datagram(peers=entries))

    def test_encoder_passes_on_what_fits(self):
        peers = tuple((f"2001:db8:ffff:ffff:ffff:ffff:ffff:{n:x}", 65535) for n in range(100))
        message = wire.Announce(PEER, INSTANCE, 4000, REVISION, name="ü" * MAX_PEER_NAME,
                                host="2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", peers=peers)
        data = wire.encode_datagram(message)
        assert len(data) <= MAX_DATAGRAM
        decoded = wire.decode_datagram(data)
        assert 10 < len(decoded.peers) < MAX_EXCHANGE_PEERS
        assert decoded.peers == peers[: len(decoded.peers)]

    def test_encoder_never_passes_on_more_than_the_limit(self):
        peers = tuple((f"192.0.2.{n}", 1) for n in range(1, 100))
        data = wire.encode_datagram(wire.Announce(PEER, INSTANCE, 4000, REVISION, peers=peers))
        assert len(wire.decode_datagram(data).peers) == MAX_EXCHANGE_PEERS

    @given(
        st.text(max_size=100),
        st.lists(st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)), max_size=40),
    )
    def test_encode_always_fits_and_decodes(self, name, peers):
        peers = tuple((h, p) for h, p in peers if wire.parse_address(h) == h)
        data = wire.encode_datagram(wire.Announce(PEER, INSTANCE, 4000, REVISION, name=name, peers=peers))
        assert len(data) <= MAX_DATAGRAM
        assert wire.decode_datagram(data).peers == peers[: len(wire.decode_datagram(data).peers)]


# -- sealed datagrams ----------------------------------------------------------

GROUP_ID = bytes(8)
KEY = b"k" * 32


class TestSealedDatagrams:
    def test_round_trip(self):
        body = _datagram()
        sealed = wire.seal_datagram(body, GROUP_ID, KEY, 1234567, 42)
        assert len(sealed) == len(body) + wire.SEAL_OVERHEAD
        assert wire.open_datagram(sealed, GROUP_ID, KEY) == (1234567, 42, body)

    def test_a_peer_without_a_key_knows_a_sealed_datagram(self):
        sealed = wire.seal_datagram(_datagram(), GROUP_ID, KEY, 1, 1)
        with pytest.raises(wire.Sealed):
            wire.decode_datagram(sealed)

    def test_an_open_datagram_is_not_sealed(self):
        with pytest.raises(wire.NotSealed):
            wire.open_datagram(_datagram(), GROUP_ID, KEY)

    def test_another_group(self):
        sealed = wire.seal_datagram(_datagram(), b"\x01" * 8, KEY, 1, 1)
        with pytest.raises(wire.OtherGroup):
            wire.open_datagram(sealed, GROUP_ID, KEY)

    def test_another_key_is_forged(self):
        sealed = wire.seal_datagram(_datagram(), GROUP_ID, b"x" * 32, 1, 1)
        with pytest.raises(wire.Forged):
            wire.open_datagram(sealed, GROUP_ID, KEY)

    def test_every_changed_byte_is_caught(self):
        sealed = wire.seal_datagram(_datagram(), GROUP_ID, KEY, 1, 1)
        for i in range(len(sealed)):
            damaged = bytearray(sealed)
            damaged[i] ^= 0x01
            with pytest.raises(wire.ProtocolError):
                wire.open_datagram(bytes(damaged), GROUP_ID, KEY)

    def test_truncated(self):
        sealed = wire.seal_datagram(b"", GROUP_ID, KEY, 1, 1)
        for n in range(len(sealed)):
            with pytest.raises(wire.ProtocolError):
                wire.open_datagram(sealed[:n], GROUP_ID, KEY)

    def test_oversized(self):
        with pytest.raises(wire.Oversized):
            wire.open_datagram(wire.SEAL_MAGIC + bytes(MAX_DATAGRAM), GROUP_ID, KEY)

    def test_encoder_leaves_room_for_the_seal(self):
        peers = tuple((f"2001:db8:ffff:ffff:ffff:ffff:ffff:{n:x}", 65535) for n in range(100))
        message = wire.Announce(PEER, INSTANCE, 4000, REVISION, name="ü" * MAX_PEER_NAME, peers=peers)
        limit = MAX_DATAGRAM - wire.SEAL_OVERHEAD
        data = wire.encode_datagram(message, limit)
        # Full but for less than one more entry.
        assert limit - 60 < len(data) <= limit

    @given(st.binary(max_size=MAX_DATAGRAM + 10))
    def test_fuzz(self, data):
        try:
            wire.open_datagram(data, GROUP_ID, KEY)
        except wire.ProtocolError:
            pass
        try:
            wire.open_datagram(wire.SEAL_MAGIC + data, GROUP_ID, KEY)
        except wire.ProtocolError:
            pass


# -- frames ----------------------------------------------------------------


class TestFrames:
    def test_round_trip(self):
        header = {"t": "chunk", "i": 3, "name": "caf\u00e9"}
        body = b"\x00\n\xffbinary\nbody"
        assert wire.decode_frame(wire.encode_frame(header, body)) == (header, body)

    def test_round_trip_empty_body(self):
        frame = wire.encode_frame({"t": "catalog"})
        assert frame == b'{"t":"catalog"}\n'
        assert wire.decode_frame(frame) == ({"t": "catalog"}, b"")

    def test_missing_newline(self):
        with pytest.raises(wire.ProtocolError):
            wire.decode_frame(b'{"t":"catalog"}')

    def test_header_too_long(self):
        header = {"t": "x", "pad": "a" * MAX_HEADER}
        with pytest.raises(wire.ProtocolError):
            wire.decode_frame(wire.encode_frame(header, b"body"))

    def test_header_at_the_limit(self):
        base = len(wire.encode_frame({"t": "x", "pad": ""})) - 1
        header = {"t": "x", "pad": "a" * (MAX_HEADER - base)}
        frame = wire.encode_frame(header, b"tail")
        assert frame.index(b"\n") == MAX_HEADER
        assert wire.decode_frame(frame) == (header, b"tail")

    @pytest.mark.parametrize(
        "header",
        [b"{}", b'{"type":"catalog"}', b'{"t":1}', b'{"t":null}', b'{"t":"' + b"x" * 33 + b'"}'],
    )
    def test_header_without_t(self, header):
        with pytest.raises(wire.ProtocolError):
            wire.decode_frame(header + b"\n")

    @pytest.mark.parametrize("header", [b"[]", b'"t"', b"nope", b"\xff"])
    def test_header_not_an_object(self, header):
        with pytest.raises(wire.ProtocolError):
            wire.decode_frame(header + b"\nbody")

    def test_request_and_check_version(self):
        header = wire.request("get", id="a" * 64)
        assert header == {"t": "get", "v": PROTOCOL_VERSION, "id": "a" * 64}
        wire.check_version(header)

    @pytest.mark.parametrize("version", [None, 0, 2, "1", True, 1.0])
    def test_check_version_rejects(self, version):
        header = {"t": "get"}
        if version is not None:
            header["v"] = version
        with pytest.raises(wire.WrongVersion):
            wire.check_version(header)


class TestFieldHelpers:
    def test_file_id_field(self):
        assert wire.file_id_field({"id": "ab" * 32}) == "ab" * 32
        with pytest.raises(wire.ProtocolError):
            wire.file_id_field({"id": "ab" * 31})

    def test_token_field(self):
        assert wire.token_field({"token": "0f" * 16}) == "0f" * 16
        with pytest.raises(wire.ProtocolError):
            wire.token_field({"token": "0F" * 16})

    def test_list_field(self):
        assert wire.list_field({"x": [1, 2]}, "x", 2) == [1, 2]
        with pytest.raises(wire.ProtocolError):
            wire.list_field({"x": [1, 2, 3]}, "x", 2)
        with pytest.raises(wire.ProtocolError):
            wire.list_field({"x": "12"}, "x", 2)

    def test_text_field_max_length(self):
        assert wire.text_field({"s": "abc"}, "s", max_length=3) == "abc"
        with pytest.raises(wire.ProtocolError):
            wire.text_field({"s": "abcd"}, "s", max_length=3)

    def test_int_field_rejects_bool(self):
        with pytest.raises(wire.ProtocolError):
            wire.int_field({"n": True}, "n", 0, 10)
        assert wire.int_field({"n": 10}, "n", 0, 10) == 10


@given(st.binary(max_size=512))
def test_decode_frame_fuzz(frame):
    """
    Whatever arrives, decode_frame gives a header with a string "t" and the
    rest of the frame as body, or a ProtocolError.
    """
    try:
        header, body = wire.decode_frame(frame)
    except wire.ProtocolError:
        return
    assert isinstance(header, dict)
    assert isinstance(header["t"], str)
    assert frame.endswith(body)
    assert frame[: len(frame) - len(body)].endswith(b"\n")


@given(
    st.dictionaries(st.text(max_size=8), _json_values, max_size=4),
    st.text(max_size=32),
    st.binary(max_size=64),
)
def test_frame_round_trip_fuzz(extra, kind, body):
    header = dict(extra, t=kind)
    assert wire.decode_frame(wire.encode_frame(header, body)) == (header, body)


# -- chunk maps -----------------------------------------------------------------


@given(st.lists(st.booleans(), max_size=100))
def test_pack_and_expand_bits_round_trip(flags):
    flags = bytes(flags)
    packed = wire.pack_bits(flags)
    assert len(packed) == (len(flags) + 7) // 8
    assert wire.expand_bits(packed, len(flags)) == flags


def test_bit_order_is_least_significant_first():
    assert wire.pack_bits([1, 0, 0, 0, 0, 0, 0, 0, 0, 1]) == b"\x01\x02"
    assert wire.expand_bits(b"\xff", 3) == b"\x01\x01\x01"
