"""
Keeping Python's cycle collector from blocking the reactor.

A peer sharing 100,000 files holds a few hundred thousand long-lived
objects (the index's files and manifests, the network catalog's entries).
Every full collection of the cycle collector walks all of them, holding the
GIL for 100-200 ms: the reactor, and every transfer, stops meanwhile
(measured by C{tests/benchmarks/run --only folders}).  These objects are
never garbage while they are offered, and are freed by reference counting
when they go, so once a large batch of them is in place it is moved out of
the collector's sight with C{gc.freeze()}: later collections walk only what
is newer.

C{gc.freeze()} also hides the cyclic garbage that is waiting for a
collection at that moment, which then is never collected; so it is done
only when an index or a catalog grew by L{FREEZE_GROWTH} entries since
the last time: at start-up and when a large tree or catalog arrives, not
at every re-scan.
"""

import gc
from contextlib import contextmanager

#: Entries an index or the catalog must have grown by for a freeze.
FREEZE_GROWTH = 10_000

_sizes = {}


def settled(owner, size):
    """
    C{owner} (a name) now holds C{size} long-lived entries: freeze the heap
    if that is L{FREEZE_GROWTH} more than when it last did.  Whether it did.
    """
    last = _sizes.get(owner, 0)
    if size < last:
        _sizes[owner] = size
        return False
    if size - last < FREEZE_GROWTH:
        return False
    _sizes[owner] = size
    gc.freeze()
    return True


@contextmanager
def collector_paused():
    """
    Keep the cycle collector off while a large batch of long-lived objects
    is built (an index scan, in a thread): each collection the new objects
    would set off walks all of them so far, under the GIL.  The batch is
    then frozen (L{settled}) or left to the next collection.  Nested and
    overlapping pauses keep it off until the last ends.
    """
    global _paused
    _paused += 1
    if _paused == 1:
        _was_enabled[0] = gc.isenabled()
        gc.disable()
    try:
        yield
    finally:
        _paused -= 1
        if _paused == 0 and _was_enabled[0]:
            gc.enable()


_paused = 0
_was_enabled = [True]
