"""Durations ("90s", "15m", "4h", "2d") and sizes ("512KB", "50MB") as the spec writes them."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^([0-9]{1,9})([smhd])$")
_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_SIZE = re.compile(r"^([0-9]{1,12})(B|KB|MB|GB)$")
_SIZE_UNITS = {"GB": 1024**3, "MB": 1024**2, "KB": 1024, "B": 1}


def parse_duration(text: str) -> int:
    """Seconds in a spec duration; ValueError when it is not one."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 4h or 2d")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_duration(seconds: int) -> str:
    """The canonical spelling: the largest unit that divides exactly ("120m" -> "2h")."""
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    for unit, factor in _DURATION_UNITS.items():
        if seconds % factor == 0 and seconds >= factor:
            return f"{seconds // factor}{unit}"
    return "0s"


def parse_size(text: str) -> int:
    """Bytes in a spec size; ValueError when it is not one."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 512KB or 50MB")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_size(size: int) -> str:
    if size < 0:
        raise ValueError("a size cannot be negative")
    for unit, factor in _SIZE_UNITS.items():
        if size % factor == 0 and size >= factor:
            return f"{size // factor}{unit}"
    return "0B"
