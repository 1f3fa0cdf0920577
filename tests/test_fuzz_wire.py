"""
Fuzzing the wire codecs and what they feed (issue 11): discovery datagrams
through L{Discovery} in storms, sealed datagrams damaged at every byte, and
frame streams damaged at random, fed whole and one byte at a time.

What every test checks: nothing raises but the module's documented error,
the same input gives the same result however it is cut up, and what is kept
in memory stays under its limit.  (Random bytes alone are fuzzed in
C{test_wire.py}, C{test_discovery.py} and C{test_framing.py}; these start
from well-formed messages, which get much deeper into the parsers.)
"""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import frame
from twisted.internet.task import Clock

from twisted_p2p import wire
from twisted_p2p.discovery import Discovery
from twisted_p2p.framing import FrameReader
from twisted_p2p.group import DiscoverySeal, GroupKey, Stale
from twisted_p2p.limits import (
    MAX_DATAGRAM,
    MAX_EXCHANGE_CANDIDATES,
    MAX_PEERS,
    NEWCOMER_REPLY_BURST,
    NEWCOMER_REPLY_RATE,
    EXCHANGE_INTRO_BURST,
    EXCHANGE_INTRO_RATE,
)
from twisted_p2p.peers import PeerTable

OUR_ID = "0" * 32
OUR_INSTANCE = "0" * 16
REV = "0" * 16
GROUP = GroupKey(bytes(range(32)))

# -- strategies -----------------------------------------------------------------

_hex = "0123456789abcdef"
peer_ids = st.text(_hex, min_size=32, max_size=32)
instances = st.text(_hex, min_size=16, max_size=16)
#: Few addresses, so that storms hit the per-host limits.
hosts = st.sampled_from(["198.51.100.1", "198.51.100.2", "203.0.113.9", "2001:db8::5"])
udp_ports = st.integers(1, 65535)


@st.composite
def mutations(draw, data):
    """
    C{data} damaged: some bytes flipped, some cut, some inserted.
    """
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


announces = st.builds(
    wire.Announce,
    peer_ids,
    instances,
    udp_ports,
    st.text(_hex, min_size=16, max_size=16),
    st.none() | st.text(max_size=80),
    st.none() | hosts,
    st.lists(st.tuples(hosts, udp_ports), max_size=40).map(tuple),
)
goodbyes = st.builds(wire.Goodbye, peer_ids, instances)


# -- datagrams ----------------------------------------------------------------


@given(st.one_of(announces, goodbyes).flatmap(lambda m: mutations(wire.encode_datagram(m))))
def test_a_damaged_datagram_decodes_or_is_a_protocol_error(data):
    try:
        message = wire.decode_datagram(data)
    except wire.ProtocolError:
        return
    # What decodes, encodes again within the limit.
    assert len(wire.encode_datagram(message)) <= MAX_DATAGRAM


@given(st.one_of(announces, goodbyes))
def test_every_datagram_round_trips(message):
    decoded = wire.decode_datagram(wire.encode_datagram(message))
    assert type(decoded) is type(message)
    assert decoded.peer_id == message.peer_id


@given(
    st.dictionaries(
        st.sampled_from(["p2p", "type", "peer", "instance", "port", "rev", "name", "host", "peers"]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
            max_leaves=20,
        ),
    )
)
def test_any_json_object_decodes_or_is_a_protocol_error(body):
    data = json.dumps(body).encode()
    try:
        wire.decode_datagram(data)
    except wire.ProtocolError:
        pass


def test_deeply_nested_json_is_a_protocol_error():
    for data in (b"[" * 100_000, b'{"a":' * 100_000):
        try:
            wire.decode_datagram(data[:MAX_DATAGRAM])
        except wire.ProtocolError:
            pass
        try:
            wire.decode_frame(data + b"\n")
        except wire.ProtocolError:
            pass


# -- sealed datagrams -------------------------------------------------------------


def _sealed():
    seal = DiscoverySeal(GROUP)
    body = wire.encode_datagram(
        wire.Announce("a" * 32, "1" * 16, 4000, REV, "x" * 30), limit=seal.room
    )
    return seal.seal(body, 1000.0)


def test_a_sealed_datagram_damaged_at_any_byte_is_refused():
    """
    As Tahoe-LAFS's test_each_byte: every byte of a sealed datagram flipped
    in turn, and none is taken.
    """
    data = _sealed()
    for at in range(len(data)):
        for mask in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[at] ^= mask
            opener = DiscoverySeal(GROUP)
            try:
                opener.open(bytes(damaged), 1000.0)
            except wire.ProtocolError:
                continue
            raise AssertionError(f"byte {at} flipped with {mask:#x} was taken")


def test_a_sealed_datagram_cut_anywhere_is_refused():
    data = _sealed()
    for end in range(len(data)):
        try:
            DiscoverySeal(GROUP).open(data[:end], 1000.0)
        except wire.ProtocolError:
            continue
        raise AssertionError(f"cut at {end} was taken")


@given(st.binary(max_size=MAX_DATAGRAM + 100).map(lambda b: wire.SEAL_MAGIC + b))
def test_sealed_garbage_is_a_protocol_error(data):
    try:
        DiscoverySeal(GROUP).open(data, 1000.0)
    except (wire.ProtocolError, Stale):
        return
    raise AssertionError("garbage was taken")


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**64 - 1)), max_size=200))
def test_replay_records_stay_bounded_and_a_counter_is_fresh_once(entries):
    seal = DiscoverySeal(GROUP)
    seen = set()
    for run, counter in entries:
        fresh = seal.fresh((run, "i"), counter)
        if (run, counter) in seen:
            assert not fresh
        if fresh:
            seen.add((run, counter))
    assert len(seal._seen) <= 4


# -- discovery storms ---------------------------------------------------------------


class _Sends:
    def __init__(self):
        self.sent = []

    def __call__(self, data, address, via):
        assert len(data) <= MAX_DATAGRAM
        self.sent.append(address)


def _discovery(clock):
    table = PeerTable(clock, 35.0, max_per_host=16)
    discovery = Discovery(clock, table, OUR_ID, OUR_INSTANCE, 7000, lambda: REV, 27000, 10.0)
    sends = _Sends()
    discovery.attach(sends, lambda: [], lambda: [])
    return discovery, table, sends


storm = st.lists(
    st.tuples(
        st.one_of(announces, goodbyes),
        hosts,
        udp_ports,
        st.floats(0, 2),
        st.booleans(),
    ),
    max_size=120,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(storm)
def test_a_storm_never_raises_and_everything_stays_bounded(datagrams):
    """
    Any sequence of announces and goodbyes, from any few addresses, some
    damaged: the table holds at most its limits, and what we send in
    answer (replies to newcomers, introductions) stays within the rate
    limits however many datagrams arrive.
    """
    clock = Clock()
    discovery, table, sends = _discovery(clock)
    elapsed = 0.0
    for message, host, port, wait, damage in datagrams:
        clock.advance(wait)
        elapsed += wait
        data = wire.encode_datagram(message)
        if damage:
            data = data[: len(data) // 2]
        discovery.datagram_received(data, (host, port), "ipv4")
        assert len(table) <= MAX_PEERS
        assert all(count <= 16 for count in table._per_host.values())
        assert len(discovery._candidates) <= MAX_EXCHANGE_CANDIDATES
    budget = (
        NEWCOMER_REPLY_BURST + NEWCOMER_REPLY_RATE * elapsed
        + EXCHANGE_INTRO_BURST + EXCHANGE_INTRO_RATE * elapsed
    )
    assert len(sends.sent) <= budget + 1


def test_an_announcement_storm_of_new_ids_fills_no_more_than_the_table():
    clock = Clock()
    discovery, table, sends = _discovery(clock)
    for n in range(5000):
        message = wire.Announce(f"{n + 1:032x}", "1" * 16, 4000, REV)
        discovery.datagram_received(
            wire.encode_datagram(message), (f"198.51.{n % 250}.{n // 250 % 250 + 1}", 4000), "ipv4"
        )
    assert len(table) == MAX_PEERS
    assert discovery.dropped["peer table full"] == 5000 - MAX_PEERS
    assert len(sends.sent) <= NEWCOMER_REPLY_BURST


# -- frames -------------------------------------------------------------------------


class _Owner:
    def __init__(self):
        self.frames = []
        self._current = None

    def header_received(self, header, body_length):
        body = bytearray(body_length)
        self._current = (header, body)
        return memoryview(body) if body_length else None

    def body_progress(self, count):
        pass

    def frame_ended(self):
        header, body = self._current
        self.frames.append((header, bytes(body)))


def _read(data, pieces):
    """
    The frames a reader finds in C{data} fed in C{pieces} bytes at a time,
    and whether it stopped on an error.
    """
    owner = _Owner()
    reader = FrameReader(owner, 4096, 256)
    failed = False
    for i in range(0, len(data), pieces):
        try:
            reader.feed(data[i : i + pieces])
        except wire.ProtocolError:
            failed = True
            break
    return owner.frames, failed


_frames = st.lists(
    st.tuples(
        st.fixed_dictionaries({"t": st.sampled_from(["chunk", "hello", "x"]), "i": st.integers(0, 9)}),
        st.binary(max_size=600),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=80)
@given(_frames.map(lambda fs: b"".join(frame(h, b) for h, b in fs)).flatmap(mutations))
def test_a_damaged_frame_stream_reads_alike_whole_and_bytewise(data):
    whole = _read(data, max(len(data), 1))
    assert _read(data, 1) == whole
    assert _read(data, 7) == whole


@given(_frames.map(lambda fs: frame(*fs[0])).flatmap(mutations))
def test_a_damaged_frame_decodes_or_is_a_protocol_error(data):
    try:
        header, body = wire.decode_frame(data[4:])
    except wire.ProtocolError:
        return
    assert isinstance(header["t"], str)


def test_a_frame_length_of_2_32_minus_1_stops_the_reader_at_once():
    owner = _Owner()
    reader = FrameReader(owner, 4096, 256)
    try:
        reader.feed(b"\xff\xff\xff\xff" + b'{"t":"chunk"}\n')
    except wire.ProtocolError as e:
        assert "over the limit" in str(e)
    else:
        raise AssertionError("a 4 GiB frame was taken")
    # Nothing was allocated for it: the head area is all the reader holds.
    assert len(reader._head) == 4 + 256


# -- sealed stream frames (private groups) ------------------------------------------


def test_a_sealed_stream_frame_damaged_at_any_byte_does_not_open():
    """
    Every byte of a sealed body (ciphertext and tag) and of the header line
    it is bound to, flipped in turn; also the wrong frame number and key:
    none opens.
    """
    from twisted_p2p.seal import TAG_SIZE, SealBroken, StreamSeal

    key = bytes(range(16))
    line = b'{"t":"chunk","i":3}'
    plain = bytes(range(256)) * 2
    sealed = bytearray(len(plain) + TAG_SIZE)
    StreamSeal(key).seal_into(line, plain, sealed)
    opener = StreamSeal(key)
    assert bytes(opener.open_in_place(0, line, bytearray(sealed))) == plain
    tries = [(0, line, bytearray(sealed[:n])) for n in (0, TAG_SIZE - 1, len(sealed) - 1)]
    tries += [(1, line, bytearray(sealed))]
    for at in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[at] ^= 0x01
        tries.append((0, line, damaged))
    for at in range(len(line)):
        damaged_line = bytearray(line)
        damaged_line[at] ^= 0x01
        tries.append((0, bytes(damaged_line), bytearray(sealed)))
    for number, header_line, buffer in tries:
        try:
            opener.open_in_place(number, header_line, buffer)
        except SealBroken:
            continue
        raise AssertionError("a damaged sealed frame opened")
    other = StreamSeal(bytes(16))
    try:
        other.open_in_place(0, line, bytearray(sealed))
    except SealBroken:
        pass
    else:
        raise AssertionError("opened with another key")
