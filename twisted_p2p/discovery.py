"""
Discovery: announcing ourselves, hearing others, saying goodbye.

L{Discovery} holds the logic and feeds the L{PeerTable}; L{DiscoveryProtocol}
only hands it datagrams.  Two UDP sockets are used:

 - the I{listener} on the shared discovery port, bound with C{SO_REUSEPORT}
   so that every peer on a host can hear broadcasts on it;
 - a I{private} socket on an ephemeral port, from which we send everything.
   Unicast replies to a newcomer go to this socket, because a unicast datagram
   to a shared port reaches only one of the sockets bound to it.
"""

from collections import Counter

from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_p2p import wire
from twisted_p2p.limits import NEWCOMER_REPLY_BURST, NEWCOMER_REPLY_RATE

log = Logger()


class Discovery:
    """
    Owns our side of discovery: when we announce, whom we answer, and how
    incoming datagrams update the peer table.

    @param clock: an L{IReactorTime}.
    @param table: the L{PeerTable} to feed.
    @param peer_id: our stable peer id.
    @param instance_id: this run's id.
    @param transfer_port: our transfer port T.
    @param revision: a callable giving our current catalog revision.
    @param broadcast: C{(address, port)} announcements go to.
    @param interval: seconds between announcements.

    Datagrams that change nothing are counted in C{dropped}, by reason; so
    are unicast replies to newcomers held back because more than
    L{NEWCOMER_REPLY_BURST} came at once (such a newcomer still hears our
    next periodic announce).
    """

    def __init__(
        self,
        clock,
        table,
        peer_id,
        instance_id,
        transfer_port,
        revision,
        broadcast,
        interval,
        reply_burst=NEWCOMER_REPLY_BURST,
        reply_rate=NEWCOMER_REPLY_RATE,
    ):
        self._clock = clock
        self.table = table
        self.peer_id = peer_id
        self.instance_id = instance_id
        self.transfer_port = transfer_port
        self._revision = revision
        self.broadcast = broadcast
        self.interval = interval
        self.dropped = Counter()
        self._send = None
        self._loop = None
        self._reply_burst = reply_burst
        self._reply_rate = reply_rate
        self._reply_tokens = float(reply_burst)
        self._reply_refilled = clock.seconds()

    def attach(self, send):
        """
        Give discovery its way out: C{send(data, (host, port))}.
        """
        self._send = send

    def start(self):
        """
        Announce now, then every interval.
        """
        self._loop = LoopingCall(self.announce)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def stop(self):
        """
        Stop announcing and say goodbye.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._transmit(wire.Goodbye(self.peer_id, self.instance_id), self.broadcast)
        self.table.clear()

    def announce(self, to=None):
        """
        Announce ourselves to C{to}, or to everyone.
        """
        message = wire.Announce(
            self.peer_id, self.instance_id, self.transfer_port, self._revision()
        )
        self._transmit(message, to or self.broadcast)

    def revision_changed(self):
        """
        What we offer changed: tell everyone now rather than at the next tick.
        """
        if self._loop is not None and self._loop.running:
            self._loop.reset()
            self.announce()

    def _transmit(self, message, address):
        if self._send is None:
            return
        try:
            self._send(wire.encode_datagram(message), address)
        except OSError as e:
            log.warn(
                "Could not send a discovery datagram to {address}: {error}",
                address=address,
                error=e,
            )

    def datagram_received(self, data, address):
        """
        Decode one datagram from C{address} and act on it.  Never raises.
        """
        host, port = address[0], address[1]
        try:
            message = wire.decode_datagram(data)
        except wire.Oversized:
            self.dropped["oversized"] += 1
            return
        except wire.WrongVersion:
            self.dropped["wrong version"] += 1
            return
        except wire.ProtocolError:
            self.dropped["malformed"] += 1
            return
        if message.peer_id == self.peer_id:
            if message.instance_id != self.instance_id:
                # Another process with our state dir: worth a warning, as
                # both would answer for the same id.
                self.dropped["our id, other instance"] += 1
            return
        if isinstance(message, wire.Goodbye):
            if not self.table.goodbye(message, host, port):
                self.dropped["unmatched goodbye"] += 1
            return
        outcome = self.table.heard(message, host, port)
        if outcome == "full":
            self.dropped["peer table full"] += 1
        elif outcome == "moved":
            self.dropped["moved without restart"] += 1
        elif outcome in ("new", "restarted"):
            # A newcomer learns of us now, not one interval from now.
            if self._take_reply_token():
                self.announce(to=(host, port))
            else:
                self.dropped["newcomer reply held back"] += 1

    def _take_reply_token(self):
        """
        A token bucket for newcomer replies, so that a flood of invented ids
        does not make us flood back.
        """
        now = self._clock.seconds()
        elapsed = max(0.0, now - self._reply_refilled)
        self._reply_refilled = now
        self._reply_tokens = min(
            float(self._reply_burst), self._reply_tokens + elapsed * self._reply_rate
        )
        if self._reply_tokens < 1.0:
            return False
        self._reply_tokens -= 1.0
        return True


class DiscoveryProtocol(DatagramProtocol):
    """
    Hands every datagram to a L{Discovery}.
    """

    noisy = False

    def __init__(self, discovery):
        self.discovery = discovery

    def datagramReceived(self, data, address):
        self.discovery.datagram_received(data, address)
