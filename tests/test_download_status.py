"""
A download's counts as data: the rates (a source's, for its window; the
download's, for people), the ETA, and the chunk buffers it reuses.
"""

import pytest
from twisted.internet import task

from twisted_p2p.download.buffers import SHELF, BufferPool, Shelf, buffer_size
from twisted_p2p.download.status import Progress, RateMeter
from twisted_p2p.limits import CHUNK_SIZE, KEEP_BUFFER_BYTES, MAX_RUN
from twisted_p2p.seal import TAG_SIZE


def test_a_source_has_no_rate_until_something_arrived_over_a_while():
    meter = RateMeter(span=1.0)
    assert meter.rate(0.0) is None
    meter.add(0.0, 1000)
    assert meter.rate(0.0) is None
    assert meter.rate(0.5) == pytest.approx(2000)


def test_a_source_rate_is_over_the_last_span_only():
    meter = RateMeter(span=1.0)
    for t in range(10):
        meter.add(float(t), 1000 if t < 5 else 10)
    assert meter.rate(9.0) == pytest.approx(20)  # the arrivals at 8 and 9


def test_a_source_that_stopped_has_a_rate_of_zero():
    meter = RateMeter(span=1.0)
    meter.add(0.0, 1000)
    meter.add(0.5, 1000)
    assert meter.rate(5.0) == 0


def test_a_fast_source_is_a_few_dozen_entries_and_its_rate_is_right():
    # 4,000 chunks a second, for two seconds: the meter keeps no entry per
    # chunk, and its rate is within its resolution of the exact one.
    meter = RateMeter(span=1.0)
    for i in range(8000):
        meter.add(i / 4000, 256 * 1024)
    assert len(meter._arrivals) <= 1 / RateMeter.RESOLUTION + 1
    exact = 4000 * 256 * 1024
    assert meter.rate(7999 / 4000) == pytest.approx(exact, rel=RateMeter.RESOLUTION)


def test_arrivals_close_together_count_as_one():
    meter = RateMeter(span=1.0)
    for _ in range(100):
        meter.add(0.0, 10)
    assert len(meter._arrivals) == 1
    assert meter.rate(0.5) == pytest.approx(2000)
    assert meter.rate(1.5) == 0


def test_the_first_progress_has_a_rate_and_then_the_last_seconds_count():
    clock = task.Clock()
    progress = Progress(clock)
    progress.size = 10 * CHUNK_SIZE
    clock.advance(1)
    progress.verified = CHUNK_SIZE
    progress.tick()
    # A sample just taken says nothing yet: the rate since the start.
    assert progress.rate() == CHUNK_SIZE
    clock.advance(1)
    progress.verified = 3 * CHUNK_SIZE
    assert progress.rate() == 2 * CHUNK_SIZE
    assert progress.eta() == 4
    assert progress.percent() == 30


def test_resumed_bytes_are_not_counted_in_the_rate():
    clock = task.Clock()
    progress = Progress(clock)
    progress.size = 100
    progress.resumed = progress.verified = 50
    clock.advance(1)
    progress.verified = 60
    assert progress.rate() == 10
    assert progress.eta() == 4


def test_an_empty_file_is_done_and_unknown_sizes_are_not():
    progress = Progress(task.Clock())
    assert progress.percent() == 0 and progress.eta() is None
    progress.size = 0
    assert progress.percent() == 100


def test_buffers_are_reused_and_counted():
    pool = BufferPool(Shelf())
    first = pool.take(CHUNK_SIZE)
    assert len(first) == CHUNK_SIZE and pool.out == 1
    owner = first.obj
    pool.give_back(first)
    again = pool.take(10)
    assert again.obj is owner and len(again) == 10
    other = pool.take(MAX_RUN * CHUNK_SIZE + TAG_SIZE)  # a sealed frame's body
    assert other.obj is not owner and pool.out == 2
    with pytest.raises(ValueError):
        pool.take(MAX_RUN * CHUNK_SIZE + TAG_SIZE + 1)


@pytest.mark.parametrize(
    "length, chunks",
    [
        (1, 1),
        (CHUNK_SIZE, 1),
        (CHUNK_SIZE + TAG_SIZE, 1),  # one sealed chunk
        (CHUNK_SIZE + TAG_SIZE + 1, 2),
        (3 * CHUNK_SIZE, 4),
        (4 * CHUNK_SIZE + TAG_SIZE, 4),
        (5 * CHUNK_SIZE, 8),
        (9 * CHUNK_SIZE + 1, 16),
        (MAX_RUN * CHUNK_SIZE + TAG_SIZE, MAX_RUN),
    ],
)
def test_a_frame_is_read_into_a_buffer_of_a_power_of_two_chunks(length, chunks):
    assert buffer_size(length) == chunks * CHUNK_SIZE + TAG_SIZE
    view = BufferPool(Shelf()).take(length)
    assert len(view) == length and len(view.obj) == chunks * CHUNK_SIZE + TAG_SIZE


def test_a_buffer_is_used_again_for_frames_of_its_size_only():
    shelf = Shelf()
    pool = BufferPool(shelf)
    small, large = pool.take(CHUNK_SIZE), pool.take(3 * CHUNK_SIZE)
    pool.give_back(small)
    pool.give_back(large)
    assert pool.take(4 * CHUNK_SIZE).obj is large.obj
    assert pool.take(CHUNK_SIZE - 5).obj is small.obj
    assert pool.take(2 * CHUNK_SIZE).obj not in (small.obj, large.obj)


def test_the_next_download_reads_into_the_buffers_the_last_one_gave_back():
    shelf = Shelf(keep=3 * CHUNK_SIZE)
    first = BufferPool(shelf)
    views = [first.take(CHUNK_SIZE) for _ in range(5)]
    buffers = {id(v.obj) for v in views}
    for view in views:
        first.give_back(view)
    assert first.out == 0
    # Three kept (the chunks a shelf keeps), the other two let go.
    assert len(shelf) == 3 and shelf.kept == 3 * CHUNK_SIZE
    second = BufferPool(shelf)
    again = [second.take(CHUNK_SIZE) for _ in range(4)]
    assert sum(id(v.obj) in buffers for v in again) == 3
    assert len(shelf) == 0 and shelf.kept == 0 and second.out == 4


def test_a_shelf_keeps_bytes_not_buffers():
    shelf = Shelf(keep=4 * CHUNK_SIZE)
    pool = BufferPool(shelf)
    large = [pool.take(4 * CHUNK_SIZE) for _ in range(2)]
    small = pool.take(CHUNK_SIZE)
    for view in large + [small]:
        pool.give_back(view)
    # One four-chunk buffer fills it: the other, and the small one, go.
    assert len(shelf) == 1 and shelf.kept == 4 * CHUNK_SIZE
    assert pool.take(4 * CHUNK_SIZE).obj is large[0].obj


def test_a_buffer_given_back_twice_is_refused_not_shared():
    shelf = Shelf()
    pool = BufferPool(shelf)
    view = pool.take(CHUNK_SIZE)
    pool.give_back(view)
    with pytest.raises(ValueError):
        pool.give_back(view)
    assert len(shelf) == 1
    assert pool.take(10).obj is view.obj
    assert pool.take(10).obj is not view.obj


def test_downloads_share_the_processs_shelf():
    assert BufferPool()._shelf is SHELF
    assert SHELF._keep == KEEP_BUFFER_BYTES >= 3 * MAX_RUN * CHUNK_SIZE
