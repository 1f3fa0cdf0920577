"""
Where a peer's logs go, and in which format.

Human-readable lines by default; JSON lines (one event per line, every
structured field kept) for journald or a log shipper.  A log file opened here
is reopened on SIGHUP, so logrotate can move it away.
"""

import sys

from twisted.logger import jsonFileLogObserver, textFileLogObserver

LOG_FORMATS = ("text", "json")


class ReopenableFile:
    """
    A text file, appended to, that can be reopened at the same path after
    logrotate renamed it.
    """

    def __init__(self, path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, text):
        self._file.write(text)

    def flush(self):
        self._file.flush()

    def reopen(self):
        old, self._file = self._file, open(self.path, "a", encoding="utf-8")
        old.close()

    def close(self):
        self._file.close()


def observer_for(stream, log_format):
    """
    A log observer writing to C{stream} in C{log_format} (C{text} or C{json}).
    """
    if log_format == "json":
        return jsonFileLogObserver(stream, recordSeparator="")
    return textFileLogObserver(stream)


def json_stdout():
    """
    A log observer factory for C{twistd --logger twisted_p2p.logs.json_stdout}:
    JSON lines on stdout, for journald under systemd.
    """
    return observer_for(sys.stdout, "json")
