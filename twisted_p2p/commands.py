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
from twisted_p2p.names import BadName, check_path, is_legal_path, leaf, next_parts
from twisted_p2p.manifest import chunk_count
from twisted_p2p.units import human_size
from twisted_p2p.version import version

#: Every command, in the order C{help} lists them: its usage, what it does,
#: and the other names it answers to.
COMMANDS = (
    ("list", "list [PATTERN]", "files here and on the peers", ("ls",)),
    ("peers", "peers", "the peers this one knows", ()),
    ("download", "download FILE... [--folder] [--from PEER]", "fetch files or folders into downloads/",
     ("get",)),
    ("status", "status", "downloads running, stopped and partial", ()),
    ("cache", "cache", "what this peer holds for others, what it pushed", ()),
    ("resume", "resume FILE | FOLDER/", "continue a stopped download, or a folder download in "
     "the folder it made", ()),
    ("cancel", "cancel FILE", "stop a download (or a FOLDER/), throw its data away", ()),
    ("version", "version", "the version of twisted-p2p", ()),
    ("help", "help", "this text", ("?",)),
    ("exit", "exit", "say goodbye and stop; asks if busy", ("quit",)),
    ("exit!", "exit!", "say goodbye and stop at once", ("stop",)),
)

#: Said below the commands in C{help}.
HELP_NOTES = (
    "FILE: a name or path (photos/a.jpg), a pattern (*.jpg) or an id prefix;",
    "a folder ends with / (download photos/, list photos/) or takes --folder.",
    "PATTERN: *.jpg, or part of a name.  PEER: a name, an address or an id prefix.",
    'Quote names with spaces: download "my photo.jpg".  Tab completes.',
)

#: Entries (here and in the catalog) from which C{list} is worked out in a
#: thread: 20,000 take ~30 ms, longer would hold the reactor too long.
LIST_IN_THREAD = 20_000

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
    @param catalog: the L{NetworkCatalog}: C{size}, C{offers()}, C{paths()},
        C{path_names()}, C{named()}, C{with_id_prefix()}, C{offer_of()},
        C{count_of()}, C{files_of()}; and, if it has them, C{availability()}
        and C{holds_whole()} for the C{list} columns they give.
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
    @param run_in_thread: C{deferToThread}, for C{list} over a large
        catalog; by default it runs at once.
    @param distribution: C{distribution()}, the fields of the C{cache}
        answer (the cache, and what distribution sent and took); C{None}
        for a peer without distribution.
    """

    def __init__(self, index, table, catalog, downloads, clock, shutdown, hub=None,
                 dropped=dict, uploads_active=lambda: 0, partials=None, partial_files=None,
                 run_in_thread=defer.maybeDeferred, distribution=None):
        self._index = index
        self._run = run_in_thread
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
        The file names C{command} may be given, for completion, sorted: the
        stopped downloads for C{resume}, those in progress for C{cancel},
        what the network offers for the others (and what is here, for
        C{list}).
        """
        command = self._canonical.get(command.lower(), command)
        if command == "resume":
            active = {d.file_id for d in self._downloads.active.values()}
            stopped = self._partials.stopped() if self._partials is not None else []
            names = {s["file"] for s in stopped if s["id"] not in active}
            # And the folders a folder download made, to go on with (the
            # top folders of the sorted paths, found by bisection).
            tops = next_parts(self._catalog.path_names(), "")
            names.update(top for top in tops
                         if top.endswith("/") and self._downloads.folder_here(top[:-1]))
        elif command == "cancel":
            names = {d.name for d in self._downloads.active.values()}
        elif command != "list":
            # Kept sorted by the catalog until it changes: a Tab over
            # 100,000 paths costs no walk of them.
            return self._catalog.path_names()
        else:
            names = set(self._catalog.path_names())
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
        """
        The files here and on the peers.  Without a pattern, the folders
        below the one asked (the top by default, C{list photos/} for
        another) are collapsed into one row each, with their file count
        and size; a pattern lists every file whose path matches.
        """
        pattern = args[0] if args else None
        folder = None
        if pattern is not None and pattern.endswith("/") and not _PATTERN & set(pattern):
            folder, pattern = pattern.rstrip("/") + "/", None
            try:
                check_path(folder[:-1])
            except BadName as e:
                raise CommandError(f"{folder} is not a folder path: {e}") from e
        local = self._index.files()
        catalog = self._catalog

        def said(result):
            files, folders = result
            emit(events.event(
                "list", files=files, folders=folders, folder=folder, pattern=pattern,
                peers=len(self._table),
            ))

        entries = len(local) + catalog.size
        if entries < LIST_IN_THREAD:
            # Answered at once, so that it comes before what the next
            # command says.
            said(_list_rows(local, catalog, pattern, folder or ""))
            return None
        # 100,000 entries take longer than a turn of the reactor: worked
        # out in a thread, from lists that are replaced, never changed.
        return self._run(_list_rows, local, catalog, pattern, folder or "").addCallback(said)

    def peers(self, args, emit, origin):
        now = self._clock.seconds()
        peers = [
            {
                "peer": peer.label,
                "name": _name_of(peer),
                "id": peer.peer_id,
                "host": peer.host,
                "transfer_port": peer.transfer_port,
                "files": self._catalog.count_of(peer.peer_id),
                "last_heard": round(now - peer.last_seen, 1),
            }
            for peer in self._table.peers()
        ]
        # Discovery datagrams dropped, by reason: a sign of a misconfigured
        # or misbehaving peer on the network.
        dropped = dict(sorted(self._dropped().items()))
        emit(events.event("peers", peers=peers, dropped=dropped))

    def download(self, args, emit, origin):
        wanted, source, as_folder = _split_options(args)
        walks = as_folder or any(arg.endswith("/") or _PATTERN & set(arg) for arg in wanted)
        if walks and self._catalog.size >= LIST_IN_THREAD:
            # A pattern or a folder goes over every offer: over 100,000
            # entries, longer than a turn of the reactor should take (as
            # list); a name is looked up, and answered at once.
            d = self._run(self._resolve_all, wanted, as_folder)
            return d.addCallback(self._download_resolved, source, emit, origin)
        return self._download_resolved(self._resolve_all(wanted, as_folder), source, emit, origin)

    def _resolve_all(self, wanted, as_folder):
        """
        C{(chosen, folders, errors)} for the names, patterns and folders
        C{wanted}: the files by id, as C{(offer, target)}; the folders, as
        L{_resolve_folder} gives them; what could not be found, as error
        messages.  Says nothing itself (it may run in a thread).

        @raise CommandError: the one thing asked could not be found.
        """
        chosen = {}
        folders = []
        errors = []
        for arg in wanted:
            try:
                if as_folder or arg.endswith("/"):
                    folders.append(self._resolve_folder(arg))
                    continue
                found = self._resolve(arg, many=bool(_PATTERN & set(arg)))
            except CommandError as e:
                if len(wanted) == 1:
                    raise
                # What one name cannot give is said; the others go on.
                errors.append(str(e))
                continue
            for offer in found:
                # A file asked for by itself lands in downloads/ under its
                # own name, wherever it is in the peer's tree.
                chosen.setdefault(offer.file_id, (offer, leaf(offer.name)))
        return chosen, folders, errors

    def _download_resolved(self, resolved, source, emit, origin):
        chosen, folders, errors = resolved
        for message in errors:
            emit(events.error(message))
        if not chosen and not folders:
            return None
        if source is not None:
            chosen = self._from(source, chosen)
            # A folder takes the files that peer has; the others are left.
            narrowed = []
            for path, items in folders:
                held = [
                    (o, below) for o, below in items if any(_is_peer(p, source) for p in o.peers)
                ]
                if not held:
                    raise CommandError(
                        f"{source} offers nothing below {path}/; 'list' shows who does"
                    )
                narrowed.append((path, list(self._from(source, dict(enumerate(held))).values())))
            folders = narrowed
        running = []
        if chosen:
            running.append(self._start(list(chosen.values()), emit, origin))
        for path, items in folders:
            running.append(self._start_folder(path, items, emit, origin))
        if len(running) == 1:
            return running[0]
        return defer.gatherResults(running, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure
        )

    def _resolve_folder(self, wanted):
        """
        C{(folder, [(offer, path under it)])}: every file the peers offer
        below folder C{wanted}, by path and id.

        @raise CommandError: not a folder path, or nothing offered below it.
        """
        folder = wanted.rstrip("/")
        try:
            check_path(folder)
        except BadName as e:
            raise CommandError(f"{wanted!r} is not a folder path: {e}") from e
        prefix = folder + "/"
        items = [
            (offer, offer.name[len(prefix):])
            for offer in self._catalog.paths()
            if offer.name.startswith(prefix)
        ]
        if not items:
            raise CommandError(
                f"no known peer offers a folder {prefix}; 'list' shows what they do"
            )
        return folder, items

    def resume(self, args, emit, origin):
        wanted = args[0]
        if wanted.endswith("/"):
            return self._resume_folder(wanted, emit, origin)
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
        offer = self._catalog.offer_of(entry["id"])
        if offer is None:
            raise CommandError(
                f"no known peer offers {entry['file']} now; resume it when one that has it is back"
            )
        # Where it was going: a file of a folder download goes back into
        # that folder.
        target = entry["file"] if is_legal_path(entry["file"]) else leaf(offer.name)
        return self._start([(offer, target)], emit, origin)

    def status(self, args, emit, origin):
        transfers = [d.status() for d in self._downloads.active.values()]
        running = {t["id"] for t in transfers}
        stopped = []
        if self._partials is not None:
            stopped = [s for s in self._partials.stopped() if s["id"] not in running]
        emit(events.event(
            "status", transfers=transfers, stopped=stopped, partial_files=self._partial_files,
            waiting=list(getattr(self._downloads, "waiting", ())),
        ))

    def cache(self, args, emit, origin):
        if self._distribution is None:
            raise CommandError("this peer does not distribute")
        emit(events.event("cache", **self._distribution()))

    def cancel(self, args, emit, origin):
        wanted = args[0]
        if wanted.endswith("/"):
            return self._cancel_folder(wanted, emit)
        matches = self._find_active(wanted)
        if not matches:
            raise CommandError(f"no download of {wanted!r} is in progress; 'status' lists them")
        if len(matches) > 1:
            raise CommandError(f"several downloads match {wanted!r}; cancel one by its id")
        download = matches[0]
        emit(events.event("cancelled", file=download.name, id=download.file_id))
        download.cancel()

    def _cancel_folder(self, wanted, emit):
        """
        Cancel every download below folder C{wanted} (as it is named in
        downloads/, C{photos (1)/} say), those waiting their turn too.
        """
        prefix = wanted.rstrip("/") + "/"
        unqueue = getattr(self._downloads, "unqueue", None)
        dropped = unqueue(lambda name: name.startswith(prefix)) if unqueue else []
        active = [d for d in self._downloads.active.values() if d.name.startswith(prefix)]
        if not active and not dropped:
            raise CommandError(f"no download below {prefix} is in progress; 'status' lists them")
        for download in active:
            emit(events.event("cancelled", file=download.name, id=download.file_id))
            download.cancel()
        if dropped:
            emit(events.event("unqueued", folder=prefix, files=len(dropped)))

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

    def _resolve(self, wanted, many):
        """
        The offers C{wanted} names: by name, by pattern (C{many}), or by id
        prefix.  A name and an id prefix are looked up in the catalog; only
        a pattern goes over every offer.

        @raise CommandError: none, several different files for one name, or
            only files that are here already.
        """
        if many:
            here = {f.file_id for f in self._index.files()}
            matches = sorted(
                (o for o in self._catalog.offers() if fnmatch.fnmatchcase(o.name, wanted)),
                key=lambda o: (o.name, o.file_id),
            )
            fresh = [o for o in matches if o.file_id not in here]
            if not fresh:
                if matches:
                    raise CommandError(f"every file that matches {wanted!r} is here already")
                raise CommandError(f"no known peer offers a file that matches {wanted!r}; 'list' shows what they do")
            return fresh
        matches = self._catalog.named(wanted)
        if not matches and len(wanted) >= 4:
            matches = self._catalog.with_id_prefix(wanted.lower())
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
        if self._index.by_id(offer.file_id) is not None:
            raise CommandError(f"{offer.name} is already here")
        return [offer]

    def _from(self, wanted, chosen):
        """
        C{chosen} C{(offer, target)} pairs, by key, with their peers
        narrowed to those C{wanted} names (by name, address or id prefix).
        """
        known = [p for p in self._table.peers() if _is_peer(p, wanted)]
        if not known:
            raise CommandError(f"no known peer is called {wanted!r}; 'peers' lists them")
        narrowed = {}
        for key, (offer, target) in chosen.items():
            peers = tuple(p for p in offer.peers if _is_peer(p, wanted))
            if not peers:
                raise CommandError(f"{wanted} does not offer {offer.name}; 'list' shows who does")
            narrowed[key] = (type(offer)(offer.file_id, offer.name, offer.size, peers), target)
        return narrowed

    def _start(self, chosen, emit, origin):
        """
        Start a download of each C{(offer, target)} of C{chosen}, into
        C{target} below the downloads folder; a Deferred that fires when
        they are all over.  One file starts at once; several wait their
        turn in the downloads' queue.
        """
        emit(events.event(
            "download-requested",
            files=[
                {"file": target, "id": o.file_id, "sources": len(o.peers)}
                for o, target in chosen
            ],
        ))
        running = []
        for offer, target in chosen:
            report = self._reporter(emit, origin)
            if len(chosen) == 1:
                try:
                    d = self._downloads.start(target, offer.file_id, offer.peers, report)
                except DownloadFailed as e:
                    emit(events.error(str(e), file=target, id=offer.file_id))
                    continue
            else:
                d = self._downloads.queue(target, offer.file_id, offer.peers, report)
            running.append(d.addErrback(self._failed, emit))
        if len(running) == 1:
            return running[0]
        return defer.gatherResults(running, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure
        )

    def _resume_folder(self, wanted, emit, origin):
        """
        Go on with a folder download into the folder of downloads/ it made
        (C{photos/} for C{resume photos/}): the files there already with the
        content the peers offer are kept, a file stopped part way resumes
        from its verified chunks, and the others are fetched.
        """
        # The index is a snapshot (replaced, never changed), so the whole of
        # it can be read in the thread: over 100,000 files, the offers below
        # the folder and what is here take longer than a turn of the reactor.
        local = self._index.files() if self._index is not None else ()
        d = self._run(self._resume_plan, wanted, local)

        def start(plan):
            folder, top, kept, rest = plan
            return self._start_folder(folder, rest, emit, origin, into=top, kept=kept)

        return d.addCallback(start)

    def _resume_plan(self, wanted, local):
        """
        C{(folder, its top folder in downloads/, the items there already,
        the items to fetch)} for C{resume wanted}, from the index's files
        C{local}.  Says nothing itself: it runs in a thread.

        @raise CommandError: nothing offered below the folder, or no such
            folder in downloads/.
        """
        folder, items = self._resolve_folder(wanted)
        top = leaf(folder)
        if not self._downloads.folder_here(top):
            raise CommandError(
                f"there is no folder {top}/ in downloads/ to resume; "
                f"'download {folder}/' fetches it"
            )
        known = {f.path: (f.signature, f.file_id) for f in local if hasattr(f, "signature")}
        entries = [(f"{top}/{below}", offer.file_id, offer.size) for offer, below in items]
        here = self._downloads.already_here(entries, known)
        kept = [item for item, there in zip(items, here) if there]
        rest = [item for item, there in zip(items, here) if not there]
        return folder, top, kept, rest

    def _start_folder(self, folder, items, emit, origin, into=None, kept=()):
        """
        Download every C{(offer, path below folder)} of C{items} into one
        new folder of downloads/, keeping the tree.  The folder's name is
        decided once, before any file arrives: C{folder}'s own name, or
        C{name (1)} and so on if that is taken.  Each file is verified and
        renamed into place on its own, and the whole is summed up at the
        end.

        With C{into}, the files go into that folder of downloads/ as it is
        (a resumed folder download), and C{kept} are the C{(offer, path)}
        found there already, which are not fetched.
        """
        resumed = into is not None
        top = into if resumed else self._downloads.free_folder(leaf(folder))
        started = self._clock.seconds()
        total = sum(offer.size for offer, _ in items)
        here = {"here": len(kept), "here_size": sum(o.size for o, _ in kept)} if resumed else {}
        emit(events.event(
            "folder-requested", folder=folder + "/", into=top + "/",
            existed=not resumed and top != leaf(folder), resumed=resumed,
            files=len(items), size=total, **here,
        ))
        outcome = {"done": 0, "failed": 0, "bytes": 0}
        running = []
        for offer, below in items:
            target = f"{top}/{below}"
            report = self._reporter(emit, origin, folder=folder + "/")
            d = self._downloads.queue(target, offer.file_id, offer.peers, report)

            def ok(result, size=offer.size):
                outcome["done"] += 1
                outcome["bytes"] += size

            def failed(failure):
                outcome["failed"] += 1
                failure.trap(CommandError, DownloadFailed)
                if not getattr(failure.value, "reported", False):
                    emit(events.error(failure.getErrorMessage()))

            running.append(d.addCallbacks(ok, failed))

        def summed(_):
            emit(events.event(
                "folder-finished", folder=folder + "/", into=top + "/",
                files=outcome["done"], failed=outcome["failed"], size=outcome["bytes"],
                seconds=round(self._clock.seconds() - started, 3), **here,
            ))

        return defer.DeferredList(running, consumeErrors=True).addCallback(summed)

    def _reporter(self, emit, origin, folder=None):
        """
        Where a download's events go: the record of partial downloads, the
        face that asked, and every other face.  The events of a file of a
        folder download name the folder (the faces sum those up).
        """
        face = getattr(origin, "face", None)

        def report(e):
            if folder is not None:
                e = dict(e, folder=folder)
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


def _split_options(args):
    """
    The names of a C{download}, its C{--from PEER} if any, and whether
    C{--folder} was given.
    """
    names, source, as_folder = [], None, False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--folder":
            as_folder = True
            i += 1
            continue
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
        raise CommandError("download needs a file: download FILE... [--folder] [--from PEER]")
    return names, source, as_folder


def _add_availability(row, offer, catalog):
    """
    Add to a file's C{list} row the share of its chunks the known peers
    hold, the fewest copies of any chunk and whether anyone holds it whole:
    what is left of it once its origin left.
    """
    availability = getattr(catalog, "availability", None)
    if availability is None:
        return
    reachable, copies = availability(offer.file_id, chunk_count(offer.size))
    row["available"] = round(reachable, 4)
    row["copies"] = copies + (1 if row["here"] else 0)
    row["whole"] = row["here"] or any(
        catalog.holds_whole(peer.peer_id, offer.file_id) for peer in offer.peers
    )


def _list_rows(local, catalog, pattern, folder):
    """
    C{(file rows, folder rows)} of a C{list}: one row per path and content
    (a folder may hold the same content twice, and it counts its files).
    With a C{pattern}, every file whose path matches; else the files
    directly in C{folder} (C{""} for the top, else a path ending in C{/})
    and one row per subfolder, summing its files (count, size, how many are
    here) and naming every peer that has any.  Runs in a thread.
    """
    here = {f.file_id for f in local}
    rows = {}
    folders = {}
    counted = set()
    cut = len(folder)

    def wanted(name):
        if pattern is not None:
            return _matches(pattern, name), -1
        if not name.startswith(folder):
            return False, -1
        return True, name.find("/", cut)

    def fold(name, file_id, size, in_here, sources):
        key = (name, file_id)
        path = name[: slash_at[0] + 1]
        row = folders.get(path)
        if row is None:
            row = folders[path] = {"name": path, "files": 0, "size": 0, "here": 0,
                                   "where": [], "sources": {}}
        if key not in counted:
            counted.add(key)
            row["files"] += 1
            row["size"] += size
            row["here"] += 1 if in_here else 0
        for label, name_of in sources:
            row["sources"].setdefault(label, name_of)

    slash_at = [-1]
    for f in local:
        show, slash = wanted(f.name)
        if not show:
            continue
        if slash >= 0:
            slash_at[0] = slash
            fold(f.name, f.file_id, f.size, True, ())
            continue
        row = rows.setdefault((f.name, f.file_id), _row(f.name, f.size, f.file_id))
        row["here"] = True
        if "here" not in row["where"]:
            row["where"].append("here")
    for offer in catalog.paths():
        show, slash = wanted(offer.name)
        if not show:
            continue
        sources = [(peer.label, _name_of(peer)) for peer in offer.peers]
        if slash >= 0:
            slash_at[0] = slash
            fold(offer.name, offer.file_id, offer.size, offer.file_id in here, sources)
            continue
        row = rows.get((offer.name, offer.file_id))
        if row is None:
            row = rows[offer.name, offer.file_id] = _row(offer.name, offer.size, offer.file_id)
            if offer.file_id in here:
                row["here"] = True
                row["where"].append("here")
        for label, name_of in sources:
            row["where"].append(label)
            row["sources"].append({"peer": label, "name": name_of})
        _add_availability(row, offer, catalog)
    files = sorted(rows.values(), key=lambda f: (f["name"], f["id"]))
    summed = []
    for path in sorted(folders):
        row = folders[path]
        sources = row.pop("sources")
        row["where"] = list(sources)
        row["sources"] = [{"peer": label, "name": n} for label, n in sources.items()]
        summed.append(row)
    return files, summed


