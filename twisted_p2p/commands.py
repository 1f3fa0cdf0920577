"""
The command layer: parse a command line, act on the peer, and report what
happened as structured events (see C{events.py}) to the face that asked:
the stdio console, or the control socket that C{p2ppeer-ctl} talks to.  The
faces turn the events into words (C{render.py}) or JSON.

Arguments are read like a shell's (C{shlex}): C{download "my photo.jpg"},
and C{download *.jpg} downloads every file the pattern matches.
"""

import fnmatch
import shlex

from twisted.internet import defer

from twisted_p2p import events
from twisted_p2p.download import DownloadFailed
from twisted_p2p.manifest import chunk_count
from twisted_p2p.units import human_size
from twisted_p2p.version import version

#: Every command, in the order C{help} lists them: its usage, what it does,
#: and the other names it answers to.
COMMANDS = (
    ("list", "list [PATTERN]", "files here and on the peers", ("ls",)),
    ("peers", "peers", "the peers this one knows", ()),
    ("download", "download FILE... [--from PEER]", "fetch files into downloads/", ("get",)),
    ("status", "status", "downloads running, stopped and partial", ()),
    ("cache", "cache", "what this peer holds for others, what it pushed", ()),
    ("resume", "resume FILE", "continue a stopped download", ()),
    ("cancel", "cancel FILE", "stop a download, throw its data away", ()),
    ("version", "version", "the version of twisted-p2p", ()),
    ("help", "help", "this text", ("?",)),
    ("exit", "exit", "say goodbye and stop; asks if busy", ("quit",)),
    ("exit!", "exit!", "say goodbye and stop at once", ("stop",)),
)

#: Said below the commands in C{help}.
HELP_NOTES = (
    "FILE: a name, a pattern (*.jpg) or an id prefix.  PATTERN: *.jpg, or",
    "part of a name.  PEER: a name, an address or an id prefix.",
    'Quote names with spaces: download "my photo.jpg".  Tab completes.',
)

#: Characters that make an argument a pattern rather than a name.
_PATTERN = frozenset("*?[")


class CommandError(Exception):
    """
    A command that cannot be carried out; the message is the one line the
    user sees.
    """


class Commands:
    """
    Carries out commands against a peer, for every face.

    It is given the parts it uses rather than the whole peer, so that each
    face (and each test) can hand it exactly those:

    @param index: the L{SharedIndex} (C{files()}, C{by_id()}).
    @param table: the L{PeerTable} (C{peers()}, C{len()}).
    @param catalog: the L{NetworkCatalog} (C{offers()}, C{files_of()}).
    @param downloads: the L{Downloads} (C{active}, C{start()}).
    @param clock: an L{IReactorTime}, for how long ago a peer was heard.
    @param shutdown: C{shutdown()} stops the peer.
    @param hub: the L{EventHub} download events are published on, so that
        every face sees them; C{None} for none.
    @param dropped: C{dropped()} gives the discovery datagrams dropped, by
        reason.
    @param uploads_active: C{uploads_active()} gives the uploads in progress.
    @param partials: the L{PartialDownloads} record, for C{status} and
        C{resume}.
    @param partial_files: where the hidden partial files are, for C{status}.
    @param distribution: C{distribution()}, the fields of the C{cache}
        answer (the cache, and what distribution sent and took); C{None}
        for a peer without distribution.
    """

    def __init__(self, index, table, catalog, downloads, clock, shutdown, hub=None,
                 dropped=dict, uploads_active=lambda: 0, partials=None, partial_files=None,
                 distribution=None):
        self._index = index
        self._table = table
        self._catalog = catalog
        self._downloads = downloads
        self._clock = clock
        self._shutdown = shutdown
        self._hub = hub
        self._dropped = dropped
        self._uploads_active = uploads_active
        self._partials = partials
        self._partial_files = partial_files
        self._distribution = distribution
        self._exit_asked = False
        methods = {
            "list": (self.list, 0, 1),
            "peers": (self.peers, 0, 0),
            "download": (self.download, 1, None),
            "status": (self.status, 0, 0),
            "cache": (self.cache, 0, 0),
            "resume": (self.resume, 1, 1),
            "cancel": (self.cancel, 1, 1),
            "version": (self.version, 0, 0),
            "help": (self.help, 0, 0),
            "exit": (self.exit, 0, 0),
            "exit!": (self.exit_now, 0, 0),
        }
        self._handlers = {}
        self._usage = {}
        self._canonical = {}
        for name, usage, _, aliases in COMMANDS:
            for word in (name, *aliases):
                self._handlers[word] = methods[name]
                self._usage[word] = usage.replace(name, word, 1)
                self._canonical[word] = name

    def names(self):
        """
        Every command name and alias, for completion.
        """
        return sorted(self._handlers)

    def file_names(self, command="download"):
        """
        The file names C{command} may be given, for completion: the
        stopped downloads for C{resume}, those in progress for C{cancel},
        what the network offers for the others (and what is here, for
        C{list}).
        """
        command = self._canonical.get(command.lower(), command)
        if command == "resume":
            active = {d.file_id for d in self._downloads.active.values()}
            stopped = self._partials.stopped() if self._partials is not None else []
            names = {s["file"] for s in stopped if s["id"] not in active}
        elif command == "cancel":
            names = {d.name for d in self._downloads.active.values()}
        else:
            names = {offer.name for offer in self._catalog.offers()}
            if command == "list":
                names.update(f.name for f in self._index.files())
        return sorted(names)

    def peer_names(self):
        """
        The names and addresses of the known peers, for completion.
        """
        names = set()
        for peer in self._table.peers():
            names.add(peer.label)
            if _name_of(peer):
                names.add(_name_of(peer))
        return sorted(names)

    def run(self, line, emit, origin=None):
        """
        Carry out one command line, calling C{emit(event)} for everything
        there is to say.  Returns a Deferred that fires when the command (a
        download, say) is over; it never fails for the user's mistakes:
        errors are emitted.

        @param origin: the face that asks (its C{face} names it, and an
            C{interactive} one is asked before C{exit} interrupts
            transfers); its own download events are not published back to it.
        """
        try:
            words = shlex.split(line)
        except ValueError as e:
            emit(events.error(f"cannot read that command: {e}; quote names with \" or '"))
            return defer.succeed(None)
        if not words:
            return defer.succeed(None)
        name, args = words[0].lower(), words[1:]
        try:
            handler = self._handlers.get(name)
            if handler is None:
                raise CommandError(f"unknown command {words[0]!r}; type 'help' for the list")
            method, least, most = handler
            if len(args) < least:
                raise CommandError(f"{name} needs an argument: {self._usage[name]}")
            if most is not None and len(args) > most:
                if most == 0:
                    raise CommandError(f"{name} takes no argument")
                raise CommandError(
                    f"{name} takes one argument; quote a name with spaces: {self._usage[name]}"
                )
            if name not in ("exit", "quit"):
                self._exit_asked = False
            d = defer.maybeDeferred(method, args, emit, origin)
        except CommandError as e:
            emit(events.error(str(e)))
            return defer.succeed(None)
        return d.addErrback(self._failed, emit)

    @staticmethod
    def _failed(failure, emit):
        failure.trap(CommandError, DownloadFailed)
        if not getattr(failure.value, "reported", False):
            emit(events.error(failure.getErrorMessage()))

    # -- the commands ------------------------------------------------------------

    def help(self, args, emit, origin):
        rows = []
        for name, usage, what, aliases in COMMANDS:
            also = f" (also: {', '.join(aliases)})" if aliases else ""
            rows.append((usage, what + also))
        emit(events.event("help", commands=rows, notes=list(HELP_NOTES)))

    def version(self, args, emit, origin):
        emit(events.event("version", version=version()))

    def list(self, args, emit, origin):
        pattern = args[0] if args else None
        rows = {}
        for local in self._index.files():
            row = rows.setdefault(local.file_id, _row(local.name, local.size, local.file_id))
            row["here"] = True
            if "here" not in row["where"]:
                row["where"].append("here")
        availability = getattr(self._catalog, "availability", None)
        holdings_of = getattr(self._catalog, "holdings_of", None)
        for offer in self._catalog.offers():
            row = rows.setdefault(offer.file_id, _row(offer.name, offer.size, offer.file_id))
            for peer in offer.peers:
                row["where"].append(peer.label)
                row["sources"].append({"peer": peer.label, "name": _name_of(peer)})
            if availability is not None:
                # The share of its chunks the known peers hold, and the
                # fewest copies of any: what is left once its origin left.
                reachable, copies = availability(offer.file_id, chunk_count(offer.size))
                row["available"] = round(reachable, 4)
                row["copies"] = copies + (1 if row["here"] else 0)
                row["whole"] = row["here"] or any(
                    holdings_of(peer.peer_id).get(offer.file_id, b"") is None
                    for peer in offer.peers
                )
        files = sorted(rows.values(), key=lambda f: (f["name"], f["id"]))
        if pattern is not None:
            files = [f for f in files if _matches(pattern, f["name"])]
        emit(events.event("list", files=files, pattern=pattern, peers=len(self._table)))

    def peers(self, args, emit, origin):
        now = self._clock.seconds()
        peers = [
            {
                "peer": peer.label,
                "name": _name_of(peer),
                "id": peer.peer_id,
                "host": peer.host,
                "transfer_port": peer.transfer_port,
                "files": len(self._catalog.files_of(peer.peer_id)),
                "last_heard": round(now - peer.last_seen, 1),
            }
            for peer in self._table.peers()
        ]
        # Discovery datagrams dropped, by reason: a sign of a misconfigured
        # or misbehaving peer on the network.
        dropped = dict(sorted(self._dropped().items()))
        emit(events.event("peers", peers=peers, dropped=dropped))

    def download(self, args, emit, origin):
        wanted, source = _split_from(args)
        offers = self._catalog.offers()
        chosen = {}
        for arg in wanted:
            try:
                found = self._resolve(arg, offers, many=bool(_PATTERN & set(arg)))
            except CommandError as e:
                if len(wanted) == 1:
                    raise
                # What one name cannot give is said; the others go on.
                emit(events.error(str(e)))
                continue
            for offer in found:
                chosen.setdefault(offer.file_id, offer)
        if not chosen:
            return None
        if source is not None:
            chosen = self._from(source, chosen)
        return self._start(list(chosen.values()), emit, origin)

    def resume(self, args, emit, origin):
        wanted = args[0]
        if self._partials is None:
            raise CommandError("this peer keeps no record of stopped downloads")
        active = self._find_active(wanted)
        if active:
            raise CommandError(f"{active[0].name} is being downloaded; 'status' shows how far")
        stopped = self._partials.find(wanted)
        if not stopped:
            raise CommandError(
                f"no stopped download of {wanted!r}; 'status' lists them, and "
                "'download' starts a new one"
            )
        if len(stopped) > 1:
            ids = ", ".join(s["id"][:8] for s in stopped)
            raise CommandError(f"several stopped downloads match {wanted!r} ({ids}); resume one by its id")
        entry = stopped[0]
        offers = [o for o in self._catalog.offers() if o.file_id == entry["id"]]
        if not offers:
            raise CommandError(
                f"no known peer offers {entry['file']} now; resume it when one that has it is back"
            )
        return self._start(offers, emit, origin)

    def status(self, args, emit, origin):
        transfers = [d.status() for d in self._downloads.active.values()]
        running = {t["id"] for t in transfers}
        stopped = []
        if self._partials is not None:
            stopped = [s for s in self._partials.stopped() if s["id"] not in running]
        emit(events.event(
            "status", transfers=transfers, stopped=stopped, partial_files=self._partial_files
        ))

    def cache(self, args, emit, origin):
        if self._distribution is None:
            raise CommandError("this peer does not distribute")
        emit(events.event("cache", **self._distribution()))

    def cancel(self, args, emit, origin):
        wanted = args[0]
        matches = self._find_active(wanted)
        if not matches:
            raise CommandError(f"no download of {wanted!r} is in progress; 'status' lists them")
        if len(matches) > 1:
            raise CommandError(f"several downloads match {wanted!r}; cancel one by its id")
        download = matches[0]
        emit(events.event("cancelled", file=download.name, id=download.file_id))
        download.cancel()

    def exit(self, args, emit, origin):
        if getattr(origin, "interactive", False) and not self._exit_asked:
            downloads = [
                {"file": d.name, "id": d.file_id, "percent": d.status()["percent"]}
                for d in self._downloads.active.values()
            ]
            uploads = self._uploads_active()
            if downloads or uploads:
                self._exit_asked = True
                emit(events.event("exit-confirm", downloads=downloads, uploads=uploads))
                return
        self.exit_now(args, emit, origin)

    def exit_now(self, args, emit, origin):
        emit(events.event("bye"))
        self._shutdown()

    # -- helpers -----------------------------------------------------------------

    def _find_active(self, wanted):
        prefix = wanted.lower() if len(wanted) >= 4 else None
        return [
            d for d in self._downloads.active.values()
            if d.name == wanted or (prefix and d.file_id.startswith(prefix))
        ]

    def _resolve(self, wanted, offers, many):
        """
        The offers C{wanted} names: by name, by pattern (C{many}), or by id
        prefix.

        @raise CommandError: none, several different files for one name, or
            only files that are here already.
        """
        here = {f.file_id for f in self._index.files()}
        if many:
            matches = sorted(
                (o for o in offers if fnmatch.fnmatchcase(o.name, wanted)),
                key=lambda o: (o.name, o.file_id),
            )
            fresh = [o for o in matches if o.file_id not in here]
            if not fresh:
                if matches:
                    raise CommandError(f"every file that matches {wanted!r} is here already")
                raise CommandError(f"no known peer offers a file that matches {wanted!r}; 'list' shows what they do")
            return fresh
        matches = [o for o in offers if o.name == wanted]
        if not matches and len(wanted) >= 4:
            prefix = wanted.lower()
            matches = [o for o in offers if o.file_id.startswith(prefix)]
        if not matches:
            local = [f for f in self._index.files() if f.name == wanted]
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
        if offer.file_id in here:
            raise CommandError(f"{offer.name} is already here")
        return [offer]

    def _from(self, wanted, chosen):
        """
        C{chosen} offers with their peers narrowed to those C{wanted} names
        (by name, address or id prefix).
        """
        known = [p for p in self._table.peers() if _is_peer(p, wanted)]
        if not known:
            raise CommandError(f"no known peer is called {wanted!r}; 'peers' lists them")
        narrowed = {}
        for file_id, offer in chosen.items():
            peers = tuple(p for p in offer.peers if _is_peer(p, wanted))
            if not peers:
                raise CommandError(f"{wanted} does not offer {offer.name}; 'list' shows who does")
            narrowed[file_id] = type(offer)(offer.file_id, offer.name, offer.size, peers)
        return narrowed

    def _start(self, offers, emit, origin):
        """
        Start a download of each of C{offers}; a Deferred that fires when
        they are all over.
        """
        emit(events.event(
            "download-requested",
            files=[{"file": o.name, "id": o.file_id, "sources": len(o.peers)} for o in offers],
        ))
        running = []
        for offer in offers:
            report = self._reporter(emit, origin)
            try:
                d = self._downloads.start(offer.name, offer.file_id, offer.peers, report)
            except DownloadFailed as e:
                emit(events.error(str(e), file=offer.name, id=offer.file_id))
                continue
            running.append(d.addErrback(self._failed, emit))
        if len(running) == 1:
            return running[0]
        return defer.gatherResults(running, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure
        )

    def _reporter(self, emit, origin):
        """
        Where a download's events go: the record of partial downloads, the
        face that asked, and every other face.
        """
        face = getattr(origin, "face", None)

        def report(e):
            if (
                e.get("event") == "download-stopped"
                and "percent" not in e
                and self._partials is not None
            ):
                # How far it got, which the stop event does not say.
                e = dict(e, percent=self._partials.percent(e.get("id")))
            if self._partials is not None:
                self._partials.observe(e)
            emit(e)
            if self._hub is not None:
                if e.get("event") == "download-started" and face and "requested_by" not in e:
                    # The other faces are told who asked for it.
                    e = dict(e, requested_by=face)
                self._hub.publish(e, origin=origin)

        return report


def _row(name, size, file_id):
    return {"name": name, "size": size, "id": file_id, "here": False, "where": [], "sources": []}


def _name_of(peer):
    """
    A peer's name, if it announced one (peers of older versions do not).
    """
    name = getattr(peer, "name", None)
    return name if isinstance(name, str) and name else None


def _is_peer(peer, wanted):
    name = _name_of(peer)
    if name is not None and name.casefold() == wanted.casefold():
        return True
    if peer.label == wanted:
        return True
    return len(wanted) >= 4 and peer.peer_id.startswith(wanted.lower())


def _matches(pattern, name):
    """
    Whether C{name} is one C{list PATTERN} shows: a shell-style pattern, or
    else a part of the name (neither minds the case).
    """
    if _PATTERN & set(pattern):
        return fnmatch.fnmatch(name.casefold(), pattern.casefold())
    return pattern.casefold() in name.casefold()


def _split_from(args):
    """
    The names of a C{download} and its C{--from PEER}, if any.
    """
    names, source = [], None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--from" or arg.startswith("--from="):
            if arg == "--from":
                if i + 1 >= len(args):
                    raise CommandError("--from needs a peer: download FILE --from PEER")
                value = args[i + 1]
                i += 2
            else:
                value = arg.split("=", 1)[1]
                i += 1
            if source is not None:
                raise CommandError("give --from once")
            source = value
            continue
        names.append(arg)
        i += 1
    if not names:
        raise CommandError("download needs a file: download FILE... [--from PEER]")
    return names, source
