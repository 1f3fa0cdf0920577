"""
L{twisted_p2p.heap}: the cycle collector paused while a large batch is
built, and the batch frozen once it has grown enough.
"""

import gc

import pytest

from twisted_p2p import heap


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(heap, "_sizes", {})
    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    assert gc.isenabled()
    yield frozen
    assert gc.isenabled()


def test_frozen_only_after_growing_enough(fresh):
    assert not heap.settled("index", heap.FREEZE_GROWTH - 1)
    assert heap.settled("index", heap.FREEZE_GROWTH)
    assert not heap.settled("index", heap.FREEZE_GROWTH + 5)
    # Each owner counts for itself; shrinking lowers the mark.
    assert heap.settled("catalog", 2 * heap.FREEZE_GROWTH)
    assert not heap.settled("index", 10)
    assert heap.settled("index", 10 + heap.FREEZE_GROWTH)
    assert len(fresh) == 3


def test_paused_and_nested():
    with heap.collector_paused():
        assert not gc.isenabled()
        with heap.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_error_still_resumes():
    with pytest.raises(ZeroDivisionError):
        with heap.collector_paused():
            1 / 0
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with heap.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
