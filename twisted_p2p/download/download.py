"""
One file's download, and the set of downloads in progress.

A L{Download} wires its parts together: the L{Finder} finds its sources,
the pure L{plan} says what to ask of whom, each source's L{SourceStream}
carries the asking and the chunks, the L{Lifecycle} machine says what an
event means at each stage, and L{Progress} keeps the counts.  What stays
here is what joins them: a chunk that arrives is checked against the ledger,
verified and written in a worker thread, and reading pauses while too many
wait for that.
"""

import os
import threading
from collections import deque

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_p2p import events, wire
from twisted_p2p.cache import CacheMiss
from twisted_p2p.chunkmap import ChunkLedger
from twisted_p2p.client import PeerRefused
from twisted_p2p.download.buffers import BufferPool
from twisted_p2p.download.finder import Finder
from twisted_p2p.download.lifecycle import Lifecycle
from twisted_p2p.download.requests import GetRequest, SourceStream
from twisted_p2p.download.scheduler import ask_size, plan, run_for
from twisted_p2p.download.status import Progress
from twisted_p2p.limits import (
    BAN_ADDRESS_SECONDS,
    BUSY_BACKOFF_MAX,
    BUSY_BACKOFF_MIN,
    CHUNK_SIZE,
    HAVE_REFRESH,
    MAX_STRIKES,
    MAX_TIMEOUTS,
    PARALLEL_FILES,
    REQUEST_TIMEOUT,
    TIMEOUT_REST,
    VERIFY_FRAMES,
)
from twisted_p2p.names import BadName, check_path, free_name
from twisted_p2p.seal import SealBroken, stream_seal
from twisted_p2p.storage import StorageError, already_here, is_folder_here

log = Logger()

#: Seconds between progress events.
PROGRESS_INTERVAL = 1.0


def verify(manifest, first, wanted, buffer, opener=None):
    """
    Which of chunks C{wanted} (indexes, in order) of the frame that starts
    at chunk C{first}, in C{buffer}, are right.  Blocks for the hashes: a
    worker thread runs it.

    @param opener: for a sealed stream, C{(seal, frame number, header
        line)}: the frame is opened in place first.
    @raise SealBroken: a sealed frame that does not open.
    """
    if opener is not None:
        seal, number, line = opener
        buffer = seal.open_in_place(number, line, buffer)
    base = manifest.chunk_offset(first)
    good = []
    for index in wanted:
        start = manifest.chunk_offset(index) - base
        if manifest.verify_pieces(index, (buffer[start : start + manifest.chunk_length(index)],)):
            good.append(index)
    return good


def store(manifest, storage, first, good, buffer):
    """
    Write chunks C{good} (verified indexes, in order) of the frame that
    starts at chunk C{first}, in C{buffer}: each run of them that follow
    each other in one write.  Blocks: a worker thread runs it.

    @return: C{good}.
    """
    base = manifest.chunk_offset(first)
    run = []
    for index in good + [None]:
        if run and (index is None or index != run[-1] + 1):
            start = manifest.chunk_offset(run[0]) - base
            end = manifest.chunk_offset(run[-1]) - base + manifest.chunk_length(run[-1])
            storage.store_run(run[0], len(run), base + start, buffer[start:end])
            run = []
        if index is not None:
            run.append(index)
    return good


def verify_and_store(manifest, storage, first, wanted, buffer, opener=None):
    """
    L{verify} chunks C{wanted} of a frame, then L{store} the good ones: one
    job, so that a frame costs one hand-off to a worker and back.  Blocks.
    """
    good = verify(manifest, first, wanted, buffer, opener)
    if good:
        store(manifest, storage, first, good, buffer)
    return good


def copy_from_cache(cache, manifest, storage, verified, stop):
    """
    Copy into C{storage} the chunks of C{manifest}'s file that this peer's
    own C{cache} holds (for other peers, see L{twisted_p2p.cache}) and that
    are not among C{verified} already, so that they are not fetched over the
    network: each is read, checked against the manifest and written, one at
    a time (memory stays flat).  A chunk the cache cannot give, or that does
    not match, is skipped and fetched as usual.  Stops early once C{stop}
    (a C{threading.Event}) is set.  Blocks: run it in a thread.

    @return: the indexes copied, in order.
    @raise StorageError: a chunk could not be written.
    """
    have = set(verified)
    copied = []
    for index in sorted(cache.held(manifest.file_id)):
        if stop.is_set():
            break
        if index in have or not 0 <= index < manifest.chunk_count:
            continue
        try:
            data = cache.read(manifest.file_id, index)
        except (CacheMiss, OSError, ValueError):
            continue  # evicted meanwhile, or unreadable
        if manifest.verify_chunk(index, data):
            storage.store(index, manifest.chunk_offset(index), (data,))
            copied.append(index)
    return copied


class DownloadFailed(Exception):
    """
    A download that cannot complete; the message is for the user.

    @ivar reported: whether a C{download-failed} event already told the user.
    """

    reported = False


class Bans:
    """
    Owns the strikes against peers that sent bad data, for the whole session
    (every download shares one), and the list of peers banned for it.  The
    address a banned peer was at is banned too, for L{BAN_ADDRESS_SECONDS}
    (with a C{clock}), for the peer ids first heard after the ban: a liar
    that comes back under a new id from that address is not asked, while
    the honest peers already known there (on one host, or behind one NAT)
    still are.
    """

    def __init__(self, max_strikes=MAX_STRIKES, clock=None,
                 address_seconds=BAN_ADDRESS_SECONDS):
        self._max = max_strikes
        self._strikes = {}
        self._banned = set()
        self._clock = clock
        self._address_seconds = address_seconds
        self._addresses = {}

    def strike(self, peer_key, host=None):
        """
        One more strike against the peer C{peer_key}, at C{host}; whether
        this one banned it.
        """
        self._strikes[peer_key] = self._strikes.get(peer_key, 0) + 1
        if self._strikes[peer_key] >= self._max and peer_key not in self._banned:
            self._banned.add(peer_key)
            if host is not None and self._clock is not None:
                now = self._clock.seconds()
                self._addresses[wire.address_group(host)] = (now, now + self._address_seconds)
            return True
        return False

    def strikes(self, peer_key):
        return self._strikes.get(peer_key, 0)

    def is_banned(self, peer_key, host=None, joined=None):
        """
        Whether the peer C{peer_key} is banned; or, at C{host} and first
        heard at C{joined}, whether its address is, for it.
        """
        if peer_key in self._banned:
            return True
        if host is None or joined is None or self._clock is None:
            return False
        group = wire.address_group(host)
        ban = self._addresses.get(group)
        if ban is None:
            return False
        since, until = ban
        if self._clock.seconds() >= until:
            del self._addresses[group]
            return False
        return joined >= since


def _peer_key(peer):
    return getattr(peer, "peer_id", None) or peer.label


def _host(peer):
    return getattr(peer, "host", None)


def _where(peer):
    """
    C{(host, joined)} of a peer, for the bans of an address.
    """
    return _host(peer), getattr(peer, "joined", None)


class Download:
    """
    Owns one file's download from the first manifest to the final rename.
    See the module docstring, and L{Lifecycle} for its stages.

    @param name: the display name, used for the final file name.
    @param file_id: what we download.
    @param peers: the peers that offer it now.
    @param open_client: C{open_client(peer)} giving a Deferred L{SenderClient}.
    @param inbox: the L{Inbox} of our receiver port.
    @param receiver_port: our port T, sent in requests.
    @param storage: a L{PartialFile}-like object (blocking methods).
    @param run_in_thread: C{deferToThread} or a stand-in (storage open,
        complete and release).
    @param workers: the L{WorkerPool}: one of its workers verifies this
        download's chunks, another (if there are two) writes them.
    @param clock: an L{IReactorTime}.
    @param report: C{report(event)} for progress and outcome events.
    @param bans: the session's L{Bans} (shared by every download); a fresh
        one if C{None}.
    @param index: the L{SharedIndex} that offers the verified chunks while
        the download runs, or C{None}.
    @param size_offered: C{size_offered(peer)}, the size that peer's catalog
        offered the file at, or C{None}: a manifest of another size is refused
        before its pages are fetched.
    @param find_peers: C{find_peers()}, the peers that offer the file now,
        asked every L{HAVE_REFRESH} seconds so that a peer that appears
        later joins; or C{None}.
    """

    def __init__(
        self,
        name,
        file_id,
        peers,
        open_client,
        inbox,
        receiver_port,
        storage,
        run_in_thread,
        workers,
        clock,
        report,
        bans=None,
        index=None,
        find_peers=None,
        size_offered=None,
        local=None,
    ):
        self.name = name
        self.file_id = file_id
        self._peers = list(peers)
        self._inbox = inbox
        self._receiver_port = receiver_port
        self.storage = storage
        self._run = run_in_thread
        self._workers = workers
        self.buffers = BufferPool()
        self._clock = clock
        self._report = report
        self.bans = bans if bans is not None else Bans()
        self._index = index
        self._find_peers = find_peers
        self._local = local
        self._stop_copying = threading.Event()
        self.from_cache = 0
        self.manifest = None
        self.sources = []
        self.progress = Progress(clock)
        self.final_name = None
        self.stage = "finding"
        self._lifecycle = Lifecycle(self)
        self._finder = Finder(
            self, file_id, open_client, clock,
            skip=lambda peer: self.bans.is_banned(_peer_key(peer), *_where(peer)),
            size_offered=size_offered or (lambda peer: None),
        )
        self._ledger = None
        self._verifying = 0  # jobs verifying and writing frames
        self._verifying_bytes = 0  # the bytes of their frames
        #: Past this many bytes verifying, reading pauses: VERIFY_FRAMES of
        #: the longest run asked (set as streams are made).
        self.verify_limit = VERIFY_FRAMES * CHUNK_SIZE
        self._reading_paused = False
        self._storage_busy = set()
        self._ticker = None
        self._wake = None
        self._plan_call = None
        self._last_refresh = 0.0
        self.done = defer.Deferred()

    # -- what it looks like ----------------------------------------------------------

    @property
    def size(self):
        return self.manifest.size if self.manifest else None

    @property
    def have(self):
        """
        How many chunks are verified (resumed ones included).
        """
        return self._ledger.have if self._ledger is not None else 0

    @property
    def bytes_verified(self):
        return self.progress.verified

    @property
    def bytes_wasted(self):
        return self.progress.wasted

    def status(self):
        """
        Where this download stands, as data (see L{Progress.snapshot}).
        """
        usable = sum(1 for s in self.sources if self._usable(s))
        return self.progress.snapshot(self.name, self.file_id, usable)

    def by_source(self):
        return dict(self.progress.by_source)

    def _emit(self, kind, **fields):
        """
        Report an event of C{kind} about this download; the faces put it in
        words (L{twisted_p2p.render}).
        """
        e = events.event(kind, file=self.name, id=self.file_id, **fields)
        try:
            self._report(e)
        except Exception:
            # A face that fails to show an event must not stop the download.
            log.failure("Reporting {kind} failed", kind=kind)

    # -- starting and stopping ----------------------------------------------------------

    def start(self):
        """
        Start the download.  L{done} fires with C{(final name, signature)}, or
        fails with L{DownloadFailed}.
        """
        self._finder.add(self._peers)
        return self.done

    def cancel(self):
        """
        Stop, and throw away what was downloaded.
        """
        self._lifecycle.cancel()

    def pause(self):
        """
        Stop, keeping every verified chunk for a later resume (the peer is
        shutting down).
        """
        self._lifecycle.pause()

    # -- what the finder finds ---------------------------------------------------------

    def manifest_found(self, manifest):
        self.manifest = manifest
        self.progress.size = manifest.size
        self._lifecycle.found_manifest()

    def source_found(self, source):
        if self.stage in ("completing", "finished", "failed", "stopped"):
            source.client.close()
            return
        self.sources.append(source)
        source.client.when_closed().addCallback(self._client_closed, source)
        if self._ledger is not None and self._usable(source):
            self._ledger.add_source(source, source.has)
            self._schedule_soon()

    def finding_over(self, errors):
        if self.manifest is None:
            self._lifecycle.no_manifest(
                f"no peer could give the manifest of {self.name}"
                + (f" ({errors[0]})" if errors else "")
            )
        else:
            self._schedule_soon()

    def holdings_changed(self, source, has):
        if self._ledger is not None and self._usable(source):
            self._ledger.update_source(source, has)
            self._schedule_soon()

    def source_failed(self, source, reason):
        if source.usable and self.stage == "fetching":
            self._lose(source, reason)
        source.client.close()

    # -- the lifecycle's work ----------------------------------------------------------

    def open_storage(self):
        self.stage = "opening"
        self._finder.manifest_known(self.manifest)
        manifest, storage, local, stop = self.manifest, self.storage, self._local, self._stop_copying

        def open_and_copy():
            verified = storage.open(manifest.size, manifest)
            return verified, copy_from_cache(local, manifest, storage, verified, stop)

        def opened(result):
            verified, copied = result
            self.from_cache = sum(manifest.chunk_length(index) for index in copied)
            return list(verified) + copied

        if local is None:
            d = self._storage_op(storage.open, manifest.size, manifest)
        else:
            d = self._storage_op(open_and_copy).addCallback(opened)

        def failed(failure):
            error = failure.value
            reason = str(error) if isinstance(error, StorageError) else failure.getErrorMessage()
            if not isinstance(error, StorageError):
                log.failure("Opening the partial file of {name} failed", failure, name=self.name)
            self._lifecycle.open_failed(f"could not start {self.name}: {reason}")

        d.addCallbacks(lambda verified: self._lifecycle.opened(list(verified or ())), failed)

    def start_fetching(self, verified):
        self.stage = "fetching"
        manifest = self.manifest
        self._ledger = ChunkLedger(manifest.chunk_count, verified=verified)
        resumed = sum(manifest.chunk_length(index) for index in verified)
        self.progress.resumed = self.progress.verified = resumed
        for source in self.sources:
            if self._usable(source):
                self._ledger.add_source(source, source.has)
        if self._index is not None and getattr(self.storage, "chunks", None) is not None:
            self._index.add_partial(self.name, manifest, self.storage.path, self.storage.chunks)
        self._emit(
            "download-started",
            size=manifest.size,
            chunks=manifest.chunk_count,
            sources=max(len(self.sources), self._finder.tried),
            resumed=resumed,
            from_cache=self.from_cache,
        )
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self._clock
        self._ticker.start(PROGRESS_INTERVAL, now=False)
        if self._ledger.complete:
            self._lifecycle.all_verified()
        else:
            self._schedule()

    def complete(self):
        self.stage = "completing"
        self._stop_transfers()
        self._withdraw_partial()
        d = self._storage_op(self.storage.complete, self.name)

        def failed(failure):
            error = failure.value
            reason = str(error) if isinstance(error, StorageError) else failure.getErrorMessage()
            self._lifecycle.complete_failed(f"could not complete {self.name}: {reason}")

        d.addCallbacks(self._lifecycle.completed, failed)

    def finished(self, result):
        self.stage = "finished"
        final_name, _ = result
        self.final_name = final_name
        self._stop_everything()
        progress = self.progress
        elapsed = progress.elapsed()
        size = self.manifest.size
        where = os.path.join(os.path.basename(self.storage.folder), final_name)
        by_source = self.by_source()
        self._emit(
            "download-finished",
            path=where,
            size=size,
            seconds=round(elapsed, 3),
            rate=round(size / elapsed),
            by_source=by_source,
            received=progress.received,
            resumed=progress.resumed,
            wasted=progress.wasted,
        )
        log.info(
            "Bytes of {file} by source: {counts}; received {received} B, "
            "resumed {resumed} B, wasted {wasted} B; chunks taken over {taken_over}, "
            "asked twice {doubled}",
            event="download-sources",
            file=self.name,
            counts=", ".join(f"{label}={n}" for label, n in sorted(by_source.items())),
            by_source=by_source,
            received=progress.received,
            resumed=progress.resumed,
            wasted=progress.wasted,
            taken_over=progress.taken_over,
            doubled=progress.doubled,
        )
        self.done.callback(result)

    def failed(self, reason):
        self.stage = "failed"
        self._stop_everything()
        self._release_storage(keep=True)
        self._emit("download-failed", reason=reason)
        self._fail_done(reason)

    def stopped(self, cancelled):
        self.stage = "stopped"
        self._stop_copying.set()
        self._stop_everything()
        self._release_storage(keep=not cancelled)
        if cancelled:
            reason = f"download {self.name} was cancelled"
            self._emit("download-cancelled")
        else:
            percent = self.progress.percent()
            reason = f"download {self.name} stopped at {percent}%"
            self._emit("download-stopped", percent=percent, reason="the peer is stopping")
        self._fail_done(reason)

    def _fail_done(self, reason):
        error = DownloadFailed(reason)
        error.reported = True
        self.done.errback(error)

    def _release_storage(self, keep):
        """
        Let go of the partial file once no storage work runs on it: kept for
        a resume if anything in it is verified, else removed.
        """
        if self.manifest is None:
            return
        release = self.storage.close if keep and self.have > 0 else self.storage.discard
        busy = defer.DeferredList(list(self._storage_busy), consumeErrors=True)
        busy.addCallback(lambda _: self._run(release)).addErrback(
            lambda f: log.failure("Releasing the partial file of {name}", f, name=self.name)
        )

    def _storage_op(self, f, *args):
        """
        C{f(*args)} in a thread, kept in C{_storage_busy} while it runs.
        """
        return self._busy(self._run(f, *args))

    def _busy(self, d):
        self._storage_busy.add(d)

        def settled(result):
            self._storage_busy.discard(d)
            return result

        return d.addBoth(settled)

    def _stop_transfers(self):
        if self._plan_call is not None and self._plan_call.active():
            self._plan_call.cancel()
        self._plan_call = None
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        for source in self.sources:
            self._end_stream(source)

    def _stop_everything(self):
        self._stop_transfers()
        self._withdraw_partial()
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._finder.stop()
        for source in self.sources:
            source.client.close()

    def _withdraw_partial(self):
        if self._index is not None and self.manifest is not None:
            self._index.remove_partial(self.file_id)

    # -- sources ---------------------------------------------------------------------

    def _usable(self, source):
        return source.usable and not self.bans.is_banned(source.key, *_where(source.peer))

    def _end_stream(self, source):
        """
        Stop using C{source}'s stream: what it still owed goes back to the
        queue, for the others.
        """
        stream, source.stream = source.stream, None
        if stream is None:
            return
        stream.close()
        self._inbox.withdraw(stream.token)
        if self._ledger is not None:
            for request in stream.requests():
                self._ledger.end(request)

    def _drop(self, source):
        """
        Ask C{source} for nothing more; what it owes goes to the others.
        """
        source.usable = False
        self._end_stream(source)
        if self._ledger is not None:
            self._ledger.remove_source(source)
        self._schedule_soon()

    def _lose(self, source, reason):
        """
        C{source} is gone or no longer answers: say so, and go on without it.
        """
        others = sum(1 for s in self.sources if s is not source and self._usable(s))
        self._emit(
            "source-lost",
            peer=source.label,
            name=getattr(source.peer, "name", None),
            reason=reason,
            others=others,
        )
        self._drop(source)

    def peer_left(self, key, reason):
        """
        The peer whose key is C{key} left the network (it said goodbye, or
        went silent): stop waiting for it.
        """
        for source in self.sources:
            if source.key == key and source.usable:
                if self.stage == "fetching":
                    self._lose(source, f"it left the network: {reason}")
                else:
                    source.usable = False
                source.client.close()

    def _client_closed(self, _, source):
        if source.usable and self.stage == "fetching":
            self._lose(source, "the connection closed")
        else:
            source.usable = False
            self._end_stream(source)
            if self._ledger is not None and self.stage == "fetching":
                self._ledger.remove_source(source)
                self._schedule_soon()

    def _rest(self, source, seconds):
        source.rest_until = max(source.rest_until, self._clock.seconds() + seconds)

    def _give_up_stream(self, source, why):
        """
        C{source}'s stream failed (silent, or closed under us): rest the
        source and ask it again later on a new stream; after
        L{MAX_TIMEOUTS} such failures it is no longer asked.
        """
        self._end_stream(source)
        source.failures += 1
        if source.failures >= MAX_TIMEOUTS:
            self._lose(source, why)
        else:
            log.info(
                "{peer} {why}; asking the others for its chunks of {name}",
                peer=source.label,
                why=why,
                name=self.name,
            )
            self._rest(source, TIMEOUT_REST)
            self._schedule_soon()

    # -- what the streams tell --------------------------------------------------------

    def stream_attached(self, stream):
        if self._reading_paused:
            stream.connection.pause()

    def stream_lost(self, stream, reason):
        source = stream.source
        if source.stream is stream and self.stage == "fetching":
            self._give_up_stream(source, "closed its data connection")

    def get_refused(self, stream, request, failure):
        source = stream.source
        if self._ledger is not None:
            self._ledger.end(request)
        if self.stage != "fetching" or source.stream is not stream or not source.usable:
            return
        code = failure.value.code if failure.check(PeerRefused) else None
        if failure.check(ConnectionLost):
            return  # the request connection is gone: _client_closed says so
        if code == "unreachable":
            self._emit(
                "source-unreachable",
                peer=source.label,
                port=self._receiver_port,
            )
            self._drop(source)
        elif code == "busy":
            # Not the source's fault: ask it again later, later each time.
            self._end_stream(source)
            source.backoff = min(max(2 * source.backoff, BUSY_BACKOFF_MIN), BUSY_BACKOFF_MAX)
            self._rest(source, source.backoff)
            self._schedule_soon()
        elif code == "missing-chunks":
            # A partial holder we asked for chunks it has not got (any more).
            self._rest(source, BUSY_BACKOFF_MIN)
            self._finder.refresh(source)
            self._schedule_soon()
        elif code == "stream-closed":
            self._end_stream(source)
            self._schedule_soon()
        else:
            log.info(
                "{peer} refused a request: {error}",
                peer=source.label,
                error=failure.getErrorMessage(),
            )
            self._drop(source)

    def cancel_answered(self, stream, withdrawn, coming):
        """
        C{stream}'s source took C{withdrawn} (C{(request, index)}) off its
        queue, and is sending C{coming} anyway.  A chunk that comes anyway
        and was asked of another source too (a steal) is cancelled there
        in turn, so that only one copy travels.
        """
        if self._ledger is None or self.stage != "fetching":
            return
        ledger = self._ledger
        for request, index in withdrawn:
            ledger.withdraw(request, index)
        for index in coming:
            for other in ledger.askers(index):
                if other.stream is not stream and not other.stream.closed:
                    other.stream.cancel([index])
        self._schedule_soon()

    def chunks_arrived(self, stream, first, arrived, buffer, opener=None):
        """
        Chunks C{first}, C{first + 1}, ... came on C{stream} in C{buffer}:
        C{arrived} is the C{(index, request)} of each.  Those still wanted
        are verified (a sealed frame opened first, with C{opener}) and
        written, in one job for a worker each; the others are dropped
        (another copy came first).
        """
        source = stream.source
        ledger = self._ledger
        manifest = self.manifest
        now = self._clock.seconds()
        wanted = []
        fetching = self.stage == "fetching"
        for index, request in arrived:
            length = manifest.chunk_length(index)
            source.meter.add(now, length)
            if not fetching or request is None or not ledger.arrived(request, index, now):
                self.progress.wasted += length  # cancelled: another copy came first
                continue
            others = ledger.askers(index)
            if ledger.begin_verifying(index) is None:
                self.progress.wasted += length  # another copy is being verified
                continue
            self.progress.received += length
            for other in others:
                other.stream.cancel([index])
            wanted.append(index)
        if not wanted:
            self._give_back(None, buffer)
            return
        self._verifying += 1
        self._verifying_bytes += len(buffer)
        if self._verifying_bytes >= self.verify_limit:
            # Counted by the frames given to jobs, not by buffers out: a
            # connection paused in the middle of a frame holds a buffer until
            # it is read again.
            self._pause_reading()
        # A frame is hashed and written in one job, by whichever worker has
        # less to do: the two threads take frames in turn, each a whole
        # frame at a time, so one hand-off there and back per frame (two
        # stages in two threads, hashing then writing, measured 20% slower:
        # a hop more per frame, and the slower stage set the pace).
        d = self._workers.pick().submit(
            verify_and_store, manifest, self.storage, first, wanted, buffer, opener
        )
        d = self._busy(d)
        d.addBoth(self._give_back, buffer)
        d.addCallbacks(
            self._stored,
            self._store_failed,
            callbackArgs=(source, wanted, len(buffer)),
            errbackArgs=(wanted, stream, len(buffer)),
        )
        window = source.window(now)
        if window - ledger.in_flight(source) >= ask_size(window):
            self._schedule_soon()

    def _stored(self, good, source, wanted, length):
        self._settled(length)
        if self.stage != "fetching":
            return
        ledger, progress, manifest = self._ledger, self.progress, self.manifest
        verified = 0
        for index in good:
            ledger.verified(index)
            verified += manifest.chunk_length(index)
        progress.verified += verified
        source.received += verified
        progress.by_source[source.label] = progress.by_source.get(source.label, 0) + verified
        for index in set(wanted).difference(good):
            ledger.requeue(index)
            self._reject(source, index)
        if ledger.complete:
            self._lifecycle.all_verified()
            return
        self._schedule_soon()

    def _store_failed(self, failure, wanted, stream, length):
        self._settled(length)
        if self.stage != "fetching":
            return
        for index in wanted:
            self._ledger.requeue(index)
        if failure.check(SealBroken):
            # Not the source's doing for sure (someone on the way may have
            # altered it): its stream is closed, as on any broken frame.
            log.info("A sealed frame from {peer} did not open; closing its stream",
                     peer=stream.source.label)
            if stream.source.stream is stream:
                self._give_up_stream(stream.source, "sent a sealed frame that did not open")
            return
        error = failure.value
        if isinstance(error, StorageError):
            reason = str(error)
        else:
            log.failure("Storing chunks of {name} failed", failure, name=self.name)
            reason = failure.getErrorMessage()
        self._lifecycle.write_failed(f"could not write {self.name}: {reason}")

    def _settled(self, length):
        self._verifying -= 1
        self._verifying_bytes -= length
        if self._reading_paused and self._verifying_bytes <= self.verify_limit // 2:
            self._resume_reading()

    def _give_back(self, result, buffer):
        self.buffers.give_back(buffer)
        return result

    def _pause_reading(self):
        self._reading_paused = True
        for source in self.sources:
            if source.stream is not None and source.stream.connection is not None:
                source.stream.connection.pause()

    def _resume_reading(self):
        self._reading_paused = False
        now = self._clock.seconds()
        for source in self.sources:
            stream = source.stream
            if stream is not None:
                # Time spent paused by us is no silence of theirs.
                stream.heard_at = now
                if stream.connection is not None:
                    stream.connection.resume()

    def _reject(self, source, index):
        log.warn(
            "Chunk {index} of {file} from {peer} failed verification",
            event="chunk-rejected",
            file=self.name,
            id=self.file_id,
            index=index,
            peer=source.label,
        )
        if self.bans.strike(source.key, _host(source.peer)):
            self._emit(
                "peer-banned",
                peer=source.label,
                name=getattr(source.peer, "name", None),
                strikes=self.bans.strikes(source.key),
            )
        if self.bans.is_banned(source.key, *_where(source.peer)):
            self._drop(source)
            source.client.close()

    # -- scheduling ------------------------------------------------------------------

    def _schedule_soon(self):
        """
        Plan once the current event is handled: many events in a row (a
        burst of chunks) cost one plan.
        """
        if self._plan_call is None and self.stage == "fetching":
            self._plan_call = self._clock.callLater(0, self._schedule)

    def _schedule(self):
        if self._plan_call is not None and self._plan_call.active():
            self._plan_call.cancel()
        self._plan_call = None
        ledger = self._ledger
        if self.stage != "fetching" or ledger.complete:
            return
        now = self._clock.seconds()
        usable = []
        for source in self.sources:
            if self._usable(source):
                usable.append(source)
            elif source in ledger:
                self._drop(source)
        decided = plan(ledger, usable, now)
        self.progress.taken_over += decided.taken_over
        self.progress.doubled += decided.doubled
        # Asks first: a cancel answered at once must find the chunks asked
        # of their new source already.
        for source, chunks in decided.asks:
            self._ask(source, chunks, now)
        for victim, chunks in decided.cancels:
            if victim.stream is not None:
                victim.stream.cancel(chunks)
        if decided.wake_at is not None:
            self._wake_at(decided.wake_at)
        self._check_stuck(decided)

    def _ask(self, source, chunks, now):
        stream = source.stream
        if stream is None:
            # Runs that fit the budget of a download drawing on every peer
            # that offered the file (they join as the manifest race allows),
            # or on the sources it has streams with, if more.
            streams = max(
                len(self._peers),
                sum(1 for other in self.sources if other.usable),
                1 + sum(1 for other in self.sources if other.stream is not None),
            )
            run = run_for(streams)
            stream = SourceStream(
                self, source, self.manifest, self.file_id, self._receiver_port, self._clock,
                run=run,
            )
            self.verify_limit = max(self.verify_limit, VERIFY_FRAMES * run * CHUNK_SIZE)
            # In a private group its frames are sealed, keyed by the TLS of
            # the request connection it is asked on.
            stream.seal = stream_seal(getattr(source.client, "transport", None), stream.token)
            source.stream = stream
            self._inbox.expect(stream)
        request = GetRequest(stream, chunks)
        self._ledger.ask(request, source, chunks, now)
        stream.ask(request)

    def _check_stuck(self, decided):
        ledger = self._ledger
        if (
            ledger.requests_in_flight()
            or decided.wake_at is not None
            or self._verifying
            or self._finder.busy
        ):
            return
        # Nothing more is coming.  A chunk nobody holds fails the download,
        # unless partial holders are left: they may get it yet.
        index = ledger.first_unheld()
        if not any(self._usable(s) for s in self.sources):
            why = f"no peer is left to download {self.name} from"
            if ledger.have:
                why += f"; what came is kept: 'resume {self.name}' goes on once one is back"
            self._lifecycle.stuck(why)
        elif index is not None and not ledger.partial_sources():
            self._lifecycle.stuck(
                f"no peer left has chunk {index} of {self.name}; "
                "download again when one that has the whole file is back"
            )

    def _wake_at(self, when):
        if self._wake is not None and self._wake.active():
            if self._wake.getTime() <= when:
                return
            self._wake.cancel()
        self._wake = self._clock.callLater(
            max(0.0, when - self._clock.seconds()), self._woken
        )

    def _woken(self):
        self._wake = None
        self._schedule()

    def _tick(self):
        """
        Every L{PROGRESS_INTERVAL}: a progress event, a look for silent
        streams, for what partial holders have gained, and for peers that
        offer the file since.
        """
        now = self._clock.seconds()
        self.progress.tick()
        for source in list(self.sources):
            self._check_silence(source, now)
        if now - self._last_refresh >= HAVE_REFRESH:
            self._last_refresh = now
            for source in self._ledger.partial_sources():
                self._finder.refresh(source)
            if self._find_peers is not None:
                self._finder.add(self._find_peers())
        self._show_progress()
        self._schedule()

    def _check_silence(self, source, now):
        stream = source.stream
        if stream is None or self._reading_paused or not stream.outstanding:
            return
        if now - stream.heard_at >= REQUEST_TIMEOUT:
            self._give_up_stream(source, f"sent nothing for {REQUEST_TIMEOUT:.0f} s")

    def _show_progress(self):
        if self.manifest is None or self.manifest.size == 0:
            return
        status = self.status()
        self._emit(
            "download-progress",
            percent=status["percent"],
            bytes=status["bytes"],
            size=status["size"],
            rate=status["rate"],
            sources=status["sources"],
            eta=status["eta"],
        )


class Downloads:
    """
    Owns the downloads in progress: starts them, keeps one per file, hands
    finished files to the index so they are offered in turn, and shares one
    L{Bans} between them for the session.  It also owns the queue of files
    waiting their turn (a folder download, a pattern): at most C{parallel}
    of those run at once.

    @param make_download: C{make_download(name, file_id, peers, report,
        bans, index)} giving an unstarted L{Download} that shares C{bans} and
        offers its verified chunks through C{index}.
    @param index: the L{SharedIndex} that finished files join, and partial
        ones are offered from, or C{None} when downloads are not offered.
    @param folder: the downloads folder, where a folder download's top
        folder is given a name nothing uses yet; C{None} for none.
    """

    def __init__(self, make_download, index, folder=None, parallel=PARALLEL_FILES,
                 clock=None):
        self._make = make_download
        self._index = index
        self.folder = folder
        self._parallel = parallel
        self.bans = Bans(clock=clock)
        self.active = {}
        self._waiting = deque()
        self._from_queue = set()

    def start(self, name, file_id, peers, report):
        """
        Start (or resume) downloading C{file_id} as C{name} (a path below
        the downloads folder); a Deferred of the final name.

        @raise DownloadFailed: it is already being downloaded, or C{name}
            breaks the path rule.
        """
        if file_id in self.active:
            raise DownloadFailed(f"{name} is already being downloaded")
        try:
            check_path(name)
        except BadName as e:
            raise DownloadFailed(f"will not download as {name!r}: {e}") from e
        download = self._make(name, file_id, peers, report, self.bans, self._index)
        self.active[file_id] = download
        d = download.start()

        def finished(result):
            final_name, signature = result
            if self._index is not None:
                self._index.add(download.storage.folder, final_name, download.manifest, signature)
            return final_name

        def ended(result):
            del self.active[file_id]
            self._from_queue.discard(file_id)
            self._pump()
            return result

        return d.addCallback(finished).addBoth(ended)

    def queue(self, name, file_id, peers, report):
        """
        Like L{start}, but the download waits its turn: at most C{parallel}
        queued downloads run at once, and one of a file being downloaded
        already waits for that one to end (a folder may hold the same
        content twice).  A Deferred of the final name.
        """
        try:
            check_path(name)
        except BadName as e:
            return defer.fail(DownloadFailed(f"will not download as {name!r}: {e}"))
        d = defer.Deferred()
        self._waiting.append((name, file_id, peers, report, d))
        self._pump()
        return d

    @property
    def waiting(self):
        """
        The names of the queued downloads that have not started yet.
        """
        return [name for name, *_ in self._waiting]

    def _pump(self):
        passed = deque()
        while self._waiting and len(self._from_queue) < self._parallel:
            item = self._waiting.popleft()
            name, file_id, peers, report, d = item
            if file_id in self.active:
                passed.append(item)
                continue
            try:
                started = self.start(name, file_id, peers, report)
            except DownloadFailed as e:
                d.errback(e)
                continue
            self._from_queue.add(file_id)
            started.chainDeferred(d)
        passed.extend(self._waiting)
        self._waiting = passed

    def unqueue(self, which):
        """
        Drop the queued downloads not started yet whose name C{which(name)}
        accepts (a folder download cancelled); their Deferreds fail with a
        L{DownloadFailed} already reported.  Their names.
        """
        kept, dropped = deque(), []
        for item in self._waiting:
            (dropped if which(item[0]) else kept).append(item)
        self._waiting = kept
        for name, *_, d in dropped:
            error = DownloadFailed(f"{name} was cancelled before it started")
            error.reported = True
            d.errback(error)
        return [item[0] for item in dropped]

    def folder_here(self, name):
        """
        Whether the downloads folder holds folder C{name} (a folder download
        to resume into).  One C{lstat}: quick.
        """
        return self.folder is not None and is_folder_here(self.folder, name)

    def already_here(self, entries, known=None):
        """
        Which of C{entries}, C{(path, file id, size)}, the downloads folder
        holds already with that content (see L{already_here}).  Blocks: run
        it in a thread.
        """
        if self.folder is None:
            return [False] * len(entries)
        return already_here(self.folder, entries, known)

    def free_folder(self, name):
        """
        A name for a folder download's top folder in the downloads folder
        that nothing uses yet: C{name}, else C{name (1)} and so on.  Decided
        once per folder download, before any of its files arrives, so that
        its files all go into one new folder.  (One C{lstat} or two: quick.)
        """
        if self.folder is None:
            return name
        return free_name(self.folder, name)

    # The peer table's observer: a peer that leaves is a source lost.

    def joined(self, peer):
        pass

    def changed(self, peer, old_revision):
        pass

    def left(self, peer, reason):
        for download in list(self.active.values()):
            download.peer_left(peer.peer_id, reason)

    def cancel_all(self):
        """
        Stop every download, keeping what each has verified, so that the
        next C{download} of the same file resumes it (the peer is stopping).
        The queued ones that have not started are dropped.
        """
        waiting, self._waiting = self._waiting, deque()
        for name, *_, d in waiting:
            error = DownloadFailed(f"{name} was waiting its turn when the peer stopped")
            d.errback(error)
        for download in list(self.active.values()):
            download.pause()
