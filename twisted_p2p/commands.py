"""
The command layer: parse a command line, act on the peer, and report what
happened as events (see C{events.py}) to whichever face asked: the stdio
console, or the control socket that C{p2ppeer-ctl} talks to.
"""

from twisted.internet import defer

from twisted_p2p import events
from twisted_p2p.download import DownloadFailed, human_size

HELP = [
    "commands:",
    "  list             files here and on every known peer",
    "  peers            the peers this one knows",
    "  download <file>  fetch a file (by name, or by id prefix) into downloads/",
    "  status           the downloads in progress",
    "  cancel <file>    stop a download",
    "  help             this text",
    "  exit             say goodbye to the other peers and stop (also: stop)",
]


class CommandError(Exception):
    """
    A command that cannot be carried out; the message is the one line the
    user sees.
    """


class Commands:
    """
    Carries out commands against a peer, for every face.

    @param peer: the L{PeerService} (its C{index}, C{table}, C{catalog},
        C{downloads}, C{clock} and C{shutdown}).
    """

    def __init__(self, peer):
        self._peer = peer
        self._handlers = {
            "list": (self.list, 0),
            "ls": (self.list, 0),
            "peers": (self.peers, 0),
            "download": (self.download, 1),
            "get": (self.download, 1),
            "status": (self.status, 0),
            "cancel": (self.cancel, 1),
            "help": (self.help, 0),
            "?": (self.help, 0),
            "exit": (self.exit, 0),
            "quit": (self.exit, 0),
            "stop": (self.exit, 0),
        }

    def run(self, line, emit):
        """
        Carry out one command line, calling C{emit(event)} for everything
        there is to say.  Returns a Deferred that fires when the command (a
        download, say) is over; it never fails: errors are emitted.
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
            args = (rest, emit) if arguments else (emit,)
            d = defer.maybeDeferred(method, *args)
        except CommandError as e:
            emit(events.error(str(e)))
            return defer.succeed(None)
        return d.addErrback(self._failed, emit)

    @staticmethod
    def _failed(failure, emit):
        failure.trap(CommandError, DownloadFailed)
        if not getattr(failure.value, "reported", False):
            emit(events.error(failure.getErrorMessage()))

    def help(self, emit):
        emit(events.event("help", "\n".join(HELP)))

    def list(self, emit):
        rows = {}
        for local in self._peer.index.files():
            row = rows.setdefault(local.file_id, [local.name, local.size, []])
            if "here" not in row[2]:
                row[2].append("here")
        for offer in self._peer.catalog.offers():
            row = rows.setdefault(offer.file_id, [offer.name, offer.size, []])
            row[2].extend(p.label for p in offer.peers)
        files = [
            {"name": name, "size": size, "id": file_id, "where": where}
            for file_id, (name, size, where) in sorted(
                rows.items(), key=lambda r: (r[1][0], r[0])
            )
        ]
        if not files:
            text = f"no files here or on {len(self._peer.table)} known peer(s)"
        else:
            table = [("NAME", "SIZE", "ID", "WHERE")]
            for f in files:
                table.append((f["name"], human_size(f["size"]), f["id"][:8], ", ".join(f["where"])))
            text = "\n".join(_columns(table))
        emit(events.event("list", text, files=files))

    def peers(self, emit):
        now = self._peer.clock.seconds()
        peers = [
            {
                "peer": peer.label,
                "id": peer.peer_id,
                "host": peer.host,
                "transfer_port": peer.transfer_port,
                "files": len(self._peer.catalog.files_of(peer.peer_id)),
                "last_heard": round(now - peer.last_seen, 1),
            }
            for peer in self._peer.table.peers()
        ]
        if not peers:
            text = "no peers known yet"
        else:
            table = [("PEER", "ID", "FILES", "LAST HEARD")]
            for p in peers:
                table.append((p["peer"], p["id"][:8], str(p["files"]), f"{p['last_heard']:.0f} s ago"))
            text = "\n".join(_columns(table))
        # Discovery datagrams dropped, by reason: a sign of a misconfigured
        # or misbehaving peer on the network.
        dropped = dict(sorted(self._peer.discovery.dropped.items()))
        if dropped:
            counts = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
            text += f"\ndiscovery datagrams dropped: {counts}"
        emit(events.event("peers", text, peers=peers, dropped=dropped))

    def download(self, wanted, emit):
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
        return self._peer.downloads.start(offer.name, offer.file_id, offer.peers, emit)

    def status(self, emit):
        transfers = [d.status() for d in self._peer.downloads.active.values()]
        if not transfers:
            text = "no downloads in progress"
        else:
            table = [("FILE", "DONE", "RATE", "SOURCES", "ETA")]
            for t in transfers:
                eta = "?" if t["eta"] is None else f"{t['eta']} s"
                table.append(
                    (t["file"], f"{t['percent']}%", f"{human_size(t['rate'])}/s", str(t["sources"]), eta)
                )
            text = "\n".join(_columns(table))
        emit(events.event("status", text, transfers=transfers))

    def cancel(self, wanted, emit):
        active = self._peer.downloads.active
        matches = [
            d for d in active.values()
            if d.name == wanted or (len(wanted) >= 4 and d.file_id.startswith(wanted.lower()))
        ]
        if not matches:
            raise CommandError(f"no download of {wanted!r} is in progress; 'status' lists them")
        if len(matches) > 1:
            raise CommandError(f"several downloads match {wanted!r}; cancel one by its id")
        download = matches[0]
        emit(events.event("cancelled", f"cancelled {download.name}", file=download.name, id=download.file_id))
        download.cancel()

    def exit(self, emit):
        emit(events.event("bye", "bye"))
        self._peer.shutdown()


def _columns(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
