"""
The record of downloads that stopped before the end: what the user may
resume, and why each stopped.

The verified chunks themselves are kept by storage, in hidden files in
C{downloads/}; this record only remembers, across restarts, which they are
for (name, id, size, how far, why it stopped), so that C{status} can list
them and C{resume FILE} can find them by name.  It is fed with the download
events that pass through the command layer, and kept as a small JSON file in
the state dir.
"""

import json
import os

from twisted.logger import Logger

from twisted_p2p.limits import MAX_RECORDED_PARTIALS

log = Logger()

#: The record's file name in the state dir.
RECORD_NAME = "partial-downloads.json"

#: Downloads remembered at most (see limits.py).
MAX_RECORDED = MAX_RECORDED_PARTIALS


class PartialDownloads:
    """
    Owns the record of stopped and failed downloads, by file id.

    @param path: the record's file, or C{None} to keep it in memory only.
    """

    def __init__(self, path=None):
        self._path = path
        self._entries = _load(path) if path else {}
        #: How far each download in progress has got, and its size, by id.
        self._percent = {}
        self._sizes = {}

    def stopped(self):
        """
        The stopped downloads, oldest first: dicts of C{file}, C{id},
        C{size}, C{percent} and C{reason}.
        """
        return [dict(entry) for entry in self._entries.values()]

    def find(self, wanted):
        """
        The stopped downloads whose name is C{wanted}, or whose id starts
        with it (four characters at least).
        """
        prefix = wanted.lower() if len(wanted) >= 4 else None
        return [
            dict(entry)
            for entry in self._entries.values()
            if entry["file"] == wanted or (prefix and entry["id"].startswith(prefix))
        ]

    def percent(self, file_id):
        """
        How far a download got, as last reported; C{None} if unknown.
        """
        if file_id in self._percent:
            return self._percent[file_id]
        entry = self._entries.get(file_id)
        return entry.get("percent") if entry else None

    def observe(self, e):
        """
        Follow one download event.
        """
        kind, file_id = e.get("event"), e.get("id")
        if not isinstance(file_id, str) or not isinstance(e.get("file"), str):
            return
        if kind == "download-started":
            size = e.get("size") or 0
            resumed = e.get("resumed") or 0
            self._percent[file_id] = 100 * resumed // size if size else 0
            self._sizes[file_id] = e.get("size")
        elif kind == "download-progress":
            if isinstance(e.get("percent"), int):
                self._percent[file_id] = e["percent"]
        elif kind in ("download-stopped", "download-failed"):
            percent = self.percent(file_id)
            if percent is None or (kind == "download-failed" and not percent):
                # Failed before a chunk was kept: there is nothing to resume.
                self._percent.pop(file_id, None)
                return
            size = self._sizes.pop(file_id, None)
            if size is None:
                size = self._entries.get(file_id, {}).get("size")
            self._entries.pop(file_id, None)
            self._entries[file_id] = {
                "file": e["file"],
                "id": file_id,
                "size": size,
                "percent": percent,
                "reason": _why(e),
            }
            while len(self._entries) > MAX_RECORDED:
                del self._entries[next(iter(self._entries))]
            self._percent.pop(file_id, None)
            self._save()
        elif kind in ("download-finished", "download-cancelled"):
            self._percent.pop(file_id, None)
            self._sizes.pop(file_id, None)
            if self._entries.pop(file_id, None) is not None:
                self._save()

    def _save(self):
        if self._path is None:
            return
        temporary = self._path + ".tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(list(self._entries.values()), f)
            os.replace(temporary, self._path)
        except OSError as e:
            log.warn("Could not save the record of partial downloads {path}: {error}",
                     path=self._path, error=e)


def _why(e):
    """
    Why a download stopped, in a few words.
    """
    if e.get("event") == "download-stopped":
        return "the peer stopped"
    reason = e.get("reason")
    return str(reason) if reason else "failed"


def _load(path):
    """
    The record at C{path}; an empty one if it is missing or damaged (it is
    only a convenience: the partial data resumes on a plain C{download}).
    """
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    record = {}
    if not isinstance(entries, list):
        return record
    for entry in entries[-MAX_RECORDED:]:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and isinstance(entry.get("id"), str)
            and (entry.get("size") is None or isinstance(entry.get("size"), int))
            and (entry.get("percent") is None or isinstance(entry.get("percent"), int))
        ):
            record[entry["id"]] = {
                "file": entry["file"],
                "id": entry["id"],
                "size": entry.get("size"),
                "percent": entry.get("percent"),
                "reason": str(entry.get("reason") or "stopped"),
            }
    return record
