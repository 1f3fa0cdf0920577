"""
T+2, the distributor, and T+3, the distributee: bound, and answering "not
supported yet" until distribution is built.
"""

from twisted_p2p.transfer.framed import FramedProtocol, PerHostLimitedFactory


class NotSupportedProtocol(FramedProtocol):
    """
    Distributor and distributee ports: bound, and answering "not supported
    yet" until distribution is built.
    """

    def connectionMade(self):
        FramedProtocol.connectionMade(self)
        self.send(
            {
                "t": "error",
                "code": "not-supported",
                "message": "distribution is not supported yet",
            }
        )
        self.transport.loseConnection()

    def frame_received(self, header, body):
        pass


class NotSupportedFactory(PerHostLimitedFactory):
    protocol = NotSupportedProtocol
