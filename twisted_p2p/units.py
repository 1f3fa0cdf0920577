"""
Sizes, rates and durations, for people and from people: one unit system
everywhere.

Sizes and rates are binary: 1 KiB = 1024 B, 1 MiB = 1024 KiB, 1 GiB =
1024 MiB.  The console, C{p2ppeer-ctl} and the log show them so, and the
option suffixes read them so: C{--max-upload-rate 25M} is 25 MiB/s, the rate
the console then shows.
"""

import math

#: Binary multiples, in the order they are shown.
_UNITS = ("KiB", "MiB", "GiB", "TiB")

#: What an option's suffix multiplies by: K, M, G, T, alone or as KiB, KB...
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def human_size(n):
    """
    C{n} bytes for people: C{"512 B"}, C{"1.5 MiB"}.
    """
    if n < 1024:
        return f"{n:.0f} B"
    for unit in _UNITS:
        n /= 1024
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.1f} {unit}"


def human_rate(bytes_per_second):
    """
    A rate for people: C{"12.5 MiB/s"}.
    """
    return f"{human_size(bytes_per_second)}/s"


def human_duration(seconds, precise=False):
    """
    A duration for people: C{"45 s"}, C{"1 min 30 s"}, C{"2 h 5 min"}.

    @param precise: two decimals under ten seconds (C{"2.51 s"}), so that a
        fast download does not take "0 s".
    """
    seconds = max(0.0, float(seconds))
    if precise and seconds < 10:
        return f"{seconds:.2f} s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min" + (f" {secs} s" if secs else "")
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h" + (f" {minutes} min" if minutes else "")


def parse_size(text):
    """
    A number of bytes (or bytes per second) from C{text}: C{"500000"},
    C{"800K"}, C{"25M"}, C{"1.5GiB"}, C{"25 MiB/s"}.  Suffixes are binary,
    as everywhere in the project.

    @raise ValueError: not a size, or not a finite, non-negative one.
    """
    value = str(text).strip().upper().replace(" ", "")
    value = value.removesuffix("/S").removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SUFFIXES and value[-1:] else ""
    number = float(value[: len(value) - len(unit)])
    size = number * _SUFFIXES[unit]
    if not math.isfinite(size) or size < 0:
        raise ValueError(f"not a size: {text!r}")
    return int(size)
