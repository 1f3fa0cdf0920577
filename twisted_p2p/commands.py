"""
The command layer: parse a command line, act on the peer, and say what
happened, one line at a time, to whichever face asked (the stdio console
today, a control socket later).
"""

from twisted.internet import defer

from twisted_p2p.download import DownloadFailed, human_size

HELP = [
    "commands:",
    "  list             files here and on every known peer",
    "  peers            the peers this one knows",
    "  download <file>  fetch a file (by name, or by id prefix) into downloads/",
    "  help             this text",
    "  exit             say goodbye to the other peers and stop",
]


class CommandError(Exception):
    """
    A command that cannot be carried out; the message is the one line the
    user sees.
    """


class Commands:
    """
    Carries out console commands against a peer.

    @param peer: the L{PeerService} (its C{index}, C{table}, C{catalog},
        C{downloads} and C{shutdown}).
    """

    def __init__(self, peer):
        self._peer = peer
        self._handlers = {
            "list": (self.list, 0),
            "ls": (self.list, 0),
            "peers": (self.peers, 0),
            "download": (self.download, 1),
            "get": (self.download, 1),
            "help": (self.help, 0),
            "?": (self.help, 0),
            "exit": (self.exit, 0),
            "quit": (self.exit, 0),
        }

    def run(self, line, say):
        """
        Carry out one command line, calling C{say(text)} for each line of
        output.  Returns a Deferred that fires when the command (a download,
        say) is over; it never fails: errors are said.
        """
        words = line.strip().split(None, 1)
        if not words:
            return defer.succeed(None)
        name, rest = words[0].lower(), (words[1].strip() if len(words) > 1 else "")
        handler = self._handlers.get(name)
        try:
            if handler is None:
                raise CommandError(f"unknown command {words[0]!r}; type 'help' for the list")
            method, arguments = handler
            if arguments and not rest:
                raise CommandError(f"{name} needs an argument: {name} <file>")
            if not arguments and rest:
                raise CommandError(f"{name} takes no argument")
            d = defer.maybeDeferred(method, rest, say) if arguments else defer.maybeDeferred(
                method, say
            )
        except CommandError as e:
            say(f"error: {e}")
            return defer.succeed(None)
        return d.addErrback(self._said, say)

    @staticmethod
    def _said(failure, say):
        failure.trap(CommandError, DownloadFailed)
        say(f"error: {failure.getErrorMessage()}")

    def help(self, say):
        for line in HELP:
            say(line)

    def list(self, say):
        rows = {}
        for local in self._peer.index.files():
            row = rows.setdefault(local.file_id, [local.name, local.size, []])
            if "here" not in row[2]:
                row[2].append("here")
        for offer in self._peer.catalog.offers():
            row = rows.setdefault(offer.file_id, [offer.name, offer.size, []])
            row[2].extend(p.label for p in offer.peers)
        if not rows:
            say(f"no files here or on {len(self._peer.table)} known peer(s)")
            return
        table = [("NAME", "SIZE", "ID", "WHERE")]
        for file_id, (name, size, where) in sorted(rows.items(), key=lambda r: (r[1][0], r[0])):
            table.append((name, human_size(size), file_id[:8], ", ".join(where)))
        for line in _columns(table):
            say(line)

    def peers(self, say):
        peers = self._peer.table.peers()
        if not peers:
            say("no peers known yet")
            return
        now = self._peer.clock.seconds()
        table = [("PEER", "ID", "FILES", "LAST HEARD")]
        for peer in peers:
            files = len(self._peer.catalog.files_of(peer.peer_id))
            table.append(
                (peer.label, peer.short_id, str(files), f"{now - peer.last_seen:.0f} s ago")
            )
        for line in _columns(table):
            say(line)

    def download(self, wanted, say):
        offers = self._peer.catalog.offers()
        matches = [o for o in offers if o.name == wanted]
        if not matches and len(wanted) >= 4:
            prefix = wanted.lower()
            matches = [o for o in offers if o.file_id.startswith(prefix)]
        if not matches:
            local = [f for f in self._peer.index.files() if f.name == wanted]
            if local:
                raise CommandError(f"{wanted} is already here, in {local[0].folder}")
            raise CommandError(f"no known peer offers {wanted!r}; 'list' shows what they do")
        if len(matches) > 1:
            choices = ", ".join(f"{o.short_id} ({human_size(o.size)})" for o in matches)
            raise CommandError(
                f"{len(matches)} different files match {wanted!r}: {choices}; "
                "download one by its id"
            )
        offer = matches[0]
        if self._peer.index.by_id(offer.file_id) is not None:
            raise CommandError(f"{offer.name} is already here")
        return self._peer.downloads.start(offer.name, offer.file_id, offer.peers, say)

    def exit(self, say):
        say("bye")
        self._peer.shutdown()


def _columns(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
