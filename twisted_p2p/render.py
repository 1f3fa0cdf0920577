"""
Words for events: how the faces (the console, C{p2ppeer-ctl}) show what the
peer says.

Every kind is rendered from its fields, never from a C{text} written where
the event happened, so that the logic that emits events writes no prose and
a later face (a web page) can render the same fields its own way.  A kind
this module does not know falls back to the event's C{text}, or to its
fields.

Columns are measured in terminal cells (L{wcwidth}), so that a file name in
Japanese or with an emoji does not push the columns after it out of line.
Text of printable ASCII takes a cell a character, and is measured without
it: C{wcwidth} is imported for the first text that needs it, as its tables
cost a peer 2 MiB of memory.
"""

import json

from twisted_p2p.limits import CHUNK_SIZE
from twisted_p2p.units import human_duration, human_rate, human_size

#: Kinds that say what goes on around the user rather than answer them:
#: C{--quiet} leaves them out.
NOTICES = frozenset(
    {"peer-joined", "peer-left", "upload-started", "upload-finished", "source-lost"}
)

#: Events after which a download has no progress bar any more.
ENDINGS = frozenset(
    {"download-finished", "download-failed", "download-cancelled", "download-stopped"}
)

#: Characters in a progress bar.
BAR_WIDTH = 24


def _plain(text):
    """
    Whether C{text} is printable ASCII, a cell a character.
    """
    return text.isascii() and text.isprintable()


def width_of(text):
    """
    How many terminal cells C{text} takes.
    """
    if _plain(text):
        return len(text)
    from wcwidth import wcswidth, wcwidth

    cells = wcswidth(text)
    if cells >= 0:
        return cells
    # A character with no defined width (a control character): count it as
    # one, as most terminals show a replacement for it.
    return sum(max(wcwidth(c), 1) if wcwidth(c) != 0 else 0 for c in text)


def fit(text, cells):
    """
    C{text} cut to at most C{cells} terminal cells, with an ellipsis if cut.
    """
    if width_of(text) <= cells:
        return text
    if _plain(text):
        return text[: max(cells - 1, 0)] + "…"
    from wcwidth import wcwidth

    out, used = [], 0
    for c in text:
        w = max(wcwidth(c), 0)
        if used + w > cells - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…"


def columns(rows):
    """
    Lines of C{rows} (tuples of text) in aligned columns, two spaces apart.
    """
    widths = [max(width_of(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell + " " * (width - width_of(cell)) for cell, width in zip(row, widths)]
        yield "  ".join(cells).rstrip()


def plural(count, word):
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def peer_name(label, name=None):
    """
    A peer for people: its name next to its address, when it has one.
    """
    return f"{name} ({label})" if name else str(label)


def render(e, max_rows=None):
    """
    The lines that show event C{e}.

    @param max_rows: at most this many rows of a long table (C{list}); the
        rest is counted in a last line.  C{None}: every row.
    """
    kind = e.get("event")
    renderer = _RENDERERS.get(kind)
    if renderer is not None:
        try:
            return renderer(e, max_rows)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # fields of another version, or broken: show what there is
    text = e.get("text")
    if isinstance(text, str):
        return text.splitlines() or [""]
    fields = {k: v for k, v in e.items() if k != "event"}
    return [f"{kind}: {json.dumps(fields, ensure_ascii=False, default=str)}"]


# -- answers to commands -------------------------------------------------------


def _error(e, _):
    return [f"error: {e['message']}"]


def _help(e, _):
    rows = [(f"  {usage}", what) for usage, what in e["commands"]]
    return ["commands:", *columns(rows)] + [f"  {line}" for line in e.get("notes", ())]


def _version(e, _):
    return [f"twisted-p2p {e['version']}"]


def _list(e, max_rows):
    files = e["files"]
    folders = e.get("folders") or []
    if not files and not folders:
        where = f"here or on {plural(e.get('peers', 0), 'known peer')}"
        if e.get("pattern"):
            return [f"no file matches {e['pattern']!r} {where}"]
        if e.get("folder"):
            return [f"no folder {e['folder']} {where}"]
        return [f"no files {where}"]
    entries = sorted(
        [("folder", f) for f in folders] + [("file", f) for f in files],
        key=lambda pair: pair[1]["name"],
    )
    shown = entries if max_rows is None else entries[:max_rows]
    # Availability is shown when some file is held whole by nobody known:
    # its origin left, and caches hold it in pieces.
    pieces = any(f.get("whole") is False for kind, f in shown if kind == "file")
    rows = [("NAME", "SIZE", "ID", "AVAILABLE", "WHERE") if pieces else ("NAME", "SIZE", "ID", "WHERE")]
    for kind, f in shown:
        if kind == "folder":
            here = f.get("here") or 0
            where = ["here"] if here == f["files"] else (
                [f"here ({here} of {f['files']})"] if here else [])
            where += [peer_name(s["peer"], s.get("name")) for s in f.get("sources", ())]
            row = [f["name"], human_size(f["size"]), plural(f["files"], "file"), ", ".join(where)]
            if pieces:
                row.insert(3, "")
            rows.append(tuple(row))
            continue
        where = ["here"] if f.get("here") else []
        where += [peer_name(s["peer"], s.get("name")) for s in f.get("sources", ())]
        if f.get("partial"):
            where.append("(partly)")
        row = [f["name"], human_size(f["size"]), f["id"][:8], ", ".join(where)]
        if pieces:
            row.insert(3, _availability(f))
        rows.append(tuple(row))
    lines = list(columns(rows))
    if len(shown) < len(entries):
        lines.append(
            f"... and {len(entries) - len(shown)} more ({len(entries)} in all); "
            "'list PATTERN' shows fewer, p2ppeer-ctl list shows all"
        )
    if folders and not e.get("pattern"):
        lines.append("'list FOLDER/' shows what a folder holds; 'download FOLDER/' fetches it")
    return lines


def _availability(f):
    """
    A file's availability for people: C{100% (2 copies)}, or the share of
    its chunks still to be had when some are on no known peer.
    """
    share = f.get("available")
    if share is None:
        return "-"
    if share >= 1:
        copies = f.get("copies", 0)
        return f"100% ({copies} {'copy' if copies == 1 else 'copies'})"
    return f"{int(share * 100)}% of chunks"


def _cache(e, _):
    quota = e["quota"]
    if not quota:
        head = "cache: this peer hosts nothing for others (--cache-size 0)"
    else:
        head = (
            f"cache: {human_size(e['used'])} of {human_size(quota)} used, "
            f"{human_size(e['free'])} free"
        )
    lines = [head]
    files = e.get("files") or []
    if files:
        rows = [("NAME", "SIZE", "ID", "CHUNKS", "HELD")]
        for f in files:
            total = (f["size"] + CHUNK_SIZE - 1) // CHUNK_SIZE
            rows.append((f["name"], human_size(f["size"]), f["id"][:8],
                         f"{f['chunks']}/{total}", human_size(f["bytes"])))
        lines += list(columns(rows))
    lines.append(
        f"distribution (replicas {e['replicas']}): pushed {plural(e['pushed_chunks'], 'chunk')} "
        f"({human_size(e['pushed_bytes'])}), stored {plural(e['stored_chunks'], 'chunk')} "
        f"({human_size(e['stored_bytes'])}) for others; refused {e['refused_pushes']} push(es), "
        f"{e['refused_offers']} offer(s) were refused in part or whole"
        + (f"; {e['banned_pushers']} address(es) banned for bad chunks"
           if e.get("banned_pushers") else "")
    )
    return lines


def _peers(e, _):
    peers = e["peers"]
    if not peers:
        lines = ["no peers known yet"]
    else:
        named = any(p.get("name") for p in peers)
        header = ("PEER", "NAME", "ID", "FILES", "LAST HEARD") if named else (
            "PEER", "ID", "FILES", "LAST HEARD")
        rows = [header]
        for p in peers:
            heard = f"{human_duration(p['last_heard'])} ago"
            cells = [p["peer"], p["id"][:8], str(p["files"]), heard]
            if named:
                cells.insert(1, p.get("name") or "-")
            rows.append(tuple(cells))
        lines = list(columns(rows))
    dropped = e.get("dropped") or {}
    if dropped:
        counts = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        lines.append(f"discovery datagrams dropped: {counts}")
    return lines


def _eta(eta):
    return "?" if eta is None else human_duration(eta)


def _done(t):
    size = t.get("size")
    if size is None:
        return "connecting"
    return f"{t['percent']}% ({human_size(t['bytes'])} of {human_size(size)})"


def _status(e, _):
    transfers, stopped = e["transfers"], e.get("stopped", ())
    lines = []
    if transfers:
        rows = [("FILE", "DONE", "RATE", "SOURCES", "ETA")]
        for t in transfers:
            rows.append((t["file"], _done(t), _rate(t), str(t["sources"]), _eta(t["eta"])))
        lines += columns(rows)
    else:
        lines.append("no downloads in progress")
    waiting = e.get("waiting") or ()
    if waiting:
        names = ", ".join(waiting[:3]) + (", ..." if len(waiting) > 3 else "")
        lines.append(f"{plural(len(waiting), 'file')} waiting their turn: {names}")
    if stopped:
        lines.append("stopped or partial ('resume FILE' continues one):")
        rows = [("FILE", "DONE", "WHY")]
        for s in stopped:
            done = "?" if s.get("percent") is None else f"{s['percent']}%"
            size = s.get("size")
            if size is not None:
                done += f" of {human_size(size)}"
            rows.append((s["file"], done, s.get("reason") or "stopped"))
        lines += ["  " + line for line in columns(rows)]
    if e.get("partial_files") and (transfers or stopped):
        lines.append(f"partial downloads are kept, hidden, as {e['partial_files']}")
    return lines


def _rate(t):
    if not t.get("rate"):
        return "waiting" if not t.get("bytes") or t.get("size") is None else "-"
    return human_rate(t["rate"])


def _cancelled(e, _):
    return [f"cancelling {e['file']}"]


def _unqueued(e, _):
    return [f"dropped {plural(e['files'], 'file')} of {e['folder']} that had not started"]


def _bye(e, _):
    return ["bye"]


def _exit_confirm(e, _):
    busy = [f"the download of {d['file']} at {d['percent']}%" for d in e.get("downloads", ())]
    if e.get("uploads"):
        busy.append(plural(e["uploads"], "upload") + " to other peers")
    later = "; downloads resume later" if e.get("downloads") else ""
    return [
        f"leaving now interrupts {' and '.join(busy)}{later}. "
        "Type exit again, or exit!, to leave"
    ]


def _input_closed(e, _):
    return [
        "console input closed; the peer keeps running: stop it with "
        f"'{e['stop']}' or kill {e['pid']}"
    ]


def _folder_requested(e, _):
    if e.get("resumed"):
        return [
            f"resuming folder {e['folder']} in {e['into']}: {plural(e['files'], 'file')} "
            f"({human_size(e['size'])}) to fetch, {plural(e.get('here', 0), 'file')} "
            f"({human_size(e.get('here_size', 0))}) already there"
        ]
    line = (
        f"downloading folder {e['folder']} ({plural(e['files'], 'file')}, "
        f"{human_size(e['size'])}) into {e['into']}"
    )
    if e.get("existed"):
        name = e["folder"].rstrip("/").rsplit("/", 1)[-1]
        line += f" ({name}/ already existed; 'resume {name}/' goes on with it there)"
    return [line]


def _folder_finished(e, _):
    seconds = max(float(e["seconds"]), 1e-6)
    line = (
        f"downloaded folder {e['folder']} to {e['into']}: {plural(e['files'], 'file')}, "
        f"{human_size(e['size'])} in {human_duration(seconds, precise=True)}"
    )
    if e.get("here"):
        line += f"; {plural(e['here'], 'file')} already there"
    if e.get("failed"):
        retry = f"'resume {e['into']}'" if "here" in e else "'download' again"
        line += f"; {plural(e['failed'], 'file')} failed (see above), {retry} retries"
    return [line]


def _requested(e, _):
    files = e["files"]
    if len(files) == 1:
        f = files[0]
        return [f"asking {plural(f['sources'], 'peer')} for {f['file']}"]
    names = ", ".join(f["file"] for f in files)
    return [f"downloading {len(files)} files: {names}"]


# -- downloads -------------------------------------------------------------------


def _started(e, _):
    if e.get("folder"):
        return []
    line = (
        f"download {e['file']}: {human_size(e['size'])} in {plural(e['chunks'], 'chunk')} "
        f"from {plural(e['sources'], 'peer')}"
    )
    from_cache = e.get("from_cache") or 0
    if (e.get("resumed") or 0) > from_cache:
        line += f", resuming with {human_size(e['resumed'] - from_cache)} already here"
    if from_cache:
        line += f", {human_size(from_cache)} copied from this peer's cache"
    if e.get("requested_by"):
        line += f" (asked for by {e['requested_by']})"
    return [line]


def _progress(e, _):
    line = f"download {e['file']}: {_done(e)}"
    if e.get("rate"):
        line += f" at {human_rate(e['rate'])}"
    elif not e.get("bytes"):
        line += ", waiting for data"
    line += f" from {plural(e['sources'], 'peer')}"
    if e.get("eta") is not None:
        line += f", {human_duration(e['eta'])} left"
    return [line]


def _finished(e, _):
    if e.get("folder"):
        return []
    path = e["path"].replace("\\", "/")
    renamed = "" if path.endswith("/" + e["file"]) or path == e["file"] else (
        f" ({e['file']} already existed)")
    resumed = e.get("resumed") or 0
    rate = human_rate(e["rate"])
    if resumed:
        # The rate of what was fetched now, not of the part already here.
        fetched = max(e["size"] - resumed, 0) / max(float(e["seconds"]), 1e-6)
        rate = f"{human_rate(fetched)}; {human_size(resumed)} was already here"
        if resumed >= e["size"]:
            rate = "all of it was already here"
    return [
        f"downloaded {e['file']} to {path}{renamed}: {human_size(e['size'])} in "
        f"{human_duration(e['seconds'], precise=True)} ({rate})"
    ]


def _failed(e, _):
    return [f"error: {e['reason']}"]


def _stopped(e, _):
    at = f" at {e['percent']}%" if e.get("percent") is not None else ""
    return [f"download {e['file']} stopped{at}; 'resume {e['file']}' continues it"]


def _download_cancelled(e, _):
    return [f"download {e['file']} cancelled"]


def _banned(e, _):
    return [
        f"{peer_name(e['peer'], e.get('name'))} sent bad data {plural(e['strikes'], 'time')} "
        "and is banned for this session"
    ]


def _unreachable(e, _):
    return [
        f"download {e['file']}: {e['peer']} could not connect back to our receiver port; "
        "a firewall may block it, or --host is not an address that peer can reach"
    ]


def _source_lost(e, _):
    line = f"download {e['file']}: lost {peer_name(e['peer'], e.get('name'))} ({e['reason']})"
    if e.get("others", 1):
        line += "; going on with the other sources"
    return [line]


# -- the peer's own doings -------------------------------------------------------


def _upload_started(e, _):
    return [f"sending {e['file']} to {peer_name(e['peer'], e.get('name'))}"]


def _upload_finished(e, _):
    seconds = max(float(e["seconds"]), 1e-6)
    return [
        f"sent {e['file']} to {peer_name(e['peer'], e.get('name'))}: "
        f"{human_size(e['bytes'])} in {human_duration(seconds, precise=True)} "
        f"({human_rate(e['bytes'] / seconds)})"
    ]


def _peer_joined(e, _):
    return [f"peer {peer_name(e['peer'], e.get('name'))} joined"]


def _peer_left(e, _):
    return [f"peer {peer_name(e['peer'], e.get('name'))} left ({e['reason']})"]


_RENDERERS = {
    "error": _error,
    "help": _help,
    "version": _version,
    "list": _list,
    "peers": _peers,
    "status": _status,
    "cache": _cache,
    "cancelled": _cancelled,
    "bye": _bye,
    "unqueued": _unqueued,
    "exit-confirm": _exit_confirm,
    "input-closed": _input_closed,
    "download-requested": _requested,
    "folder-requested": _folder_requested,
    "folder-finished": _folder_finished,
    "download-started": _started,
    "download-progress": _progress,
    "download-finished": _finished,
    "download-failed": _failed,
    "download-stopped": _stopped,
    "download-cancelled": _download_cancelled,
    "peer-banned": _banned,
    "source-unreachable": _unreachable,
    "source-lost": _source_lost,
    "upload-started": _upload_started,
    "upload-finished": _upload_finished,
    "peer-joined": _peer_joined,
    "peer-left": _peer_left,
}


def progress_bar(progress, cells=80):
    """
    The bar line of the downloads in C{progress} (their latest progress
    events, in the order they started), at most C{cells} wide.
    """
    parts = []
    for e in progress:
        percent = max(0, min(100, int(e.get("percent") or 0)))
        # No rate yet: "waiting" before the first byte, else nothing rather
        # than a "0 B/s" that is not true.
        rate = human_rate(e["rate"]) if e.get("rate") else ("" if e.get("bytes") else "waiting")
        if len(progress) == 1:
            filled = BAR_WIDTH * percent // 100
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            size = e.get("size")
            amount = (
                f"{human_size(e.get('bytes') or 0)}/{human_size(size)}" if size is not None else ""
            )
            eta = e.get("eta")
            left = "" if eta is None else f", {human_duration(eta)} left"
            words = [f"{e.get('file', '?')} [{bar}] {percent}%", amount, rate,
                     f"from {plural(e.get('sources', 0), 'peer')}{left}"]
            parts.append(" ".join(w for w in words if w))
        else:
            parts.append(" ".join(w for w in (f"{e.get('file', '?')} {percent}%", rate) if w))
    return fit(" | ".join(parts), max(cells, 10))
