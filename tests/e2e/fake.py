"""
A hostile peer for the end-to-end tests, written against the wire protocol
(twisted_p2p/PROTOCOL.md) with plain sockets and threads: it announces from
an address of its own on 127.0.0.0/8, answers its sender port from a script
the test gives, and connects back to a requester's receiver port to send
what the script says.  Nothing of the product runs in it but the codecs
used to build its messages.

Everything binds loopback addresses; datagrams go to 127.255.255.255 or to
127.0.0.1 only.
"""

import hashlib
import json
import os
import socket
import threading
import time

from twisted_p2p import wire
from twisted_p2p.limits import CHUNK_SIZE, MAX_DATAGRAM
from twisted_p2p.manifest import hash_file

BROADCAST = "127.255.255.255"


def random_hex(n):
    return os.urandom(n // 2).hex()


def frame(header, body=b""):
    data = json.dumps(header, separators=(",", ":")).encode() + b"\n" + body
    return len(data).to_bytes(4, "big") + data


def read_exactly(sock, count):
    data = bytearray()
    while len(data) < count:
        piece = sock.recv(count - len(data))
        if not piece:
            raise ConnectionError("closed")
        data += piece
    return bytes(data)


def read_frame(sock):
    length = int.from_bytes(read_exactly(sock, 4), "big")
    data = read_exactly(sock, length)
    line, _, body = data.partition(b"\n")
    return json.loads(line), body


def free_port(host):
    """
    A port T on C{host} such that T and T+1 are free for TCP.
    """
    for _ in range(200):
        probe = socket.socket()
        probe.bind((host, 0))
        port = probe.getsockname()[1]
        probe.close()
        if port > 65000:
            continue
        try:
            second = socket.socket()
            second.bind((host, port + 1))
            second.close()
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


class Datagrams:
    """
    A UDP socket on C{host} that sends announces, goodbyes or any bytes to
    the peers' discovery port.
    """

    def __init__(self, host, discovery_port):
        self.host = host
        self.discovery_port = discovery_port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.sock.bind((host, 0))

    def send(self, data):
        self.sock.sendto(data, (BROADCAST, self.discovery_port))

    def announce(self, peer_id, instance, port, revision="0" * 16, name=None, peers=()):
        self.send(wire.encode_datagram(
            wire.Announce(peer_id, instance, port, revision, name, None, tuple(peers))
        ))

    def goodbye(self, peer_id, instance):
        self.send(wire.encode_datagram(wire.Goodbye(peer_id, instance)))

    def close(self):
        self.sock.close()


def sniff_announce(discovery_port, peer_port, timeout=5.0):
    """
    The announce of the peer whose transfer port is C{peer_port}, as heard
    on the shared discovery port (peers bind it with SO_REUSEPORT, and a
    broadcast reaches every socket bound to it).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", discovery_port))
    sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data, _ = sock.recvfrom(MAX_DATAGRAM + 1)
            except socket.timeout:
                continue
            try:
                message = wire.decode_datagram(data)
            except wire.ProtocolError:
                continue
            if isinstance(message, wire.Announce) and message.transfer_port == peer_port:
                return message
    finally:
        sock.close()
    raise AssertionError(f"never heard the peer on port {peer_port}")


class FakeFile:
    """
    A file the fake offers: the real content's manifest (so its id is the
    real one, and honest peers may hold it too), or any id and size.
    """

    def __init__(self, name, path=None, file_id=None, size=0):
        self.name = name
        self.path = path
        if path is not None:
            self.manifest = hash_file(path)
            self.file_id, self.size = self.manifest.file_id, self.manifest.size
        else:
            self.manifest = None
            self.file_id = file_id or hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
            self.size = size

    def entry(self):
        return {"id": self.file_id, "name": self.name, "size": self.size}


class FakePeer:
    """
    A peer on C{host} (an address of 127.0.0.0/8 of its own) that
    announces itself and serves its sender port (T+1) with
    L{answer}, which a test may replace or subclass.

    @ivar mode: how it sends chunks: C{"honest"}, C{"wrong-data"} (right
        length, wrong bytes), C{"truncated"} (half a frame, then it
        closes), C{"out-of-range"} (a chunk index past the end),
        C{"huge-frame"} (a length prefix of 2**32-1), C{"silent"}
        (answers C{sending} and sends nothing).
    """

    def __init__(self, host, discovery_port, files=(), mode="honest", name="fake"):
        self.host = host
        self.peer_id = random_hex(32)
        self.instance = random_hex(16)
        self.revision = random_hex(16)
        self.name = name
        self.files = list(files)
        self.mode = mode
        self.requests = []
        self.connections_back = 0
        self.transfer_port = free_port(host)
        self.datagrams = Datagrams(host, discovery_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, self.transfer_port + 1))
        self._listener.listen(64)
        self._stopped = threading.Event()
        self._threads = []
        self._spawn(self._accept)
        self._spawn(self._announce_loop)

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _announce_loop(self):
        while not self._stopped.is_set():
            try:
                self.datagrams.announce(
                    self.peer_id, self.instance, self.transfer_port, self.revision, self.name
                )
            except OSError:
                return
            self._stopped.wait(0.5)

    def _accept(self):
        self._listener.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                conn, address = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._spawn(self._serve, conn, address)

    def _serve(self, conn, address):
        conn.settimeout(30)
        try:
            while not self._stopped.is_set():
                header, _ = read_frame(conn)
                self.requests.append(header)
                for reply in self.answer(header, address):
                    conn.sendall(frame(*reply))
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            conn.close()

    def by_id(self, file_id):
        return next((f for f in self.files if f.file_id == file_id), None)

    def answer(self, header, address):
        """
        The C{(header, body)} frames that answer C{header}.
        """
        kind = header.get("t")
        if kind == "catalog":
            start = header.get("start", 0)
            page = [f.entry() for f in self.files[start : start + 200]]
            return [({"t": "catalog", "rev": self.revision, "start": start,
                      "total": len(self.files), "files": page}, b"")]
        local = self.by_id(header.get("id"))
        if local is None and kind != "cancel":
            return [({"t": "error", "code": "unknown-file", "message": "no"}, b"")]
        if kind == "manifest":
            if local.manifest is None:
                return [({"t": "error", "code": "unknown-file", "message": "no"}, b"")]
            return [self.manifest_page(local, header.get("start", 0))]
        if kind == "have":
            return [({"t": "have", "id": local.file_id, "all": True}, b"")]
        if kind == "get":
            self._spawn(self._send_back, local, header, address[0])
            return [({"t": "sending", "token": header["token"]}, b"")]
        if kind == "cancel":
            return [({"t": "cancelled", "token": header["token"], "chunks": []}, b"")]
        return [({"t": "error", "code": "bad-request", "message": "no"}, b"")]

    def manifest_page(self, local, start):
        hashes = local.manifest.chunk_hashes[start : start + 8192]
        return ({"t": "manifest", "id": local.file_id, "size": local.size, "start": start,
                 "count": len(hashes)}, b"".join(hashes))

    def _send_back(self, local, header, host):
        """
        The data connection of a get: connect to the requester's receiver
        port, say hello, and send the chunks as L{mode} says.
        """
        self.connections_back += 1
        try:
            sock = socket.create_connection((host, header["port"]), timeout=10,
                                            source_address=(self.host, 0))
        except OSError:
            return
        try:
            sock.sendall(frame({"t": "hello", "v": 1, "token": header["token"]}))
            for index in header["chunks"]:
                data = self.chunk(local, index)
                if self.mode == "wrong-data":
                    data = os.urandom(len(data))
                if self.mode == "out-of-range":
                    sock.sendall(frame({"t": "chunk", "i": 10**6}, data))
                elif self.mode == "huge-frame":
                    sock.sendall(b"\xff\xff\xff\xff" + b'{"t":"chunk","i":0}\n' + data[:1000])
                elif self.mode == "truncated":
                    whole = frame({"t": "chunk", "i": index}, data)
                    sock.sendall(whole[: len(whole) // 2])
                    break
                elif self.mode == "silent":
                    self._stopped.wait(30)
                    break
                else:
                    sock.sendall(frame({"t": "chunk", "i": index}, data))
            # Held open a while, as a liar would, then closed.
            self._stopped.wait(2)
        except OSError:
            pass
        finally:
            sock.close()

    def chunk(self, local, index):
        with open(local.path, "rb") as f:
            f.seek(index * CHUNK_SIZE)
            return f.read(CHUNK_SIZE)

    def stop(self):
        self._stopped.set()
        self._listener.close()
        self.datagrams.close()
        for thread in self._threads:
            thread.join(2)


def rss_kib(pid):
    """
    The resident memory of process C{pid}, in KiB (Linux).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))
