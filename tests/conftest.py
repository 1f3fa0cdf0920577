"""
Fixtures shared by the unit tests.
"""

import pytest


@pytest.fixture(params=["all at once", "one byte at a time"])
def feed(request):
    """
    C{feed(protocol, data)}: hand C{data} to a protocol in one call, or one
    byte per call; a parser must give the same result either way.
    """

    def whole(protocol, data):
        protocol.dataReceived(data)

    def bytewise(protocol, data):
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])

    return whole if request.param == "all at once" else bytewise


# Hypothesis: `make test` (and so CI) runs every property with a fixed seed,
# so that a landing never hangs on what one random draw happened to find;
# `make fuzz` explores with fresh random draws and many more examples, and
# prints a @reproduce_failure line for anything it finds.
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover - hypothesis is a test extra
    pass
else:
    _hypothesis_settings.register_profile("default", derandomize=True)
    _hypothesis_settings.register_profile("fuzz", derandomize=False, max_examples=2000)
    _hypothesis_settings.load_profile("default")
