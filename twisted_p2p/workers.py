"""
Threads for the transfer's blocking work: hashing and writing chunks that
arrive, and sending chunks from disk.

Twisted's thread pool costs about 126 µs of CPU per job and side (a
condition-variable hand-off, then one C{callFromThread}, that is one wake-up
of the reactor, per job); at a job per 256 KiB chunk that was half a CPU
second per GiB.  A L{Worker} is one thread with its own queue that hands its
results back in batches: while jobs keep coming it wakes the reactor once per
L{BATCH} results, or when its queue runs dry, so a busy transfer costs a
wake-up every few chunks instead of one or two per chunk.
"""

import collections
import queue
import threading

from twisted.internet import defer
from twisted.python.failure import Failure

#: Results a busy worker gathers before it wakes the reactor.
BATCH = 8

_STOP = object()


class Worker:
    """
    Owns one thread that runs blocking jobs in the order they were given.

    @param reactor: the reactor results are handed back to.
    @ivar pending: jobs given and not yet answered (read on the reactor
        thread, to share work between workers).
    """

    def __init__(self, reactor, name="p2ppeer-worker"):
        self._reactor = reactor
        self._name = name
        self._jobs = queue.SimpleQueue()
        self._results = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._thread = None
        self._stopped = None
        self.pending = 0

    def start(self):
        if self._thread is None:
            # Each thread has its own queue and tells its own end: a job
            # given after stop() goes to a new thread while the old one
            # finishes what it was given.
            self._jobs = queue.SimpleQueue()
            self._stopped = defer.Deferred()
            self._thread = threading.Thread(
                target=self._run, args=(self._jobs, self._stopped), name=self._name, daemon=True
            )
            self._thread.start()

    def submit(self, f, *args):
        """
        Run C{f(*args)} in the thread; a Deferred of its result.
        """
        if self._thread is None:
            self.start()
        d = defer.Deferred()
        self.pending += 1
        self._jobs.put((d, f, args))
        return d

    def stop(self):
        """
        Finish the jobs given so far, then end the thread; a Deferred that
        fires once it has ended.
        """
        if self._thread is None:
            return defer.succeed(None)
        self._thread = None
        self._jobs.put(_STOP)
        return self._stopped

    def _run(self, jobs, stopped):
        since_wake = 0
        while True:
            item = jobs.get()
            if item is _STOP:
                break
            d, f, args = item
            try:
                outcome = (True, f(*args))
            except BaseException:
                outcome = (False, Failure())
            self._results.append((d, outcome))
            since_wake += 1
            if since_wake >= BATCH or jobs.empty():
                since_wake = 0
                self._wake()
        self._wake()
        self._reactor.callFromThread(stopped.callback, None)

    def _wake(self):
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self._reactor.callFromThread(self._deliver)

    def _deliver(self):
        with self._lock:
            self._wake_pending = False
        results = self._results
        while results:
            d, (ok, value) = results.popleft()
            self.pending -= 1
            if ok:
                d.callback(value)
            else:
                d.errback(value)


class WorkerPool:
    """
    A few L{Worker}s; each job goes to the one with the fewest pending.

    Jobs given to the pool may run in any order: a caller whose jobs must
    run in order keeps at most one in flight.
    """

    def __init__(self, reactor, threads, name="p2ppeer-worker"):
        self.workers = [Worker(reactor, f"{name}-{n}") for n in range(threads)]

    def pick(self, besides=None):
        """
        The worker with the fewest jobs pending (another than C{besides}
        where there is another): for a caller that picks a thread once for
        jobs that must run in order, or once per job to spread its jobs.
        """
        others = [w for w in self.workers if w is not besides] or self.workers
        return min(others, key=lambda w: w.pending)

    def submit(self, f, *args):
        return self.pick().submit(f, *args)

    def stop(self):
        return defer.gatherResults([w.stop() for w in self.workers])
