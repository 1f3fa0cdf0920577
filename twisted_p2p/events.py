"""
Events: what the peer tells whoever asked, as plain dicts.

Every event has a C{event} kind and a C{text} for people (possibly several
lines); the other fields are for scripts (C{p2ppeer-ctl --json}) and for
structured logs.  The console prints the text; the control socket sends the
whole event as one JSON line.
"""


def event(kind, text, **fields):
    """
    An event of C{kind}, with C{text} for people and C{fields} for scripts.
    """
    return dict(fields, event=kind, text=text)


def error(message, **fields):
    """
    An error event: one line, C{error: message}.
    """
    return event("error", f"error: {message}", message=message, **fields)


def is_failure(e):
    """
    Whether an event reports a failure (a script should exit non-zero).
    """
    return e.get("event") in (
        "error", "download-failed", "download-cancelled", "download-stopped"
    )
