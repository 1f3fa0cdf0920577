"""
Finding a download's sources: connecting to every peer that offers the
file at once, the race for the manifest (among L{MANIFEST_RACERS} of them
at a time: the first one that matches the file id wins, and the other
fetches stop), asking each source which chunks it holds, and asking partial
holders again as they gain more.
"""

from twisted.internet import defer
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.logger import Logger

from twisted_p2p.client import fetch_have, fetch_manifest
from twisted_p2p.limits import ANSWER_TIMEOUT, MANIFEST_RACE_PATIENCE, MANIFEST_RACERS
from twisted_p2p.manifest import chunk_count
from twisted_p2p.download.requests import Source

log = Logger()



def _drop(d):
    """
    Cancel C{d} (if any, and not done), a call whose answer is not wanted,
    and let go of its failure.
    """
    if d is not None:
        d.cancel()
        d.addErrback(lambda _: None)


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


class _Progress:
    """
    A racer's sender connection: each answer it gets is progress of the
    manifest race (see L{Finder._race_stalled}).
    """

    def __init__(self, client, progressed):
        self._client = client
        self._progressed = progressed

    def call(self, header):
        return self._client.call(header).addCallback(self._answered)

    def _answered(self, answer):
        self._progressed()
        return answer


class Finder:
    """
    Owns the search for one download's sources.  It tells its C{owner} (the
    L{Download}):

     - C{manifest_found(manifest)}, once, for the first valid manifest;
     - C{source_found(source)} for each peer that answered (a L{Source}
       with its holdings in C{has});
     - C{finding_over(errors)} once every first attempt has ended, with a
       line for each peer that failed;
     - C{holdings_changed(source, has)} and C{source_failed(source,
       reason)} for the refreshes of partial holders.

    @param open_client: C{open_client(peer)}, a Deferred L{SenderClient}.
    @param skip: C{skip(peer)}, whether to leave a peer out (banned).
    @param size_offered: C{size_offered(peer)}, the size the peer's catalog
        offered the file at, or C{None}: its manifest must be of that size.
    """

    def __init__(self, owner, file_id, open_client, clock, skip=lambda peer: False,
                 size_offered=lambda peer: None):
        self._owner = owner
        self._file_id = file_id
        self._open_client = open_client
        self._clock = clock
        self._skip = skip
        self._size_offered = size_offered
        self._tried = set()
        self._connecting = set()
        self._manifest_fetches = set()
        self._racing = 0
        self._turns = []  # sources waiting for the race's outcome
        self._progress_at = None  # when a racer last joined or got a page
        self._refreshing = set()
        self._manifest = None
        self._over = False
        self._adding = False
        self._stopped = False
        self.errors = []

    @property
    def tried(self):
        """
        How many peers were tried (connected to, or being connected to).
        """
        return len(self._tried)

    @property
    def busy(self):
        """
        Whether some peer is still being connected to.
        """
        return bool(self._connecting) or self._adding

    def add(self, peers):
        """
        Connect to each of C{peers} not tried yet, all at once.
        """
        fresh = []
        for peer in peers:
            key = getattr(peer, "peer_id", None) or peer.label
            if not (self._stopped or key in self._tried or self._skip(peer)):
                self._tried.add(key)
                fresh.append(peer)
        self._adding = True
        try:
            for peer in fresh:
                d = defer.ensureDeferred(self._connect(peer))
                self._connecting.add(d)
                d.addErrback(self._connect_crashed, peer)
                d.addBoth(self._connect_ended, d)
        finally:
            # A connection that fails at once must not end the search
            # before the others are even started.
            self._adding = False
        self._maybe_over()

    def manifest_known(self, manifest):
        """
        The manifest the download uses (from us or from the storage).
        """
        self._manifest = manifest
        self._next_turns()

    async def _connect(self, peer):
        try:
            client = await self._open_client(peer)
        except Exception as e:
            self.errors.append(
                f"{peer.label}: could not connect ({e}); it may have stopped, "
                "or a firewall or --host keeps it out of reach"
            )
            return
        source = Source(peer, client)
        timed = _Deadline(client, ANSWER_TIMEOUT, self._clock)
        offered = self._size_offered(peer)
        early_have = None
        try:
            if offered and self._manifest is None and self._must_wait():
                # Asked while this source waits for the race, on the size
                # the catalog offered: the chunk map is here when the
                # manifest is.
                early_have = self._early_have(timed, offered)
            while self._manifest is None and self._must_wait():
                # Enough sources race already: wait for the winner, for a
                # racer to fail (its place is then this one's), or for the
                # race to stall (then this one joins it anyway, which counts
                # as progress: one more source a stalled second).
                turn = defer.Deferred()
                self._turns.append(turn)
                timer = self._clock.callLater(self._patience_left(), self._give_turn, turn)
                try:
                    await turn
                finally:
                    if timer.active():
                        timer.cancel()
                    if turn in self._turns:
                        self._turns.remove(turn)
            if self._manifest is None:
                self._racing += 1
                self._progress_at = self._clock.seconds()
                racer = _Progress(timed, self._race_progressed)
                try:
                    fetching = defer.ensureDeferred(self._fetch_manifest(racer, offered))
                    if offered and early_have is None:
                        # Asked at once behind the manifest, on the size the
                        # catalog offered: answers come in order, so the
                        # chunk map costs no round trip of its own.
                        early_have = self._early_have(racer, offered)
                    manifest = await fetching
                    if manifest is not None and self._manifest is None and not self._stopped:
                        self._manifest = manifest
                        for fetch in list(self._manifest_fetches):
                            fetch.cancel()
                        self._owner.manifest_found(manifest)
                finally:
                    # After the manifest is kept, so that those waiting go
                    # on with it rather than race for it.
                    self._racing -= 1
                    self._next_turns()
            if self._stopped:
                raise CancelledError()
            count = self._manifest.chunk_count
            if early_have is not None and count == chunk_count(offered):
                source.has = await early_have
            else:
                _drop(early_have)
                if count:
                    source.has = await fetch_have(timed, self._file_id, count)
        except Exception as e:
            _drop(early_have)
            client.close()
            if isinstance(e, TimeoutError):
                e = f"no answer in {ANSWER_TIMEOUT:.0f} s"
            if not isinstance(e, CancelledError):
                self.errors.append(f"{peer.label}: {e}")
            return
        if self._stopped:
            client.close()
            return
        self._owner.source_found(source)

    async def _fetch_manifest(self, client, size_offered):
        """
        The manifest from C{client}; C{None} if another peer's came first
        (this fetch is then cancelled).
        """
        fetch = defer.ensureDeferred(fetch_manifest(client, self._file_id, size_offered))
        self._manifest_fetches.add(fetch)
        try:
            return await fetch
        except CancelledError:
            if self._manifest is None or self._stopped:
                raise
            return None
        finally:
            self._manifest_fetches.discard(fetch)

    def _must_wait(self):
        """
        Whether a source without the manifest must wait for the race: enough
        sources race, and the race is not stalled.
        """
        return self._racing >= MANIFEST_RACERS and not self._race_stalled()

    def _early_have(self, client, offered):
        return defer.ensureDeferred(fetch_have(client, self._file_id, chunk_count(offered)))

    def _race_progressed(self):
        self._progress_at = self._clock.seconds()

    def _race_stalled(self):
        """
        Whether no racer has joined or got an answer for
        L{MANIFEST_RACE_PATIENCE} seconds.
        """
        return (self._progress_at is not None
                and self._clock.seconds() - self._progress_at >= MANIFEST_RACE_PATIENCE)

    def _patience_left(self):
        if self._progress_at is None:
            return MANIFEST_RACE_PATIENCE
        return max(0.0, self._progress_at + MANIFEST_RACE_PATIENCE - self._clock.seconds())

    def _give_turn(self, turn):
        if turn in self._turns:
            self._turns.remove(turn)
            turn.callback(None)

    def _next_turns(self):
        """
        A racer is done, won or lost: the sources waiting look again (each
        goes on with the manifest, or takes the free place).
        """
        turns, self._turns = self._turns, []
        for turn in turns:
            turn.callback(None)

    def _connect_crashed(self, failure, peer):
        log.failure("Connecting to {peer} failed", failure, peer=peer.label)

    def _connect_ended(self, _, d):
        self._connecting.discard(d)
        self._maybe_over()

    def _maybe_over(self):
        if not (self._connecting or self._adding or self._over or self._stopped):
            self._over = True
            self._owner.finding_over(list(self.errors))

    def refresh(self, source):
        """
        Ask partial holder C{source} again which chunks it holds.
        """
        if source in self._refreshing or self._stopped:
            return
        self._refreshing.add(source)
        timed = _Deadline(source.client, ANSWER_TIMEOUT, self._clock)
        d = defer.ensureDeferred(fetch_have(timed, self._file_id, self._manifest.chunk_count))

        def got(has):
            if not self._stopped:
                self._owner.holdings_changed(source, has)

        def failed(failure):
            if self._stopped:
                return
            error = (
                f"no answer in {ANSWER_TIMEOUT:.0f} s"
                if failure.check(TimeoutError)
                else failure.getErrorMessage()
            )
            self._owner.source_failed(source, f"could not ask which chunks it has ({error})")

        d.addCallbacks(got, failed)
        d.addBoth(lambda _: self._refreshing.discard(source))

    def stop(self):
        """
        Stop connecting and asking.
        """
        self._stopped = True
        for d in list(self._connecting):
            d.cancel()
