"""
Workers: jobs run in their thread, in order, and results come back on the
reactor thread in batches.
"""

import threading

import pytest
from support import result_of

from twisted_p2p.workers import BATCH, Worker, WorkerPool


class ThreadReactor:
    """
    Stands in for the reactor: C{callFromThread} queues the call, and the
    test runs the queue on its own thread (the "reactor thread").
    """

    def __init__(self):
        self._calls = []
        self._lock = threading.Lock()
        self.wakes = 0

    def callFromThread(self, f, *args):
        with self._lock:
            self._calls.append((f, args))
            self.wakes += 1

    def run_calls(self):
        with self._lock:
            calls, self._calls = self._calls, []
        for f, args in calls:
            f(*args)


def drained(worker, reactor):
    """
    Let C{worker} finish what it was given, and deliver every result.
    """
    run_until(reactor, worker.stop())


def run_until(reactor, d):
    """
    Run C{reactor}'s calls from threads until C{d} has fired.
    """
    fired = threading.Event()
    d.addBoth(lambda _: fired.set())
    for _ in range(1000):
        reactor.run_calls()
        if fired.is_set():
            return
        threading.Event().wait(0.01)
    raise AssertionError("the worker did not stop")


def test_results_in_order_on_the_reactor_thread():
    reactor = ThreadReactor()
    worker = Worker(reactor)
    threads = []
    ds = [worker.submit(lambda n=n: threads.append(threading.current_thread()) or n * n)
          for n in range(20)]
    assert worker.pending == 20
    drained(worker, reactor)
    assert [result_of(d) for d in ds] == [n * n for n in range(20)]
    assert threading.current_thread() not in threads
    assert worker.pending == 0


def test_a_failing_job_fails_its_deferred_only():
    reactor = ThreadReactor()
    worker = Worker(reactor)
    bad = worker.submit(lambda: 1 / 0)
    good = worker.submit(lambda: "fine")
    drained(worker, reactor)
    with pytest.raises(ZeroDivisionError):
        result_of(bad)
    assert result_of(good) == "fine"


def test_a_busy_worker_wakes_the_reactor_once_per_batch():
    reactor = ThreadReactor()
    worker = Worker(reactor)
    gate = threading.Event()
    worker.submit(gate.wait)
    ds = [worker.submit(lambda n=n: n) for n in range(4 * BATCH)]
    gate.set()  # the queue is full by now: results come in batches
    drained(worker, reactor)
    assert [result_of(d) for d in ds] == list(range(4 * BATCH))
    # One wake per BATCH results, plus the last ones and the stop.
    assert reactor.wakes <= 4 * BATCH // BATCH + 3


def test_pool_shares_jobs_by_pending_count():
    reactor = ThreadReactor()
    pool = WorkerPool(reactor, 2)
    gate = threading.Event()
    pool.submit(gate.wait)
    pool.submit(gate.wait)
    assert [w.pending for w in pool.workers] == [1, 1]
    gate.set()
    for w in pool.workers:
        drained(w, reactor)


def test_stopping_a_worker_that_never_started():
    worker = Worker(ThreadReactor())
    assert result_of(worker.stop()) is None


def test_stop_finishes_the_jobs_given_first():
    reactor = ThreadReactor()
    worker = Worker(reactor)
    gate = threading.Event()
    ds = [worker.submit(gate.wait)] + [worker.submit(lambda n=n: n) for n in range(5)]
    stopped = worker.stop()
    gate.set()
    run_until(reactor, stopped)
    assert [result_of(d) for d in ds[1:]] == list(range(5))


def test_a_job_given_after_stop_runs_and_the_stop_still_ends():
    """
    A stream still sending while the peer stops gives its worker a job
    after stop(): the job runs (in a new thread), and the stop that was
    asked for still fires once the first thread has ended.
    """
    reactor = ThreadReactor()
    worker = Worker(reactor)
    gate = threading.Event()
    worker.submit(gate.wait)
    first_stop = worker.stop()
    late = worker.submit(lambda: "late")
    gate.set()
    run_until(reactor, first_stop)
    drained(worker, reactor)  # the second thread
    assert result_of(late) == "late"
    assert worker.pending == 0


def test_pool_stop_ends_every_worker():
    reactor = ThreadReactor()
    pool = WorkerPool(reactor, 3)
    ds = [pool.submit(lambda n=n: n) for n in range(6)]
    run_until(reactor, pool.stop())
    assert sorted(result_of(d) for d in ds) == list(range(6))
    assert all(w.pending == 0 for w in pool.workers)
