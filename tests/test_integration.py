"""
Two peers in this process, on real loopback sockets: discovery, catalog,
download and goodbye, end to end through the services but without twistd.
"""

import hashlib
import os
import random
import socket

import pytest
import pytest_twisted
from support import can_bind, running
from twisted.internet import defer, reactor, task

from twisted_p2p.render import render
from twisted_p2p.service import PeerService
from twisted_p2p.tap import Options


def free_ports(count):
    """
    A base port B such that B..B+count-1 are free for TCP and UDP on loopback.
    """
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32000 - count)
        if all(
            can_bind(socket.SOCK_STREAM, base + i) and can_bind(socket.SOCK_DGRAM, base + i)
            for i in range(count)
        ):
            return base
    raise RuntimeError("no free ports")


def make_peer(folder, transfer_port, discovery_port, *extra):
    os.makedirs(os.path.join(folder, "shared"), exist_ok=True)
    options = Options()
    options.parseOptions(
        [
            "--transfer-port", str(transfer_port),
            "--discovery-port", str(discovery_port),
            "--host", "127.0.0.1",
            "--broadcast", "127.255.255.255",
            "--announce-interval", "0.5",
            "--shared", os.path.join(folder, "shared"),
            "--downloads", os.path.join(folder, "downloads"),
            "--state-dir", os.path.join(folder, "state"),
            *extra,
        ]
    )
    options["log-target"] = None
    return PeerService(options, reactor, console_enabled=False)


async def wait_for(condition, timeout=5.0, step=0.02):
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, step, lambda: None)
        waited += step
    return waited


@pytest.fixture
def two_peers(tmp_path):
    base = free_ports(9)
    discovery_port = base + 8
    a = make_peer(str(tmp_path / "a"), base, discovery_port)
    b = make_peer(str(tmp_path / "b"), base + 4, discovery_port)
    payload = random.Random(7).randbytes(3 * 256 * 1024 + 12345)
    with open(tmp_path / "b" / "shared" / "data.bin", "wb") as f:
        f.write(payload)
    with running(a, b):
        yield a, b, payload


@pytest_twisted.ensureDeferred
async def test_peers_find_each_other_and_download(two_peers, tmp_path):
    a, b, payload = two_peers
    await wait_for(lambda: b.peer_id in a.table and a.peer_id in b.table)
    await wait_for(lambda: any(o.name == "data.bin" for o in a.catalog.offers()))
    offer = [o for o in a.catalog.offers() if o.name == "data.bin"][0]
    assert offer.size == len(payload)
    assert [p.peer_id for p in offer.peers] == [b.peer_id]

    lines = []
    final = await a.downloads.start(
        offer.name, offer.file_id, offer.peers, lambda e: lines.append(" ".join(render(e)))
    )
    assert final == "data.bin"
    with open(tmp_path / "a" / "downloads" / "data.bin", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    assert lines[-1].startswith("downloaded data.bin to downloads/data.bin: 780.1 KiB in ")
    assert not [n for n in os.listdir(tmp_path / "a" / "downloads") if n.startswith(".")]
    # The finished file is offered in turn.
    assert a.index.by_id(offer.file_id).name == "data.bin"


@pytest_twisted.ensureDeferred
async def test_goodbye_drops_the_peer_at_once(two_peers):
    a, b, _ = two_peers
    await wait_for(lambda: b.peer_id in a.table)
    await b.stopService()
    # The goodbye is one datagram away: far sooner than the peer timeout.
    waited = await wait_for(lambda: b.peer_id not in a.table, timeout=0.5)
    assert waited < 0.5


@pytest_twisted.ensureDeferred
async def test_download_never_overwrites(two_peers, tmp_path):
    a, b, payload = two_peers
    existing = tmp_path / "a" / "downloads" / "data.bin"
    existing.parent.mkdir(exist_ok=True)
    existing.write_bytes(b"mine, keep it")
    await wait_for(lambda: any(o.name == "data.bin" for o in a.catalog.offers()))
    offer = [o for o in a.catalog.offers() if o.name == "data.bin"][0]
    lines = []
    final = await a.downloads.start(
        offer.name, offer.file_id, offer.peers, lambda e: lines.append(" ".join(render(e)))
    )
    assert final == "data (1).bin"
    assert existing.read_bytes() == b"mine, keep it"
    assert (tmp_path / "a" / "downloads" / "data (1).bin").read_bytes() == payload
    assert "(data.bin already existed)" in lines[-1]


@pytest_twisted.ensureDeferred
async def test_unknown_data_on_the_receiver_port_is_dropped(two_peers):
    a, _, _ = two_peers
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    closed = defer.Deferred()

    class Intruder(Protocol):
        def connectionMade(self):
            frame = b'{"t":"hello","v":1,"token":"' + b"0" * 32 + b'"}\n'
            self.transport.write(len(frame).to_bytes(4, "big") + frame)

        def connectionLost(self, reason):
            closed.callback(None)

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", a.transfer_port)
    await connectProtocol(endpoint, Intruder())
    await closed
