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
