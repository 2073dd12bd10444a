"""One-line texts for messages and logs: an error's first line, a duration, a list of names."""

from __future__ import annotations

from collections.abc import Sequence


def first_line(exc: BaseException) -> str:
    """An error's first line of text, or its class name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def one_line(exc: BaseException) -> str:
    """'Kind: first line' of an error, for a log line that must name what went wrong."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"


def span(seconds: float) -> str:
    """'4.2s', '45s', '12m', '2h05m'."""
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f}s"
    if seconds < 120:
        return f"{round(seconds)}s"
    minutes = round(seconds) // 60
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def names(keys: Sequence[str], shown: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more'."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
