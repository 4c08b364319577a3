"""Durations on the command line: ``90s``, ``15m``, ``2h``, ``7d``."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ValueError naming the accepted forms."""
    m = _RX.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration; use a number and a unit: 90s, 15m, 2h, 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def format_seconds(value: float) -> str:
    return f"{value:g}"
