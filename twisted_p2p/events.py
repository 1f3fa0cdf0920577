"""
Events: what the peer tells whoever asked, or whoever listens, as plain
dicts.

Every event has an C{event} kind and fields for scripts
(C{p2ppeer-ctl --json}), structured logs and the faces, which turn them into
words (see L{twisted_p2p.render}).  An event may still carry a C{text} for
people, written where it happened; the faces use it only for kinds they do
not know.

L{EventHub} carries what the peer does on its own (peers joining and
leaving, uploads, downloads started by another face) to every face that
listens.
"""

from twisted.logger import Logger

log = Logger()


def event(kind, text=None, **fields):
    """
    An event of C{kind} with C{fields}; C{text}, if given, is the words a
    face shows for a kind it does not know.
    """
    e = dict(fields, event=kind)
    if text is not None:
        e["text"] = text
    return e


def error(message, **fields):
    """
    An error event: shown as one line, C{error: message}.
    """
    return event("error", message=message, **fields)


def is_failure(e):
    """
    Whether an event reports a failure (a script should exit non-zero).
    """
    return e.get("event") in (
        "error", "download-failed", "download-cancelled", "download-stopped"
    )


class EventHub:
    """
    Owns the listeners of the peer's own events, and hands each published
    event to every one of them.

    A listener is C{listener(event)}, subscribed with an C{owner} (a face: the
    console, a control connection).  An event published with an C{origin}
    skips the listeners that origin owns: the face that asked for a
    download already gets its events as the answer to its command.
    """

    #: Events that stand until another clears them (discovery can send
    #: nowhere, then can again): a face that subscribes later is told the
    #: standing one at once, so a console opened after the first announce
    #: round still says it.  Kind -> topic.
    STANDING = {"discovery-problem": "discovery", "discovery-restored": "discovery"}

    def __init__(self):
        self._listeners = []
        self._standing = {}

    def subscribe(self, listener, owner=None):
        """
        Call C{listener(event)} for every event published from now on.

        @return: a function that ends the subscription.
        """
        entry = (listener, owner)
        self._listeners.append(entry)
        for e in list(self._standing.values()):
            listener(e)

        def unsubscribe():
            if entry in self._listeners:
                self._listeners.remove(entry)

        return unsubscribe

    def publish(self, e, origin=None):
        """
        Hand C{e} to every listener, but those C{origin} owns.  A listener
        that raises is logged and the others still get the event.
        """
        topic = self.STANDING.get(e.get("event"))
        if topic is not None:
            if e["event"].endswith("-problem"):
                self._standing[topic] = e
            else:
                self._standing.pop(topic, None)
        for listener, owner in list(self._listeners):
            if origin is not None and owner is origin:
                continue
            try:
                listener(e)
            except Exception:
                log.failure("A listener of {kind} events failed", kind=e.get("event"))

    def __len__(self):
        return len(self._listeners)
