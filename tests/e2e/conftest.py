"""
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
