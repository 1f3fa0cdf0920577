"""
Fixtures of the end-to-end tests.

On a failed end-to-end test, add every peer's console, stderr and log to the
report: a fixture value with a C{diagnostics()} method provides them.
"""

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        diagnostics = getattr(value, "diagnostics", None)
        if callable(diagnostics):
            try:
                text = diagnostics()
            except Exception as e:  # a report must never fail to be made
                text = f"(could not collect diagnostics: {e!r})"
            report.sections.append((f"peers of fixture {name!r}", text))


@pytest.fixture
def hosts(tmp_path):
    """
    A L{tests.e2e.hosts.Network} to build hosts on; everything it made is
    removed after the test, pass or fail.  Skips, saying why, where network
    namespaces cannot be made (not root, no iproute2).
    """
    from .hosts import Network, unavailable

    why = unavailable()
    if why is not None:
        pytest.skip(why)
    network = Network(tmp_path)
    try:
        yield network
    finally:
        network.close()
        assert network.leftovers() == [], "namespaces left behind"
