"""
Peers of a private group in this process, on real loopback sockets: two
members find each other, prove who they are and download from each other;
a peer without the key, on the same discovery port, is not heard and is
not let in.
"""

import hashlib
import random

import pytest
import pytest_twisted
from support import frame, running
from test_integration import free_ports, make_peer, wait_for
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol

from twisted_p2p import client, wire
from twisted_p2p.group import write_new_key


@pytest.fixture
def group(tmp_path):
    base = free_ports(13)
    discovery_port = base + 12
    key = str(tmp_path / "group.key")
    write_new_key(key)
    a = make_peer(str(tmp_path / "a"), base, discovery_port, "--group-key-file", key)
    b = make_peer(str(tmp_path / "b"), base + 4, discovery_port, "--group-key-file", key)
    stranger = make_peer(str(tmp_path / "c"), base + 8, discovery_port)
    payload = random.Random(12).randbytes(2 * 256 * 1024 + 99)
    (tmp_path / "b" / "shared" / "data.bin").write_bytes(payload)
    (tmp_path / "c" / "shared" / "open.bin").write_bytes(b"open to all")
    with running(a, b, stranger):
        yield a, b, stranger, payload


@pytest_twisted.ensureDeferred
async def test_members_find_prove_and_download(group, tmp_path):
    a, b, stranger, payload = group
    await wait_for(lambda: b.peer_id in a.table and a.peer_id in b.table)
    await wait_for(lambda: any(o.name == "data.bin" for o in a.catalog.offers()))
    # The catalog fetch proved each one's identity to the other.
    await wait_for(lambda: a.table.get(b.peer_id).fingerprint is not None)
    assert a.table.get(b.peer_id).fingerprint == b.identity.fingerprint
    offer = [o for o in a.catalog.offers() if o.name == "data.bin"][0]
    final = await a.downloads.start(offer.name, offer.file_id, offer.peers, lambda e: None)
    data = (tmp_path / "a" / "downloads" / final).read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()

    # The stranger on the same port hears neither, nor they it.
    await task.deferLater(reactor, 1.0, lambda: None)
    assert len(stranger.table) == 0
    assert stranger.peer_id not in a.table and stranger.peer_id not in b.table
    assert stranger.discovery.dropped["of a private group"] > 0
    assert a.discovery.dropped["without our group key"] > 0
    assert [o.name for o in a.catalog.offers()] == ["data.bin"]


@pytest_twisted.ensureDeferred
async def test_a_stranger_cannot_fetch_a_members_catalog(group):
    a, b, stranger, _ = group
    await wait_for(lambda: b.peer_id in a.table)
    peer = a.table.get(b.peer_id)
    # Plain TCP, as the stranger's own code would connect.
    sender = await stranger._connect(peer.host, peer.sender_port, client.SenderClient())
    with pytest.raises(ConnectionLost):
        await defer.ensureDeferred(client.fetch_catalog(sender)).addTimeout(5, reactor)
    # A member, asking as the same code does, gets it (once B's first scan,
    # in a thread, has found it).
    await wait_for(lambda: any(f.name == "data.bin" for f in b.index.files()))
    sender = await a._open_client(peer)
    try:
        revision, files = await client.fetch_catalog(sender)
    finally:
        sender.close()
    assert [name for _, name, _ in files] == ["data.bin"]


@pytest_twisted.ensureDeferred
async def test_a_members_bad_request_closes_the_connection(group):
    """
    Over TLS as over TCP: the sender answers bad-request and drops the
    connection (its transport shows the producer it registered).
    """
    a, b, _, _ = group
    await wait_for(lambda: b.peer_id in a.table)
    peer = a.table.get(b.peer_id)
    lost = defer.Deferred()
    received = []

    class Raw(Protocol):
        def dataReceived(self, data):
            received.append(data)

        def connectionLost(self, reason):
            lost.callback(None)

    raw = Raw()
    await a._connect(peer.host, peer.sender_port, raw, peer.peer_id)
    raw.transport.write(frame(wire.request("catalog", start=0) | {"v": 2}))
    await lost.addTimeout(5, reactor)
    assert b'"code":"bad-request"' in b"".join(received)
