"""
Many peers on one host (containers, a test rig): forty real C{twistd
p2ppeer} processes on 127.0.0.1, all with the default per-address peer
limit, all list each other.
"""

import re
import time

import pytest

from .peers import Peer, free_transfer_port, free_udp_port
from .test_three_peers import poll

pytestmark = pytest.mark.e2e

COUNT = 40


class Crowd(list):
    """The peers, with their diagnostics for a failure report."""

    def diagnostics(self):
        return "\n\n".join(p.diagnostics(lines=10) for p in self)


@pytest.fixture
def crowd(tmp_path):
    discovery = free_udp_port()
    peers = Crowd()
    for n in range(COUNT):
        folder = tmp_path / f"peer{n}"
        (folder / "shared").mkdir(parents=True)
        # A loaded machine (40 processes on a few cores) may answer late:
        # a long timeout keeps peers from flapping while the rest start.
        peers.append(Peer(f"peer{n}", folder, free_transfer_port(), discovery,
                          announce_interval=1.0, peer_timeout=10.0))
    try:
        yield peers
    finally:
        for p in peers:
            p.cleanup()


def test_forty_peers_on_one_host_all_list_each_other(crowd):
    started = time.monotonic()
    for p in crowd:
        p.start()
    for p in crowd:
        p.ready(timeout=40)
    up = time.monotonic() - started
    labels = {p.label for p in crowd}

    def listed_by(peer):
        text = "\n".join(peer.ask("peers", timeout=10))
        return {label for label in labels if re.search(rf"{re.escape(label)}(?!\d)", text)}

    def everyone_lists_everyone():
        return all(listed_by(p) == labels - {p.label} for p in crowd)

    ok, waited = poll(everyone_lists_everyone, 15, interval=0.5)
    print(f"\ne2e: {COUNT} peers up in {up:.1f} s, all listed each other {waited:.1f} s later")
    assert ok, {p.name: len(listed_by(p)) for p in crowd}
