"""
L{twisted_p2p.units}: one binary unit system for what is shown and what is
typed.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_p2p.units import human_duration, human_rate, human_size, parse_size


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536 * 1024, "1.5 MiB"), (5 << 40, "5.0 TiB")],
)
def test_human_size(n, text):
    assert human_size(n) == text


def test_human_rate():
    assert human_rate(3 << 20) == "3.0 MiB/s"


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0 s"), (7.4, "7 s"), (59.6, "1 min"), (90, "1 min 30 s"), (3600, "1 h"),
     (3600 + 5 * 60 + 7, "1 h 5 min"), (-3, "0 s")],
)
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


def test_precise_duration_under_ten_seconds():
    assert human_duration(2.514, precise=True) == "2.51 s"
    assert human_duration(12.4, precise=True) == "12 s"


@pytest.mark.parametrize(
    "text, n",
    [("0", 0), ("500000", 500000), ("800K", 800 << 10), ("25M", 25 << 20), ("25m", 25 << 20),
     ("1.5G", 3 << 29), ("25MiB", 25 << 20), ("25 MiB/s", 25 << 20), ("25MB", 25 << 20),
     ("512B", 512), ("2T", 2 << 40)],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "B", "fast", "-1M", "inf", "nan", "1X", "K"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_a_shown_size_reads_back_close(n):
    """What the console shows, typed back as an option, is within 5%."""
    shown = human_size(n).replace(" ", "")
    assert abs(parse_size(shown) - n) <= max(0.05 * n, 1)


@given(st.text(max_size=12))
def test_parse_size_never_crashes(text):
    try:
        parse_size(text)
    except ValueError:
        pass
