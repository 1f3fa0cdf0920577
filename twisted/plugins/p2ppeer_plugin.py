"""
twistd plugin for the twisted-p2p peer: `twistd p2ppeer --help`.

Lazy on purpose: the service module is named as a string, so scanning plugins
for `twistd --help` imports nothing heavy (and never the reactor).
"""

from twisted.application.service import ServiceMaker

p2ppeer = ServiceMaker(
    "twisted-p2p peer",
    "twisted_p2p.tap",
    "Peer-to-peer file sharing for local networks",
    "p2ppeer",
)
