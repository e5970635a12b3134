"""Units for people: the one byte formatter every status line and step summary uses."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5K'``; binary units like ``df -h``."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" or n >= 100 else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")
