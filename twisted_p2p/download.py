"""
One download: its manifest, its chunk map, its sources, and the scheduling
of chunk requests over them.
"""

import os
import secrets
from collections import deque

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_p2p import events, wire
from twisted_p2p.client import PeerRefused, fetch_manifest
from twisted_p2p.limits import REQUEST_BATCH, REQUEST_TIMEOUT, SOURCE_WINDOW
from twisted_p2p.manifest import ManifestMismatch

log = Logger()

#: Seconds between progress lines.
PROGRESS_INTERVAL = 1.0

#: Verification failures after which a source is no longer asked.
MAX_STRIKES = 3


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


def human_size(n):
    """
    C{n} bytes for people: C{"512 B"}, C{"1.5 MiB"}.
    """
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


class _Source:
    """
    One peer we draw chunks from, over one connection to its sender port.
    """

    def __init__(self, peer, client):
        self.peer = peer
        self.client = client
        self.in_flight = 0
        self.strikes = 0
        self.usable = True
        self.received = 0


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
        self.pending = set(chunks)
        self.timeout = None

    def accepts(self, index, length):
        return (
            index in self.pending
            and length == self.download.manifest.chunk_length(index)
        )

    def deliver(self, index, data):
        self.pending.discard(index)
        return self.download._chunk_arrived(self, index, data)

    def finished(self):
        self.download._request_ended(self)

    def lost(self):
        self.download._request_ended(self)


class Download:
    """
    Owns one file's download from first manifest to final rename.

    Chunks are requested in batches from every source that holds the file,
    with at most L{SOURCE_WINDOW} chunks in flight per source, so a faster
    source is asked more often.  Each chunk is verified against the manifest
    in a thread before it is written.  A request that stalls, or a source
    that drops, puts its chunks back in the queue for the others.

    @param name: the display name, used for the final file name.
    @param file_id: what we download.
    @param peers: the peers that offer it.
    @param open_client: C{open_client(peer)} giving a Deferred L{SenderClient}.
    @param inbox: the L{Inbox} of our receiver port.
    @param receiver_port: our port T, sent in requests.
    @param storage: a L{PartialFile}-like object (blocking methods).
    @param run_in_thread: C{deferToThread} or a stand-in.
    @param clock: an L{IReactorTime}.
    @param report: C{report(line)} for progress and outcome lines.
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
        self.manifest = None
        self.sources = []
        self._missing = deque()
        self._requests = set()
        self.have = 0
        self.bytes_received = 0
        self.bytes_verified = 0
        self.started = clock.seconds()
        self.final_name = None
        self._progress = None
        self._finishing = False
        self._cancelled = False
        self.done = defer.Deferred()

    @property
    def size(self):
        return self.manifest.size if self.manifest else None

    def status(self):
        """
        Where this download stands: C{file}, C{id}, C{size}, C{bytes}
        verified, C{percent}, C{rate} (bytes/s), C{sources} in use and
        C{eta} (seconds, or C{None} while unknown).
        """
        size = self.size
        elapsed = max(self._clock.seconds() - self.started, 1e-6)
        rate = self.bytes_verified / elapsed
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
            "sources": sum(1 for s in self.sources if s.usable),
            "eta": eta,
        }

    def _emit(self, kind, text, **fields):
        """
        Tell the user (through C{report}) and, but for progress, the log.
        """
        e = events.event(kind, text, file=self.name, id=self.file_id, **fields)
        if kind != "download-progress":
            log.info("{text}", **e)
        self._report(e)

    def start(self):
        """
        Start the download.  L{done} fires with the final name, or fails with
        L{DownloadFailed}.
        """
        defer.ensureDeferred(self._begin()).addErrback(self._fail)
        return self.done

    async def _begin(self):
        first_error = None
        for peer in self._peers:
            try:
                client = await self._open_client(peer)
            except Exception as e:
                first_error = first_error or f"{peer.label}: {e}"
                continue
            source = _Source(peer, client)
            if self.manifest is None:
                try:
                    self.manifest = await fetch_manifest(client, self.file_id)
                except (PeerRefused, wire.ProtocolError, ManifestMismatch, Exception) as e:
                    first_error = first_error or f"{peer.label}: {e}"
                    client.close()
                    continue
            self.sources.append(source)
            client.when_closed().addCallback(self._source_closed, source)
        if self.manifest is None:
            raise DownloadFailed(
                f"no peer could give the manifest of {self.name}"
                + (f" ({first_error})" if first_error else "")
            )
        await self._run(self.storage.open, self.manifest.size)
        self._missing.extend(range(self.manifest.chunk_count))
        self._emit(
            "download-started",
            f"download {self.name}: {human_size(self.manifest.size)} in "
            f"{self.manifest.chunk_count} chunks from {len(self.sources)} peer(s)",
            size=self.manifest.size,
            chunks=self.manifest.chunk_count,
            sources=len(self.sources),
        )
        self._progress = LoopingCall(self._show_progress)
        self._progress.clock = self._clock
        self._progress.start(PROGRESS_INTERVAL, now=False)
        self._schedule()

    # scheduling

    def _schedule(self):
        if self.done.called or self._finishing:
            return
        if self.have == self.manifest.chunk_count:
            self._finish()
            return
        for source in self.sources:
            while source.usable and self._missing and self._batch_fits(source):
                self._request(source)
        if not self._requests and not any(s.usable for s in self.sources):
            self._fail(DownloadFailed(f"no peer is left to download {self.name} from"))

    def _batch_size(self):
        return min(REQUEST_BATCH, SOURCE_WINDOW, len(self._missing))

    def _batch_fits(self, source):
        # A whole batch or nothing: never more than SOURCE_WINDOW in flight.
        return source.in_flight + self._batch_size() <= SOURCE_WINDOW

    def _request(self, source):
        batch = []
        size = self._batch_size()
        while len(batch) < size:
            batch.append(self._missing.popleft())
        request = Request(self, source, batch)
        self._requests.add(request)
        source.in_flight += len(batch)
        self._inbox.expect(request)
        request.timeout = self._clock.callLater(
            REQUEST_TIMEOUT, self._request_timed_out, request
        )
        header = wire.request(
            "get",
            id=self.file_id,
            chunks=batch,
            port=self._receiver_port,
            token=request.token,
        )
        d = source.client.call(header)
        d.addErrback(self._request_refused, request)

    def _source_closed(self, _, source):
        source.usable = False
        if self.manifest is not None and self._missing:
            self._schedule()

    def _request_refused(self, failure, request):
        if request not in self._requests:
            # Over already: the download finished or stopped and closed
            # this connection itself.
            return
        source = request.source
        if failure.check(PeerRefused) and failure.value.code == "unreachable":
            self._emit(
                "source-unreachable",
                f"download {self.name}: {source.peer.label} could not connect back to "
                f"our receiver port {self._receiver_port}; a firewall may block it, "
                "or --host is not an address that peer can reach",
                peer=source.peer.label,
            )
            source.usable = False
        elif failure.check(PeerRefused) and failure.value.code == "busy":
            pass
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
        request.source.strikes += 1
        if request.source.strikes >= MAX_STRIKES:
            request.source.usable = False
        self._request_ended(request)

    def _request_ended(self, request):
        if request not in self._requests:
            return
        self._requests.discard(request)
        self._inbox.withdraw(request.token)
        if request.timeout is not None and request.timeout.active():
            request.timeout.cancel()
        request.source.in_flight -= len(request.pending)
        # Chunks that never came go to the front of the queue.
        self._missing.extendleft(sorted(request.pending, reverse=True))
        request.pending = set()
        self._schedule()

    def _chunk_arrived(self, request, index, data):
        source = request.source
        source.in_flight -= 1
        self.bytes_received += len(data)
        manifest = self.manifest
        offset = manifest.chunk_offset(index)
        storage = self.storage

        def verify_and_write():
            if not manifest.verify_chunk(index, data):
                return False
            storage.write(offset, data)
            return True

        d = self._run(verify_and_write)

        def stored(ok):
            if ok:
                self.have += 1
                self.bytes_verified += len(data)
                source.received += len(data)
            else:
                self._reject(source, index)
            self._schedule()

        def failed(failure):
            self._missing.appendleft(index)
            self._fail(
                DownloadFailed(
                    f"could not write {self.name}: {failure.getErrorMessage()}"
                )
            )

        return d.addCallbacks(stored, failed)

    def _reject(self, source, index):
        self._missing.append(index)
        source.strikes += 1
        log.warn(
            "Chunk {index} of {name} from {peer} failed verification",
            index=index,
            name=self.name,
            peer=source.peer.label,
        )
        if source.strikes >= MAX_STRIKES and source.usable:
            source.usable = False
            self._emit(
                "peer-banned",
                f"download {self.name}: {source.peer.label} sent bad data "
                f"{source.strikes} times and is no longer asked",
                peer=source.peer.label,
                strikes=source.strikes,
            )

    # the end

    def _finish(self):
        self._finishing = True
        d = self._run(self.storage.complete, self.name)

        def completed(result):
            final_name, _ = result
            self.final_name = final_name
            self._stop()
            elapsed = max(self._clock.seconds() - self.started, 1e-6)
            size = self.manifest.size
            where = os.path.join(os.path.basename(self.storage.folder), final_name)
            renamed = "" if final_name == self.name else f" ({self.name} already existed)"
            self._emit(
                "download-finished",
                f"downloaded {self.name} to {where}{renamed}: {human_size(size)} in "
                f"{_seconds(elapsed)} ({human_size(size / elapsed)}/s)",
                path=where,
                size=size,
                seconds=round(elapsed, 3),
                rate=round(size / elapsed),
            )
            self.done.callback(result)

        def failed(failure):
            self._fail(
                DownloadFailed(f"could not complete {self.name}: {failure.getErrorMessage()}")
            )

        d.addCallbacks(completed, failed)

    def cancel(self):
        self._cancelled = True
        self._fail(DownloadFailed(f"download {self.name} was cancelled"))

    def _fail(self, failure_or_error):
        if self.done.called:
            return
        error = getattr(failure_or_error, "value", failure_or_error)
        if not isinstance(error, DownloadFailed):
            log.failure("Download of {name} failed", failure_or_error, name=self.name)
            error = DownloadFailed(f"download {self.name} failed: {error}")
        self._stop()
        if self.manifest is not None:
            self._run(self.storage.discard).addErrback(lambda f: None)
        if self._cancelled:
            self._emit("download-cancelled", f"download {self.name} cancelled")
        else:
            self._emit("download-failed", f"error: {error}", reason=str(error))
        error.reported = True
        self.done.errback(error)

    def _stop(self):
        if self._progress is not None and self._progress.running:
            self._progress.stop()
        for request in list(self._requests):
            self._inbox.withdraw(request.token)
            if request.timeout is not None and request.timeout.active():
                request.timeout.cancel()
        self._requests.clear()
        for source in self.sources:
            source.client.close()

    def _show_progress(self):
        if self.manifest is None or self.manifest.size == 0:
            return
        elapsed = max(self._clock.seconds() - self.started, 1e-6)
        percent = 100 * self.bytes_verified // self.manifest.size
        sources = sum(1 for s in self.sources if s.usable)
        self._emit(
            "download-progress",
            f"download {self.name}: {percent}% of {human_size(self.manifest.size)} "
            f"at {human_size(self.bytes_verified / elapsed)}/s from {sources} peer(s)",
            percent=percent,
            bytes=self.bytes_verified,
            size=self.manifest.size,
            rate=round(self.bytes_verified / elapsed),
            sources=sources,
        )


class Downloads:
    """
    Owns the downloads in progress: starts them, keeps one per file, and
    hands finished files to the index so they are offered in turn.

    @param make_download: C{make_download(name, file_id, peers, report)}
        giving an unstarted L{Download}.
    @param index: the L{SharedIndex} that finished files join, or C{None}
        when finished downloads are not offered.
    """

    def __init__(self, make_download, index):
        self._make = make_download
        self._index = index
        self.active = {}

    def start(self, name, file_id, peers, report):
        """
        Start downloading C{file_id}; a Deferred of the final name.

        @raise DownloadFailed: it is already being downloaded.
        """
        if file_id in self.active:
            raise DownloadFailed(f"{name} is already being downloaded")
        download = self._make(name, file_id, peers, report)
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
        for download in list(self.active.values()):
            download.cancel()
