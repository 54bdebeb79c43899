"""Numbers for people: durations, sizes and speeds as a person would say them."""

from __future__ import annotations

import math


def format_duration(seconds: float | None) -> str:
    """``"45 s"``, ``"3 min 20 s"``, ``"2 h 05 min"``; ``"—"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m} min {s} s" if s else f"{m} min"
    if s < 86400:
        h, rest = divmod(s, 3600)
        return f"{h} h {rest // 60:02d} min"
    d, rest = divmod(s, 86400)
    return f"{d} d {rest // 3600} h"


def format_bytes(n: float | None) -> str:
    """Decimal units, as file managers show them: ``"2.1 GB"``, ``"640 KB"``."""
    if n is None or n < 0:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_rate(steps_per_s: float | None) -> str:
    """``"1.8 it/s"``; below one step a second ``"2.4 s/it"``, which is easier to read than ``"0.42 it/s"``."""
    if not steps_per_s or not math.isfinite(steps_per_s) or steps_per_s <= 0:
        return "— it/s"
    if steps_per_s >= 1:
        return f"{steps_per_s:.1f} it/s" if steps_per_s < 100 else f"{steps_per_s:.0f} it/s"
    return f"{1 / steps_per_s:.1f} s/it"


def format_number(value: float) -> str:
    """Short, exact-enough form of a setting: ``0.0001`` → ``"0.0001"``, ``16.0`` → ``"16"``."""
    return f"{value:g}"


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else (words or word + 's')}"


def format_step_time(seconds: float | None) -> str:
    """Time of one step, where tenths matter: ``"0.42 s"``, ``"3.1 s"``, ``"1 min 5 s"``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    return format_duration(seconds)
