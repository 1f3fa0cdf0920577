#!/usr/bin/env python3
"""
The shared-folders benchmark (``tests/benchmarks/run --only folders`` runs
it in a process of its own, for a fresh reactor).  In one process, on
loopback, with the product's own parts (no twistd, so that a probe can run
on the reactor that does the work):

 - the index of a tree of 10,000 files in 500 folders: a cold scan (every
   file hashed), then a warm re-index (nothing changed);
 - a tree of 100,000 files in 5,000 folders, indexed, served on a real
   sender port (L{Uploads}, L{SenderFactory}) and fetched page by page by
   the catalog client, as a peer fetches another's;
 - the first C{download NAME}, C{list} and C{download FOLDER/} over a
   catalog that just came (the last two work out what it offers, in a
   thread), then C{list} (collapsed) and C{list FOLDER/} over it;

while a C{LoopingCall} probe on the same reactor measures how late it
runs: the longest lag is the longest the reactor was blocked.  Prints one
JSON object of figures on stdout.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

PROBE_INTERVAL = 0.005


class LagProbe:
    """
    Runs every L{PROBE_INTERVAL} seconds on the reactor and keeps the
    longest gap beyond that: how long the reactor was kept from it.
    """

    def __init__(self, reactor):
        from twisted.internet.task import LoopingCall

        self._reactor = reactor
        self._last = None
        self._last_cpu = None
        self.worst = 0.0
        #: The most CPU the reactor's own thread used between two ticks:
        #: work of its own, as against waiting for the GIL or the CPU (the
        #: machine is shared).
        self.worst_cpu = 0.0
        self._call = LoopingCall(self._tick)
        self._call.clock = reactor

    def _tick(self):
        now, cpu = time.perf_counter(), time.thread_time()
        if self._last is not None:
            self.worst = max(self.worst, now - self._last - PROBE_INTERVAL)
            self.worst_cpu = max(self.worst_cpu, cpu - self._last_cpu)
        self._last, self._last_cpu = now, cpu

    def start(self):
        self._call.start(PROBE_INTERVAL)

    def reset(self):
        self.worst = self.worst_cpu = 0.0
        self._last = None

    async def settled(self):
        """
        Let the probe tick once more: a block that ends just before the
        figures are read is counted only at the tick after it.
        """
        from twisted.internet import task

        await task.deferLater(self._reactor, 2 * PROBE_INTERVAL, lambda: None)

    def stop(self):
        self._call.stop()


def make_tree(root, files, folders):
    """C{files} small files of distinct content, spread over C{folders} folders 2 deep."""
    per_top = 100 if folders >= 100 else folders
    made = []
    for f in range(folders):
        path = root / f"top {f // per_top:03d}" / f"folder é {f % per_top:03d}"
        path.mkdir(parents=True, exist_ok=True)
        made.append(path)
    for i in range(files):
        (made[i % folders] / f"photo {i:06d}.jpg").write_bytes(b"%d\n" % i)


class OnePeer:
    """What the network catalog needs of a peer table, for one peer."""

    def __init__(self, peer):
        self.peer = peer

    def subscribe(self, observer):
        pass

    def peers(self):
        return [self.peer]

    def get(self, peer_id):
        return self.peer if peer_id == self.peer.peer_id else None

    def __contains__(self, peer_id):
        return peer_id == self.peer.peer_id

    def __len__(self):
        return 1


async def measure(reactor, base, small, large, folders):
    from twisted.internet import defer, endpoints, threads
    from twisted.internet.protocol import Factory

    from twisted_p2p import client
    from twisted_p2p.catalog import NetworkCatalog
    from twisted_p2p.commands import Commands
    from twisted_p2p.index import SharedIndex
    from twisted_p2p.peers import Peer
    from twisted_p2p.transfer import SenderFactory
    from twisted_p2p.uploads import Uploads

    figures = {}
    probe = LagProbe(reactor)
    probe.start()

    def run_in_thread(f, *args, **kwargs):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)

    # -- 10,000 files: cold, then warm.
    tree = base / "small"
    await threads.deferToThread(make_tree, tree, small, small // 20)
    index = SharedIndex([str(tree)], str(base / "small.json"), run_in_thread)
    probe.reset()
    started = time.perf_counter()
    await index.rescan()
    figures["small_cold_s"] = time.perf_counter() - started
    assert len(index.files()) == small, len(index.files())
    warm = []
    for _ in range(3):
        started = time.perf_counter()
        await index.rescan()
        warm.append(time.perf_counter() - started)
    figures["small_warm_s"] = sorted(warm)[1]
    await probe.settled()
    figures["small_lag_s"] = probe.worst
    figures["small_cpu_s"] = probe.worst_cpu

    # -- 100,000 files in 5,000 folders, indexed and served.
    tree = base / "large"
    started = time.perf_counter()
    await threads.deferToThread(make_tree, tree, large, folders)
    figures["large_make_s"] = time.perf_counter() - started
    index = SharedIndex([str(tree)], str(base / "large.json"), run_in_thread)
    probe.reset()
    started = time.perf_counter()
    await index.rescan()
    figures["large_cold_s"] = time.perf_counter() - started
    await probe.settled()
    figures["large_cold_lag_s"] = probe.worst
    figures["large_cold_cpu_s"] = probe.worst_cpu
    probe.reset()
    started = time.perf_counter()
    await index.rescan()
    figures["large_warm_s"] = time.perf_counter() - started
    await probe.settled()
    figures["large_warm_lag_s"] = probe.worst
    figures["large_warm_cpu_s"] = probe.worst_cpu
    assert len(index.files()) == large, len(index.files())

    uploads = Uploads(index, None, run_in_thread, None, reactor)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        SenderFactory(uploads)
    )
    try:
        fetches = []
        probe.reset()
        for _ in range(3):
            started = time.perf_counter()
            sender = client.SenderClient()
            factory = Factory.forProtocol(lambda: sender)
            await endpoints.TCP4ClientEndpoint(
                reactor, "127.0.0.1", port.getHost().port
            ).connect(factory)
            revision, files = await client.fetch_catalog(sender)
            sender.close()
            fetches.append(time.perf_counter() - started)
            assert len(files) == large, len(files)
        figures["catalog_s"] = sorted(fetches)[1]
        await probe.settled()
        figures["catalog_lag_s"] = probe.worst
        figures["catalog_cpu_s"] = probe.worst_cpu
    finally:
        await port.stopListening()

    # -- what the user sees of it: list, collapsed and expanded.
    peer = Peer("ab" * 16, "0" * 16, "127.0.0.1", 27000, 7000, revision, last_seen=0.0)
    table = OnePeer(peer)
    catalog = NetworkCatalog(table, lambda p: defer.succeed((revision, files)), reactor,
                             run_in_thread=run_in_thread)
    stored = []
    catalog.on_fetched(lambda peer_id, first: stored.pop().callback(None) if stored else None)

    async def arrives():
        # The catalog as a peer stores one that came: indexed in a thread.
        stored.append(defer.Deferred())
        waiting = stored[-1]
        catalog.refresh(peer.peer_id)
        await waiting

    class NoIndex:
        def files(self):
            return []

        def by_id(self, file_id):
            return None

    commands = Commands(NoIndex(), table, catalog, None, reactor, lambda: None,
                        run_in_thread=run_in_thread)
    # A catalog that just came: the first download looks its file up, and
    # the first list works out what the catalog offers (in a thread; the
    # later ones reuse that until the catalog changes).
    probe.reset()
    started = time.perf_counter()
    await arrives()
    figures["catalog_store_s"] = time.perf_counter() - started
    # A command comes in a turn of the reactor of its own, not in the one
    # that stored the catalog.
    await probe.settled()

    async def timed(line, key, answer):
        said = []
        started = time.perf_counter()
        await commands.run(line, said.append)
        figures[key] = time.perf_counter() - started
        assert said and said[0]["event"] == answer, said
        # The error is the one for what is not offered, not another.
        assert answer != "error" or "no known peer" in said[0]["message"], said

    await timed("download 'no such file'", "download_first_s", "error")
    await timed("list", "list_first_s", "list")
    # And a folder download over a catalog just come (the folder is not
    # there: the answer is an error, after going over every path).
    await arrives()
    await probe.settled()
    await timed("download 'no such folder/'", "download_folder_first_s", "error")
    await probe.settled()
    figures["new_catalog_lag_s"] = probe.worst
    figures["new_catalog_cpu_s"] = probe.worst_cpu
    probe.reset()
    for line, key in (("list", "list_s"), ("list 'top 007/'", "list_folder_s")):
        said = []
        started = time.perf_counter()
        await commands.run(line, said.append)
        figures[key] = time.perf_counter() - started
        assert said and said[0]["event"] == "list", said
    # Once the catalog has not changed, list reads what it worked out before.
    started = time.perf_counter()
    await commands.run("list", said.append)
    figures["list_again_s"] = time.perf_counter() - started
    await probe.settled()
    figures["list_lag_s"] = probe.worst
    figures["list_cpu_s"] = probe.worst_cpu
    probe.stop()
    figures["files"] = large
    figures["folders"] = folders
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=5_000)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="p2p-folders-", dir=args.dir))
    from twisted.internet import reactor, task

    reactor.suggestThreadPoolSize(4)
    out = {}

    async def run(reactor):
        out.update(await measure(reactor, base, args.small, args.large, args.folders))

    try:
        try:
            task.react(lambda r: __import__("twisted.internet.defer", fromlist=["x"])
                       .ensureDeferred(run(r)))
        except SystemExit as e:
            if e.code:
                raise
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
