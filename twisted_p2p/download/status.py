"""
Where a download stands, as numbers: bytes verified, received and wasted,
by source; the rate over the last seconds; the time left.  Faces turn these
into words (C{status}, progress lines).
"""

import collections

#: Progress samples the rate is measured over (one per progress tick).
RATE_WINDOW = 5

#: Seconds of arrivals a source's rate is measured over, for its window.
SOURCE_RATE_SPAN = 1.0


class RateMeter:
    """
    The rate of one source: bytes that arrived over the last
    L{SOURCE_RATE_SPAN} seconds.  C{None} until something has arrived over
    a measurable time; 0 for a source that has stopped sending.
    """

    #: Seconds of arrivals below which no rate is given.
    MIN_ELAPSED = 0.02

    #: Arrivals within this share of the span count as one (at the first
    #: one's time), so that a source is a few dozen entries however fast it
    #: sends (at 1 GB/s, 4,000 chunks a second), for an error in its rate
    #: of that share at most.
    RESOLUTION = 1 / 64

    def __init__(self, span=SOURCE_RATE_SPAN):
        self._span = span
        self._step = span * self.RESOLUTION
        self._arrivals = collections.deque()
        self._bytes = 0
        self._first = None

    def add(self, now, n):
        if self._first is None:
            self._first = now
        arrivals = self._arrivals
        if arrivals and now - arrivals[-1][0] < self._step:
            arrivals[-1][1] += n
        else:
            arrivals.append([now, n])
        self._bytes += n
        self._expire(now)

    def rate(self, now):
        """
        Bytes per second, or C{None} while unknown.
        """
        if self._first is None:
            return None
        self._expire(now)
        elapsed = min(self._span, now - self._first)
        if elapsed < self.MIN_ELAPSED:
            return None
        return self._bytes / elapsed

    def _expire(self, now):
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] < now - self._span:
            self._bytes -= arrivals.popleft()[1]


class Progress:
    """
    Owns the counts of one download.

    @ivar size: bytes in the file, once the manifest is known.
    @ivar verified: bytes verified, resumed ones included.
    @ivar resumed: bytes found verified on disk at the start (a resume).
    @ivar received: chunk bytes that arrived and were wanted.
    @ivar wasted: chunk bytes that arrived and were not (a second copy).
    @ivar taken_over: chunks the scheduler took over from a slower source.
    @ivar doubled: chunks asked of a second source because they stalled.
    @ivar by_source: verified bytes from each source, by label.
    """

    #: Seconds a rate is measured over, at the least.
    MIN_SPAN = 0.5

    def __init__(self, clock):
        self._clock = clock
        self.started = clock.seconds()
        self.size = None
        self.verified = 0
        self.resumed = 0
        self.received = 0
        self.wasted = 0
        self.taken_over = 0
        self.doubled = 0
        self.by_source = {}
        self._samples = collections.deque(maxlen=RATE_WINDOW + 1)

    def tick(self):
        """
        Take a sample for the rate (once per progress tick).
        """
        self._samples.append((self._clock.seconds(), self.verified - self.resumed))

    def rate(self):
        """
        Bytes per second over the last few ticks; from the start before
        the first tick, so that even the first progress line has a rate.
        """
        now = self._clock.seconds()
        fetched = self.verified - self.resumed
        if self._samples:
            then, before = self._samples[0]
            # A sample just taken says nothing of a rate yet.
            if now - then >= self.MIN_SPAN:
                return (fetched - before) / (now - then)
        return fetched / max(now - self.started, 1e-6)

    def elapsed(self):
        return max(self._clock.seconds() - self.started, 1e-6)

    def eta(self, rate=None):
        """
        Seconds left at the current rate, or C{None} while unknown.
        """
        rate = self.rate() if rate is None else rate
        if self.size is None or rate <= 0:
            return None
        return round((self.size - self.verified) / rate)

    def percent(self):
        if self.size is None:
            return 0
        return 100 if self.size == 0 else 100 * self.verified // self.size

    def snapshot(self, name, file_id, sources):
        """
        The status of the download as data: C{file}, C{id}, C{size},
        C{bytes} verified, C{percent}, C{rate} (bytes/s), C{sources} in use,
        C{eta} (seconds, or C{None}) and C{by_source}.
        """
        rate = self.rate()
        return {
            "file": name,
            "id": file_id,
            "size": self.size,
            "bytes": self.verified,
            "percent": self.percent(),
            "rate": round(rate),
            "sources": sources,
            "eta": self.eta(rate),
            "by_source": dict(self.by_source),
        }
