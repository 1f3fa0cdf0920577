"""
Downloads: one file's swarm download (its sources, and the scheduling of
chunk requests over them), and the set of downloads in progress.  Which
chunks to ask for, and of whom, is the pure L{ChunkLedger}'s business
(L{twisted_p2p.chunkmap}); here is the asking.

The scheduler in brief (PROTOCOL.md has the wire side):

 - every peer that offers the file is connected to at once; the first
   manifest (checked against the file id) starts the download, and the others
   join it as they answer.  A peer that leaves a manifest or "have" call
   unanswered for L{ANSWER_TIMEOUT} seconds is left out of this download;
 - every source that holds chunks of the file is used at once, full copies
   and partial ones alike (a partial holder says which chunks it has, and is
   asked again every L{HAVE_REFRESH} seconds);
 - each source has a window of at most L{SOURCE_WINDOW} chunks in flight, so
   a faster source, whose chunks come back sooner, is asked more often.  A
   source whose requests time out while it keeps delivering on others is
   slow, not gone (its upload rate is shared by its streams): its window is
   halved, down to L{REQUEST_BATCH}, and grows again by a chunk for each
   request answered in time;
 - the rarest chunks (held by the fewest usable sources) go first;
 - near the end, a chunk whose request has made no progress for
   L{ENDGAME_STALL} seconds is asked of a second source as well, and
   whichever copy arrives first cancels the other;
 - a request that makes no progress for L{REQUEST_TIMEOUT} seconds while its
   source delivers nothing else either is given up, and its source rests, so
   its chunks go to the others (after L{MAX_TIMEOUTS}, it is no longer
   asked); a "busy" source rests too, for longer each time it says so;
 - a chunk that fails verification is fetched again, and is a strike against
   the peer that sent it: after L{MAX_STRIKES}, the peer is banned for the
   session (see L{Bans}).
"""

import os
import secrets
from collections import deque

from twisted.internet import defer
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_p2p import events, wire
from twisted_p2p.chunkmap import ChunkLedger
from twisted_p2p.client import PeerRefused, fetch_have, fetch_manifest
from twisted_p2p.limits import (
    BUSY_BACKOFF_MAX,
    BUSY_BACKOFF_MIN,
    HAVE_REFRESH,
    MAX_STRIKES,
    MAX_TIMEOUTS,
    REQUEST_BATCH,
    REQUEST_TIMEOUT,
    SOURCE_WINDOW,
    TIMEOUT_REST,
)
from twisted_p2p.storage import StorageError
from twisted_p2p.units import human_size  # here too for older imports

log = Logger()

#: Seconds between progress events.
PROGRESS_INTERVAL = 1.0

#: Progress samples the rate is measured over (one per progress event).
RATE_WINDOW = 5

#: Seconds a peer has to answer each manifest or "have" call before it is
#: left out of the download (its connection closed), so that a silent peer
#: costs the others nothing.
ANSWER_TIMEOUT = 10.0

#: The smallest window a slow source is shrunk to: one request at a time.
MIN_WINDOW = REQUEST_BATCH


def _seconds(elapsed):
    """
    A duration for people: two decimals under ten seconds, so that a fast
    download does not say "0.0 s".
    """
    return f"{elapsed:.2f} s" if elapsed < 10 else f"{elapsed:.0f} s"


class DownloadFailed(Exception):
    """
    A download that cannot complete; the message is for the user.

    @ivar reported: whether a C{download-failed} event already told the user.
    """

    reported = False


class Bans:
    """
    Owns the strikes against peers that sent bad data, for the whole session
    (every download shares one), and the list of peers banned for it.
    """

    def __init__(self, max_strikes=MAX_STRIKES):
        self._max = max_strikes
        self._strikes = {}
        self._banned = set()

    def strike(self, peer_key):
        """
        One more strike; whether this one banned the peer.
        """
        self._strikes[peer_key] = self._strikes.get(peer_key, 0) + 1
        if self._strikes[peer_key] >= self._max and peer_key not in self._banned:
            self._banned.add(peer_key)
            return True
        return False

    def strikes(self, peer_key):
        return self._strikes.get(peer_key, 0)

    def is_banned(self, peer_key):
        return peer_key in self._banned


class _Deadline:
    """
    A sender connection whose every call fails with L{TimeoutError} unless
    answered within C{seconds} (the call is cancelled; a late answer is
    dropped, and the answers after it stay in order).
    """

    def __init__(self, client, seconds, clock):
        self._client = client
        self._seconds = seconds
        self._clock = clock

    def call(self, header):
        return self._client.call(header).addTimeout(self._seconds, self._clock)


class _Source:
    """
    One peer we draw chunks from, over one connection to its sender port.

    @ivar has: what it held when we connected: C{None} for a full copy, else
        one byte per chunk (1 = held).  The ledger follows it from there.
    @ivar window: chunks it may have in flight now (see the module docstring).
    @ivar delivered_at: when a chunk last came from it, or C{None}.
    """

    def __init__(self, peer, client):
        self.peer = peer
        self.key = getattr(peer, "peer_id", None) or peer.label
        self.client = client
        self.has = None
        self.strikes = 0
        self.timeouts = 0
        self.usable = True
        self.received = 0
        self.rest_until = 0.0
        self.backoff = 0.0
        self.window = SOURCE_WINDOW
        self.delivered_at = None


class Request:
    """
    One "get" to one source: the chunks it covers, and what happens to each.
    The receiver port hands its data here (see L{Inbox}).
    """

    def __init__(self, download, source, chunks):
        self.download = download
        self.source = source
        self.token = secrets.token_hex(16)
        self.host = source.peer.host
        self.asked = frozenset(chunks)
        self.arrived = set()
        self.timeout = None
        self.transport = None
        #: When its current timeout started counting.
        self.since = download._clock.seconds()
        #: Whether it ever ran out of time (its source was found slow).
        self.late = False

    @property
    def pending(self):
        """
        The chunks this request still waits for.
        """
        return self.download._ledger.pending(self)

    def accepts(self, index, length):
        # A chunk cancelled since (another copy won) is still accepted, and
        # dropped: the sender did nothing wrong by sending what it was asked.
        return (
            index in self.asked
            and index not in self.arrived
            and length == self.download.manifest.chunk_length(index)
        )

    def attach(self, transport):
        """
        The data connection of this request (from the receiver port).
        """
        self.transport = transport

    def deliver(self, index, data):
        self.arrived.add(index)
        return self.download._chunk_arrived(self, index, data)

    def finished(self):
        self.download._request_finished(self)

    def lost(self):
        self.download._request_ended(self)

    def close(self):
        if self.transport is not None and not self.transport.disconnecting:
            self.transport.loseConnection()


class Download:
    """
    Owns one file's download from first manifest to final rename: the
    sources, the requests in flight, their timeouts and rests, and the
    verifying and storing of what arrives.  See the module docstring.  Its
    L{ChunkLedger} (made once the manifest is known and the partial file
    open) keeps which chunk is where, and picks what to ask for; the ledger
    counts the usable sources only.

    @param name: the display name, used for the final file name.
    @param file_id: what we download.
    @param peers: the peers that offer it.
    @param open_client: C{open_client(peer)} giving a Deferred L{SenderClient}.
    @param inbox: the L{Inbox} of our receiver port.
    @param receiver_port: our port T, sent in requests.
    @param storage: a L{PartialFile}-like object (blocking methods).
    @param run_in_thread: C{deferToThread} or a stand-in.
    @param clock: an L{IReactorTime}.
    @param report: C{report(event)} for progress and outcome events.
    @param bans: the session's L{Bans} (shared by every download); a fresh
        one if C{None}.
    @param index: the L{SharedIndex} that offers the verified chunks while
        the download runs, or C{None}.
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
        clock,
        report,
        bans=None,
        index=None,
    ):
        self.name = name
        self.file_id = file_id
        self._peers = list(peers)
        self._open_client = open_client
        self._inbox = inbox
        self._receiver_port = receiver_port
        self.storage = storage
        self._run = run_in_thread
        self._clock = clock
        self._report = report
        self.bans = bans if bans is not None else Bans()
        self._index = index
        self.manifest = None
        self.sources = []
        self._requests = set()
        self._ledger = None
        self.bytes_received = 0
        self.bytes_verified = 0
        self.bytes_resumed = 0
        self.bytes_wasted = 0
        self.started = clock.seconds()
        self._samples = deque(maxlen=RATE_WINDOW + 1)
        self.final_name = None
        self._ticker = None
        self._wake = None
        self._refreshing = set()
        # Connections being opened and asked the manifest and holdings.
        self._connecting = set()
        self._manifest_fetches = set()
        # What _begin waits on, once every connection is started: the first
        # source to join, or none left connecting.
        self._first_source = None
        self._connect_errors = {}
        # Storage work running in a thread (open, store, complete): the
        # storage is released only once none is left.
        self._storage_busy = set()
        self._last_refresh = 0.0
        self._finishing = False
        self._scheduling = False
        self._schedule_again = False
        self._stopped = False
        self._cancelled = False
        self.done = defer.Deferred()

    @property
    def size(self):
        return self.manifest.size if self.manifest else None

    @property
    def have(self):
        """
        How many chunks are verified (resumed ones included).
        """
        return self._ledger.have if self._ledger is not None else 0

    # -- what it looks like ------------------------------------------------

    def _rate(self):
        now = self._clock.seconds()
        fetched = self.bytes_verified - self.bytes_resumed
        if self._samples:
            then, before = self._samples[0]
            if now - then > 0:
                return (fetched - before) / (now - then)
        return fetched / max(now - self.started, 1e-6)

    def status(self):
        """
        Where this download stands: C{file}, C{id}, C{size}, C{bytes}
        verified (resumed ones included), C{percent}, C{rate} (bytes/s over
        the last few seconds), C{sources} in use, C{eta} (seconds, or
        C{None} while unknown) and C{by_source} (verified bytes per peer).
        """
        size = self.size
        rate = self._rate()
        if size is None:
            percent, eta = 0, None
        else:
            percent = 100 if size == 0 else 100 * self.bytes_verified // size
            eta = round((size - self.bytes_verified) / rate) if rate > 0 else None
        return {
            "file": self.name,
            "id": self.file_id,
            "size": size,
            "bytes": self.bytes_verified,
            "percent": percent,
            "rate": round(rate),
            "sources": sum(1 for s in self.sources if self._usable(s)),
            "eta": eta,
            "by_source": self.by_source(),
        }

    def by_source(self):
        """
        Verified bytes from each peer, by label.
        """
        counts = {}
        for s in self.sources:
            counts[s.peer.label] = counts.get(s.peer.label, 0) + s.received
        return counts

    def _emit(self, kind, text, **fields):
        """
        Tell the user (through C{report}) and, but for progress, the log.
        """
        e = events.event(kind, text, file=self.name, id=self.file_id, **fields)
        if kind != "download-progress":
            log.info("{text}", **e)
        self._report(e)

    # -- starting ------------------------------------------------------------

    def start(self):
        """
        Start the download.  L{done} fires with C{(final name, signature)}, or
        fails with L{DownloadFailed}.
        """
        defer.ensureDeferred(self._begin()).addErrback(self._fail)
        return self.done

    async def _begin(self):
        for peer in self._peers:
            key = getattr(peer, "peer_id", None) or peer.label
            if self.bans.is_banned(key):
                continue
            d = defer.ensureDeferred(self._connect(peer))
            self._connecting.add(d)
            d.addBoth(self._connect_ended, d)
        if not self.sources and self._connecting:
            self._first_source = defer.Deferred()
            await self._first_source
        if self._stopped:
            return
        if self.manifest is None:
            errors = [
                self._connect_errors[p.label] for p in self._peers if p.label in self._connect_errors
            ]
            raise DownloadFailed(
                f"no peer could give the manifest of {self.name}"
                + (f" ({errors[0]})" if errors else "")
            )
        count = self.manifest.chunk_count
        try:
            resumed = await self._storage_op(self.storage.open, self.manifest.size, self.manifest)
        except StorageError as e:
            raise DownloadFailed(f"could not start {self.name}: {e}")
        if self._stopped:
            return  # _fail releases the storage once the open is over
        resumed = list(resumed or ())
        self._ledger = ChunkLedger(count, verified=resumed)
        self.bytes_resumed = sum(self.manifest.chunk_length(index) for index in resumed)
        self.bytes_verified = self.bytes_resumed
        for source in self.sources:
            if self._usable(source):
                self._ledger.add_source(source, source.has)
        if self._index is not None and getattr(self.storage, "chunks", None) is not None:
            self._index.add_partial(self.name, self.manifest, self.storage.path, self.storage.chunks)
        resumed_text = (
            f", resuming with {human_size(self.bytes_resumed)} already here"
            if self.bytes_resumed
            else ""
        )
        self._emit(
            "download-started",
            f"download {self.name}: {human_size(self.manifest.size)} in "
            f"{count} chunks from {len(self.sources)} peer(s){resumed_text}",
            size=self.manifest.size,
            chunks=count,
            sources=len(self.sources),
            resumed=self.bytes_resumed,
        )
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self._clock
        self._ticker.start(PROGRESS_INTERVAL, now=False)
        self._schedule()

    async def _connect(self, peer):
        """
        Connect to C{peer}, fetch the manifest if there is none yet, and what
        the peer holds; then it joins the download as a source.  A peer that
        fails (or is too slow to answer) is recorded in C{_connect_errors}.
        """
        try:
            client = await self._open_client(peer)
        except Exception as e:
            # By label: the peer table's entries are not hashable.
            self._connect_errors[peer.label] = (
                f"{peer.label}: could not connect ({e}); it may have stopped, "
                "or a firewall or --host keeps it out of reach"
            )
            return
        source = _Source(peer, client)
        timed = _Deadline(client, ANSWER_TIMEOUT, self._clock)
        try:
            if self.manifest is None:
                manifest = await self._fetch_manifest(timed)
                if manifest is not None:
                    self._got_manifest(manifest)
            if self._stopped:
                raise CancelledError()
            if self.manifest.chunk_count:
                source.has = await fetch_have(timed, self.file_id, self.manifest.chunk_count)
        except Exception as e:
            client.close()
            if isinstance(e, TimeoutError):
                e = f"no answer in {ANSWER_TIMEOUT:.0f} s"
            self._connect_errors[peer.label] = f"{peer.label}: {e}"
            return
        self._join(source)

    async def _fetch_manifest(self, client):
        """
        The manifest from C{client}; C{None} if another peer's came first
        (this fetch is then cancelled).
        """
        fetch = defer.ensureDeferred(fetch_manifest(client, self.file_id))
        self._manifest_fetches.add(fetch)
        try:
            return await fetch
        except CancelledError:
            if self.manifest is None or self._stopped:
                raise
            return None
        finally:
            self._manifest_fetches.discard(fetch)

    def _got_manifest(self, manifest):
        """
        The first manifest is in: the other fetches of it stop (the peers
        go on to say what they hold).
        """
        if self.manifest is not None or self._stopped:
            return
        self.manifest = manifest
        for fetch in list(self._manifest_fetches):
            fetch.cancel()

    def _connect_ended(self, result, d):
        if isinstance(result, Failure):
            log.failure("Connecting to a source of {name} failed", result, name=self.name)
        self._connecting.discard(d)
        if not self._connecting:
            self._wake_begin()
        # The last peer to answer (or not) may leave nothing to wait for.
        self._schedule()

    def _join(self, source):
        """
        C{source} answered: it is asked for chunks from now on.
        """
        if self._stopped or self.done.called:
            source.client.close()
            return
        self.sources.append(source)
        source.client.when_closed().addCallback(self._source_closed, source)
        if self._ledger is not None and self._usable(source):
            self._ledger.add_source(source, source.has)
            self._schedule()
        self._wake_begin()

    def _wake_begin(self):
        waiting, self._first_source = self._first_source, None
        if waiting is not None:
            waiting.callback(None)

    def _storage_op(self, f, *args):
        """
        C{f(*args)} in a thread, kept in C{_storage_busy} while it runs.
        """
        d = self._run(f, *args)
        self._storage_busy.add(d)

        def settled(result):
            self._storage_busy.discard(d)
            return result

        return d.addBoth(settled)

    # -- sources --------------------------------------------------------------

    def _usable(self, source):
        return source.usable and not self.bans.is_banned(source.key)

    def _drop(self, source):
        """
        Stop asking C{source} for anything, and give what it still owes to
        the others (it is banned: nothing it sends is wanted).
        """
        source.usable = False
        self._ledger.remove_source(source)
        for request in [r for r in self._requests if r.source is source]:
            request.close()
            self._request_ended(request)

    # -- scheduling ------------------------------------------------------------

    def _schedule(self):
        # A request refused at once calls back in here: run again after the
        # current pass instead of inside it.
        if self._scheduling:
            self._schedule_again = True
            return
        self._scheduling = True
        try:
            self._schedule_again = True
            while self._schedule_again:
                self._schedule_again = False
                self._schedule_once()
        finally:
            self._scheduling = False

    def _schedule_once(self):
        ledger = self._ledger
        if self.done.called or self._finishing or self._stopped or ledger is None:
            return
        if ledger.complete:
            self._finish()
            return
        now = self._clock.seconds()
        resting = []
        for source in self.sources:
            if source in ledger and not self._usable(source):
                self._drop(source)
            if not self._usable(source):
                continue
            if source.rest_until > now:
                resting.append(source.rest_until)
                continue
            # Checked again each time: a request refused at once makes the
            # source rest, or unusable.
            while (
                self._usable(source)
                and source.rest_until <= now
                and ledger.in_flight(source) < source.window
            ):
                room = min(REQUEST_BATCH, source.window - ledger.in_flight(source))
                chunks = ledger.pick(source, room) or ledger.endgame_pick(source, room, now)
                if not chunks:
                    break
                self._request(source, chunks)
        if resting:
            self._wake_at(min(resting))
        if (
            not self._requests
            and not resting
            and not ledger.verifying()
            and not self._connecting
        ):
            # Nothing more is coming.  A chunk nobody holds fails the
            # download, unless partial holders are left: they may get it yet.
            index = ledger.first_unheld()
            if not any(self._usable(s) for s in self.sources):
                self._fail(DownloadFailed(f"no peer is left to download {self.name} from"))
            elif index is not None and not ledger.partial_sources():
                self._fail(
                    DownloadFailed(
                        f"no peer left has chunk {index} of {self.name}; "
                        "download again when one that has the whole file is back"
                    )
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

    def _request(self, source, chunks):
        request = Request(self, source, chunks)
        self._requests.add(request)
        self._ledger.ask(request, source, chunks, self._clock.seconds())
        self._inbox.expect(request)
        request.timeout = self._clock.callLater(
            REQUEST_TIMEOUT, self._request_timed_out, request
        )
        header = wire.request(
            "get",
            id=self.file_id,
            chunks=list(chunks),
            port=self._receiver_port,
            token=request.token,
        )
        d = source.client.call(header)
        d.addCallbacks(self._request_accepted, self._request_refused,
                       callbackArgs=(request,), errbackArgs=(request,))

    def _request_accepted(self, _, request):
        request.source.backoff = 0.0

    def _rest(self, source, seconds):
        source.rest_until = max(source.rest_until, self._clock.seconds() + seconds)

    def _source_closed(self, _, source):
        if source.usable and not self._stopped and not self.done.called:
            log.info(
                "Lost the connection to {peer}; downloading {name} from the others",
                peer=source.peer.label,
                name=self.name,
            )
        source.usable = False
        if self._ledger is not None and not self.done.called:
            self._ledger.remove_source(source)
            self._schedule()

    def _request_refused(self, failure, request):
        if request not in self._requests:
            # Over already: the download finished or stopped and closed
            # this connection itself.
            return
        source = request.source
        code = failure.value.code if failure.check(PeerRefused) else None
        if not source.usable:
            pass  # the connection is gone, and it was said once (_source_closed)
        elif code == "unreachable":
            self._emit(
                "source-unreachable",
                f"download {self.name}: {source.peer.label} could not connect back to "
                f"our receiver port {self._receiver_port}; a firewall may block it, "
                "or --host is not an address that peer can reach",
                peer=source.peer.label,
            )
            source.usable = False
        elif code == "busy":
            # Not the source's fault: ask it again later, later each time.
            source.backoff = min(max(2 * source.backoff, BUSY_BACKOFF_MIN), BUSY_BACKOFF_MAX)
            self._rest(source, source.backoff)
        elif code == "missing-chunks":
            # A partial holder we asked for chunks it has not got (any more).
            self._rest(source, BUSY_BACKOFF_MIN)
            self._refresh_holdings(source)
        else:
            log.info(
                "{peer} refused a request: {error}",
                peer=source.peer.label,
                error=failure.getErrorMessage(),
            )
            source.usable = False
        self._request_ended(request)

    def _request_timed_out(self, request):
        request.timeout = None
        if request not in self._requests:
            return
        source = request.source
        if source.delivered_at is not None and source.delivered_at > request.since:
            # Its source delivered on other requests meanwhile: slow (its
            # upload rate is shared by our streams), not gone.  Keep waiting,
            # with fewer chunks asked of it at once.
            request.late = True
            request.since = self._clock.seconds()
            request.timeout = self._clock.callLater(
                REQUEST_TIMEOUT, self._request_timed_out, request
            )
            window = max(MIN_WINDOW, source.window // 2)
            if window < source.window:
                log.info(
                    "{peer} is slow; asking it for {window} chunks of {name} at once",
                    peer=source.peer.label,
                    window=window,
                    name=self.name,
                )
            source.window = window
            return
        source.timeouts += 1
        log.info(
            "{peer} sent nothing of {name} for {seconds:.0f} s; asking the others",
            peer=source.peer.label,
            name=self.name,
            seconds=REQUEST_TIMEOUT,
        )
        if source.timeouts >= MAX_TIMEOUTS:
            source.usable = False
        else:
            self._rest(source, TIMEOUT_REST)
        request.close()
        self._request_ended(request)

    def _request_finished(self, request):
        source = request.source
        if request in self._requests and not request.late:
            # Answered in time: the source may take a little more.
            source.window = min(SOURCE_WINDOW, source.window + 1)
        self._request_ended(request)

    def _request_ended(self, request):
        if request not in self._requests:
            return
        self._requests.discard(request)
        self._inbox.withdraw(request.token)
        if request.timeout is not None and request.timeout.active():
            request.timeout.cancel()
        request.timeout = None
        self._ledger.end(request)
        self._schedule()

    def _cancel(self, request):
        """
        Another copy of the last chunk C{request} waited for has arrived:
        drop its data connection, and its token.
        """
        request.close()
        self._request_ended(request)

    def _chunk_arrived(self, request, index, data):
        now = self._clock.seconds()
        source = request.source
        source.delivered_at = now
        if not self._ledger.arrived(request, index, now):
            # Cancelled: another source's copy came first.
            self.bytes_wasted += len(data)
            return defer.succeed(None)
        self.bytes_received += len(data)
        request.since = now
        if request.timeout is not None and request.timeout.active():
            request.timeout.reset(REQUEST_TIMEOUT)
        over = self._stopped or self.done.called
        answered = None if over else self._ledger.begin_verifying(index)
        if answered is None:
            # Over, or another copy is verified or being verified.
            self.bytes_wasted += len(data)
            return defer.succeed(None)
        for other in answered:
            self._cancel(other)
        manifest = self.manifest
        offset = manifest.chunk_offset(index)
        storage = self.storage

        def verify_and_store():
            if not manifest.verify_chunk(index, data):
                return False
            storage.store(index, offset, data)
            return True

        d = self._storage_op(verify_and_store)

        def stored(ok):
            if self.done.called or self._stopped:
                return
            if ok:
                self._ledger.verified(index)
                self.bytes_verified += len(data)
                source.received += len(data)
            else:
                self._ledger.requeue(index)
                self._reject(source, index)
            self._schedule()

        def failed(failure):
            if self.done.called or self._stopped:
                return
            self._ledger.requeue(index)
            error = failure.value
            reason = str(error) if isinstance(error, StorageError) else failure.getErrorMessage()
            self._fail(DownloadFailed(f"could not write {self.name}: {reason}"))

        return d.addCallbacks(stored, failed)

    def _reject(self, source, index):
        source.strikes += 1
        log.warn(
            "Chunk {index} of {file} from {peer} failed verification",
            event="chunk-rejected",
            file=self.name,
            id=self.file_id,
            index=index,
            peer=source.peer.label,
        )
        if self.bans.strike(source.key):
            self._emit(
                "peer-banned",
                f"{source.peer.label} sent bad data {self.bans.strikes(source.key)} times "
                "and is banned for this session",
                peer=source.peer.label,
                strikes=self.bans.strikes(source.key),
            )
        if self.bans.is_banned(source.key):
            self._drop(source)

    def _refresh_holdings(self, source):
        if (
            source in self._refreshing
            or not source.usable
            or not self._ledger.is_partial(source)
        ):
            return
        self._refreshing.add(source)
        timed = _Deadline(source.client, ANSWER_TIMEOUT, self._clock)
        d = defer.ensureDeferred(fetch_have(timed, self.file_id, self.manifest.chunk_count))

        def got(has):
            if self._usable(source) and not self.done.called:
                self._ledger.update_source(source, has)
                self._schedule()

        def failed(failure):
            if not source.usable or self._stopped or self.done.called:
                return
            error = (
                f"no answer in {ANSWER_TIMEOUT:.0f} s"
                if failure.check(TimeoutError)
                else failure.getErrorMessage()
            )
            log.info(
                "Could not ask {peer} which chunks it has ({error}); "
                "downloading {name} from the others",
                peer=source.peer.label,
                error=error,
                name=self.name,
            )
            source.usable = False
            source.client.close()
            self._schedule()

        d.addCallbacks(got, failed)
        d.addBoth(lambda _: self._refreshing.discard(source))

    # -- the end ---------------------------------------------------------------

    def _finish(self):
        self._finishing = True
        self._withdraw_partial()
        d = self._storage_op(self.storage.complete, self.name)

        def completed(result):
            final_name, _ = result
            self.final_name = final_name
            self._stop()
            elapsed = max(self._clock.seconds() - self.started, 1e-6)
            size = self.manifest.size
            where = os.path.join(os.path.basename(self.storage.folder), final_name)
            renamed = "" if final_name == self.name else f" ({self.name} already existed)"
            by_source = self.by_source()
            self._emit(
                "download-finished",
                f"downloaded {self.name} to {where}{renamed}: {human_size(size)} in "
                f"{_seconds(elapsed)} ({human_size(size / elapsed)}/s)",
                path=where,
                size=size,
                seconds=round(elapsed, 3),
                rate=round(size / elapsed),
                by_source=by_source,
                received=self.bytes_received,
                resumed=self.bytes_resumed,
                wasted=self.bytes_wasted,
            )
            log.info(
                "Bytes of {file} by source: {counts}; received {received} B, "
                "resumed {resumed} B, wasted {wasted} B",
                event="download-sources",
                file=self.name,
                counts=", ".join(f"{label}={n}" for label, n in sorted(by_source.items())),
                by_source=by_source,
                received=self.bytes_received,
                resumed=self.bytes_resumed,
                wasted=self.bytes_wasted,
            )
            self.done.callback(result)

        def failed(failure):
            error = failure.value
            reason = str(error) if isinstance(error, StorageError) else failure.getErrorMessage()
            self._fail(DownloadFailed(f"could not complete {self.name}: {reason}"))

        d.addCallbacks(completed, failed)

    def cancel(self):
        """
        Stop, and throw away what was downloaded.
        """
        self._cancelled = True
        self._fail(DownloadFailed(f"download {self.name} was cancelled"))

    def pause(self):
        """
        Stop, keeping every verified chunk for a later resume (the peer is
        shutting down).
        """
        if self.done.called:
            return
        percent = self.status()["percent"]
        self._fail(
            DownloadFailed(
                f"download {self.name} stopped at {percent}%; "
                "download it again to resume"
            ),
            kind="download-stopped",
        )

    def _fail(self, failure_or_error, kind="download-failed"):
        if self.done.called:
            return
        error = getattr(failure_or_error, "value", failure_or_error)
        if not isinstance(error, DownloadFailed):
            log.failure("Download of {name} failed", failure_or_error, name=self.name)
            error = DownloadFailed(f"download {self.name} failed: {error}")
        self._stop()
        self._withdraw_partial()
        if self.manifest is not None:
            # Kept for a resume, unless cancelled or there is nothing in it.
            keep = not self._cancelled and self.have > 0
            release = self.storage.close if keep else self.storage.discard
            # Never while a store (or the open) still runs in another thread.
            busy = defer.DeferredList(list(self._storage_busy), consumeErrors=True)
            busy.addCallback(lambda _: self._run(release)).addErrback(lambda f: None)
        if self._cancelled:
            self._emit("download-cancelled", f"download {self.name} cancelled")
        elif kind == "download-stopped":
            self._emit(kind, str(error), reason=str(error))
        else:
            self._emit(kind, f"error: {error}", reason=str(error))
        error.reported = True
        self.done.errback(error)

    def _withdraw_partial(self):
        if self._index is not None and self.manifest is not None:
            self._index.remove_partial(self.file_id)

    def _stop(self):
        self._stopped = True
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        for request in list(self._requests):
            self._inbox.withdraw(request.token)
            if request.timeout is not None and request.timeout.active():
                request.timeout.cancel()
            request.close()
        self._requests.clear()
        for d in list(self._connecting):
            d.cancel()
        for source in self.sources:
            source.client.close()

    def _tick(self):
        """
        Every L{PROGRESS_INTERVAL}: a progress event, a look at stalled
        requests (the endgame) and at what partial holders have gained.
        """
        now = self._clock.seconds()
        self._samples.append((now, self.bytes_verified - self.bytes_resumed))
        if now - self._last_refresh >= HAVE_REFRESH:
            self._last_refresh = now
            for source in self._ledger.partial_sources():
                self._refresh_holdings(source)
        self._show_progress()
        self._schedule()

    def _show_progress(self):
        if self.manifest is None or self.manifest.size == 0:
            return
        status = self.status()
        eta = "" if status["eta"] is None else f", {status['eta']} s left"
        self._emit(
            "download-progress",
            f"download {self.name}: {status['percent']}% of {human_size(self.manifest.size)} "
            f"at {human_size(status['rate'])}/s from {status['sources']} peer(s){eta}",
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
    L{Bans} between them for the session.

    @param make_download: C{make_download(name, file_id, peers, report,
        bans, index)} giving an unstarted L{Download} that shares C{bans} and
        offers its verified chunks through C{index}.
    @param index: the L{SharedIndex} that finished files join, and partial
        ones are offered from, or C{None} when downloads are not offered.
    """

    def __init__(self, make_download, index):
        self._make = make_download
        self._index = index
        self.bans = Bans()
        self.active = {}

    def start(self, name, file_id, peers, report):
        """
        Start (or resume) downloading C{file_id}; a Deferred of the final
        name.

        @raise DownloadFailed: it is already being downloaded.
        """
        if file_id in self.active:
            raise DownloadFailed(f"{name} is already being downloaded")
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
            return result

        return d.addCallback(finished).addBoth(ended)

    def cancel_all(self):
        """
        Stop every download, keeping what each has verified, so that the
        next C{download} of the same file resumes it (the peer is stopping).
        """
        for download in list(self.active.values()):
            download.pause()
