"""
Private groups with real peers on 127.0.0.1: members find each other and
download from each other; peers without the key, or with another key, on
the same discovery port see neither and cannot connect; a transfer read
off the wire holds none of the file; replayed and forged datagrams are
dropped and counted.

Everything is checked through what a user sees (the consoles' C{peers},
C{list} and C{download}, files on disk) and through what a stranger on
the network could do (plain sockets), not through the peers' internals.
"""

import os
import re
import socket
import struct
import threading
import time

import pytest
from OpenSSL import SSL

from twisted_p2p import tls, wire
from twisted_p2p.group import DiscoverySeal, load_key_file, write_new_key
from twisted_p2p.identity import Identity

from .peers import BROADCAST, HOST, Peer, free_transfer_port, free_udp_port
from .test_three_peers import LOG_ERRORS, listed, listing, poll, sha256_of, write_random

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def _folder(base, name, files):
    folder = base / name
    (folder / "shared").mkdir(parents=True)
    (folder / "downloads").mkdir()
    for filename, size in files.items():
        write_random(folder / "shared" / filename, size)
    return folder


def _peer(name, folder, discovery, key=None, extra=()):
    args = list(extra)
    if key is not None:
        args += ["--group-key-file", str(key)]
    return Peer(name, folder, free_transfer_port(), discovery, extra_args=args)


class Peers(list):
    """The peers of one test; their diagnostics for a failure report."""

    def diagnostics(self):
        return "\n\n".join(p.diagnostics() for p in self)


@pytest.fixture
def peers():
    made = Peers()
    yield made
    for peer in made:
        peer.cleanup()
    for peer in made:
        log = peer.log_path.read_text(errors="replace") if peer.log_path.exists() else ""
        assert not [e for e in LOG_ERRORS if e in log], peer.diagnostics()


def _start(peers, *new):
    for peer in new:
        peers.append(peer.start())
    for peer in new:
        peer.ready()


def _download(peer, name):
    return peer.command(f"download {name}", until=rf"^downloaded {re.escape(name)}\b",
                        timeout=60, fail=r"^error:")


# -- strangers on the network --------------------------------------------------


def _exchange(port, data, key=None, timeout=5.0):
    """
    What a stranger gets for C{data} sent to C{port}: over plain TCP, or
    for C{key}, over TLS with a certificate of that group.  C{b""} if the
    connection is closed (or the handshake refused) without an answer.
    """
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        if key is None:
            sock.sendall(data)
            connection = sock
        else:
            # OpenSSL wants a blocking socket; the kernel's timeouts bound it.
            sock.settimeout(None)
            limit = struct.pack("ll", int(timeout), 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
            connection = SSL.Connection(tls.GroupCredentials(key, Identity.generate()).context, sock)
            connection.set_connect_state()
            try:
                connection.do_handshake()
                connection.sendall(data)
            except (SSL.Error, OSError):
                return b""
        received = b""
        while True:
            try:
                piece = connection.recv(65536)
            except (SSL.ZeroReturnError, SSL.SysCallError, ConnectionResetError):
                return received
            except SSL.Error:
                return received
            except socket.timeout:
                return received
            if not piece:
                return received
            received += piece
            if key is not None and len(received) >= 4:
                # One whole frame is enough: the peer answered.
                if len(received) >= 4 + int.from_bytes(received[:4], "big"):
                    return received
    finally:
        sock.close()


def _frame(header):
    payload = wire.encode_frame(header)
    return len(payload).to_bytes(4, "big") + payload


CATALOG = _frame(wire.request("catalog", start=0))
GET = _frame(wire.request("get", id="ab" * 32, chunks=[0], port=1, token="cd" * 16))


def test_members_list_and_download_and_strangers_see_nothing(tmp_path, peers):
    key, other_key = tmp_path / "team.key", tmp_path / "other.key"
    write_new_key(str(key))
    write_new_key(str(other_key))
    discovery = free_udp_port()
    a = _peer("a", _folder(tmp_path, "a", {"from-a.bin": 3 * MiB + 77}), discovery, key)
    b = _peer("b", _folder(tmp_path, "b", {"from-b.bin": 5 * MiB + 11}), discovery, key)
    open_peer = _peer("open", _folder(tmp_path, "open", {"open.bin": 1000}), discovery)
    other = _peer("other", _folder(tmp_path, "other", {"other.bin": 1000}), discovery, other_key)
    _start(peers, a, b, open_peer, other)

    # Members find each other, list and download each other's files.
    found, _ = poll(lambda: listed(a, b.label) and listed(b, a.label), timeout=10)
    assert found, "the members did not find each other"
    rows, _ = poll(lambda: (lambda r: r if "from-b.bin" in r else None)(listing(a)), timeout=10)
    assert rows and rows["from-b.bin"] == b.label
    _download(a, "from-b.bin")
    _download(b, "from-a.bin")
    assert sha256_of(a.downloads / "from-b.bin") == sha256_of(b.shared / "from-b.bin")
    assert sha256_of(b.downloads / "from-a.bin") == sha256_of(a.shared / "from-a.bin")

    # Many announce rounds later, nobody outside the group is seen, or sees.
    time.sleep(2.0)
    for member in (a, b):
        answer = member.ask("peers")
        assert not [line for line in answer if open_peer.label in line or other.label in line]
        text = "\n".join(answer)
        assert re.search(r"\d+ without our group key", text), text
        assert re.search(r"\d+ of another group", text), text
        assert set(listing(member)) <= {"from-a.bin", "from-b.bin"}
    for stranger in (open_peer, other):
        answer = stranger.ask("peers")
        assert not [line for line in answer if a.label in line or b.label in line]
        assert set(listing(stranger)) <= {"open.bin", "other.bin"}
    assert re.search(r"\d+ of a private group", "\n".join(open_peer.ask("peers")))

    # A stranger connecting itself gets no catalog and no chunk, on any
    # port, whether without TLS or with another group's key ...
    other_group = load_key_file(str(other_key))
    for port in range(a.transfer_port, a.transfer_port + 4):
        for request in (CATALOG, GET):
            assert b'"t"' not in _exchange(port, request)
            assert _exchange(port, request, other_group) == b""
    # ... while a member asking the same gets its answers.
    group = load_key_file(str(key))
    assert b'"t":"catalog"' in _exchange(a.transfer_port + 1, CATALOG, group)
    assert b'"code":"unknown-file"' in _exchange(a.transfer_port + 1, GET, group)


# -- what the wire carries -------------------------------------------------------

#: Loopback addresses for the proxy: it is reached at one and connects out
#: from the other, so that each peer sees the other at the proxy.
PROXY_FOR_B = "127.0.0.3"
PROXY_FOR_A = "127.0.0.5"


class Proxy:
    """
    Relays TCP connections on loopback and keeps every byte that flows
    toward peer A: each listener forwards to a real port, from a source
    address of its own.
    """

    def __init__(self):
        self.toward_a = {}
        self._lock = threading.Lock()
        self._listeners = []
        self._threads = []
        self._closing = False

    def relay(self, listen, target, source, record):
        server = socket.create_server(listen)
        server.settimeout(0.2)
        self._listeners.append(server)
        thread = threading.Thread(target=self._accept, args=(server, target, source, record),
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, server, target, source, record):
        while not self._closing:
            try:
                inbound, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            outbound = socket.create_connection(target, timeout=10, source_address=(source, 0))
            key = (target, len(self.toward_a))
            with self._lock:
                self.toward_a[key] = bytearray()
            toward_a = self.toward_a[key]
            for src, dst, keep in ((inbound, outbound, record == "requests"),
                                   (outbound, inbound, record == "replies")):
                thread = threading.Thread(target=self._pump, args=(src, dst, toward_a if keep else None),
                                          daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src, dst, keep):
        src.settimeout(None)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if keep is not None:
                    with self._lock:
                        keep += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def captured(self):
        with self._lock:
            return [bytes(v) for v in self.toward_a.values()]

    def close(self):
        self._closing = True
        for server in self._listeners:
            server.close()


@pytest.mark.parametrize("private", [True, False], ids=["private group", "open group (control)"])
def test_a_captured_transfer_holds_none_of_the_file(tmp_path, peers, private):
    """
    B is advertised at the proxy, so A's requests go through it; B answers
    the proxy's address, so the chunk data comes back through it too.  In
    the open group the same capture finds the file (so the check works);
    in the private group it finds none of it.
    """
    key = tmp_path / "team.key"
    write_new_key(str(key))
    discovery = free_udp_port()
    size = 4 * MiB + 123
    a = _peer("a", _folder(tmp_path, "a", {}), discovery, key if private else None)
    b = _peer("b", _folder(tmp_path, "b", {"secret.bin": size}), discovery,
              key if private else None, extra=["--advertise-host", PROXY_FOR_B])
    proxy = Proxy()
    try:
        # A -> B's sender port: B's replies flow toward A.
        proxy.relay((PROXY_FOR_B, b.transfer_port + 1), (HOST, b.transfer_port + 1),
                    PROXY_FOR_A, "replies")
        # B -> A's receiver port (at the address A's requests came from):
        # the chunks flow toward A.  A expects them from where B is reached.
        proxy.relay((PROXY_FOR_A, a.transfer_port), (HOST, a.transfer_port),
                    PROXY_FOR_B, "requests")
        _start(peers, a, b)
        label = f"{PROXY_FOR_B}:{b.transfer_port}"
        rows, _ = poll(lambda: (lambda r: r if r.get("secret.bin") == label else None)(listing(a)),
                       timeout=10)
        assert rows, f"a does not list secret.bin at {label}"
        _download(a, "secret.bin")
        assert sha256_of(a.downloads / "secret.bin") == sha256_of(b.shared / "secret.bin")
    finally:
        proxy.close()

    captured = proxy.captured()
    # Everything A received came through the proxy.
    assert sum(len(c) for c in captured) >= size
    plain = (b.shared / "secret.bin").read_bytes()
    samples = [plain[offset : offset + 32] for offset in range(0, size - 32, 4096)]
    found = sum(1 for sample in samples if any(sample in c for c in captured))
    if private:
        assert found == 0, f"{found} of {len(samples)} samples of the file seen on the wire"
    else:
        assert found == len(samples)


# -- replayed and forged datagrams ---------------------------------------------------


def _listen_discovery(port):
    """A socket that hears the discovery broadcasts on C{port}, as any host could."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.bind(("", port))
    sock.settimeout(5)
    return sock


def _announce_of(sock, key, peer):
    """
    The next sealed announce of C{peer} heard from now on (not one queued
    from before the others started, which they never heard): its bytes and
    decoded body.
    """
    sock.setblocking(False)
    try:
        while True:
            sock.recvfrom(8192)
    except BlockingIOError:
        pass
    sock.settimeout(5)
    seal = DiscoverySeal(key)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data, _ = sock.recvfrom(8192)
        try:
            _, body = seal.open(data, time.time())
            message = wire.decode_datagram(body)
        except wire.ProtocolError:
            continue
        if isinstance(message, wire.Announce) and message.transfer_port == peer.transfer_port:
            return data, message
    raise AssertionError(f"heard no announce of {peer.name}")


def _dropped(peer, reason):
    text = "\n".join(peer.ask("peers"))
    match = re.search(rf"(\d+) {re.escape(reason)}", text)
    return int(match.group(1)) if match else 0


def test_replayed_announces_and_forged_goodbyes_are_dropped_and_counted(tmp_path, peers):
    key_path = tmp_path / "team.key"
    key = write_new_key(str(key_path))
    discovery = free_udp_port()
    a = _peer("a", _folder(tmp_path, "a", {}), discovery, key_path)
    b = _peer("b", _folder(tmp_path, "b", {}), discovery, key_path)
    sniffer = _listen_discovery(discovery)
    try:
        _start(peers, a, b)
        found, _ = poll(lambda: listed(b, a.label), timeout=10)
        assert found
        captured, announce = _announce_of(sniffer, key, a)
        assert _dropped(b, "replayed") == 0 and _dropped(b, "forged") == 0

        # The same announce, sent again by someone else on the network.
        sniffer.sendto(captured, (BROADCAST, discovery))
        replayed, _ = poll(lambda: _dropped(b, "replayed") >= 1, timeout=5)
        assert replayed, "b did not count the replayed announce"

        # A goodbye for a, made without the key (its tag is wrong).
        goodbye = wire.encode_datagram(wire.Goodbye(announce.peer_id, announce.instance_id))
        forged = wire.seal_datagram(goodbye, key.group_id, os.urandom(32),
                                    int(time.time() * 1000), 2**40)
        sniffer.sendto(forged, (BROADCAST, discovery))
        counted, _ = poll(lambda: _dropped(b, "forged") >= 1, timeout=5)
        assert counted, "b did not count the forged goodbye"
        time.sleep(0.5)
        assert listed(b, a.label), "b dropped a on a forged goodbye"

        # The control: the same goodbye sealed with the key is taken.
        genuine = wire.seal_datagram(goodbye, key.group_id, key.discovery_key,
                                     int(time.time() * 1000), 2**40)
        b.mark()
        sniffer.sendto(genuine, (BROADCAST, discovery))
        gone, _ = poll(lambda: not listed(b, a.label), timeout=5, interval=0.05)
        assert gone, "b ignored a goodbye sealed with the key"
    finally:
        sniffer.close()

