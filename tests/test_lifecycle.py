"""
A download's lifecycle machine, with a driver that records what it is told
to do: no reactor, no download.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_p2p.download.lifecycle import Lifecycle


class Driver:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def machine():
    driver = Driver()
    return Lifecycle(driver), driver


def names(driver):
    return [name for name, _, _ in driver.calls]


def test_the_happy_path():
    life, driver = machine()
    life.found_manifest()
    life.opened([3, 4])
    life.all_verified()
    life.completed(("movie.bin", (1, 2, 3)))
    assert driver.calls == [
        ("open_storage", (), {}),
        ("start_fetching", ([3, 4],), {}),
        ("complete", (), {}),
        ("finished", (("movie.bin", (1, 2, 3)),), {}),
    ]


def test_no_manifest_fails():
    life, driver = machine()
    life.no_manifest("nobody has it")
    assert driver.calls == [("failed", ("nobody has it",), {})]


@pytest.mark.parametrize("stage", ["finding", "opening", "fetching"])
@pytest.mark.parametrize("event, cancelled", [("cancel", True), ("pause", False)])
def test_cancel_and_pause_stop_at_every_stage_but_completing(stage, event, cancelled):
    life, driver = machine()
    if stage != "finding":
        life.found_manifest()
    if stage == "fetching":
        life.opened([])
    before = len(driver.calls)
    getattr(life, event)()
    assert driver.calls[before:] == [("stopped", (), {"cancelled": cancelled})]


@pytest.mark.parametrize("event", ["cancel", "pause", "stuck", "write_failed", "all_verified",
                                   "found_manifest"])
def test_completing_is_not_interrupted(event):
    life, driver = machine()
    life.found_manifest()
    life.opened([])
    life.all_verified()
    before = len(driver.calls)
    method = getattr(life, event)
    method("reason") if event in ("stuck", "write_failed") else method()
    assert driver.calls[before:] == []
    life.completed(("x", ()))
    assert names(driver)[-1] == "finished"


@pytest.mark.parametrize("failure", ["open_failed", "stuck", "write_failed", "complete_failed"])
def test_failures_at_their_stage(failure):
    life, driver = machine()
    life.found_manifest()
    if failure != "open_failed":
        life.opened([])
    if failure == "complete_failed":
        life.all_verified()
    getattr(life, failure)("it broke")
    assert driver.calls[-1] == ("failed", ("it broke",), {})


def test_a_storage_open_that_ends_after_a_cancel_is_ignored():
    life, driver = machine()
    life.found_manifest()
    life.cancel()
    life.opened([1])
    life.open_failed("too late")
    assert names(driver) == ["open_storage", "stopped"]


def test_a_second_manifest_is_ignored():
    life, driver = machine()
    life.found_manifest()
    life.found_manifest()
    life.opened([])
    life.found_manifest()
    assert names(driver) == ["open_storage", "start_fetching"]


EVENTS = [
    ("found_manifest", ()),
    ("no_manifest", ("r",)),
    ("opened", ([],)),
    ("open_failed", ("r",)),
    ("all_verified", ()),
    ("stuck", ("r",)),
    ("write_failed", ("r",)),
    ("completed", (("x", ()),)),
    ("complete_failed", ("r",)),
    ("cancel", ()),
    ("pause", ()),
]


@given(st.lists(st.sampled_from(EVENTS), max_size=30))
def test_any_order_of_events_ends_at_most_once(events):
    """
    Whatever happens, in whatever order: the driver is told to end the
    download (finished, failed or stopped) at most once, and told nothing
    after that; events that mean nothing in a stage are taken, never an
    error.
    """
    life, driver = machine()
    for name, args in events:
        try:
            getattr(life, name)(*args)
        except Exception as e:  # pragma: no cover - what the test looks for
            # Only transitions the machine does not know may raise; a real
            # download never sends those (it fetches only after opening).
            assert type(e).__name__ == "NoTransition", e
    ends = [i for i, n in enumerate(names(driver)) if n in ("finished", "failed", "stopped")]
    assert len(ends) <= 1
    if ends:
        assert ends[0] == len(driver.calls) - 1
