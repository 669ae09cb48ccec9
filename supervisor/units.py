"""Parsing of operator-written quantities: durations, sizes, CPU and percentages.

Pure functions; each raises ``ValueError`` with a message that says what is allowed.
"""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")

_SIZE_UNITS = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(|k|M|G|T|Ki|Mi|Gi|Ti)B?")


def parse_duration(value: object) -> float:
    """``"90s"``, ``"2m"``, ``"1h30m"``, ``"250ms"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 90s, 2m, 1h30m or 250ms")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text and _DURATION_PART.sub("", text) == "":
            return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return float(text)
    raise ValueError("expected a duration like 90s, 2m, 1h30m or 250ms")


def parse_size(value: object) -> int:
    """``"512Mi"``, ``"2Gi"``, ``"10G"``, ``"4096"`` or an integer -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise ValueError("expected a size like 512Mi, 2Gi, 10G or a number of bytes")


def parse_cpu(value: object) -> int:
    """``"200m"``, ``"1.5"``, ``2`` (cores) -> millicores."""
    if isinstance(value, bool):
        raise ValueError("expected CPU like 200m, 0.5 or 2")
    if isinstance(value, (int, float)):
        millicores = round(float(value) * 1000)
    elif isinstance(value, str) and re.fullmatch(r"\d+m", value.strip()):
        millicores = int(value.strip()[:-1])
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        millicores = round(float(value) * 1000)
    else:
        raise ValueError("expected CPU like 200m, 0.5 or 2")
    if millicores < 1:
        raise ValueError("CPU must be at least 1m")
    return millicores


def parse_percent(value: object) -> float:
    """``"5%"`` or ``0.05`` -> a fraction between 0 and 1."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            fraction = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError("expected a percentage like 5%") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        fraction = float(value)
    else:
        raise ValueError("expected a percentage like 5%")
    if not 0 <= fraction <= 1:
        raise ValueError("a percentage must be between 0% and 100%")
    return fraction


def format_duration(seconds: float) -> str:
    """Seconds -> ``"5m12s"`` (for logs and `workspacectl`)."""
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_size(size: int) -> str:
    """Bytes -> ``"512Mi"``-style text."""
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}".replace(".0" + unit, unit)
    return f"{size}B"
