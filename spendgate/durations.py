"""Durations as Kubernetes-style strings ("500ms", "30s", "5m", "72h", "1h30m") or plain seconds."""

from __future__ import annotations

import re
from typing import Any

_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_MAX_MS = 366 * 86_400_000


def parse_duration(value: Any) -> int:
    """Parse a duration into milliseconds; integers are seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int):
        milliseconds = value * 1_000
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        pos, milliseconds = 0, 0
        for part in _PART.finditer(text):
            if part.start() != pos:
                break
            milliseconds += int(part[1]) * _UNIT_MS[part[2]]
            pos = part.end()
        if pos != len(text) or pos == 0:
            raise ValueError(
                f'{value!r} is not a duration (use forms like "500ms", "30s", "5m", "72h")'
            )
    else:
        raise ValueError(f'{value!r} is not a duration (use forms like "30s" or "5m")')
    if milliseconds < 0 or milliseconds > _MAX_MS:
        raise ValueError(f"{value!r} is out of range (0 to 366 days)")
    return milliseconds


def format_duration(milliseconds: int) -> str:
    if milliseconds == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        size = _UNIT_MS[unit]
        count, milliseconds = divmod(milliseconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
