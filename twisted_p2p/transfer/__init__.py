"""
The four transfer ports, as thin protocols that frame and parse, then hand
what they read to the objects that hold the logic:

 - T, receiver (C{receiver.py}): the data connections senders open back to
   us, one per stream we asked for; chunks go to the stream's owner (a
   download) as they arrive.
 - T+1, sender (C{sender.py}): catalog, manifest, chunk map, C{get} and
   C{cancel} requests, answered by an L{twisted_p2p.uploads.Uploads}; chunk
   data goes out on the streams of C{streams.py}.
 - T+2, distributor, and T+3, distributee (C{distribution.py}): pulls,
   and offers and pushes of chunks for other peers' caches, handed to the
   objects of L{twisted_p2p.distribution}.

C{framed.py} has what they share.  The wire format is in C{PROTOCOL.md}.
"""

from twisted_p2p.transfer.distribution import (
    DistributeeFactory,
    DistributeeProtocol,
    DistributorFactory,
    DistributorProtocol,
)
from twisted_p2p.transfer.framed import (
    ConnectionBudget,
    FramedProtocol,
    PerHostLimitedFactory,
    RequestRefused,
)
from twisted_p2p.transfer.receiver import (
    Inbox,
    ReceiverEndpoint,
    ReceiverFactory,
    ReceiverProtocol,
)
from twisted_p2p.transfer.sender import SenderFactory, SenderProtocol

__all__ = [
    "ConnectionBudget",
    "DistributeeFactory",
    "DistributeeProtocol",
    "DistributorFactory",
    "DistributorProtocol",
    "FramedProtocol",
    "Inbox",
    "PerHostLimitedFactory",
    "ReceiverEndpoint",
    "ReceiverFactory",
    "ReceiverProtocol",
    "RequestRefused",
    "SenderFactory",
    "SenderProtocol",
]
