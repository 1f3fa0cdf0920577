"""
What is a legal shared name or path, and where one may be written.

A name that comes from the network or the console is one plain file name.
A shared I{path} (C{photos/2026/a.jpg}) is a few legal names joined by
C{/}, the only separator on the wire: no empty part, no C{.} or C{..}, no
leading C{/}, at most L{MAX_PATH_DEPTH} parts and L{MAX_PATH_BYTES} bytes.
Every part is checked as a name, so a path can only ever go down into one
of the peer's own folders, never up or out of it.
"""

import bisect
import os
import unicodedata

from twisted_p2p.limits import MAX_NAME_BYTES, MAX_PATH_BYTES, MAX_PATH_DEPTH

#: Unicode categories that must never reach a listing, a terminal or a log
#: line from the network: controls (escape sequences, newlines), format
#: characters (bidirectional overrides), surrogates, private use,
#: unassigned, and line and paragraph separators (text must stay on one line).
UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


class BadName(ValueError):
    """
    A name that may not be shared or written.
    """


def check_name(name):
    """
    Return C{name} if it is a legal shared file name, else raise L{BadName}.

    Legal names are non-empty text, at most L{MAX_NAME_BYTES} UTF-8 bytes,
    with no path separator, no control character, not starting with a dot
    (hidden files and our own partial files start with one), and not the
    Windows-hostile trailing dot or space.
    """
    if not isinstance(name, str) or not name:
        raise BadName("a file name must be non-empty text")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadName("a file name must be valid UTF-8")
    if len(encoded) > MAX_NAME_BYTES:
        raise BadName(f"a file name is at most {MAX_NAME_BYTES} bytes")
    if "/" in name or "\\" in name:
        raise BadName("a file name may not contain / or \\")
    if name.startswith("."):
        raise BadName("a file name may not start with a dot")
    if name != name.strip() or name.endswith("."):
        raise BadName("a file name may not start or end with a space, or end with a dot")
    # str.isprintable() is false for every character of UNSAFE_CATEGORIES
    # (and for spaces but " ", which are allowed): a name it passes needs
    # no walk, which costs a call per character (most of the time taken
    # to read a catalog of 100,000 paths).
    if not name.isprintable():
        for ch in name:
            if unicodedata.category(ch) in UNSAFE_CATEGORIES:
                raise BadName("a file name may not contain control or unassigned characters")
    return name


def _accepts(check, value):
    try:
        check(value)
    except BadName:
        return False
    return True


def is_legal_name(name):
    """
    Whether L{check_name} accepts C{name}.
    """
    return _accepts(check_name, name)


def check_path(path):
    """
    Return C{path} if it is a legal shared path, else raise L{BadName}.

    A path is one or more legal names (L{check_name}) joined by C{/}; a
    single name is a path too.
    """
    if not isinstance(path, str) or not path:
        raise BadName("a path must be non-empty text")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise BadName("a path must be valid UTF-8")
    if len(encoded) > MAX_PATH_BYTES:
        raise BadName(f"a path is at most {MAX_PATH_BYTES} bytes")
    parts = path.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise BadName(f"a path has at most {MAX_PATH_DEPTH} parts")
    for part in parts:
        if not part:
            raise BadName("a path may not start or end with /, nor hold //")
        check_name(part)
    return path


def is_legal_path(path):
    """
    Whether L{check_path} accepts C{path}.
    """
    return _accepts(check_path, path)


def leaf(path):
    """
    The last part of a path: its file (or folder) name.
    """
    return path.rsplit("/", 1)[-1]


def next_parts(candidates, typed):
    """
    What C{typed} may complete to among C{candidates} (paths, sorted): each
    one that starts with it, cut after the next C{/} past it, so that a tree
    completes one folder at a time (C{ph} gives C{photos/}, then
    C{photos/2026/}...).

    Found by bisection, and a folder's paths are stepped over at once: a
    catalog of 100,000 paths completes in a few steps, not a walk of them.
    """
    found = set()
    i = bisect.bisect_left(candidates, typed)
    while i < len(candidates):
        name = candidates[i]
        if not name.startswith(typed):
            break
        slash = name.find("/", len(typed))
        if slash < 0:
            found.add(name)
            i += 1
            continue
        folder = name[: slash + 1]
        found.add(folder)
        # The paths below the folder sort together, before folder[:-1] + "0"
        # ("0" follows "/").
        i = bisect.bisect_left(candidates, folder[:-1] + "0", i + 1)
    return found


def local_path(folder, path):
    """
    Where shared C{path} is inside C{folder}, after checking the path.

    The result is always below C{folder}.
    """
    check_path(path)
    joined = os.path.join(folder, *path.split("/"))
    top = os.path.abspath(folder)
    if os.path.commonpath([top, os.path.abspath(joined)]) != top or joined == folder:
        raise BadName("a path must stay inside its folder")
    return joined


def path_in(folder, name):
    """
    The path of C{name} inside C{folder}, after checking the name.

    The result is always a direct child of C{folder}.
    """
    check_name(name)
    path = os.path.join(folder, name)
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
        raise BadName("a file name must stay inside its folder")
    return path


def free_name(folder, name, exists=os.path.lexists):
    """
    A name in C{folder} that nothing uses yet, derived from C{name}.

    C{report.pdf} becomes C{report (1).pdf}, C{report (2).pdf}, ... so a
    download never overwrites a file that is already there.
    """
    check_name(name)
    if not exists(os.path.join(folder, name)):
        return name
    stem, ext = os.path.splitext(name)
    n = 1
    while True:
        candidate = f"{stem} ({n}){ext}"
        if len(candidate.encode("utf-8")) > MAX_NAME_BYTES:
            # Shorten the stem rather than fail on a long name.  When the
            # extension leaves no room for a stem, treat it as part of the
            # stem: an empty stem would loop forever or give " (1).ext".
            if len(stem) > 1:
                stem = stem[:-1]
            else:
                stem, ext = stem + ext, ""
            continue
        if not exists(os.path.join(folder, candidate)):
            return candidate
        n += 1
